"""The fast families on the engine's own loop: detection (folder configs, presets, --scheduler), defaults and
guidance semantics, and, per family, images at CPU float32 equal to diffusers' own pipeline with that family's
scheduler (same seed, ``output_type="np"``, within 8-bit rounding). Tiny models built in tests/engine/family_models.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from engine_requests import SIZE, init_image, req
from family_models import bk_sdm_unet, save_family, scheduler_from, tiny_decoder

from lcm_live.config import EngineSettings
from lcm_live.engine.loading import load_model
from lcm_live.engine.pipeline import Engine


def _load(folder, **settings) -> Engine:
    """load_model on the folder (detection, scheduler, LoRAs), then an Engine at the tiny size."""
    s = EngineSettings(model=str(folder), device="cpu", dtype="float32", **settings)
    loaded = load_model(s, progress=False)
    loaded.native_width = loaded.native_height = SIZE
    return Engine(loaded, s)


def _reference(folder, *, sdxl=False, scheduler=None, img2img=False):
    import diffusers

    if sdxl:
        cls = diffusers.StableDiffusionXLImg2ImgPipeline if img2img else diffusers.StableDiffusionXLPipeline
        pipe = cls.from_pretrained(folder)
    else:
        cls = diffusers.StableDiffusionImg2ImgPipeline if img2img else diffusers.StableDiffusionPipeline
        pipe = cls.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    if scheduler is not None:
        pipe.scheduler = scheduler(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _ref_images(pipe, prompt, *, seed, **kw) -> np.ndarray:
    if "image" not in kw:  # text-to-image at the tiny size (image-to-image: the init image's)
        kw.update(width=SIZE, height=SIZE)
    return pipe(prompt, generator=torch.Generator("cpu").manual_seed(seed), output_type="np", **kw).images


def assert_parity(ours, ref: np.ndarray) -> None:
    """Our PIL images equal diffusers' float images within 8-bit rounding, and those are not flat (a test that
    could not tell two samplers apart would prove nothing)."""
    a = np.stack([np.asarray(im) for im in ours]).astype(np.int16)
    b = np.round(ref * 255).astype(np.int16)  # diffusers' numpy_to_pil
    assert a.shape == b.shape
    assert np.abs(a - b).max() <= 1, f"max pixel difference {np.abs(a - b).max()}"
    assert b.std() > 2


def _pixels(images) -> np.ndarray:
    return np.stack([np.asarray(im) for im in images]).astype(np.int16)


# ---------------------------------------------------------------------------------------------------- models
@pytest.fixture(scope="module")
def sd_turbo_dir(tmp_path_factory):
    return save_family(tmp_path_factory.mktemp("m") / "sd-turbo", scheduler=scheduler_from("sd-turbo"))


@pytest.fixture(scope="module")
def sdxl_turbo_dir(tmp_path_factory):
    return save_family(tmp_path_factory.mktemp("m") / "tiny-xl", sdxl=True, scheduler=scheduler_from("sdxl-turbo"))


@pytest.fixture(scope="module")
def plain_sd_dir(tmp_path_factory):
    """A plain SD1.5-shaped folder with SD1.5's own PNDMScheduler (nothing in it says "distilled")."""
    return save_family(tmp_path_factory.mktemp("m") / "plain", scheduler=scheduler_from("sd15"))


# ---------------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("steps", [1, 2])
def test_sd_turbo_defaults_and_parity_with_euler_trailing(sd_turbo_dir, steps):
    engine = _load(sd_turbo_dir)
    assert (engine.family.name, engine.sampler, engine.info.scheduler) == ("sd-turbo", "euler-trailing",
                                                                         "EulerDiscreteScheduler")
    assert engine.info.default_guidance_scale == 0.0 and engine.loaded.loras == []  # no LCM-LoRA
    assert (engine.info.family, engine.info.default_num_inference_steps) == ("sd-turbo", 1)
    events = []
    result = engine.generate(req("a red boat", seed=3, num_inference_steps=steps, width=SIZE, height=SIZE),
                             callback=events.append)
    p = result.parameters
    assert (p["family"], p["guidance_scale"], p["scheduler"]) == ("sd-turbo", 0.0, "EulerDiscreteScheduler")
    assert [e.timestep for e in events] == ([999] if steps == 1 else [999, 499])  # trailing timesteps
    ref = _ref_images(_reference(sd_turbo_dir), "a red boat", seed=3, num_inference_steps=steps, guidance_scale=0.0)
    assert_parity(result.images, ref)


def test_sd_turbo_default_steps_are_the_familys_and_cfg_runs_above_one(sd_turbo_dir):
    engine = _load(sd_turbo_dir)
    events = []
    r = engine.generate(req("a cat", seed=1, num_inference_steps=None, width=SIZE, height=SIZE), callback=events.append)
    assert r.parameters["num_inference_steps"] == 1 and len(events) == 1
    # Guidance above 1 runs classifier-free guidance with the negative prompt, as diffusers' pipeline does.
    r = engine.generate(req("a cat", negative_prompt="blurry", guidance_scale=2.0, seed=1, width=SIZE, height=SIZE))
    ref = _ref_images(_reference(sd_turbo_dir), "a cat", negative_prompt="blurry", guidance_scale=2.0, seed=1,
                      num_inference_steps=2)
    assert_parity(r.images, ref)
    # Past the family's range it runs, and says so.
    r = engine.generate(req("a cat", seed=1, num_inference_steps=6, width=SIZE, height=SIZE))
    assert any("distilled for 1 to 4 steps" in w for w in r.parameters["warnings"])


def test_sd_turbo_img2img_parity(sd_turbo_dir):
    engine = _load(sd_turbo_dir)
    ours = engine.generate(req("a house", image=init_image(), strength=0.5, seed=4, guidance_scale=0.0))
    ref = _ref_images(_reference(sd_turbo_dir, img2img=True), "a house", image=init_image(), strength=0.5, seed=4,
                      num_inference_steps=2, guidance_scale=0.0)
    assert_parity(ours.images, ref)


def test_the_parity_check_tells_samplers_apart(sd_turbo_dir):
    """The same model sampled with LCM instead of Euler: the assertion above must fail on it."""
    euler = _load(sd_turbo_dir).generate(req("a red boat", seed=3, width=SIZE, height=SIZE)).images
    lcm = _load(sd_turbo_dir, scheduler="lcm", lcm_lora="none")
    assert lcm.sampler == "lcm" and lcm.info.scheduler == "LCMScheduler"
    other = lcm.generate(req("a red boat", seed=3, width=SIZE, height=SIZE)).images
    assert np.abs(_pixels(euler) - _pixels(other)).max() > 8


@pytest.mark.parametrize("steps", [1, 3])
def test_sdxl_turbo_parity_with_euler_ancestral(sdxl_turbo_dir, steps):
    engine = _load(sdxl_turbo_dir)
    assert (engine.family.name, engine.info.scheduler) == ("sdxl-turbo", "EulerAncestralDiscreteScheduler")
    ours = engine.generate(req("a castle", seed=9, num_inference_steps=steps, width=SIZE, height=SIZE))
    assert ours.parameters["guidance_scale"] == 0.0
    ref = _ref_images(_reference(sdxl_turbo_dir, sdxl=True), "a castle", seed=9, num_inference_steps=steps,
                      guidance_scale=0.0)
    assert_parity(ours.images, ref)


def test_sdxs_one_step_by_name(tmp_path):
    from diffusers import EulerDiscreteScheduler

    folder = save_family(tmp_path / "sdxs-512-0.9", scheduler=scheduler_from("sd15"), vae=tiny_decoder())
    engine = _load(folder)
    assert (engine.family.name, engine.family.num_inference_steps, engine.family.steps) == ("sdxs", 1, (1, 1))
    assert type(engine.pipe.vae).__name__ == "AutoencoderTiny"  # its own tiny decoder, as released
    ours = engine.generate(req("a dog", seed=2, num_inference_steps=None, width=SIZE, height=SIZE))
    assert ours.parameters["num_inference_steps"] == 1 and not ours.parameters["warnings"]
    trailing = lambda c: EulerDiscreteScheduler.from_config(c, timestep_spacing="trailing")  # noqa: E731
    ref = _ref_images(_reference(folder, scheduler=trailing), "a dog", seed=2, num_inference_steps=1,
                      guidance_scale=0.0)
    assert_parity(ours.images, ref)
    two = engine.generate(req("a dog", seed=2, num_inference_steps=2, width=SIZE, height=SIZE))
    assert any("distilled for 1 step" in w for w in two.parameters["warnings"])


def test_sdxl_lightning_trailing_euler_by_name(tmp_path):
    from diffusers import EulerDiscreteScheduler

    folder = save_family(tmp_path / "sdxl_lightning_4step", sdxl=True, scheduler=scheduler_from("sdxl"))
    engine = _load(folder)
    assert (engine.family.name, engine.family.num_inference_steps) == ("sdxl-lightning", 4)
    assert engine.pipe.scheduler.config.timestep_spacing == "trailing"  # SDXL base ships "leading"
    ours = engine.generate(req("a lake", seed=5, num_inference_steps=None, width=SIZE, height=SIZE))
    trailing = lambda c: EulerDiscreteScheduler.from_config(c, timestep_spacing="trailing")  # noqa: E731
    ref = _ref_images(_reference(folder, sdxl=True, scheduler=trailing), "a lake", seed=5, num_inference_steps=4,
                      guidance_scale=0.0)
    assert_parity(ours.images, ref)


@pytest.mark.parametrize("guidance, negative, eta", [(0.0, None, None), (1.5, "blurry", None), (0.0, None, 0.7)])
def test_tcd_parity(plain_sd_dir, guidance, negative, eta):
    from diffusers import TCDScheduler

    extra = {} if eta is None else {"eta": eta}
    engine = _load(plain_sd_dir, scheduler="tcd", **extra)
    assert (engine.family.name, engine.info.scheduler, engine.eta) == ("tcd", "TCDScheduler", eta or 0.3)
    ours = engine.generate(req("a tree", negative_prompt=negative, guidance_scale=guidance, seed=6,
                               num_inference_steps=None, width=SIZE, height=SIZE))
    assert ours.parameters["num_inference_steps"] == 4
    ref = _ref_images(_reference(plain_sd_dir, scheduler=TCDScheduler.from_config), "a tree", seed=6,
                      negative_prompt=negative, num_inference_steps=4, guidance_scale=guidance, eta=eta or 0.3)
    assert_parity(ours.images, ref)


def test_hyper_sd_one_step_tcd_from_its_lora_name(plain_sd_dir, tmp_path):
    from diffusers import StableDiffusionPipeline, TCDScheduler

    from lcm_live.engine.tiny import save_tiny_lora

    unet = StableDiffusionPipeline.from_pretrained(plain_sd_dir, safety_checker=None).unet
    lora = save_tiny_lora(tmp_path / "Hyper-SD15-1step-lora.safetensors", unet)
    engine = _load(plain_sd_dir, loras=[{"source": str(lora)}])
    assert (engine.family.name, engine.sampler, engine.eta) == ("hyper-sd", "tcd", 1.0)
    ours = engine.generate(req("a bird", seed=8, num_inference_steps=None, width=SIZE, height=SIZE))
    ref_pipe = _reference(plain_sd_dir, scheduler=TCDScheduler.from_config)
    ref_pipe.load_lora_weights(str(lora))
    ref_pipe.fuse_lora()
    ref = _ref_images(ref_pipe, "a bird", seed=8, num_inference_steps=1, guidance_scale=0.0, eta=1.0)
    assert_parity(ours.images, ref)


def test_euler_ancestral_override_with_cfg(plain_sd_dir):
    from diffusers import EulerAncestralDiscreteScheduler

    engine = _load(plain_sd_dir, scheduler="euler-a")
    assert (engine.family.name, engine.info.scheduler) == ("euler-a", "EulerAncestralDiscreteScheduler")
    ours = engine.generate(req("a fox", negative_prompt="dark", guidance_scale=1.5, seed=10, num_inference_steps=3,
                               width=SIZE, height=SIZE))
    ancestral = lambda c: EulerAncestralDiscreteScheduler.from_config(c, timestep_spacing="trailing")  # noqa: E731
    ref = _ref_images(_reference(plain_sd_dir, scheduler=ancestral), "a fox", negative_prompt="dark",
                      guidance_scale=1.5, seed=10, num_inference_steps=3)
    assert_parity(ours.images, ref)


def test_bk_sdm_with_its_lcm_lora(tmp_path):
    from diffusers import LCMScheduler

    from lcm_live.engine.tiny import save_tiny_lora

    unet = bk_sdm_unet()
    folder = save_family(tmp_path / "bk-sdm-tiny", scheduler=scheduler_from("sd15"), unet=unet)
    lora = save_tiny_lora(tmp_path / "lcm-lora-bk-sdm.safetensors", unet)
    engine = _load(folder, lcm_lora=str(lora))
    assert (engine.family.name, engine.sampler, engine.info.kind) == ("bk-sdm", "lcm", "lcm-lora")
    assert engine.pipe.unet.mid_block is None and engine.loaded.loras == [(str(lora), 1.0)]
    ours = engine.generate(req("a cup", seed=12, num_inference_steps=None, width=SIZE, height=SIZE))
    ref_pipe = _reference(folder, scheduler=LCMScheduler.from_config)
    ref_pipe.load_lora_weights(str(lora))
    ref_pipe.fuse_lora()
    ref = _ref_images(ref_pipe, "a cup", seed=12, num_inference_steps=4, guidance_scale=1.0)
    assert_parity(ours.images, ref)


def test_bk_sdm_takes_the_sd15_shaped_lcm_lora(tmp_path):
    """BK-SDM drops blocks of SD1.5 and keeps the rest, so SD1.5's LCM-LoRA (what ``--lcm-lora auto`` picks for
    bk-sdm) loads with the missing blocks' keys left out, as diffusers itself loads it, and changes the image."""
    from diffusers import LCMScheduler

    from lcm_live.engine.tiny import save_tiny_lora, tiny_components

    sd15_unet = tiny_components(time_cond_proj_dim=None, tokenizer_dir=tmp_path / "tok")["unet"]
    lora = save_tiny_lora(tmp_path / "lcm-lora-sdv1-5.safetensors", sd15_unet, std=0.2)
    folder = save_family(tmp_path / "bk-sdm-small", scheduler=scheduler_from("sd15"), unet=bk_sdm_unet())
    with_lora = _load(folder, lcm_lora=str(lora)).generate(req("a cup", seed=12, width=SIZE, height=SIZE)).images
    without = _load(folder, lcm_lora="none").generate(req("a cup", seed=12, width=SIZE, height=SIZE)).images
    assert np.abs(_pixels(with_lora) - _pixels(without)).max() > 0
    ref_pipe = _reference(folder, scheduler=LCMScheduler.from_config)
    ref_pipe.load_lora_weights(str(lora))
    ref_pipe.fuse_lora()
    assert_parity(with_lora, _ref_images(ref_pipe, "a cup", seed=12, num_inference_steps=2, guidance_scale=1.0))


@pytest.mark.parametrize("folder, scheduler", [("sd_turbo_dir", "auto"), ("plain_sd_dir", "tcd"),
                                               ("plain_sd_dir", "euler-a")])
def test_conditionings_compose_around_every_sampler(request, folder, scheduler):
    """Region prompts and masks wrap the model call, whatever the sampler: a region over everything is its prompt
    alone; a mask keeps the picture outside it and redraws inside."""
    from PIL import Image

    from lcm_live.engine.request import Region

    engine = _load(request.getfixturevalue(folder), scheduler=scheduler)
    full = Image.new("L", (SIZE, SIZE), 255)
    kw = dict(seed=5, num_inference_steps=2, width=SIZE, height=SIZE)
    region = engine.generate(req("a grey field", regions=[Region("a red circle", full)], **kw)).images
    alone = engine.generate(req("a red circle", **kw)).images
    assert np.abs(_pixels(region) - _pixels(alone)).max() <= 1
    mask = Image.new("L", (SIZE, SIZE), 0)
    mask.paste(255, (0, 0, SIZE // 2, SIZE))  # redraw the left half
    out = _pixels(engine.generate(req("a red circle", image=init_image(), mask_image=mask, strength=1.0,
                                      **kw)).images)[0]
    init = np.asarray(init_image()).astype(np.int16)
    assert np.abs(out[:, SIZE // 2 + 8:] - init[:, SIZE // 2 + 8:]).max() <= 2  # kept (past the feather)
    assert np.abs(out[:, : SIZE // 2 - 8] - init[:, : SIZE // 2 - 8]).mean() > 10  # redrawn


def test_lightning_one_step_x0_and_v_prediction_parity(tmp_path):
    """The samplers follow the scheduler's prediction_type as diffusers' steps do: SDXL-Lightning's 1-step UNet
    predicts x0 ("sample"); a v-prediction model (refused by detection) runs under --scheduler."""
    from diffusers import EulerDiscreteScheduler, TCDScheduler

    from lcm_live.errors import UserError

    folder = save_family(tmp_path / "sdxl_lightning_1step_x0", sdxl=True, scheduler=scheduler_from("sdxl"))
    engine = _load(folder)
    assert engine.pipe.scheduler.config.prediction_type == "sample" and engine.family.num_inference_steps == 1
    ours = engine.generate(req("a lake", seed=5, num_inference_steps=None, width=SIZE, height=SIZE)).images
    x0 = lambda c: EulerDiscreteScheduler.from_config(c, timestep_spacing="trailing", prediction_type="sample")  # noqa: E731
    assert_parity(ours, _ref_images(_reference(folder, sdxl=True, scheduler=x0), "a lake", seed=5,
                                    num_inference_steps=1, guidance_scale=0.0))

    v_config = {**dict(scheduler_from("sd15").config), "prediction_type": "v_prediction"}
    folder = save_family(tmp_path / "v-model", scheduler=EulerDiscreteScheduler.from_config(v_config))
    with pytest.raises(UserError, match="--scheduler"):
        _load(folder)
    for scheduler, make in (("euler-trailing",
                             lambda c: EulerDiscreteScheduler.from_config(c, timestep_spacing="trailing")),
                            ("tcd", TCDScheduler.from_config)):
        ours = _load(folder, scheduler=scheduler).generate(req("a hill", seed=7, num_inference_steps=3,
                                                               width=SIZE, height=SIZE)).images
        extra = {"eta": 0.3} if scheduler == "tcd" else {}
        assert_parity(ours, _ref_images(_reference(folder, scheduler=make), "a hill", seed=7, num_inference_steps=3,
                                        guidance_scale=0.0, **extra))


def test_sdxl_turbo_native_size_is_512(sdxl_turbo_dir):
    """SDXL-Turbo is SDXL's UNet trained at 512x512: its native size is the family's, not the config's 1024."""
    loaded = load_model(EngineSettings(model=str(sdxl_turbo_dir), device="cpu", dtype="float32"), progress=False)
    assert (loaded.family.name, loaded.native_width, loaded.native_height) == ("sdxl-turbo", 512, 512)


@pytest.mark.parametrize("family", ["sdxl-turbo", "tcd"])
def test_img2img_parity(request, family):
    """Image-to-image as diffusers' SD/SDXL img2img pipelines run it: the last int(steps * strength) steps, the
    init latents noised by the scheduler's own rule (Euler: x0 + sigma n; TCD: the alphas)."""
    from diffusers import TCDScheduler

    sdxl = family == "sdxl-turbo"
    folder = request.getfixturevalue("sdxl_turbo_dir" if sdxl else "plain_sd_dir")
    engine = _load(folder, scheduler="auto" if sdxl else "tcd")
    ours = engine.generate(req("a house", image=init_image(), strength=0.6, seed=4, num_inference_steps=4,
                               guidance_scale=0.0))
    make = None if sdxl else TCDScheduler.from_config
    extra = {} if sdxl else {"eta": 0.3}
    ref = _ref_images(_reference(folder, sdxl=sdxl, scheduler=make, img2img=True), "a house", image=init_image(),
                      strength=0.6, seed=4, num_inference_steps=4, guidance_scale=0.0, **extra)
    assert_parity(ours.images, ref)
