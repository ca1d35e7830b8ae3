"""The engine on tiny random models (CPU, float32): t2i, the step hook, seeds, guidance rules, caching, previews
(image-to-image: test_pipeline_img2img.py)."""

from __future__ import annotations

import numpy as np
import pytest
from engine_requests import SIZE, init_image, px, req  # tests/engine/engine_requests.py

from lcm_live.config import EngineSettings
from lcm_live.engine.hooks import Cancelled
from lcm_live.engine.pipeline import Engine
from lcm_live.errors import UserError


def test_text_to_image_reports_steps_parameters_and_timings(lcm):
    events = []
    result = lcm.generate(req("a red circle", seed=7, num_inference_steps=3), callback=events.append)
    assert len(result.images) == 1 and result.images[0].size == (SIZE, SIZE)
    assert [(e.step, e.total) for e in events] == [(1, 3), (2, 3), (3, 3)]
    assert all(tuple(e.latents.shape) == (1, 4, 32, 32) for e in events)
    assert events[0].timestep > events[-1].timestep  # timesteps go down
    # Read from the host copy of the schedule (engine/scheduler.py), and the ones the steps ran at.
    assert [e.timestep for e in events] == lcm.pipe.scheduler.timesteps.tolist() == [999, 679, 339]
    p = result.parameters
    assert p["scheduler"] == "LCMScheduler"  # HostLCMScheduler computes it; the metadata names diffusers' class
    assert (p["seed"], p["num_inference_steps"], p["guidance_scale"], p["mode"]) == (7, 3, 8.0, "txt2img")
    assert (p["width"], p["height"], p["device"], p["dtype"], p["model"]) == (SIZE, SIZE, "cpu", "float32", "tiny-lcm")
    assert p["negative_prompt"] is None and "strength" not in p and p["lcm_live_version"]
    assert set(result.timings) == {"text_encoder", "unet", "decode", "total"}
    assert result.timings["total"] >= result.timings["unet"] >= 0


def test_fp32_pixels_equal_diffusers_own_lcm_pipeline(lcm, tiny_lcm_dir):
    import torch
    from diffusers import LatentConsistencyModelPipeline

    ref_pipe = LatentConsistencyModelPipeline.from_pretrained(tiny_lcm_dir)
    ref_pipe.set_progress_bar_config(disable=True)
    ref = ref_pipe("a lighthouse at dusk", num_inference_steps=3, guidance_scale=8.0, width=SIZE, height=SIZE,
                   num_images_per_prompt=2, generator=torch.Generator("cpu").manual_seed(1234)).images
    ours = lcm.generate(req("a lighthouse at dusk", seed=1234, num_images_per_prompt=2, num_inference_steps=3)).images
    assert len(ours) == 2
    for a, b in zip(ref, ours, strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("guidance, negative", [(1.0, None), (1.7, "blurry")])
def test_fp32_pixels_equal_diffusers_for_lcm_lora_shaped_model(lora, tiny_sd_dir, guidance, negative):
    import torch
    from diffusers import LCMScheduler, StableDiffusionPipeline

    ref_pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir)
    ref_pipe.scheduler = LCMScheduler.from_config(ref_pipe.scheduler.config)
    ref_pipe.set_progress_bar_config(disable=True)
    ref = ref_pipe("a boat", negative_prompt=negative, num_inference_steps=3, guidance_scale=guidance, width=SIZE,
                   height=SIZE, generator=torch.Generator("cpu").manual_seed(5)).images[0]
    events = []
    result = lora.generate(req("a boat", negative_prompt=negative, guidance_scale=guidance, seed=5, num_inference_steps=3),
                           callback=events.append)
    assert np.array_equal(np.asarray(ref), np.asarray(result.images[0]))
    assert len(events) == 3 and result.parameters["negative_prompt"] == negative
    # Preview latents are the x0 prediction, not the re-noised sample: the last one is the final latents.
    final = lora.generate(req("a boat", negative_prompt=negative, guidance_scale=guidance, seed=5,
                                            num_inference_steps=3, output_type="latent")).images[0]
    assert torch.equal(events[-1].latents[0], final)


def test_same_seed_same_image_and_random_seed_is_reported(lcm):
    a = lcm.generate(req("a cat", seed=11)).images[0]
    b = lcm.generate(req("a cat", seed=11)).images[0]
    c = lcm.generate(req("a cat", seed=12)).images[0]
    assert np.array_equal(px(a), px(b)) and not np.array_equal(px(a), px(c))
    r = lcm.generate(req("a cat"))
    seed = r.parameters["seed"]
    assert isinstance(seed, int) and 0 <= seed < 2**32
    again = lcm.generate(req("a cat", seed=seed)).images[0]
    assert np.array_equal(px(r.images[0]), px(again))


def test_cancel_through_the_hook_stops_between_steps(lcm):
    seen = []

    def cancel_at_two(event):
        seen.append(event.step)
        if event.step == 2:
            raise Cancelled()

    with pytest.raises(Cancelled):
        lcm.generate(req("a dog", num_inference_steps=6, seed=1), callback=cancel_at_two)
    assert seen == [1, 2]
    # The engine is usable right after, and the cancelled run left no state behind (same pixels as before).
    a = lcm.generate(req("a dog", num_inference_steps=6, seed=1)).images[0]
    b = lcm.generate(req("a dog", num_inference_steps=6, seed=1)).images[0]
    assert np.array_equal(px(a), px(b))


def test_cancel_in_lcm_lora_img2img(lora):
    def cancel(event):
        raise Cancelled()

    with pytest.raises(Cancelled):
        lora.generate(req("x", image=init_image(), strength=1.0, seed=1), callback=cancel)
    assert lora.pipe.scheduler.__dict__.get("step") is None  # the x0 recorder was removed


def test_negative_prompt_on_full_lcm_is_an_error_that_says_why(lcm):
    with pytest.raises(UserError) as err:
        lcm.generate(req("a cat", negative_prompt="blurry"))
    assert err.value.field == "negative_prompt" and "w-embedding" in err.value.message


def test_negative_prompt_on_lcm_lora_needs_guidance_above_one(lora):
    with pytest.raises(UserError) as err:
        lora.generate(req("a cat", negative_prompt="blurry"))  # default guidance 1.0
    assert err.value.field == "negative_prompt" and "above 1" in err.value.message
    r = lora.generate(req("a cat", negative_prompt="blurry", guidance_scale=1.5, seed=0))
    assert r.parameters["guidance_scale"] == 1.5 and r.parameters["negative_prompt"] == "blurry"
    assert lora.generate(req("a cat", negative_prompt="", seed=0)).parameters["guidance_scale"] == 1.0


def test_long_prompt_warns_and_names_what_was_cut(lcm, caplog):
    words = " ".join(f"w{i}" for i in range(60)) + " zebra tail end"  # each "wN" is ~3 byte-level tokens
    with caplog.at_level("WARNING", logger="lcm_live.engine.prompts"):
        r = lcm.generate(req(words, seed=0))
    [warning] = r.parameters["warnings"]
    assert "77-token window" in warning and "zebra tail end" in warning
    assert "w0" not in warning.split("cut:")[1]
    assert any("zebra tail end" in rec.getMessage() for rec in caplog.records)
    # A cache hit still reports the warning.
    assert lcm.generate(req(words, seed=0)).parameters["warnings"] == [warning]
    assert lcm.generate(req("short", seed=0)).parameters["warnings"] == []


@pytest.mark.parametrize("changes, field", [
    ({"num_inference_steps": 0}, "num_inference_steps"),
    ({"num_inference_steps": 9}, "num_inference_steps"),
    ({"num_inference_steps": 2.5}, "num_inference_steps"),
    ({"width": 60}, "width"),
    ({"width": 100}, "width"),
    ({"height": 2056}, "height"),
    ({"guidance_scale": -1.0}, "guidance_scale"),
    ({"guidance_scale": float("nan")}, "guidance_scale"),
    ({"num_images_per_prompt": 0}, "num_images_per_prompt"),
    ({"seed": -1}, "seed"),
    ({"strength": 0.0, "image": "init"}, "strength"),
    ({"strength": 1.5, "image": "init"}, "strength"),
    ({"strength": 0.05, "num_inference_steps": 4, "image": "init"}, "strength"),  # 2 of LCM's 50 points
    ({"image": b"not an image"}, "image"),
    ({"output_type": "np"}, "output_type"),
])
def test_validation_errors_name_the_field(lcm, changes, field):
    if changes.get("image") == "init":
        changes = {**changes, "image": init_image()}
    calls = []
    with pytest.raises(UserError) as err:
        lcm.generate(req("a cat", **changes), callback=calls.append)
    assert err.value.field == field and calls == []


def test_prompt_cache_hits_and_lru(tiny_lcm_dir, tiny_engine):
    engine = tiny_engine(tiny_lcm_dir, "lcm", prompt_cache_size=2)
    for prompt in ["a", "a", "b", "a", "c", "b"]:  # "b" was evicted by "c" (LRU: a, b -> b, a -> a, c)
        engine.generate(req(prompt, num_inference_steps=1, seed=0))
    assert (engine.prompts.hits, engine.prompts.misses) == (2, 4)
    assert len(engine.prompts) == 2


def test_prompt_cache_disabled(tiny_lcm_dir, tiny_engine):
    engine = tiny_engine(tiny_lcm_dir, "lcm", prompt_cache_size=0)
    for _ in range(2):
        engine.generate(req("a", num_inference_steps=1, seed=0))
    assert (engine.prompts.hits, len(engine.prompts)) == (0, 0)


class _LinearVae:
    """A stand-in VAE whose encoder is a known linear map (2x2 average pool, then 3 -> 4 channels): the
    calibration must recover its inverse, so the preview returns the colours that went in."""

    def __init__(self):
        import torch

        self.weight = torch.tensor([[0.8, -0.3, 0.1], [0.2, 0.9, -0.4], [-0.5, 0.1, 0.7], [0.3, 0.3, 0.3]])
        self.bias = torch.tensor([0.1, -0.2, 0.05, 0.0])
        self.config = type("Config", (), {"scaling_factor": 0.5})()

    def parameters(self):
        return iter([self.weight])

    def encode(self, images):
        import torch.nn.functional as F

        pooled = F.avg_pool2d(images, 2)  # (B, 3, H/2, W/2)
        mean = torch_einsum("bchw,kc->bkhw", pooled, self.weight) + self.bias.view(1, 4, 1, 1)
        return type("Out", (), {"latent_dist": type("Dist", (), {"mean": mean})()})()


def torch_einsum(*args):
    import torch

    return torch.einsum(*args)


def test_decode_preview_linear_map_recovers_colours():
    import torch

    from lcm_live.engine.decoders import LatentPreview

    vae = _LinearVae()
    preview = LatentPreview(vae, scale_factor=2)
    for rgb in [(220, 30, 30), (30, 200, 40), (40, 40, 210), (230, 230, 230), (20, 20, 20)]:
        image = torch.tensor(rgb, dtype=torch.float32).view(1, 3, 1, 1).expand(1, 3, 16, 24) / 127.5 - 1
        latents = vae.encode(image).latent_dist.mean * vae.config.scaling_factor  # scaled, as the UNet sees them
        out = preview(latents)
        assert out.size == (24, 16) and out.mode == "RGB"
        assert np.abs(np.asarray(out).astype(float) - rgb).max() <= 2


@pytest.mark.timeout(60)
def test_preview_calibration_of_an_fp16_vae_leaves_it_fp16(tiny_lcm_dir):
    import torch
    from diffusers import AutoencoderKL

    from lcm_live.engine.decoders import LatentPreview

    vae = AutoencoderKL.from_pretrained(tiny_lcm_dir, subfolder="vae").half()
    fp32_map = LatentPreview(AutoencoderKL.from_pretrained(tiny_lcm_dir, subfolder="vae")).calibrate()
    fp16_map = LatentPreview(vae).calibrate()  # on a float32 copy: same map up to the fp16 rounding of weights
    assert next(vae.parameters()).dtype == torch.float16
    assert torch.isfinite(fp16_map).all() and torch.allclose(fp16_map, fp32_map, atol=0.05)


def test_decode_preview_from_inside_the_step_callback(lcm):
    """The studio previews each step from its callback, inside generate(): this must not deadlock."""
    previews = []
    lcm.generate(req("a cat", seed=0), callback=lambda e: previews.append(lcm.decode_preview(e.latents)))
    assert len(previews) == 2 and all(p.size == (SIZE, SIZE) and p.mode == "RGB" for p in previews)


def test_from_settings_loads_resolves_device_and_dtype(tiny_lcm_dir, tiny_sd_dir):
    engine = Engine.from_settings(EngineSettings(model=str(tiny_lcm_dir), device="cpu", dtype="float32"),
                                  progress=False)
    assert (engine.info.kind, engine.info.device, engine.info.dtype) == ("lcm", "cpu", "float32")
    assert engine.generate(req("a cat", seed=0, width=SIZE, height=SIZE)).images[0].size == (SIZE, SIZE)
    lora_engine = Engine.from_settings(EngineSettings(model=str(tiny_sd_dir), lcm_lora="none", device="cpu",
                                                      dtype="float32"), progress=False)
    assert lora_engine.info.kind == "lcm-lora" and lora_engine.info.default_guidance_scale == 1.0


def test_from_settings_refuses_an_absent_device_before_loading(monkeypatch, tmp_path):
    from lcm_live.engine import devices

    monkeypatch.setattr(devices, "cuda_available", lambda: False)
    with pytest.raises(UserError) as err:  # the model path does not exist either: the device is checked first
        Engine.from_settings(EngineSettings(model=str(tmp_path / "nothing"), device="cuda"))
    assert err.value.field == "device"


def test_info_and_warmup(lcm):
    info = lcm.info.to_dict()
    assert info["model"] == "tiny-lcm" and info["kind"] == "lcm" and info["default_guidance_scale"] == 8.0
    assert (info["native_width"], info["native_height"], info["device"], info["dtype"]) == (SIZE, SIZE, "cpu",
                                                                                            "float32")
    encoded: list[tuple[int, ...]] = []
    original = lcm.pipe.vae.encode
    lcm.pipe.vae.encode = lambda images, *a, **k: encoded.append(tuple(images.shape)) or original(images, *a, **k)
    try:
        timings = lcm.warmup(SIZE, SIZE, 1)
    finally:
        lcm.pipe.vae.encode = original
    assert timings["total"] > 0
    assert lcm._preview._map is not None  # the preview's calibration happens in warm-up, not at the first frame
    assert (1, 3, SIZE, SIZE) in encoded  # sketch mode's encoder ran at this size (its first call: a conversion)


@pytest.mark.parametrize("compiled", [True, False])
def test_warmup_runs_each_batch_size_through_a_compiled_unet(tiny_lcm_dir, compiled):
    """Each new batch size recompiles a torch.compile'd UNet (and records its CUDA graph): the warm-up makes
    batches of 2..max_batch_size then, not the first frames that arrive together. Uncompiled: one image."""
    from diffusers import DiffusionPipeline

    from lcm_live.engine.model import LoadedModel

    pipe = DiffusionPipeline.from_pretrained(tiny_lcm_dir)
    loaded = LoadedModel(pipe=pipe, kind="lcm", arch="sd15", name="tiny-lcm", native_width=SIZE, native_height=SIZE)
    # what apply_speedups reports after compiling (the UNet itself stays eager here: compiling takes minutes)
    speedups = ["channels_last", "torch.compile(default, freezing)"] if compiled else ["channels_last"]
    engine = Engine(loaded, EngineSettings(model=str(tiny_lcm_dir), device="cpu", dtype="float32"),
                    speedups=speedups)
    assert engine.compiled is compiled
    sizes: list[int] = []
    original = pipe.unet.forward
    pipe.unet.forward = lambda sample, *a, **k: sizes.append(sample.shape[0]) or original(sample, *a, **k)
    engine.warmup(SIZE, SIZE, 1, max_batch_size=3)
    assert sizes == ([1, 2, 3] if compiled else [1])
    if compiled:  # a batch that fails fails the warm-up (generate_batch itself reports per member)
        def no_room_for_two(sample, *args, **kwargs):
            if sample.shape[0] > 1:
                raise RuntimeError("CUDA out of memory")
            return original(sample, *args, **kwargs)

        pipe.unet.forward = no_room_for_two
        with pytest.raises(RuntimeError, match="out of memory"):
            engine.warmup(SIZE, SIZE, 1, max_batch_size=2)
