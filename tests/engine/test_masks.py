"""Inpainting on the tiny models (CPU, float32): outside the mask's feather band the input's pixels exactly, inside a
new picture; masks of another size fitted and said; bad masks refused with the field; 9-channel inpainting UNets."""

from __future__ import annotations

import numpy as np
import pytest
from engine_requests import SIZE, init_image, px, req  # tests/engine/engine_requests.py
from PIL import Image

from lcm_live.engine.masks import prepare_mask
from lcm_live.errors import UserError


def left_mask(width: int = 24, size: int = SIZE) -> Image.Image:
    """White (redraw) on the left ``width`` columns."""
    mask = Image.new("L", (size, size), 0)
    mask.paste(255, (0, 0, width, size))
    return mask


@pytest.mark.parametrize("feather", [0, 8])
@pytest.mark.parametrize("engine_name", ["lcm", "lora"])
def test_pixels_outside_the_band_are_the_inputs_and_inside_change(request, engine_name, feather):
    engine = request.getfixturevalue(engine_name)
    init = init_image()
    plain = engine.generate(req("a red circle", image=init, strength=0.8, seed=2))
    result = engine.generate(req("a red circle", image=init, strength=0.8, seed=2, mask_image=left_mask(),
                                 mask_feather=feather))
    out, before = px(result.images[0]), px(init)
    assert np.array_equal(out[:, 24 + feather:], before[:, 24 + feather:])  # beyond the band: exactly the input
    assert np.abs(out[:, :24] - before[:, :24]).mean() > 5  # inside: redrawn
    # Inside the mask the picture is the sampler's (the band fades it out), not the unmasked img2img's copy.
    assert np.abs(out[:, :16] - px(plain.images[0])[:, :16]).mean() < np.abs(out[:, :16] - before[:, :16]).mean()
    p = result.parameters
    assert (p["mode"], p["mask_feather"], p["warnings"]) == ("inpaint", feather, [])


def test_the_feather_band_blends_linearly_to_the_input():
    prepared, warning = prepare_mask(left_mask(), SIZE, SIZE, feather=8)
    row = prepared.feathered[10]
    assert warning is None and (row[:24] == 1).all() and (row[32:] == 0).all()
    assert (np.diff(row[23:33]) <= 0).all() and 0 < row[28] < 1  # falls off across the band


def test_a_mask_of_another_size_is_fitted_and_said(lcm):
    result = lcm.generate(req("x", image=init_image(), seed=1, mask_image=left_mask(size=32)))
    [warning] = result.parameters["warnings"]
    assert "mask_image was 32x32; fitted to the output's 64x64" in warning


@pytest.mark.parametrize(("kw", "field", "needle"), [
    ({"mask_image": Image.new("L", (SIZE, SIZE), 0)}, "mask_image", "nothing would change"),
    ({"mask_image": left_mask(), "image": None}, "mask_image", "needs an init image"),
    ({"mask_image": b"\x89PNG...", }, "mask_image", "must be an image"),
    ({"mask_image": left_mask(), "mask_feather": 65}, "mask_feather", "0 to 64"),
])
def test_bad_masks_are_refused_naming_the_field(lcm, kw, field, needle):
    kw = {"image": init_image(), **kw}
    calls = []
    with pytest.raises(UserError) as err:
        lcm.generate(req("x", **kw), callback=calls.append)
    assert err.value.field == field and needle in err.value.message and calls == []


def test_masked_requests_batch_and_equal_their_singles(lcm):
    requests = [req("a", image=init_image(), seed=1, mask_image=left_mask(), width=SIZE, height=SIZE),
                req("b", image=init_image(), seed=2, mask_image=left_mask(40), width=SIZE, height=SIZE)]
    batch = lcm.generate_batch(requests)
    for got, request in zip(batch, requests, strict=True):
        assert got.error is None
        assert np.abs(px(got.images[0]) - px(lcm.generate(request).images[0])).max() <= 1


def test_a_nine_channel_inpainting_unet_takes_mask_and_masked_image(tmp_path):
    """SD inpainting checkpoints (UNet in_channels 9, with an LCM-LoRA) get the mask and the masked image's
    latents as inputs, no latent blending; the pixel composite still keeps the outside exact."""
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from lcm_live.config import EngineSettings
    from lcm_live.engine.model import LoadedModel
    from lcm_live.engine.pipeline import Engine
    from lcm_live.engine.tiny import tiny_components

    parts = tiny_components(time_cond_proj_dim=None, tokenizer_dir=tmp_path / "tok")
    torch.manual_seed(0)
    parts["unet"] = UNet2DConditionModel.from_config({**parts["unet"].config, "in_channels": 9}).eval()
    pipe = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    engine = Engine(LoadedModel(pipe=pipe, kind="lcm-lora", arch="sd15", name="tiny-inpaint", native_width=SIZE,
                                native_height=SIZE), EngineSettings(model="tiny-inpaint", device="cpu", dtype="float32"))
    seen = []
    original = pipe.unet.forward
    pipe.unet.forward = lambda sample, *a, **k: seen.append(sample.shape[1]) or original(sample, *a, **k)
    init = init_image()
    result = engine.generate(req("x", image=init, strength=1.0, seed=3, mask_image=left_mask(), mask_feather=4))
    assert seen == [9, 9]
    out = px(result.images[0])
    assert np.array_equal(out[:, 28:], px(init)[:, 28:]) and np.abs(out[:, :24] - px(init)[:, :24]).mean() > 5
    # Without a mask it redraws everything (diffusers' full mask over a blank masked image), in every mode.
    seen.clear()
    assert engine.generate(req("x", seed=3)).images[0].size == (SIZE, SIZE)
    assert engine.generate(req("x", image=init, strength=1.0, seed=3)).parameters["mode"] == "img2img"
    assert seen == [9, 9, 9, 9]


def test_a_small_mask_is_redrawn_in_a_window_of_its_own(lcm):
    """The UNet sees only the window around the mask (the rest is the init image's latents anyway): the model
    composes the prompt there, and a small mask costs a small UNet call. A large mask's window is the picture."""
    from lcm_live.engine.masks import mask_window

    small = Image.new("L", (SIZE, SIZE), 0)
    small.paste(255, (40, 40, 56, 56))  # 16 x 16 px
    prepared, _ = prepare_mask(small, SIZE, SIZE, feather=4)
    assert mask_window(prepared, 2, 32) == (16, 32, 16, 32)  # latent cells: 32 px a side (the least), inside
    shapes = []
    original = lcm.pipe.unet.forward
    lcm.pipe.unet.forward = lambda sample, *a, **k: shapes.append(tuple(sample.shape[-2:])) or original(sample, *a, **k)
    try:
        init = init_image()
        out = px(lcm.generate(req("x", image=init, strength=1.0, seed=1, mask_image=small, mask_feather=4)).images[0])
        lcm.generate(req("x", image=init, seed=1, mask_image=left_mask(60)))
    finally:
        lcm.pipe.unet.__dict__.pop("forward", None)
    assert shapes == [(16, 16)] * 2 + [(32, 32)] * 2
    outside = np.ones((SIZE, SIZE), bool)
    outside[36:60, 36:60] = False
    assert np.array_equal(out[outside], px(init)[outside]) and np.abs(out[40:56, 40:56] - px(init)[40:56, 40:56]).mean() > 5


def test_a_unet_compiled_per_shape_redraws_on_the_whole_picture(tiny_lcm_dir):
    """OpenVINO and torch.compile convert each new input shape (minutes): no mask windows there."""
    from diffusers import DiffusionPipeline

    from lcm_live.config import EngineSettings
    from lcm_live.engine.model import LoadedModel
    from lcm_live.engine.pipeline import Engine

    pipe = DiffusionPipeline.from_pretrained(tiny_lcm_dir)
    loaded = LoadedModel(pipe=pipe, kind="lcm", arch="sd15", name="tiny", native_width=SIZE, native_height=SIZE)
    engine = Engine(loaded, EngineSettings(model="tiny", device="cpu", dtype="float32"),
                    speedups=["torch.compile(default, freezing)"])  # as reported; the UNet itself stays eager here
    assert engine.static_shapes
    small = Image.new("L", (SIZE, SIZE), 0)
    small.paste(255, (40, 40, 56, 56))
    shapes = []
    original = pipe.unet.forward
    pipe.unet.forward = lambda sample, *a, **k: shapes.append(tuple(sample.shape[-2:])) or original(sample, *a, **k)
    init = init_image()
    out = px(engine.generate(req("x", image=init, strength=1.0, seed=1, mask_image=small, mask_feather=4)).images[0])
    assert shapes == [(32, 32)] * 2
    outside = np.ones((SIZE, SIZE), bool)
    outside[36:60, 36:60] = False
    assert np.array_equal(out[outside], px(init)[outside])
