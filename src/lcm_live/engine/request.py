"""What a caller asks of the engine and what it gets back. Names follow diffusers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


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
    image: Any = None  # PIL.Image.Image for image-to-image, else None
    strength: float = 0.5  # img2img only: how far to noise the init image, in (0, 1]
    # With a ControlNet loaded (--controlnet): the PIL image that guides the layout of a text-to-image run (lines,
    # edges; white on black for line ControlNets), and how strongly (0 leaves the image as without it).
    control_image: Any = None
    controlnet_conditioning_scale: float = 1.0
    output_type: str = "pil"  # "pil" or "latent"


@dataclass
class GenerationResult:
    images: list[Any]  # PIL images (or latents with output_type="latent")
    parameters: dict[str, Any]  # every resolved parameter (seed, size, guidance, model, LoRAs, device, dtype, ...)
    timings: dict[str, float] = field(default_factory=dict)  # seconds: text_encoder, unet, decode, total
    # Engine.generate_batch only: why this request has no image (a UserError, Cancelled, or the engine's own
    # exception); generate() raises these instead.
    error: BaseException | None = None
