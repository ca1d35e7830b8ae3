"""Several ControlNets (engine/controlnet.py, engine/denoiser.py): each its image, scale and steps
(``control_guidance_start/end``), their residuals summed; the images equal diffusers' own
StableDiffusionControlNetPipeline with a MultiControlNetModel and the LCM scheduler, same seed."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from PIL import Image, ImageDraw

from lcm_live.config import EngineSettings
from lcm_live.engine.denoiser import ControlSteps
from lcm_live.engine.pipeline import Engine
from lcm_live.engine.request import GenerationRequest
from lcm_live.errors import UserError

TINY_SIZE = 64


@pytest.fixture(scope="module")
def controlnet_dirs(tiny_lcm_dir, tmp_path_factory):
    from diffusers import UNet2DConditionModel

    from lcm_live.engine.tiny import save_tiny_controlnet

    unet = UNet2DConditionModel.from_pretrained(tiny_lcm_dir / "unet")
    return [save_tiny_controlnet(tmp_path_factory.mktemp(f"controlnet{k}"), unet, seed=k) for k in range(2)]


@pytest.fixture(scope="module")
def engine(tiny_lcm_dir, controlnet_dirs):
    return Engine.from_settings(EngineSettings(model=str(tiny_lcm_dir), controlnet=[str(d) for d in controlnet_dirs],
                                               device="cpu", dtype="float32", decoder="vae"), progress=False)


def _lines(offset: int = 0) -> Image.Image:
    img = Image.new("RGB", (TINY_SIZE, TINY_SIZE), "black")
    draw = ImageDraw.Draw(img)
    draw.line([(4 + offset, 4), (60, 60 - offset)], fill="white", width=4)
    draw.ellipse([20, 30 + offset, 44, 54], outline="white", width=3)
    return img


def _edges() -> Image.Image:
    img = Image.new("RGB", (TINY_SIZE, TINY_SIZE), "black")
    ImageDraw.Draw(img).rectangle([10, 12, 50, 40], outline="white", width=3)
    return img


def _request(**kw) -> GenerationRequest:
    return GenerationRequest(**{"prompt": "a red circle", "seed": 3, "width": TINY_SIZE, "height": TINY_SIZE,
                                "num_inference_steps": 4, **kw})


def _pixels(result) -> np.ndarray:
    return np.asarray(result.images[0], dtype=np.float64)


def _counting(engine) -> list[int]:
    """Wrap each net's forward; the list counts its calls."""
    calls = [0] * len(engine.controlnets)
    for k, net in enumerate(engine.controlnets):
        forward = net.forward

        def counted(*a, _k=k, _forward=forward, **kw):
            calls[_k] += 1
            return _forward(*a, **kw)
        net.forward = counted
    return calls


def test_start_end_follow_diffusers_controlnet_keep():
    steps = ControlSteps.of([0.0, 0.25], [0.5, 1.0], 4)
    assert steps.keep == [[True, False], [True, True], [False, True], [False, True]]


def test_the_image_is_diffusers_own_multi_controlnet_pipelines(engine, tiny_lcm_dir, controlnet_dirs):
    import torch
    from diffusers import ControlNetModel, DiffusionPipeline, LCMScheduler, StableDiffusionControlNetPipeline

    base = DiffusionPipeline.from_pretrained(tiny_lcm_dir)
    pipe = StableDiffusionControlNetPipeline(
        vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=base.unet,
        controlnet=[ControlNetModel.from_pretrained(d) for d in controlnet_dirs],
        scheduler=LCMScheduler.from_config(base.scheduler.config), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    kw = {"controlnet_conditioning_scale": [0.8, 1.3], "control_guidance_start": [0.0, 0.25],
          "control_guidance_end": [0.5, 1.0]}
    reference = pipe("a red circle", image=[_lines(), _edges()], num_inference_steps=4, guidance_scale=8.0,
                     width=TINY_SIZE, height=TINY_SIZE, generator=torch.Generator("cpu").manual_seed(3),
                     output_type="np", **kw).images[0]
    result = engine.generate(_request(control_image=[_lines(), _edges()], guidance_scale=8.0, **kw))
    assert np.abs(_pixels(result) - reference * 255).max() <= 1.0  # 8-bit rounding
    p = result.parameters
    assert p["mode"] == "control" and p["controlnet"] == [str(d) for d in controlnet_dirs]
    assert p["controlnet_conditioning_scale"] == [0.8, 1.3] and p["control_guidance_end"] == [0.5, 1.0]
    assert engine.info.controlnets == [str(d) for d in controlnet_dirs]


def test_each_net_runs_only_in_its_steps_and_a_net_without_an_image_sits_out(engine):
    calls = _counting(engine)
    engine.generate(_request(control_image=[_lines(), _edges()], control_guidance_start=[0.0, 0.5],
                             control_guidance_end=[0.25, 1.0]))
    assert calls == [1, 2]
    calls[:] = [0, 0]
    alone = engine.generate(_request(control_image=[None, _edges()]))
    assert calls == [0, 4]
    calls[:] = [0, 0]
    zero = engine.generate(_request(control_image=[_lines(), _edges()], controlnet_conditioning_scale=[0.0, 1.0]))
    assert np.array_equal(_pixels(alone), _pixels(zero))  # sitting out is a zero scale, exactly
    plain = engine.generate(_request())
    assert np.abs(_pixels(alone) - _pixels(plain)).mean() > 1
    assert np.abs(_pixels(zero) - _pixels(engine.generate(_request(control_image=[_lines(), _edges()])))).mean() > 0.5


def test_a_batch_of_multi_control_requests_is_each_alone(engine):
    requests = [_request(control_image=[_lines(), _edges()], seed=5, control_guidance_end=0.5),
                _request(control_image=[_lines(12), _edges()], seed=6, control_guidance_end=0.5)]
    for request, result in zip(requests, engine.generate_batch(requests), strict=True):
        assert result.error is None
        assert np.abs(_pixels(result) - _pixels(engine.generate(request))).max() <= 1.0


@pytest.mark.parametrize(("kw", "field", "needle"), [
    ({"control_image": _lines()}, "control_image", "a list of 2 images"),
    ({"control_image": [_lines()]}, "control_image", "1 images for 2 ControlNets"),
    ({"control_image": [None, None]}, "control_image", "at least one image"),
    ({"controlnet_conditioning_scale": [1.0, 1.0, 1.0]}, "controlnet_conditioning_scale", "3 values for 2"),
    ({"controlnet_conditioning_scale": [1.0, -1.0]}, "controlnet_conditioning_scale", "=-1.0"),
    ({"control_guidance_start": 0.6, "control_guidance_end": 0.5}, "control_guidance_end", "above"),
    ({"control_guidance_start": [0.0, 1.0]}, "control_guidance_start", "[0, 1)"),
    ({"control_guidance_end": [1.0, 1.5]}, "control_guidance_end", "=1.5"),
])
def test_bad_multi_control_requests_say_what_to_change(engine, kw, field, needle):
    kw = {"control_image": [_lines(), _edges()], **kw}
    with pytest.raises(UserError) as excinfo:
        engine.generate(_request(**kw))
    assert excinfo.value.field == field and needle in excinfo.value.message, excinfo.value.message


@pytest.mark.slow
@pytest.mark.timeout(900)  # four IR conversions: minutes on a loaded 2-core machine
@pytest.mark.skipif(importlib.util.find_spec("openvino") is None, reason="openvino not installed")
def test_on_the_openvino_backend_each_net_runs_as_an_ir_of_its_own(engine, tiny_lcm_dir, controlnet_dirs, tmp_path):
    ov = Engine.from_settings(EngineSettings(model=str(tiny_lcm_dir), controlnet=[str(d) for d in controlnet_dirs],
                                             device="cpu", dtype="float32", decoder="vae", backend="openvino",
                                             openvino_cache_dir=str(tmp_path)), progress=False)
    assert "openvino:controlnetx2" in ov.info.speedups
    assert [type(net.forward).__name__ for net in ov.controlnets] == ["OpenVINOControlNet"] * 2
    kw = {"control_image": [_lines(), _edges()], "control_guidance_end": [1.0, 0.5]}
    ours, reference = _pixels(ov.generate(_request(**kw))), _pixels(engine.generate(_request(**kw)))
    assert np.abs(ours - reference).mean() < 0.5 and np.abs(ours - reference).max() <= 8
    assert len(list(tmp_path.rglob("controlnet.xml"))) == 2
