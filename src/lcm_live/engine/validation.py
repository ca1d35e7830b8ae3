"""Checks on a GenerationRequest, at the engine's edge: one clear UserError per bad value, never a silent clamp.

Bounds: 1 to 8 steps (LCM's useful range; more steps give no better images), width/height multiples of 8 in
64..2048 (the VAE downsamples by 8), img2img strength in (0, 1] with at least one denoising step
(``num_inference_steps * strength >= 1``, except in LCM's own img2img pipeline), guidance >= 0.
"""

from __future__ import annotations

import math
from typing import Any

from lcm_live.engine import modes
from lcm_live.engine.request import GenerationRequest
from lcm_live.errors import UserError

MAX_STEPS = 8
MIN_SIZE, MAX_SIZE = 64, 2048
# One seed range everywhere (engine, CLI, studio, page): 32 bits, as most SD tools use, and exact in JavaScript
# (a 64-bit seed would not survive the page's numbers); torch.Generator.manual_seed takes any of them.
MAX_SEED = 2**32 - 1
DEFAULT_GUIDANCE = {"lcm": 8.0, "lcm-lora": 1.0}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def validate_request(request: GenerationRequest, *, lcm_img2img: bool = False) -> None:
    """The checks that do not depend on the model (run them before loading one, for fast feedback): the common
    fields here, each conditioning's in its registry entry.

    ``lcm_img2img``: the image-to-image pipeline is LCM's own (``LatentConsistencyModelImg2ImgPipeline``), which
    runs all ``num_inference_steps`` on the strength-shortened schedule (so 1 step at strength 0.5 is one UNet
    call at t ~ 500), not SD's ``steps * strength`` of them; its own bound is checked by the engine."""
    if not isinstance(request.prompt, str):
        raise UserError(f"prompt must be text, got {type(request.prompt).__name__}", field="prompt")
    if request.negative_prompt is not None and not isinstance(request.negative_prompt, str):
        raise UserError("negative_prompt must be text", field="negative_prompt")
    steps = request.num_inference_steps
    if not _is_int(steps) or not 1 <= steps <= MAX_STEPS:
        raise UserError(f"num_inference_steps={steps!r}: use a whole number from 1 to {MAX_STEPS} "
                        "(LCMs are made for 1 to 8 steps; 4 is a good default)", field="num_inference_steps")
    for name in ("width", "height"):
        value = getattr(request, name)
        if value is None:
            continue
        if not _is_int(value) or not MIN_SIZE <= value <= MAX_SIZE or value % 8:
            raise UserError(f"{name}={value!r}: use a multiple of 8 from {MIN_SIZE} to {MAX_SIZE} (e.g. 512)",
                            field=name)
    g = request.guidance_scale
    if g is not None and (not _is_number(g) or g < 0):
        raise UserError(f"guidance_scale={g!r}: use a number >= 0 (full LCM: about 3 to 13; LCM-LoRA: 1 to 2)",
                        field="guidance_scale")
    seed = request.seed
    if seed is not None and (not _is_int(seed) or not 0 <= seed <= MAX_SEED):
        raise UserError(f"seed={seed!r}: use a whole number from 0 to {MAX_SEED} (2**32-1), or leave it out for a "
                        "random one", field="seed")
    n = request.num_images_per_prompt
    if not _is_int(n) or n < 1:
        raise UserError(f"num_images_per_prompt={n!r}: use a whole number >= 1", field="num_images_per_prompt")
    if request.output_type not in ("pil", "latent"):
        raise UserError(f"output_type={request.output_type!r}: use 'pil' or 'latent'", field="output_type")
    # The conditionings' own checks (init image, mask, regions, blends: engine/modes.py); the ControlNets' and
    # the IP-Adapter's need the model: the engine runs modes.check with its ModelCaps.
    modes.check(request, modes.ModelCaps(lcm_img2img=lcm_img2img), model_checks=False)


def resolve_guidance(request: GenerationRequest, kind: str) -> tuple[float, bool]:
    """The guidance scale to use and whether classifier-free guidance (two UNet passes) runs.

    Full LCM: guidance is distilled into a w-embedding (diffusers feeds w = guidance_scale - 1), one UNet pass,
    no negative prompt. LCM-LoRA: plain CFG, which runs only when guidance_scale > 1.
    """
    g = float(request.guidance_scale) if request.guidance_scale is not None else DEFAULT_GUIDANCE[kind]
    negative = (request.negative_prompt or "").strip()
    if kind == "lcm":
        if negative:
            raise UserError("negative_prompt: a full LCM has guidance distilled into its w-embedding and runs no "
                            "classifier-free guidance, so a negative prompt has no effect; remove it, or use a plain "
                            "SD model with an LCM-LoRA and --guidance-scale above 1", field="negative_prompt")
        return g, False
    do_cfg = g > 1
    if negative and not do_cfg:
        raise UserError(f"negative_prompt needs classifier-free guidance, which LCM-LoRA runs only when "
                        f"guidance_scale > 1 (it is {g:g}); raise --guidance-scale above 1 (e.g. 1.5) or drop "
                        "the negative prompt", field="negative_prompt")
    return g, do_cfg


def check_lcm_img2img_schedule(scheduler: Any, request: GenerationRequest) -> None:
    """LCM's own image-to-image picks all its steps from the first ``original_inference_steps * strength`` points of
    LCM's skipping schedule (50 points over 1000 timesteps): there must be enough of them."""
    original = int(getattr(scheduler.config, "original_inference_steps", 50) or 50)
    available = int(original * request.strength)
    if available < request.num_inference_steps:
        raise UserError(
            f"strength={request.strength} with num_inference_steps={request.num_inference_steps}: this LCM takes its "
            f"steps from {available} of its {original} schedule points at that strength; raise strength to at least "
            f"{request.num_inference_steps / original:.3g} or use at most {max(available, 1)} steps",
            field="strength")


def resolve_size(request: GenerationRequest, native_width: int, native_height: int) -> tuple[int, int]:
    """Text-to-image: the model's native size where not given. Image-to-image: the init image's size (to a
    multiple of 8, as diffusers' preprocessing does), or its aspect ratio when only one side is given."""
    if request.image is None or (request.width and request.height):
        return request.width or native_width, request.height or native_height
    iw, ih = request.image.size
    if request.width:
        width, height = request.width, _multiple_of_8(request.width * ih / iw)
    elif request.height:
        width, height = _multiple_of_8(request.height * iw / ih), request.height
    else:
        width, height = iw // 8 * 8, ih // 8 * 8
    if not (MIN_SIZE <= width <= MAX_SIZE and MIN_SIZE <= height <= MAX_SIZE):
        raise UserError(f"the init image is {iw}x{ih}, which gives {width}x{height}; pass width and height "
                        f"(multiples of 8 from {MIN_SIZE} to {MAX_SIZE}) to resize it", field="image")
    return width, height


def _multiple_of_8(value: float) -> int:
    return max(8, int(round(value / 8)) * 8)


def prepare_init_image(image: Any, width: int, height: int) -> Any:
    """RGB at exactly width x height (a plain resize, as diffusers' own preprocessing does by default)."""
    from PIL import Image

    image = image.convert("RGB")
    if image.size != (width, height):
        image = image.resize((width, height), Image.LANCZOS)
    return image
