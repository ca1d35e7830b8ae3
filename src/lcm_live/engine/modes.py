"""The conditionings a generation composes, declared once: validation, the mode name, the batch key, the
parameter schema (studio) and the CLI flags are all read from :data:`CONDITIONINGS`.

A request's mode is the set of conditionings it uses besides text: an init image (``img2img``), a mask over it
(``inpaint``), a control image (``control``; one per net with several ControlNets), a reference image
(``ip_adapter``), region prompts (``regions``); blends change inputs, not the mode.
Adding a conditioning means one entry here and its few lines in engine/generation.py.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable
from dataclasses import asdict, dataclass, field
from typing import Any

from lcm_live.engine.masks import MAX_FEATHER
from lcm_live.engine.request import MAX_REGIONS, GenerationRequest
from lcm_live.errors import UserError


@dataclass(frozen=True)
class Param:
    """One request field: diffusers' name where it has one, its JSON type and bounds, its CLI flag."""

    name: str
    type: str  # "string", "integer", "number", "image", or "object"/"array" for the structured ones
    description: str
    default: Any = None
    minimum: float | None = None
    maximum: float | None = None
    flag: str | None = None  # `lcm-live generate` flag
    fields: dict[str, str] = field(default_factory=dict)  # "object"/"array" items: field -> type
    # One value per ControlNet (a list in the request, in load order; a repeatable CLI flag); a single value
    # stands for all nets, except images, which take a list as soon as there are several nets.
    per_controlnet: bool = False


@dataclass(frozen=True)
class ModelCaps:
    """What the loaded model offers, as validation needs it."""

    controlnet: str | None = None  # the ControlNet's name (the first's with several), None without one
    controlnets: int | None = None  # how many ControlNets (None: 1 with ``controlnet``, else 0)
    ip_adapter: str | None = None  # the IP-Adapter's name, None without one
    lcm_img2img: bool = False  # img2img as LCM's own pipeline (all steps run whatever the strength)

    @property
    def n_controlnets(self) -> int:
        return self.controlnets if self.controlnets is not None else int(self.controlnet is not None)


@dataclass(frozen=True)
class Conditioning:
    name: str
    label: str | None  # its part of the mode name
    params: tuple[Param, ...]
    active: Callable[[GenerationRequest], bool]
    check: Callable[[GenerationRequest, ModelCaps], None]  # raises UserError naming the field
    key: Callable[[GenerationRequest], tuple] = lambda r: ()  # what requests in one batched call share
    needs_controlnet: bool = False
    needs_ip_adapter: bool = False


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_image(value: Any) -> bool:
    return hasattr(value, "convert") and hasattr(value, "size")


def _check_init(request: GenerationRequest, caps: ModelCaps) -> None:
    s, steps = request.strength, request.num_inference_steps
    if not _is_number(s) or not 0 < s <= 1:
        raise UserError(f"strength={s!r}: use a number in (0, 1] (how far to move away from the init image)",
                        field="strength")
    if not caps.lcm_img2img and steps * s < 1 - 1e-9:
        raise UserError(f"strength={s} with num_inference_steps={steps} runs no denoising step "
                        f"(steps * strength = {steps * s:.2f} < 1); raise strength to at least {1 / steps:.3g} "
                        "or use more steps", field="strength")
    if not _is_image(request.image):
        raise UserError("image must be a PIL image (the init image for image-to-image)", field="image")


def per_net(value: Any, n: int) -> list[Any]:
    """A per-ControlNet value as a list of ``n`` (a single value stands for all nets)."""
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


def _check_per_net(request: GenerationRequest, name: str, n: int) -> list[Any]:
    value = getattr(request, name)
    if isinstance(value, (list, tuple)) and len(value) != n:
        raise UserError(f"{name}: {len(value)} values for {n} ControlNet{'s' * (n != 1)}; give one per ControlNet "
                        "(in the order they were loaded) or a single value for all", field=name)
    return per_net(value, n)


def _check_control(request: GenerationRequest, caps: ModelCaps) -> None:
    n = caps.n_controlnets
    if n == 0:
        raise UserError("control_image needs a ControlNet: load one with --controlnet (a hub id, a diffusers "
                        "ControlNet folder or a .safetensors file), or drop the control image", field="control_image")
    images = request.control_image
    if isinstance(images, (list, tuple)):
        if len(images) != n or not any(image is not None for image in images):
            raise UserError(f"control_image: {len(images)} images for {n} ControlNet{'s' * (n != 1)}; give one per "
                            "ControlNet, in the order they were loaded (None leaves that net out), at least one "
                            "image", field="control_image")
    elif n > 1:
        raise UserError(f"control_image: {n} ControlNets are loaded; give a list of {n} images, one per ControlNet "
                        "in the order they were loaded (None leaves that net out)", field="control_image")
    else:
        images = [images]
    if not all(image is None or _is_image(image) for image in images):
        raise UserError("control_image must be a PIL image" + (" (or None) per ControlNet" if n > 1 else ""),
                        field="control_image")
    for scale in _check_per_net(request, "controlnet_conditioning_scale", n):
        if not _is_number(scale) or scale < 0:
            raise UserError(f"controlnet_conditioning_scale={scale!r}: use a number >= 0 (1.0 is the usual strength, "
                            "0 turns the ControlNet off)", field="controlnet_conditioning_scale")
    starts = _check_per_net(request, "control_guidance_start", n)
    ends = _check_per_net(request, "control_guidance_end", n)
    for start, end in zip(starts, ends, strict=True):
        if not _is_number(start) or not 0 <= start < 1:
            raise UserError(f"control_guidance_start={start!r}: use a number in [0, 1) (the fraction of the steps "
                            "after which the ControlNet starts)", field="control_guidance_start")
        if not _is_number(end) or not start < end <= 1:
            raise UserError(f"control_guidance_end={end!r}: use a number in ({start}, 1], above "
                            f"control_guidance_start={start} (the fraction of the steps after which the ControlNet "
                            "stops)", field="control_guidance_end")


def _check_ip_adapter(request: GenerationRequest, caps: ModelCaps) -> None:
    if caps.ip_adapter is None:
        raise UserError("ip_adapter_image needs an IP-Adapter: load one with --ip-adapter (a .safetensors file with "
                        "its image_encoder folder beside it), or drop the reference image", field="ip_adapter_image")
    if not _is_image(request.ip_adapter_image):
        raise UserError("ip_adapter_image must be a PIL image (the reference image)", field="ip_adapter_image")
    scale = request.ip_adapter_scale
    if not _is_number(scale) or not 0 <= scale <= 2:
        raise UserError(f"ip_adapter_scale={scale!r}: use a number from 0 to 2 (1.0 follows the reference image "
                        "closely, 0.5 blends it with the prompt, 0 ignores it)", field="ip_adapter_scale")


def _check_mask(request: GenerationRequest, caps: ModelCaps) -> None:
    if request.image is None:
        raise UserError("mask_image needs an init image (image): the mask says which part of it to redraw",
                        field="mask_image")
    if not _is_image(request.mask_image):
        raise UserError("mask_image must be an image (white = redraw, black = keep)", field="mask_image")
    f = request.mask_feather
    if not isinstance(f, int) or isinstance(f, bool) or not 0 <= f <= MAX_FEATHER:
        raise UserError(f"mask_feather={f!r}: use a whole number of pixels from 0 to {MAX_FEATHER}",
                        field="mask_feather")


def _check_regions(request: GenerationRequest, caps: ModelCaps) -> None:
    regions = request.regions
    if not isinstance(regions, list) or len(regions) > MAX_REGIONS:
        n = len(regions) if isinstance(regions, list) else regions
        raise UserError(f"regions: {n} given; use at most {MAX_REGIONS} region prompts", field="regions")
    for k, region in enumerate(regions):
        if not isinstance(getattr(region, "prompt", None), str) or not region.prompt.strip():
            raise UserError(f"regions[{k}].prompt is empty: give each region the prompt to draw there",
                            field=f"regions[{k}].prompt")
        if not _is_image(getattr(region, "mask_image", None)):
            raise UserError(f"regions[{k}].mask_image must be an image (white = this region)",
                            field=f"regions[{k}].mask_image")


def _check_weight(name: str, weight: Any) -> None:
    if not _is_number(weight) or not 0 <= weight <= 1:
        raise UserError(f"{name}.weight={weight!r}: use a number from 0 to 1", field=f"{name}.weight")


def _check_prompt_blend(request: GenerationRequest, caps: ModelCaps) -> None:
    blend = request.prompt_blend
    if not isinstance(getattr(blend, "prompt", None), str):
        raise UserError("prompt_blend.prompt must be text", field="prompt_blend.prompt")
    _check_weight("prompt_blend", blend.weight)


def _check_seed_blend(request: GenerationRequest, caps: ModelCaps) -> None:
    from lcm_live.engine.validation import MAX_SEED

    seed = getattr(request.seed_blend, "seed", None)
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= MAX_SEED:
        raise UserError(f"seed_blend.seed={seed!r}: use a whole number from 0 to {MAX_SEED}", field="seed_blend.seed")
    _check_weight("seed_blend", request.seed_blend.weight)


CONDITIONINGS: tuple[Conditioning, ...] = (
    Conditioning(
        "init_image", "img2img",
        (Param("image", "image", "init image: image-to-image", flag="--image"),
         Param("strength", "number", "with an init image: how far to move from it, in (0, 1]", 0.5, 0.0, 1.0,
               flag="--strength")),
        active=lambda r: r.image is not None, check=_check_init,
        key=lambda r: (r.strength, None if (r.width and r.height) else tuple(getattr(r.image, "size", ())))),
    Conditioning(
        "control_image", "control",
        (Param("control_image", "image", "with a ControlNet: the image that guides the layout (white lines on "
                                         "black for line ControlNets)", flag="--control-image", per_controlnet=True),
         Param("controlnet_conditioning_scale", "number", "how strongly the control image guides, >= 0", 1.0, 0.0,
               flag="--controlnet-conditioning-scale", per_controlnet=True),
         Param("control_guidance_start", "number", "the fraction of the steps after which the ControlNet starts "
                                                   "acting, in [0, 1)", 0.0, 0.0, 1.0,
               flag="--control-guidance-start", per_controlnet=True),
         Param("control_guidance_end", "number", "the fraction of the steps after which it stops, in (start, 1]",
               1.0, 0.0, 1.0, flag="--control-guidance-end", per_controlnet=True)),
        active=lambda r: r.control_image is not None, check=_check_control,
        key=lambda r: (_hashable(r.controlnet_conditioning_scale), _hashable(r.control_guidance_start),
                       _hashable(r.control_guidance_end),
                       tuple(i is None for i in r.control_image) if isinstance(r.control_image, list) else ()),
        needs_controlnet=True),
    Conditioning(
        "ip_adapter_image", "ip_adapter",
        (Param("ip_adapter_image", "image", "with an IP-Adapter: the reference image whose content and style guide "
                                            "the picture", flag="--ip-adapter-image"),
         Param("ip_adapter_scale", "number", "how strongly the reference image guides, 0 to 2", 1.0, 0.0, 2.0,
               flag="--ip-adapter-scale")),
        active=lambda r: r.ip_adapter_image is not None, check=_check_ip_adapter,
        key=lambda r: (r.ip_adapter_scale,), needs_ip_adapter=True),
    Conditioning(
        "mask", "inpaint",
        (Param("mask_image", "image", "with an init image: white = redraw, black = keep", flag="--mask"),
         Param("mask_feather", "integer", "pixels over which the redrawn area fades into the init image", 8, 0,
               MAX_FEATHER,
               flag="--mask-feather")),
        active=lambda r: r.mask_image is not None, check=_check_mask),
    Conditioning(
        "regions", "regions",
        (Param("regions", "array", f"up to {MAX_REGIONS} region prompts, each drawn where its mask is white; the "
                                   "prompt covers the rest", [], 0, MAX_REGIONS, flag="--region",
               fields={"prompt": "string", "mask_image": "image"}),),
        active=lambda r: bool(r.regions), check=_check_regions),
    Conditioning(
        "prompt_blend", None,
        (Param("prompt_blend", "object", "a second prompt and its weight in [0, 1]: the text embeddings "
                                         "interpolated", flag="--prompt-blend",
               fields={"prompt": "string", "weight": "number"}),),
        active=lambda r: r.prompt_blend is not None, check=_check_prompt_blend),
    Conditioning(
        "seed_blend", None,
        (Param("seed_blend", "object", "a second seed and its weight in [0, 1]: the starting noises slerped",
               flag="--seed-blend", fields={"seed": "integer", "weight": "number"}),),
        active=lambda r: r.seed_blend is not None, check=_check_seed_blend),
)
BY_NAME = {c.name: c for c in CONDITIONINGS}


def _hashable(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def active(request: GenerationRequest) -> list[Conditioning]:
    return [c for c in CONDITIONINGS if c.active(request)]


def mode_name(request: GenerationRequest) -> str:
    """``txt2img``, or the labels of the conditionings in use joined by ``+`` (``inpaint`` stands for
    ``img2img`` with a mask): ``img2img``, ``control``, ``inpaint+control``, ``regions``, ..."""
    labels = [c.label for c in active(request) if c.label]
    if "inpaint" in labels:  # in img2img's place
        labels.remove("inpaint")
        labels[labels.index("img2img")] = "inpaint"
    return "+".join(labels) or "txt2img"


def check(request: GenerationRequest, caps: ModelCaps, *, model_checks: bool = True) -> None:
    """Every active conditioning's checks, in the registry's order (the first problem is raised);
    ``model_checks=False`` leaves out those that need the model (a ControlNet, an IP-Adapter), for checks before
    loading it."""
    for conditioning in active(request):
        if model_checks or not (conditioning.needs_controlnet or conditioning.needs_ip_adapter):
            conditioning.check(request, caps)


def batch_key(request: GenerationRequest) -> Hashable | None:
    """What must be equal for two requests to share one call, from the request as given (before the engine
    resolves defaults); None when the request is never batched (``num_images_per_prompt > 1``, region prompts:
    each request's region windows are its own)."""
    if request.num_images_per_prompt != 1 or request.regions:
        return None
    parts = call_key(request)  # blends are per member
    return (mode_name(request), request.width, request.height, request.num_inference_steps,
            request.guidance_scale, request.output_type, parts)


def call_key(request: GenerationRequest) -> tuple:
    """The conditionings' part of a batch key (scales, ControlNet steps, which nets act): hashable."""
    return tuple((c.name, c.key(request)) for c in active(request) if c.label)


def param_schema(caps: ModelCaps | None = None) -> list[dict[str, Any]]:
    """The conditionings' parameters as plain dicts (name, type, description, default, bounds, flag, fields,
    conditioning), those needing a ControlNet (an IP-Adapter) only when ``caps`` has one: what a page builds its
    controls from. ``per_controlnet`` params take a list of ``caps.n_controlnets`` values."""
    caps = caps or ModelCaps()
    out = []
    for c in CONDITIONINGS:
        if (c.needs_controlnet and caps.n_controlnets == 0) or (c.needs_ip_adapter and caps.ip_adapter is None):
            continue
        out += [{**asdict(p), "conditioning": c.name} for p in c.params]
    return out
