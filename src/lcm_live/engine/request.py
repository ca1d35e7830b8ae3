"""What a caller asks of the engine and what it gets back. Names follow diffusers (``mask_image`` is the name
diffusers' inpainting pipelines take); the blends and regions have no diffusers counterpart and are named here."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

MAX_REGIONS = 8  # region prompts in one request: one UNet batch of up to 8 (+1 for the base prompt)


@dataclass
class Region:
    """A region prompt: ``prompt`` is drawn where ``mask_image`` is white; the request's prompt covers the rest."""

    prompt: str
    mask_image: Any  # PIL image, white = this region (fitted to the output size when it differs)


@dataclass
class PromptBlend:
    """A second prompt: the text embeddings are ``(1 - weight) * prompt + weight * blend.prompt``."""

    prompt: str
    weight: float = 0.5  # 0: the request's prompt alone; 1: this prompt alone


@dataclass
class SeedBlend:
    """A second seed: the initial noise is the spherical interpolation (slerp) of both seeds' noises at ``weight``
    (slerp keeps the noise's norm, so every weight is a valid starting noise; a plain mix would shrink it)."""

    seed: int
    weight: float = 0.5  # 0: the request's seed alone; 1: this seed's noise


@dataclass
class GenerationRequest:
    prompt: str
    negative_prompt: str | None = None
    num_inference_steps: int = 4
    guidance_scale: float | None = None  # None: the model kind's default (full LCM 8.0, LCM-LoRA 1.0)
    seed: int | None = None  # None: a random seed, reported back in the result
    width: int | None = None  # None: the model's (or preset's) native size
    height: int | None = None
    num_images_per_prompt: int = 1
    image: Any = None  # PIL.Image.Image: the init image (image-to-image, inpainting), else None
    strength: float = 0.5  # with an init image: how far to noise it, in (0, 1]
    # With a ControlNet loaded (--controlnet): the PIL image that guides the layout (lines, edges; white on black
    # for line ControlNets), and how strongly (0 leaves the image as without it). With several ControlNets
    # (--controlnet A --controlnet B): a list of images, one per net in load order (None: that net sits out), and
    # a scale for all or a list of one per net, as diffusers' MultiControlNet pipelines take them.
    control_image: Any = None
    controlnet_conditioning_scale: float | list[float] = 1.0
    # The fraction of the steps each net acts in, [start, end), diffusers' semantics: a number for all nets or a
    # list of one per net (step i of n runs net k when start_k <= i / n and (i + 1) / n <= end_k).
    control_guidance_start: float | list[float] = 0.0
    control_guidance_end: float | list[float] = 1.0
    # With an IP-Adapter loaded (--ip-adapter): a reference image whose content and style guide the picture, and
    # how strongly (diffusers' set_ip_adapter_scale; 0 leaves the picture as without it).
    ip_adapter_image: Any = None
    ip_adapter_scale: float = 1.0
    # Inpainting (needs ``image``): white = redraw, black = keep. Pixels farther than ``mask_feather`` pixels
    # outside the white area are the init image's exactly; the band between is a linear blend.
    mask_image: Any = None
    mask_feather: int = 8
    regions: list[Region] = field(default_factory=list)  # up to MAX_REGIONS region prompts
    prompt_blend: PromptBlend | None = None
    seed_blend: SeedBlend | None = None
    output_type: str = "pil"  # "pil" or "latent"
    # Who may share cached work with this request (prompt embeddings, the init picture's encoding, the reference
    # image's embeddings): entries made under another scope are never hit, so a client cannot tell from a frame's
    # timing what another client typed or drew. The studio sets one per session (and per REST request); None:
    # shared (the CLI, benchmarks).
    cache_scope: str | None = None


@dataclass
class GenerationResult:
    images: list[Any]  # PIL images (or latents with output_type="latent")
    parameters: dict[str, Any]  # every resolved parameter (seed, size, guidance, model, LoRAs, device, dtype, ...)
    timings: dict[str, float] = field(default_factory=dict)  # seconds: text_encoder, unet, decode, total
    # Engine.generate_batch only: why this request has no image (a UserError, Cancelled, or the engine's own
    # exception); generate() raises these instead.
    error: BaseException | None = None
