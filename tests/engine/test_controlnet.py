"""ControlNet (engine/controlnet.py): a control image guides text-to-image on the engine's own UNet and scheduler.

A tiny ControlNet shaped for the tiny models (random weights, its zero convolutions randomised so that it has an
effect), saved as a diffusers folder; the engine's image is diffusers' own StableDiffusionControlNetPipeline's.
"""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
from PIL import Image, ImageDraw

from lcm_live.config import EngineSettings
from lcm_live.engine.controlnet import controlnet_location
from lcm_live.engine.pipeline import Engine
from lcm_live.engine.request import GenerationRequest
from lcm_live.engine.speedups import resolve_backend
from lcm_live.errors import ModelUnavailableError, UserError

TINY_SIZE = 64  # the smallest size the engine accepts (tests/engine/conftest.py)


@pytest.fixture(scope="module")
def controlnet_dir(tiny_lcm_dir, tmp_path_factory):
    from diffusers import UNet2DConditionModel

    from lcm_live.engine.tiny import save_tiny_controlnet

    unet = UNet2DConditionModel.from_pretrained(tiny_lcm_dir / "unet")
    return save_tiny_controlnet(tmp_path_factory.mktemp("controlnet"), unet)


def _engine(model_dir, controlnet, **settings) -> Engine:
    settings = {"device": "cpu", "dtype": "float32", "decoder": "vae", **settings}
    return Engine.from_settings(EngineSettings(model=str(model_dir), controlnet=str(controlnet), **settings),
                                progress=False)


@pytest.fixture(scope="module")
def engine(tiny_lcm_dir, controlnet_dir):
    return _engine(tiny_lcm_dir, controlnet_dir)


def _lines(offset: int = 0) -> Image.Image:
    """White lines on black, as a scribble ControlNet takes them."""
    img = Image.new("RGB", (TINY_SIZE, TINY_SIZE), "black")
    draw = ImageDraw.Draw(img)
    draw.line([(4 + offset, 4), (60, 60 - offset)], fill="white", width=4)
    draw.ellipse([20, 30 + offset, 44, 54], outline="white", width=3)
    return img


def _request(**kw) -> GenerationRequest:
    return GenerationRequest(**{"prompt": "a red circle", "seed": 3, "width": TINY_SIZE, "height": TINY_SIZE, **kw})


def _pixels(result) -> np.ndarray:
    return np.asarray(result.images[0], dtype=np.float64)


def test_the_control_image_guides_the_image_and_is_recorded(engine, controlnet_dir):
    plain = engine.generate(_request())
    a = engine.generate(_request(control_image=_lines()))
    b = engine.generate(_request(control_image=_lines(offset=12)))
    assert np.abs(_pixels(a) - _pixels(plain)).mean() > 1  # the ControlNet acts
    assert np.abs(_pixels(a) - _pixels(b)).mean() > 0.5  # and follows its image
    assert np.array_equal(_pixels(a), _pixels(engine.generate(_request(control_image=_lines()))))  # seeds hold
    p = a.parameters
    assert p["mode"] == "control" and p["controlnet"] == str(controlnet_dir)
    assert p["controlnet_conditioning_scale"] == 1.0 and "strength" not in p
    assert engine.info.controlnet == str(controlnet_dir)
    assert plain.parameters["mode"] == "txt2img" and "controlnet" not in plain.parameters


def test_warmup_runs_lines_mode_too(tiny_lcm_dir, controlnet_dir):
    """Its first frame would otherwise convert the OpenVINO UNet's residual IR mid-session (minutes on a CPU)."""
    engine = _engine(tiny_lcm_dir, controlnet_dir)
    calls = []
    forward = engine.loaded.controlnet.forward
    engine.loaded.controlnet.forward = lambda *a, **k: calls.append(1) or forward(*a, **k)
    engine.warmup(TINY_SIZE, TINY_SIZE, num_inference_steps=2)
    assert len(calls) == 2


def test_scale_zero_is_the_plain_image(engine):
    plain = engine.generate(_request())
    off = engine.generate(_request(control_image=_lines(), controlnet_conditioning_scale=0.0))
    assert np.array_equal(_pixels(off), _pixels(plain))


def test_the_image_is_diffusers_own_controlnet_pipelines(engine, tiny_lcm_dir, controlnet_dir):
    """The same components in diffusers' StableDiffusionControlNetPipeline with its LCMScheduler, same seed."""
    import torch
    from diffusers import ControlNetModel, DiffusionPipeline, LCMScheduler, StableDiffusionControlNetPipeline

    base = DiffusionPipeline.from_pretrained(tiny_lcm_dir)
    pipe = StableDiffusionControlNetPipeline(
        vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=base.unet,
        controlnet=ControlNetModel.from_pretrained(controlnet_dir),
        scheduler=LCMScheduler.from_config(base.scheduler.config), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    reference = pipe("a red circle", image=_lines(), num_inference_steps=4, guidance_scale=8.0, width=TINY_SIZE,
                     height=TINY_SIZE, generator=torch.Generator("cpu").manual_seed(3), output_type="np").images[0]
    ours = _pixels(engine.generate(_request(control_image=_lines(), num_inference_steps=4, guidance_scale=8.0)))
    assert np.abs(ours - reference * 255).max() <= 1.0  # 8-bit rounding


def test_a_batch_of_control_requests_is_each_alone(engine):
    requests = [_request(control_image=_lines(), seed=5), _request(control_image=_lines(offset=12), seed=6)]
    batch = engine.generate_batch(requests)
    for request, result in zip(requests, batch, strict=True):
        assert result.error is None
        assert np.abs(_pixels(result) - _pixels(engine.generate(request))).max() <= 1.0


def test_lcm_lora_with_classifier_free_guidance_takes_the_control_image(tiny_sd_dir, controlnet_dir):
    engine = _engine(tiny_sd_dir, controlnet_dir, lcm_lora="none")
    plain = engine.generate(_request(guidance_scale=1.5, negative_prompt="blue"))
    control = engine.generate(_request(guidance_scale=1.5, negative_prompt="blue", control_image=_lines()))
    assert np.abs(_pixels(control) - _pixels(plain)).mean() > 1
    assert control.parameters["negative_prompt"] == "blue"


def test_a_control_image_guides_image_to_image_and_inpainting_too(engine):
    """The engine's own loop composes the ControlNet with an init image (and a mask over it), which diffusers'
    ControlNet pipelines could not give a full LCM."""
    init = Image.new("RGB", (TINY_SIZE, TINY_SIZE), (40, 90, 160))
    plain = engine.generate(_request(image=init, strength=0.7))
    control = engine.generate(_request(image=init, strength=0.7, control_image=_lines()))
    assert control.parameters["mode"] == "img2img+control"
    assert np.abs(_pixels(control) - _pixels(plain)).mean() > 1
    mask = Image.new("L", (TINY_SIZE, TINY_SIZE), 0)
    mask.paste(255, (0, 0, 24, TINY_SIZE))
    inpaint = engine.generate(_request(image=init, strength=0.7, control_image=_lines(), mask_image=mask,
                                       mask_feather=4))
    assert inpaint.parameters["mode"] == "inpaint+control"
    assert np.array_equal(_pixels(inpaint)[:, 28:], np.asarray(init, dtype=np.float64)[:, 28:])


@pytest.mark.parametrize(("kw", "needle"), [
    ({"controlnet_conditioning_scale": -0.5}, "controlnet_conditioning_scale=-0.5"),
    ({"control_image": "lines.png"}, "PIL image"),
])
def test_bad_control_requests_say_what_to_change(engine, kw, needle):
    kw = {"control_image": _lines(), **kw}
    with pytest.raises(UserError) as excinfo:
        engine.generate(_request(**kw))
    assert needle in excinfo.value.message
    assert excinfo.value.field in ("control_image", "controlnet_conditioning_scale")


def test_a_control_image_without_a_controlnet_names_the_flag(lcm):
    with pytest.raises(UserError) as excinfo:
        lcm.generate(_request(control_image=_lines()))
    assert "--controlnet" in excinfo.value.message and excinfo.value.field == "control_image"


def test_a_controlnet_for_another_architecture_is_refused_before_loading(tiny_lcm_dir, controlnet_dir, tmp_path):
    import shutil

    other = tmp_path / "sdxl_controlnet"
    shutil.copytree(controlnet_dir, other)
    config = json.loads((other / "config.json").read_text())
    config["cross_attention_dim"] = 2048
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError) as excinfo:
        _engine(tiny_lcm_dir, other)
    assert "made for sdxl" in excinfo.value.message and excinfo.value.field == "controlnet"


def test_what_is_not_a_safetensors_controlnet_folder_is_refused(tiny_lcm_dir, controlnet_dir, tmp_path):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((controlnet_dir / "config.json").read_text())
    (pickled / "diffusion_pytorch_model.bin").write_bytes(b"not loaded")
    cases = {
        str(pickled): "only pickle weights",
        str(tiny_lcm_dir / "unet"): "not a ControlNetModel",
        str(pickled / "diffusion_pytorch_model.bin"): "not a safetensors file",
        str(tmp_path / "missing"): "no such folder",
    }
    for source, needle in cases.items():
        with pytest.raises(UserError) as excinfo:
            controlnet_location(source, cache_dir=None, progress=False)
        assert needle in excinfo.value.message, source


def test_a_single_file_controlnet_in_the_original_layout_loads_with_the_models_config(tiny_lcm_dir, tmp_path):
    """The ControlNet 1.1 releases' layout (control_model.*), no config: the one from_unet derives is used. Its image
    embedding is the released 8x one, so the tiny model (2x VAE) cannot run it: the weights are compared."""
    import torch
    from diffusers import UNet2DConditionModel

    from lcm_live.engine.controlnet import load_controlnet
    from lcm_live.engine.tiny import save_tiny_controlnet_single_file

    unet = UNet2DConditionModel.from_pretrained(tiny_lcm_dir / "unet")
    path, made = save_tiny_controlnet_single_file(tmp_path / "control_tiny.safetensors", unet)
    assert controlnet_location(str(path), cache_dir=None, progress=False) == path
    loaded = load_controlnet(str(path), path, unet=unet, arch="sd15", dtype=torch.float32, device="cpu")
    want, got = made.state_dict(), loaded.state_dict()
    assert set(want) == set(got) and all(torch.equal(want[k], got[k]) for k in want)


def test_a_single_file_controlnet_for_another_width_is_refused_before_loading(tiny_lcm_dir, tmp_path):
    import torch
    from diffusers import UNet2DConditionModel

    from lcm_live.engine.controlnet import load_controlnet
    from lcm_live.engine.tiny import save_tiny_controlnet_single_file, save_tiny_sdxl_pipeline

    sdxl = save_tiny_sdxl_pipeline(tmp_path / "sdxl")
    path, _ = save_tiny_controlnet_single_file(tmp_path / "xl.safetensors",
                                               UNet2DConditionModel.from_pretrained(sdxl / "unet"))
    with pytest.raises(UserError) as excinfo:
        load_controlnet(str(path), path, unet=UNet2DConditionModel.from_pretrained(tiny_lcm_dir / "unet"),
                        arch="sd15", dtype=torch.float32, device="cpu")
    assert "cross_attention_dim 80" in excinfo.value.message and "cross_attention_dim 32" in excinfo.value.message


def test_a_hub_controlnet_loads_from_the_cache_and_says_so_when_missing(monkeypatch, tmp_path, tiny_lcm_dir,
                                                                         controlnet_dir):
    from lcm_live.engine.tiny import put_in_hf_cache

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path / "hub"
    put_in_hf_cache(cache, "someorg/tiny-scribble", controlnet_dir)
    engine = _engine(tiny_lcm_dir, "someorg/tiny-scribble", cache_dir=str(cache))
    assert engine.generate(_request(control_image=_lines())).parameters["controlnet"] == "someorg/tiny-scribble"
    with pytest.raises(ModelUnavailableError) as excinfo:
        controlnet_location("someorg/not-cached", cache_dir=str(cache), progress=False)
    assert "--controlnet 'someorg/not-cached' cannot be had" in excinfo.value.message
    assert "--controlnet PATH" in excinfo.value.message and excinfo.value.field == "controlnet"


@pytest.mark.skipif(importlib.util.find_spec("openvino") is None, reason="openvino not installed")
def test_the_openvino_unet_takes_the_controlnets_residuals(engine, tiny_lcm_dir, controlnet_dir, tmp_path):
    """The residuals become inputs of an IR of their own; the image is the torch UNet's."""
    ov = _engine(tiny_lcm_dir, controlnet_dir, backend="openvino", openvino_cache_dir=str(tmp_path))
    assert type(ov.pipe.unet).__name__ == "OpenVINOUNet"
    for kw in ({}, {"control_image": _lines()}, {"control_image": _lines(offset=12)}):
        ours, reference = _pixels(ov.generate(_request(**kw))), _pixels(engine.generate(_request(**kw)))
        assert np.abs(ours - reference).mean() < 0.5 and np.abs(ours - reference).max() <= 8, kw
    assert ov.pipe.unet.conversions == 2  # one IR without residuals, one with: the two images share it
    folders = sorted(p.parent.name for p in tmp_path.rglob("unet.xml"))
    assert len(folders) == 2 and sum("_controlnet" in f for f in folders) == 1
    # The ControlNet runs in OpenVINO too (its own IR, one shape), the real ControlNetModel still in the pipeline.
    runner = ov.loaded.controlnet.forward
    assert type(runner).__name__ == "OpenVINOControlNet" and "openvino:controlnet" in ov.info.speedups
    assert runner.conversions == 1 and runner.torch_calls == 0 and len(list(tmp_path.rglob("controlnet.xml"))) == 1
    half = _pixels(ov.generate(_request(control_image=_lines(), controlnet_conditioning_scale=0.5)))
    reference = _pixels(engine.generate(_request(control_image=_lines(), controlnet_conditioning_scale=0.5)))
    assert np.abs(half - reference).mean() < 0.5  # the scale applied after the IR, as diffusers does
    # Its torch weights wait on disk between conversions (the module keeps its dtype and the CPU as device); a new
    # size brings them back for an IR of its own.
    assert ov.loaded.controlnet.conv_in.weight.numel() == 0 and ov.loaded.controlnet.device.type == "cpu"
    wide = {"control_image": _lines(), "width": 2 * TINY_SIZE}
    ours, reference = _pixels(ov.generate(_request(**wide))), _pixels(engine.generate(_request(**wide)))
    assert np.abs(ours - reference).mean() < 0.5 and runner.conversions == 2
    # What the IR does not cover (here guess mode) goes to the torch forward, its weights back from the file.
    import torch
    from diffusers import ControlNetModel

    args = (torch.randn(1, 4, 32, 32), torch.tensor(500), torch.randn(1, 77, 32), torch.rand(1, 3, 64, 64))
    want = ControlNetModel.from_pretrained(controlnet_dir)(*args, guess_mode=True, return_dict=False)[1]
    got = ov.loaded.controlnet(*args, guess_mode=True, return_dict=False)[1]
    assert runner.torch_calls == 1 and torch.allclose(got, want, atol=1e-5)


def test_auto_picks_openvino_with_a_controlnet_too(monkeypatch):
    from lcm_live.engine import speedups
    from lcm_live.engine.devices import CpuFeatures

    monkeypatch.setattr(speedups.devices, "detect_cpu_features", lambda *a, **k: CpuFeatures(flags=["amx_bf16"]))
    monkeypatch.setattr(speedups, "openvino_installed", lambda: True)
    assert resolve_backend(EngineSettings(model="x", controlnet="org/cn"), "cpu").name == "openvino"


def test_sdxl_takes_an_sdxl_controlnet(tmp_path):
    from diffusers import UNet2DConditionModel

    from lcm_live.engine.tiny import save_tiny_controlnet, save_tiny_sdxl_pipeline

    model = save_tiny_sdxl_pipeline(tmp_path / "sdxl")
    controlnet = save_tiny_controlnet(tmp_path / "cn", UNet2DConditionModel.from_pretrained(model / "unet"))
    engine = _engine(model, controlnet)
    plain = engine.generate(_request())
    control = engine.generate(_request(control_image=_lines()))
    # diffusers' own StableDiffusionXLControlNetPipeline on the same components gives the same image.
    import torch
    from diffusers import (
        ControlNetModel,
        LCMScheduler,
        StableDiffusionXLControlNetPipeline,
        StableDiffusionXLPipeline,
    )

    base = StableDiffusionXLPipeline.from_pretrained(model)
    pipe = StableDiffusionXLControlNetPipeline.from_pipe(base, controlnet=ControlNetModel.from_pretrained(controlnet))
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    guidance = engine.info.default_guidance_scale
    reference = pipe("a red circle", image=_lines(), num_inference_steps=4, guidance_scale=guidance, width=TINY_SIZE,
                     height=TINY_SIZE, generator=torch.Generator("cpu").manual_seed(3), output_type="np").images[0]
    assert np.abs(_pixels(control) - reference * 255).max() <= 1.0  # 8-bit rounding
    assert control.parameters["mode"] == "control" and control.images[0].size == (TINY_SIZE, TINY_SIZE)
    assert np.abs(_pixels(control) - _pixels(plain)).mean() > 1
