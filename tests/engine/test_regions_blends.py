"""Region prompts (one UNet batch, MultiDiffusion weights) and prompt / seed blends on the tiny models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from engine_requests import SIZE, px, req  # tests/engine/engine_requests.py
from PIL import Image

from lcm_live.engine.latents import slerp
from lcm_live.engine.masks import region_weights
from lcm_live.engine.request import PromptBlend, Region, SeedBlend
from lcm_live.errors import UserError


def half(side: str) -> Image.Image:
    mask = Image.new("L", (SIZE, SIZE), 0)
    mask.paste(255, (0, 0, SIZE // 2, SIZE) if side == "left" else (SIZE // 2, 0, SIZE, SIZE))
    return mask


def unet_batches(engine):
    sizes = []
    original = engine.pipe.unet.forward

    def forward(sample, *args, **kwargs):
        sizes.append(int(sample.shape[0]))
        return original(sample, *args, **kwargs)

    engine.pipe.unet.forward = forward
    return sizes


def test_region_weights_cover_each_cell_once():
    weights, warnings = region_weights([half("left"), half("right").resize((32, 32))], SIZE, SIZE, 2)
    assert weights.shape == (3, 1, 32, 32) and torch.allclose(weights.sum(0), torch.ones(1, 32, 32))
    assert (weights[0] == 0).all()  # the halves cover everything: no room left for the base prompt
    assert (weights[1, :, :, :16] == 1).all() and (weights[2, :, :, 16:] == 1).all()
    assert warnings == ["regions[1].mask_image was 32x32; fitted to the output's 64x64"]


@pytest.mark.parametrize("engine_name, rows", [("lcm", 2), ("lora", 4)])  # LCM-LoRA with CFG: + 2 uncond rows
def test_regions_run_as_one_unet_batch(request, engine_name, rows):
    engine = request.getfixturevalue(engine_name)
    guidance = {"lora": {"guidance_scale": 1.5}}.get(engine_name, {})
    regions = [Region("a red circle", half("left")), Region("a blue square", half("right"))]
    sizes = unet_batches(engine)
    try:
        result = engine.generate(req("a grey field", seed=4, regions=regions, **guidance))
    finally:
        engine.pipe.unet.__dict__.pop("forward", None)
    assert sizes == [rows, rows]  # one UNet call per step: the 2 regions' windows (the base covers nothing)
    assert result.parameters["mode"] == "regions"
    assert result.parameters["regions"] == [{"prompt": "a red circle"}, {"prompt": "a blue square"}]


def test_a_region_over_everything_is_its_prompt_alone(lcm):
    full = Image.new("L", (SIZE, SIZE), 255)
    region = lcm.generate(req("a grey field", seed=5, regions=[Region("a red circle", full)]))
    alone = lcm.generate(req("a red circle", seed=5))
    assert np.abs(px(region.images[0]) - px(alone.images[0])).max() <= 1  # batched UNet rounding at most
    base = lcm.generate(req("a grey field", seed=5))
    # (the tiny random model hardly listens to its prompt: the base prompt's image is close, but not the same)
    assert np.abs(px(region.images[0]) - px(alone.images[0])).mean() < np.abs(px(region.images[0]) - px(base.images[0])).mean()


@pytest.mark.parametrize(("regions", "field", "needle"), [
    ([Region("x", half("left"))] * 9, "regions", "at most 8"),
    ([Region("  ", half("left"))], "regions[0].prompt", "empty"),
    ([Region("x", half("left")), Region("y", Image.new("L", (SIZE, SIZE), 0))], "regions[1].mask_image", "covers nothing"),
    ([Region("x", "left.png")], "regions[0].mask_image", "must be an image"),
])
def test_bad_regions_are_refused_naming_the_field(lcm, regions, field, needle):
    with pytest.raises(UserError) as err:
        lcm.generate(req("base", regions=regions))
    assert err.value.field == field and needle in err.value.message


def test_prompt_blend_ends_are_the_two_prompts(lcm):
    a = lcm.generate(req("a red circle", seed=3)).images[0]
    b = lcm.generate(req("a blue square", seed=3)).images[0]
    at0 = lcm.generate(req("a red circle", seed=3, prompt_blend=PromptBlend("a blue square", 0.0))).images[0]
    at1 = lcm.generate(req("a red circle", seed=3, prompt_blend=PromptBlend("a blue square", 1.0)))
    mid = lcm.generate(req("a red circle", seed=3, prompt_blend=PromptBlend("a blue square", 0.5))).images[0]
    assert np.array_equal(px(at0), px(a)) and np.array_equal(px(at1.images[0]), px(b))
    assert not np.array_equal(px(mid), px(a)) and not np.array_equal(px(mid), px(b))
    assert at1.parameters["prompt_blend"] == {"prompt": "a blue square", "weight": 1.0}


def test_seed_blend_moves_between_the_two_seeds_noises(lcm):
    one = {"num_inference_steps": 1}  # one step: no re-noising, so the image is the starting noise's alone
    a = lcm.generate(req("x", seed=1, **one)).images[0]
    b = lcm.generate(req("x", seed=2, **one)).images[0]
    at0 = lcm.generate(req("x", seed=1, seed_blend=SeedBlend(2, 0.0), **one)).images[0]
    at1 = lcm.generate(req("x", seed=1, seed_blend=SeedBlend(2, 1.0), **one)).images[0]
    mid = lcm.generate(req("x", seed=1, seed_blend=SeedBlend(2, 0.5), **one)).images[0]
    assert np.array_equal(px(at0), px(a)) and np.array_equal(px(at1), px(b))
    assert np.abs(px(mid) - px(a)).mean() > 1 and np.abs(px(mid) - px(b)).mean() > 1


def test_slerp_keeps_the_norm_of_a_gaussian_draw():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1, 4, 32, 32, generator=g), torch.randn(1, 4, 32, 32, generator=g)
    for w in (0.25, 0.5, 0.75):
        mixed = slerp(a, b, w)
        assert abs(mixed.norm() / a.norm() - 1) < 0.02  # a plain mix at 0.5 would be ~0.71 of it
    assert torch.equal(slerp(a, b, 0.0), a)


@pytest.mark.parametrize(("kw", "field"), [
    ({"prompt_blend": PromptBlend("y", 1.5)}, "prompt_blend.weight"),
    ({"prompt_blend": PromptBlend(None, 0.5)}, "prompt_blend.prompt"),
    ({"seed_blend": SeedBlend(-1, 0.5)}, "seed_blend.seed"),
    ({"seed_blend": SeedBlend(3, float("nan"))}, "seed_blend.weight"),
])
def test_bad_blends_name_the_field(lcm, kw, field):
    with pytest.raises(UserError) as err:
        lcm.generate(req("x", **kw))
    assert err.value.field == field


def test_windows_have_one_size_and_hold_their_regions():
    from lcm_live.engine.regions import windows

    small = Image.new("L", (SIZE, SIZE), 0)
    small.paste(255, (50, 40, 60, 60))  # 10 x 20 px near the bottom right
    wide = Image.new("L", (SIZE, SIZE), 0)
    wide.paste(255, (0, 0, 40, 12))  # 40 x 12 px at the top left
    weights, _ = region_weights([small, wide], SIZE, SIZE, 2)
    # latent cells (32 x 32): the largest box, 10 x 20, rounded up to quarters of the picture (8 cells): 16 x 24,
    # each window over its region and inside the picture
    assert windows(weights) == [(16, 32, 8, 32), (0, 16, 0, 24)]


def test_a_region_leaving_room_runs_the_base_prompt_on_the_canvas_too(lcm):
    corner = Image.new("L", (SIZE, SIZE), 0)
    corner.paste(255, (0, 0, 32, 32))
    shapes = []
    original = lcm.pipe.unet.forward
    lcm.pipe.unet.forward = lambda sample, *a, **k: shapes.append(tuple(sample.shape)) or original(sample, *a, **k)
    try:
        lcm.generate(req("a grey field", seed=1, regions=[Region("a red circle", corner)]))
    finally:
        lcm.pipe.unet.__dict__.pop("forward", None)
    assert shapes == [(1, 4, 16, 16), (1, 4, 32, 32)] * 2  # per step: the region's window, then the base's canvas


def test_blended_and_plain_requests_share_one_call_and_equal_their_singles(lcm):
    requests = [req("a red circle", seed=1, width=SIZE, height=SIZE),
                req("a red circle", seed=2, width=SIZE, height=SIZE, prompt_blend=PromptBlend("a blue square", 0.5),
                    seed_blend=SeedBlend(7, 0.3))]
    sizes = unet_batches(lcm)
    try:
        batch = lcm.generate_batch(requests)
    finally:
        lcm.pipe.unet.__dict__.pop("forward", None)
    assert sizes == [2, 2]
    for got, request in zip(batch, requests, strict=True):
        assert got.error is None
        assert np.abs(px(got.images[0]) - px(lcm.generate(request).images[0])).max() <= 1
