"""The engine's image-to-image on the tiny models (CPU, float32): LCM's own img2img and SD's, against diffusers'
pipelines pixel for pixel; steps at a strength, sizes from the init image, the engine's dtype kept."""

from __future__ import annotations

import numpy as np
import pytest
from engine_requests import SIZE, init_image, px, req  # tests/engine/engine_requests.py

from lcm_live.errors import UserError


def test_image_to_image_full_lcm(lcm):
    init = init_image()
    events = []
    r1 = lcm.generate(req("a sunset", image=init, strength=0.5, seed=3), callback=events.append)
    r2 = lcm.generate(req("a sunset", image=init, strength=0.5, seed=3))
    r3 = lcm.generate(req("a sunset", image=init, strength=0.9, seed=3))
    t2i = lcm.generate(req("a sunset", seed=3))
    assert r1.images[0].size == (SIZE, SIZE)
    assert r1.parameters["mode"] == "img2img" and r1.parameters["strength"] == 0.5
    assert events and events[-1].step == events[-1].total
    assert np.array_equal(px(r1.images[0]), px(r2.images[0]))
    assert not np.array_equal(px(r1.images[0]), px(r3.images[0]))
    assert not np.array_equal(px(r1.images[0]), px(t2i.images[0]))


def test_img2img_keeps_every_component_in_the_engine_dtype(tiny_lcm_dir):
    # diffusers' from_pipe casts the components it shares to float32 unless told a dtype: the first img2img call
    # must not turn a bfloat16 engine (text encoder, UNet, VAE, shared with text-to-image) into a float32 one.
    import torch
    from diffusers import DiffusionPipeline

    from lcm_live.config import EngineSettings
    from lcm_live.engine.model import LoadedModel
    from lcm_live.engine.pipeline import Engine

    pipe = DiffusionPipeline.from_pretrained(tiny_lcm_dir).to(dtype=torch.bfloat16)
    engine = Engine(LoadedModel(pipe=pipe, kind="lcm", arch="sd15", name="tiny", native_width=64, native_height=64),
                    EngineSettings(model="tiny", dtype="bfloat16"))
    engine.generate(req("x", image=init_image(), strength=0.5, num_inference_steps=1))
    for name in ("text_encoder", "unet", "vae"):
        assert getattr(pipe, name).dtype == torch.bfloat16, name


def test_full_lcm_img2img_runs_one_step_at_half_strength(lcm, lora):
    # LCM's img2img runs all its steps on the strength-shortened schedule: 1 step at strength 0.5 is one UNet
    # call (the live sketch mode); the SD img2img of an LCM-LoRA model would run 1 * 0.5 steps, i.e. none.
    assert lcm.lcm_img2img and not lora.lcm_img2img
    events = []
    result = lcm.generate(req("x", image=init_image(), strength=0.5, num_inference_steps=1, seed=1),
                          callback=events.append)
    assert [e.step for e in events] == [1] and result.images
    assert 400 <= events[0].timestep <= 520  # one step from about the middle of the schedule
    with pytest.raises(UserError) as err:
        lora.generate(req("x", image=init_image(), strength=0.5, num_inference_steps=1))
    assert err.value.field == "strength"


def test_full_lcm_img2img_needs_enough_schedule_points(lcm):
    # 8 steps at strength 0.125 leave int(50 * 0.125) = 6 of LCM's 50 schedule points: a clear error, not diffusers'
    with pytest.raises(UserError) as err:
        lcm.generate(req("x", image=init_image(), strength=0.125, num_inference_steps=8))
    assert err.value.field == "strength" and "at most 6 steps" in err.value.message


def test_img2img_pixels_equal_diffusers(lcm, lora, tiny_lcm_dir, tiny_sd_dir):
    import torch
    from diffusers import LatentConsistencyModelImg2ImgPipeline, LCMScheduler, StableDiffusionImg2ImgPipeline

    init = init_image()
    ref_lcm = LatentConsistencyModelImg2ImgPipeline.from_pretrained(tiny_lcm_dir)
    ref_sd = StableDiffusionImg2ImgPipeline.from_pretrained(tiny_sd_dir)
    ref_sd.scheduler = LCMScheduler.from_config(ref_sd.scheduler.config)
    for engine, ref, guidance in ((lcm, ref_lcm, 8.0), (lora, ref_sd, 1.0)):
        ref.set_progress_bar_config(disable=True)
        expected = ref("a sunset", image=init, strength=0.6, num_inference_steps=3, guidance_scale=guidance,
                       generator=torch.Generator("cpu").manual_seed(21)).images[0]
        ours = engine.generate(req("a sunset", image=init, strength=0.6, num_inference_steps=3, seed=21)).images[0]
        assert np.array_equal(np.asarray(expected), np.asarray(ours))


def test_image_to_image_lcm_lora_runs_steps_times_strength_and_resizes(lora):
    init = init_image().resize((100, 60))  # any size: resized to the requested width x height
    events = []
    r = lora.generate(req("a sunset", image=init, strength=0.5, num_inference_steps=4, seed=3,
                                        width=64, height=128), callback=events.append)
    assert r.images[0].size == (64, 128)
    assert [e.step for e in events] == [1, 2] and events[0].total == 2  # 4 steps * strength 0.5


def test_image_to_image_default_size_follows_the_init_image(lcm):
    init = init_image().resize((203, 121))
    assert lcm.generate(req("x", image=init, seed=0)).images[0].size == (200, 120)  # down to multiples of 8
    assert lcm.generate(req("x", image=init, seed=0, width=128)).images[0].size == (128, 80)  # keeps the aspect
    with pytest.raises(UserError) as err:
        lcm.generate(req("x", image=init_image().resize((100, 60)), seed=0))
    assert err.value.field == "image" and "100x60" in err.value.message


def test_image_to_image_keeps_a_replaced_unet(tiny_lcm_dir, tiny_engine):
    """Speed-ups may swap pipe.unet for a wrapper module (OpenVINO); the img2img twin must use it too."""
    import torch

    class Wrapper(torch.nn.Module):
        def __init__(self, unet):
            super().__init__()
            self.inner, self.config, self.calls = unet, unet.config, 0

        @property
        def dtype(self):
            return self.inner.dtype

        @property
        def device(self):
            return self.inner.device

        def forward(self, *args, **kwargs):
            self.calls += 1
            return self.inner(*args, **kwargs)

    engine = tiny_engine(tiny_lcm_dir, "lcm")
    engine.pipe.unet = wrapper = Wrapper(engine.pipe.unet)
    engine.generate(req("x", seed=0, image=init_image(), strength=0.5))
    assert wrapper.calls == 2
