"""Masks, region prompts and blends on a tiny SDXL-shaped model: pooled text embeddings and size ids per window."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from lcm_live.engine.request import GenerationRequest, PromptBlend, Region

SIZE = 64


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    from diffusers import StableDiffusionXLPipeline

    from lcm_live.config import EngineSettings
    from lcm_live.engine.model import LoadedModel
    from lcm_live.engine.pipeline import Engine
    from lcm_live.engine.tiny import save_tiny_sdxl_pipeline

    folder = save_tiny_sdxl_pipeline(tmp_path_factory.mktemp("sdxl"), full_lcm=False)
    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    return Engine(LoadedModel(pipe=pipe, kind="lcm-lora", arch="sdxl", name="tiny-sdxl", native_width=SIZE,
                              native_height=SIZE), EngineSettings(model="tiny-sdxl", device="cpu", dtype="float32"))


def _half(left: bool) -> Image.Image:
    mask = Image.new("L", (SIZE, SIZE), 0)
    mask.paste(255, (0, 0, SIZE // 2, SIZE) if left else (SIZE // 2, 0, SIZE, SIZE))
    return mask


def test_sdxl_regions_with_cfg_mask_and_prompt_blend(sdxl):
    rows = []
    original = sdxl.pipe.unet.forward

    def forward(sample, t, *args, added_cond_kwargs=None, **kwargs):
        rows.append((sample.shape[0], added_cond_kwargs["text_embeds"].shape[0], added_cond_kwargs["time_ids"][0].tolist()))
        return original(sample, t, *args, added_cond_kwargs=added_cond_kwargs, **kwargs)

    sdxl.pipe.unet.forward = forward
    try:
        regions = [Region("a red circle", _half(True)), Region("a blue square", _half(False))]
        result = sdxl.generate(GenerationRequest("a field", negative_prompt="fog", guidance_scale=1.5, seed=2,
                                                 num_inference_steps=2, regions=regions))
    finally:
        sdxl.pipe.unet.__dict__.pop("forward", None)
    # One call per step: 2 windows x (uncond + cond); each window is 64 x 32 px, its size ids say so.
    assert rows == [(4, 4, [64.0, 32.0, 0.0, 0.0, 64.0, 32.0])] * 2
    assert result.parameters["mode"] == "regions" and result.images[0].size == (SIZE, SIZE)

    init = Image.fromarray(np.random.default_rng(1).integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8))
    inpaint = sdxl.generate(GenerationRequest("a boat", seed=3, num_inference_steps=2, image=init, strength=1.0,
                                              mask_image=_half(True), mask_feather=4,
                                              prompt_blend=PromptBlend("a storm", 0.5)))
    out, before = np.asarray(inpaint.images[0]).astype(int), np.asarray(init).astype(int)
    assert np.array_equal(out[:, 36:], before[:, 36:]) and np.abs(out[:, :32] - before[:, :32]).mean() > 5
    assert inpaint.parameters["mode"] == "inpaint" and inpaint.parameters["prompt_blend"]["weight"] == 0.5
