"""Upscaling a kept frame with the same LCM: tiled image-to-image with feathered blending.

The recipe (Ultimate-SD-Upscale's idea, on the engine's own img2img):

1. check the target size (``scale`` 2 or 4) against the pixel cap, before any work;
2. resize the frame up with Lanczos (or with an ESRGAN-family model first: engine/esrgan.py);
3. cut the result into square tiles of the model's native size that overlap by ``tile_overlap`` pixels (edge
   padding where the image is smaller than a tile or not a multiple of 8), evenly spaced;
4. run each tile through image-to-image at a low strength (0.3: details are redrawn, the layout is kept) with the
   frame's own prompt and seed; one :class:`TileEvent` per tile carries progress (and cancellation: raise
   :class:`~lcm_live.engine.hooks.Cancelled` from the callback);
5. blend the tiles back with feathered weights: each tile's weight rises (smoothstep) from ~0 at an edge it shares
   with a neighbour to 1 at ``tile_overlap`` pixels inside, and every pixel is the weighted mean of the tiles over
   it, so no tile border shows as a seam (tests/engine/test_upscale.py measures it).

The tile runner is a function (``tile_fn(tile_image, index) -> (image, parameters)``), so the studio runs the
same recipe with each tile as a job on its worker, between live frames (studio/upscale_route.py).
"""

from __future__ import annotations

import dataclasses
import math
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lcm_live.engine.request import GenerationRequest
from lcm_live.errors import UserError

SCALES = (2, 4)
DEFAULT_MAX_PIXELS = 4096 * 4096  # the output's width * height at most, by default (a setting: --max-pixels)
DEFAULT_STRENGTH = 0.3  # low: the tiles keep the upscaled frame's layout and colours, the LCM redraws detail
MIN_OVERLAP = 8


@dataclass
class TileEvent:
    """Progress: ``tile`` of ``tiles`` (1-based) is done; ``image`` is that tile's output (PIL)."""

    tile: int
    tiles: int
    image: Any = None


TileCallback = Callable[[TileEvent], None]
TileFn = Callable[[Any, int], tuple[Any, dict[str, Any]]]


@dataclass
class UpscaleRequest:
    """What to upscale and how. ``None`` fields come from the frame's own parameters (its PNG chunks), then from
    the model's defaults."""

    image: Any  # PIL image: the kept frame
    scale: int = 2  # 2 or 4
    prompt: str = ""
    negative_prompt: str | None = None
    seed: int | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    strength: float | None = None  # None: default_strength (0.3, or 1 / steps for SD-style img2img)
    tile_size: int | None = None  # pixels, a multiple of 8; None: the model's native size
    tile_overlap: int | None = None  # pixels; None: a quarter of the tile


def check_scale(scale: Any, width: int, height: int, max_pixels: int) -> tuple[int, int]:
    """The output size for ``scale``; one clear error for a scale that is not 2 or 4, or past the pixel cap."""
    if isinstance(scale, bool) or scale not in SCALES:
        raise UserError(f"scale={scale!r}: use 2 or 4 (--scale 2|4)", field="scale")
    out_w, out_h = width * scale, height * scale
    if out_w * out_h > max_pixels:
        side = math.isqrt(max_pixels)
        fits = [s for s in SCALES if width * s * height * s <= max_pixels]
        fix = f"use --scale {fits[-1]}" if fits else "start from a smaller image"
        raise UserError(f"--scale {scale} makes {width}x{height} into {out_w}x{out_h} = {out_w * out_h} pixels, "
                        f"past the pixel cap of {max_pixels} (about {side}x{side}): {fix}, or raise the cap "
                        "(--max-pixels; the studio's max_upscale_pixels)", field="scale")
    return out_w, out_h


def default_strength(num_inference_steps: int, lcm_img2img: bool) -> float:
    """DEFAULT_STRENGTH; where img2img runs ``steps * strength`` steps (SD's pipelines: LCM-LoRA models), at least
    enough for one step (2 steps: 0.5)."""
    if lcm_img2img:
        return DEFAULT_STRENGTH
    return max(DEFAULT_STRENGTH, math.ceil(100 / num_inference_steps) / 100)


def resolve_tiling(tile_size: int | None, tile_overlap: int | None, native: int) -> tuple[int, int]:
    """(tile, overlap) in pixels: the tile a multiple of 8 of at least 64, the overlap from 8 to half the tile."""
    default = max(64, native // 8 * 8)
    tile = default if tile_size is None else tile_size
    if isinstance(tile, bool) or not isinstance(tile, int) or tile < 64 or tile % 8:
        raise UserError(f"tile_size={tile_size!r}: use a multiple of 8 from 64 (default: the model's native size, "
                        f"{default})", field="tile_size")
    overlap = max(MIN_OVERLAP, tile // 4 // 8 * 8) if tile_overlap is None else tile_overlap
    if isinstance(overlap, bool) or not isinstance(overlap, int) or not MIN_OVERLAP <= overlap <= tile // 2:
        raise UserError(f"tile_overlap={tile_overlap!r}: use {MIN_OVERLAP} to {tile // 2} pixels (half the tile) "
                        f"for tiles of {tile}", field="tile_overlap")
    return tile, overlap


def _starts(length: int, tile: int, overlap: int) -> list[int]:
    """Tile starts along one axis of ``length >= tile`` pixels: evenly spaced, neighbours sharing >= overlap."""
    if length <= tile:
        return [0]
    n = math.ceil((length - overlap) / (tile - overlap))
    return [round(i * (length - tile) / (n - 1)) for i in range(n)]


def plan_tiles(width: int, height: int, tile: int, overlap: int) -> tuple[tuple[int, int], list[tuple[int, int, int, int]]]:
    """The padded canvas size (at least a tile, a multiple of 8 on each side) and the tile boxes (x0, y0, x1, y1)
    over it, row by row."""
    pw, ph = max(tile, -(-width // 8) * 8), max(tile, -(-height // 8) * 8)
    boxes = [(x, y, x + tile, y + tile) for y in _starts(ph, tile, overlap) for x in _starts(pw, tile, overlap)]
    return (pw, ph), boxes


def feather_weights(box: tuple[int, int, int, int], size: tuple[int, int], overlap: int) -> Any:
    """A tile's blending weights (h, w) float32 in (0, 1]: a smoothstep ramp over ``overlap`` pixels on each side
    that lies inside the canvas (a neighbour's side), 1 elsewhere; never 0, so every pixel has some weight."""
    import numpy as np

    x0, y0, x1, y1 = box
    t = (np.arange(overlap, dtype=np.float32) + 0.5) / overlap  # (overlap,) from ~0 to ~1
    ramp = t * t * (3 - 2 * t)  # smoothstep

    def axis(start: int, end: int, length: int) -> Any:
        w = np.ones(end - start, dtype=np.float32)
        if start > 0:
            w[:overlap] = np.minimum(w[:overlap], ramp)
        if end < length:
            w[-overlap:] = np.minimum(w[-overlap:], ramp[::-1])
        return w

    return axis(y0, y1, size[1])[:, None] * axis(x0, x1, size[0])[None, :]


def blend_tiles(size: tuple[int, int], boxes: list[tuple[int, int, int, int]], tiles: list[Any], overlap: int) -> Any:
    """The canvas (PIL RGB, ``size``) as the feather-weighted mean of ``tiles`` (PIL, one per box)."""
    import numpy as np
    from PIL import Image

    acc = np.zeros((size[1], size[0], 3), dtype=np.float32)
    total = np.zeros((size[1], size[0], 1), dtype=np.float32)
    for box, tile in zip(boxes, tiles, strict=True):
        x0, y0, x1, y1 = box
        w = feather_weights(box, size, overlap)[:, :, None]
        acc[y0:y1, x0:x1] += np.asarray(tile.convert("RGB"), dtype=np.float32) * w
        total[y0:y1, x0:x1] += w
    out = np.clip(np.rint(acc / total), 0, 255).astype(np.uint8)
    return Image.fromarray(out, "RGB")


def pad_edges(image: Any, size: tuple[int, int]) -> Any:
    """``image`` on a ``size`` canvas, its last row and column repeated into the padding (no new edge for the
    model to draw)."""
    import numpy as np
    from PIL import Image

    a = np.asarray(image.convert("RGB"))
    h, w = a.shape[:2]
    return Image.fromarray(np.pad(a, ((0, size[1] - h), (0, size[0] - w), (0, 0)), mode="edge"), "RGB")


def refine_tiled(image: Any, tile_fn: TileFn, *, tile: int, overlap: int,
                 callback: TileCallback | None = None) -> tuple[Any, list[dict[str, Any]], int]:
    """Steps 3 to 5 on an image already at the output size: (the refined image, each tile's parameters, tiles)."""
    width, height = image.size
    size, boxes = plan_tiles(width, height, tile, overlap)
    canvas = pad_edges(image, size) if size != image.size else image.convert("RGB")
    outputs, parameters = [], []
    for index, box in enumerate(boxes):
        out, params = tile_fn(canvas.crop(box), index)
        if out.size != (tile, tile):
            raise RuntimeError(f"tile {index}: the engine returned {out.size[0]}x{out.size[1]} for {tile}x{tile}")
        outputs.append(out)
        parameters.append(params)
        if callback is not None:
            callback(TileEvent(tile=index + 1, tiles=len(boxes), image=out))
    blended = blend_tiles(size, boxes, outputs, overlap)
    return (blended.crop((0, 0, width, height)) if size != (width, height) else blended), parameters, len(boxes)


def frame_request(request: UpscaleRequest, frame: dict[str, Any]) -> UpscaleRequest:
    """``request`` with its unset fields (None, or an empty prompt) from the frame's own parameters."""
    def pick(name: str, value: Any, kind: type | tuple[type, ...]) -> Any:
        own = frame.get(name)
        return value if value is not None or not isinstance(own, kind) or isinstance(own, bool) else own

    return dataclasses.replace(
        request,
        prompt=request.prompt or (frame.get("prompt") if isinstance(frame.get("prompt"), str) else ""),
        negative_prompt=pick("negative_prompt", request.negative_prompt, str),
        seed=pick("seed", request.seed, int),
        num_inference_steps=pick("num_inference_steps", request.num_inference_steps, int),
        guidance_scale=pick("guidance_scale", request.guidance_scale, (int, float)),
    )


def engine_tile_fn(engine: Any, request: UpscaleRequest, tile: int, *,
                   should_stop: Callable[[], str | None] | None = None) -> TileFn:
    """Each tile through ``engine.generate`` as image-to-image at ``request.strength``, with its prompt and seed."""
    def run(tile_image: Any, index: int) -> tuple[Any, dict[str, Any]]:
        r = GenerationRequest(prompt=request.prompt, negative_prompt=request.negative_prompt,
                              num_inference_steps=request.num_inference_steps, guidance_scale=request.guidance_scale,
                              seed=request.seed, width=tile, height=tile, image=tile_image, strength=request.strength)
        if r.num_inference_steps is None:
            r = dataclasses.replace(r, num_inference_steps=engine.info.default_num_inference_steps)
        result = engine.generate(r, should_stop=should_stop)
        return result.images[0], result.parameters

    return run


def upscale(engine: Any, request: UpscaleRequest, *, frame: dict[str, Any] | None = None,
            max_pixels: int = DEFAULT_MAX_PIXELS, upscaler: Any = None, refine: bool = True,
            callback: TileCallback | None = None, should_stop: Callable[[], str | None] | None = None,
            tile_fn: TileFn | None = None) -> tuple[Any, dict[str, Any]]:
    """The recipe above: (the upscaled PIL image, its parameters). ``frame``: the kept frame's parameters (its PNG
    chunks), which fill the request's unset fields and are carried over; ``upscaler``: a loaded ESRGAN-family
    model (engine/esrgan.py) for step 2, and ``refine=False`` to stop there. ``engine`` may be None without
    refinement; ``tile_fn`` replaces the engine's tile runner (the studio's worker jobs)."""
    from PIL import Image

    frame = dict(frame or {})
    request = frame_request(request, frame)
    if request.seed is None:  # one seed for every tile (and recorded), not one each
        request = dataclasses.replace(request, seed=secrets.randbits(32))
    # 1. The cap and the tiling first: nothing runs for a request that cannot finish.
    width, height = request.image.size
    out_w, out_h = check_scale(request.scale, width, height, max_pixels)
    if not refine and upscaler is None:
        raise UserError("refine=False leaves nothing to do without an upscaler: give --upscaler PATH.safetensors "
                        "or drop --no-refine", field="upscaler")
    if refine:
        if engine is None and tile_fn is None:
            raise ValueError("refining needs an engine or a tile_fn")
        native = min(engine.info.native_width, engine.info.native_height) if engine is not None else 512
        tile, overlap = resolve_tiling(request.tile_size, request.tile_overlap, native)
        if request.strength is None:
            steps = request.num_inference_steps or (engine.info.default_num_inference_steps if engine else 4)
            request = dataclasses.replace(request, strength=default_strength(
                steps, bool(engine.lcm_img2img) if engine is not None else True))
        if not (isinstance(request.strength, (int, float)) and 0 < request.strength <= 1):
            raise UserError(f"strength={request.strength!r}: use a number in (0, 1]; about 0.2 to 0.4 keeps the "
                            "frame and redraws its detail", field="strength")
    # 2. Up to the output size: Lanczos, or the ESRGAN model (then Lanczos to the exact size if its scale differs).
    warnings: list[str] = []
    method = "lanczos"
    image = request.image.convert("RGB")
    if upscaler is not None:
        from lcm_live.engine.esrgan import run_upscaler

        image = run_upscaler(upscaler, image)
        method = "esrgan"
        if image.size != (out_w, out_h):
            warnings.append(f"the upscaler is {upscaler.scale}x: its {image.size[0]}x{image.size[1]} was resized "
                            f"to {out_w}x{out_h} (--scale {request.scale})")
    if image.size != (out_w, out_h):
        image = image.resize((out_w, out_h), Image.Resampling.LANCZOS)
    # 3-5. Tiled image-to-image, blended back.
    upscale_info: dict[str, Any] = {"scale": request.scale, "method": method, "source_width": width,
                                    "source_height": height}
    if upscaler is not None:
        upscale_info["upscaler"] = upscaler.name
    parameters = {**frame}
    if refine:
        run = tile_fn or engine_tile_fn(engine, request, tile, should_stop=should_stop)
        image, tile_params, tiles = refine_tiled(image, run, tile=tile, overlap=overlap, callback=callback)
        upscale_info.update(method=f"{method}+lcm-tiled", tile_size=tile, tile_overlap=overlap, tiles=tiles,
                            strength=request.strength)
        last = tile_params[-1]
        for p in tile_params:
            warnings += [w for w in p.get("warnings", []) if w not in warnings]
        # The run's own resolved values (model, seed, steps, guidance, device, ...) over the frame's.
        parameters.update({k: v for k, v in last.items() if k not in ("width", "height", "strength", "mode",
                                                                      "warnings", "image_index")})
    parameters.update(width=out_w, height=out_h, upscale=upscale_info)
    parameters.pop("warnings", None)  # the frame's were about its own run
    if warnings:
        parameters["warnings"] = warnings
    return image, parameters
