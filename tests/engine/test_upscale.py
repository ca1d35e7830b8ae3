"""Tiled LCM upscaling (engine/upscale.py): no visible seam, progress per tile, the pixel cap, the frame's own
parameters carried over."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from lcm_live.engine.upscale import (
    UpscaleRequest,
    blend_tiles,
    check_scale,
    feather_weights,
    plan_tiles,
    resolve_tiling,
    upscale,
)
from lcm_live.errors import UserError


def smooth_image(width: int = 64, height: int = 64) -> Image.Image:
    """Gradients in all three channels: no edge anywhere, so any edge in an upscale of it is the upscaler's."""
    yy, xx = np.mgrid[0:height, 0:width]
    xx, yy = xx / (width - 1), yy / (height - 1)
    return Image.fromarray((np.stack([xx, yy, 1 - xx * yy], -1) * 255).astype(np.uint8), "RGB")


def line_differences(image: Image.Image, boxes) -> tuple[list[float], list[float]]:
    """Mean absolute difference between neighbouring columns (and rows): at the tiles' borders, and in the
    interior (lines at least 3 px from any border)."""
    a = np.asarray(image, dtype=np.float32)
    h, w = a.shape[:2]
    cuts_x = {b[0] for b in boxes if b[0] > 0} | {b[2] for b in boxes if b[2] < w}
    cuts_y = {b[1] for b in boxes if b[1] > 0} | {b[3] for b in boxes if b[3] < h}
    dx = np.abs(np.diff(a, axis=1)).mean(axis=(0, 2))  # dx[k]: between columns k and k + 1
    dy = np.abs(np.diff(a, axis=0)).mean(axis=(1, 2))
    border = [float(dx[c - 1]) for c in cuts_x] + [float(dy[c - 1]) for c in cuts_y]
    interior = [float(d) for k, d in enumerate(dx) if all(abs(k + 1 - c) > 2 for c in cuts_x)]
    interior += [float(d) for k, d in enumerate(dy) if all(abs(k + 1 - c) > 2 for c in cuts_y)]
    return border, interior


@pytest.fixture(scope="module")
def shapes():
    """builtin:shapes (a small trained LCM, native 64 px): its tiles are pictures, not random noise, so a seam
    between two of them would show."""
    from lcm_live.config import EngineSettings
    from lcm_live.engine.pipeline import Engine

    return Engine.from_settings(EngineSettings(model="builtin:shapes", device="cpu", dtype="float32",
                                               backend="torch"), progress=False)


def test_no_visible_seam_across_tile_borders(shapes):
    tiles = []
    out, params = upscale(shapes, UpscaleRequest(smooth_image(), scale=2, prompt="a smooth gradient", seed=1,
                                                 num_inference_steps=2),
                          callback=lambda e: tiles.append(e))
    u = params["upscale"]
    assert out.size == (128, 128) and (u["tile_size"], u["tile_overlap"], u["tiles"]) == (64, 16, 9)
    size, boxes = plan_tiles(128, 128, 64, 16)
    border, interior = line_differences(out, boxes)
    # Across the tile borders the picture changes no more than inside it: the border lines' mean absolute
    # difference is within the interior lines' usual range (their 95th percentile; a shape the model draws may cross
    # a border, so one line may be an edge, as inside), and no border line exceeds the interior's largest.
    usual = np.percentile(interior, 95)
    assert np.mean(border) <= usual and max(border) <= max(interior), (border, usual, max(interior))
    # The same tiles pasted without blending do show seams by the same measure: the check can fail.
    hard = Image.new("RGB", size)
    for box, event in zip(boxes, tiles, strict=True):
        hard.paste(event.image, box[:2])
    hard_border, hard_interior = line_differences(hard, boxes)
    assert np.mean(hard_border) > 2 * np.percentile(hard_interior, 95) and max(hard_border) > max(hard_interior)


def test_progress_per_tile_and_the_frames_parameters(lcm):
    frame = {"prompt": "a red fox", "seed": 5, "num_inference_steps": 2, "guidance_scale": 7.0, "mode": "txt2img",
             "width": 64, "height": 48}
    events = []
    out, params = upscale(lcm, UpscaleRequest(smooth_image(64, 48), scale=2), frame=frame,
                          callback=lambda e: events.append((e.tile, e.tiles, e.image.size)))
    n = params["upscale"]["tiles"]
    assert events == [(k, n, (64, 64)) for k in range(1, n + 1)] and n == len(plan_tiles(128, 96, 64, 16)[1])
    assert out.size == (128, 96)
    # The frame's own prompt, seed, steps and guidance ran (flags left unset), and are recorded.
    assert (params["prompt"], params["seed"], params["num_inference_steps"], params["guidance_scale"]) == \
        ("a red fox", 5, 2, 7.0)
    assert (params["width"], params["height"], params["mode"]) == (128, 96, "txt2img")
    assert params["upscale"] == {"scale": 2, "method": "lanczos+lcm-tiled", "source_width": 64, "source_height": 48,
                                 "tile_size": 64, "tile_overlap": 16, "tiles": n, "strength": 0.3}
    # Fields given override the frame's.
    _, params = upscale(lcm, UpscaleRequest(smooth_image(64, 48), scale=2, prompt="override", seed=11,
                                            num_inference_steps=1), frame=frame)
    assert (params["prompt"], params["seed"], params["num_inference_steps"]) == ("override", 11, 1)


def test_same_seed_for_every_tile_when_none_is_given(lcm):
    seen = []
    original = lcm.generate

    def spy(request, *args, **kwargs):
        seen.append(request.seed)
        return original(request, *args, **kwargs)

    lcm.generate = spy
    try:
        _, params = upscale(lcm, UpscaleRequest(smooth_image(), scale=2, num_inference_steps=1))
    finally:
        del lcm.generate
    assert len(seen) == params["upscale"]["tiles"] and set(seen) == {params["seed"]}


def test_default_strength():
    from lcm_live.engine.upscale import default_strength

    assert default_strength(1, True) == default_strength(4, True) == default_strength(4, False) == 0.3
    assert (default_strength(2, False), default_strength(3, False), default_strength(1, False)) == (0.5, 0.34, 1.0)


def test_lcm_lora_tiles_run_at_least_a_step(lora):
    _, params = upscale(lora, UpscaleRequest(smooth_image(), scale=2, prompt="x", seed=1, num_inference_steps=2))
    assert params["upscale"]["strength"] == 0.5 and not lora.lcm_img2img


@pytest.mark.parametrize("scale, size, cap, needle", [
    (4, (1024, 1024), 4096 * 4096, None),
    (4, (1025, 1024), 4096 * 4096, "--scale 2"),
    (2, (4000, 4000), 4096 * 4096, "start from a smaller image"),
])
def test_pixel_cap(scale, size, cap, needle):
    if needle is None:
        assert check_scale(scale, *size, cap) == (size[0] * scale, size[1] * scale)
        return
    with pytest.raises(UserError) as exc:
        check_scale(scale, *size, cap)
    assert exc.value.field == "scale" and needle in exc.value.message and str(cap) in exc.value.message
    assert f"--scale {scale}" in exc.value.message


@pytest.mark.parametrize("scale", [3, 1, True, "2"])
def test_scale_is_2_or_4(scale):
    with pytest.raises(UserError, match="use 2 or 4"):
        check_scale(scale, 64, 64, 10**9)


def test_the_cap_is_checked_before_any_tile_runs():
    def tile_fn(tile, index):
        raise AssertionError("no tile may run")

    with pytest.raises(UserError, match="pixel cap"):
        upscale(None, UpscaleRequest(smooth_image(), scale=4, tile_size=64), max_pixels=128 * 128, tile_fn=tile_fn)


def test_tiles_cover_the_image_and_the_weights_sum_to_one_blend():
    size, boxes = plan_tiles(200, 72, 64, 16)
    assert size == (200, 72)
    cover = np.zeros((72, 200))
    for x0, y0, x1, y1 in boxes:
        assert (x1 - x0, y1 - y0) == (64, 64)
        cover[y0:y1, x0:x1] += feather_weights((x0, y0, x1, y1), size, 16)
    assert cover.min() > 0
    # Constant tiles blend back to the same constant (weights are normalised), and a smaller image is padded.
    flat = [Image.new("RGB", (64, 64), (10, 20, 30))] * len(boxes)
    assert np.all(np.asarray(blend_tiles(size, boxes, flat, 16)) == (10, 20, 30))
    assert plan_tiles(50, 30, 64, 16) == ((64, 64), [(0, 0, 64, 64)])


@pytest.mark.parametrize("tile, overlap, field", [(60, None, "tile_size"), (32, None, "tile_size"),
                                                  (64, 4, "tile_overlap"), (64, 40, "tile_overlap")])
def test_tiling_bounds(tile, overlap, field):
    with pytest.raises(UserError) as exc:
        resolve_tiling(tile, overlap, 64)
    assert exc.value.field == field
