"""IP-Adapter (engine/ip_adapter.py): a reference image guides the picture on the engine's own loop.

A tiny IP-Adapter in diffusers' format (a tiny CLIPVisionModelWithProjection from a config, random base-adapter
weights for the tiny UNet), saved as safetensors in h94/IP-Adapter's layout; the engine's images equal diffusers'
own pipelines' with ``load_ip_adapter`` and the same seed.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image, ImageDraw

from lcm_live.bench.bench_conditioning import TINY_ENCODER, random_ip_adapter, save_ip_adapter
from lcm_live.config import EngineSettings
from lcm_live.engine.ip_adapter import ip_adapter_location, pixel_key
from lcm_live.engine.pipeline import Engine
from lcm_live.engine.request import GenerationRequest
from lcm_live.errors import UserError

TINY_SIZE = 64


def _save_adapter(folder, model_dir, *, seed=0, **encoder):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(model_dir / "unet")
    encoder_model, state = random_ip_adapter(unet, {**TINY_ENCODER, **encoder}, seed=seed)
    return save_ip_adapter(folder, encoder_model, state)


@pytest.fixture(scope="module")
def adapter(tiny_lcm_dir, tmp_path_factory):
    return _save_adapter(tmp_path_factory.mktemp("ip_adapter"), tiny_lcm_dir)


def _engine(model_dir, adapter, **settings) -> Engine:
    settings = {"device": "cpu", "dtype": "float32", "decoder": "vae", **settings}
    return Engine.from_settings(EngineSettings(model=str(model_dir), ip_adapter=str(adapter), **settings),
                                progress=False)


@pytest.fixture(scope="module")
def engine(tiny_lcm_dir, adapter):
    return _engine(tiny_lcm_dir, adapter)


def _reference(colour=(200, 40, 40)) -> Image.Image:
    img = Image.new("RGB", (48, 40), colour)
    ImageDraw.Draw(img).ellipse([8, 8, 36, 32], fill=(20, 200, 90))
    return img


def _request(**kw) -> GenerationRequest:
    return GenerationRequest(**{"prompt": "a red circle", "seed": 3, "width": TINY_SIZE, "height": TINY_SIZE, **kw})


def _pixels(result) -> np.ndarray:
    return np.asarray(result.images[0], dtype=np.float64)


def _diffusers_pipe(model_dir, adapter):
    from diffusers import DiffusionPipeline, LCMScheduler

    pipe = DiffusionPipeline.from_pretrained(model_dir)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_ip_adapter(str(adapter.parent), subfolder="", weight_name=adapter.name)  # its own loader
    return pipe


def test_the_image_is_diffusers_own_with_the_reference_image(engine, tiny_lcm_dir, adapter):
    """A full LCM: LatentConsistencyModelPipeline with the same adapter loaded by diffusers, same seed."""
    import torch

    pipe = _diffusers_pipe(tiny_lcm_dir, adapter)
    pipe.set_ip_adapter_scale(0.7)
    reference = pipe("a red circle", ip_adapter_image=_reference(), num_inference_steps=4, guidance_scale=8.0,
                     width=TINY_SIZE, height=TINY_SIZE, generator=torch.Generator("cpu").manual_seed(3),
                     output_type="np").images[0]
    result = engine.generate(_request(ip_adapter_image=_reference(), ip_adapter_scale=0.7, num_inference_steps=4,
                                      guidance_scale=8.0))
    assert np.abs(_pixels(result) - reference * 255).max() <= 1.0  # 8-bit rounding
    p = result.parameters
    assert p["mode"] == "ip_adapter" and p["ip_adapter"] == str(adapter) and p["ip_adapter_scale"] == 0.7


def test_with_classifier_free_guidance_the_uncond_rows_are_diffusers_zeros(tiny_sd_dir, tmp_path):
    """LCM-LoRA kind (StableDiffusionPipeline + LCMScheduler), guidance 1.5 and a negative prompt."""
    import torch

    adapter = _save_adapter(tmp_path, tiny_sd_dir, seed=4)
    engine = _engine(tiny_sd_dir, adapter, lcm_lora="none")
    pipe = _diffusers_pipe(tiny_sd_dir, adapter)
    reference = pipe("a red circle", negative_prompt="blue", ip_adapter_image=_reference(), num_inference_steps=4,
                     guidance_scale=1.5, width=TINY_SIZE, height=TINY_SIZE,
                     generator=torch.Generator("cpu").manual_seed(3), output_type="np").images[0]
    ours = engine.generate(_request(ip_adapter_image=_reference(), negative_prompt="blue", num_inference_steps=4,
                                    guidance_scale=1.5))
    assert np.abs(_pixels(ours) - reference * 255).max() <= 1.0


def test_the_reference_image_acts_and_without_one_the_picture_is_the_plain_one(engine, tiny_lcm_dir, lcm):
    plain = _pixels(lcm.generate(_request()))
    assert np.array_equal(_pixels(engine.generate(_request())), plain)  # adapter loaded, no image: scale 0
    a = _pixels(engine.generate(_request(ip_adapter_image=_reference())))
    b = _pixels(engine.generate(_request(ip_adapter_image=_reference((20, 20, 220)))))
    assert np.abs(a - plain).mean() > 1 and np.abs(a - b).mean() > 0.5
    assert np.array_equal(_pixels(engine.generate(_request(ip_adapter_image=_reference(), ip_adapter_scale=0))),
                          plain)
    assert np.array_equal(_pixels(engine.generate(_request())), plain)  # the scale is set back


def test_the_embedding_is_cached_by_pixels(engine):
    cache = engine.ip_embeddings
    hits, misses = cache.hits, cache.misses
    image = _reference((1, 2, 3))
    engine.generate(_request(ip_adapter_image=image))
    engine.generate(_request(ip_adapter_image=image.copy(), seed=4))  # another object, same pixels
    assert (cache.misses - misses, cache.hits - hits) == (1, 1)
    assert pixel_key(image) != pixel_key(_reference((1, 2, 4)))


def test_a_batch_of_reference_images_is_each_alone(engine):
    requests = [_request(ip_adapter_image=_reference(), seed=5), _request(ip_adapter_image=_reference((9, 9, 200)),
                                                                           seed=6)]
    for request, result in zip(requests, engine.generate_batch(requests), strict=True):
        assert result.error is None
        assert np.abs(_pixels(result) - _pixels(engine.generate(request))).max() <= 1.0


def test_bad_reference_requests_say_what_to_change(engine, lcm):
    with pytest.raises(UserError) as excinfo:
        engine.generate(_request(ip_adapter_image="ref.png"))
    assert excinfo.value.field == "ip_adapter_image" and "PIL image" in excinfo.value.message
    with pytest.raises(UserError) as excinfo:
        engine.generate(_request(ip_adapter_image=_reference(), ip_adapter_scale=3.0))
    assert excinfo.value.field == "ip_adapter_scale" and "ip_adapter_scale=3.0" in excinfo.value.message
    with pytest.raises(UserError) as excinfo:
        lcm.generate(_request(ip_adapter_image=_reference()))
    assert excinfo.value.field == "ip_adapter_image" and "--ip-adapter" in excinfo.value.message


def test_an_adapter_for_another_architecture_is_refused_before_loading(tiny_lcm_dir, adapter, tmp_path):
    from safetensors.torch import load_file, save_file

    state = load_file(str(adapter))
    wide = {k: (v.new_zeros(v.shape[0], 2048) if "to_k_ip" in k or "to_v_ip" in k else v) for k, v in state.items()}
    other = tmp_path / "sdxl"
    shutil.copytree(adapter.parent / "image_encoder", other / "image_encoder")
    save_file(wide, str(other / "ip-adapter_sdxl.safetensors"))
    with pytest.raises(UserError) as excinfo:
        _engine(tiny_lcm_dir, other / "ip-adapter_sdxl.safetensors")
    assert "made for sdxl" in excinfo.value.message and excinfo.value.field == "ip_adapter"


def test_an_adapter_that_does_not_fit_its_encoder_or_is_a_plus_one_is_refused(tiny_lcm_dir, adapter, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "x"
    shutil.copytree(adapter.parent / "image_encoder", folder / "image_encoder")
    config = json.loads((folder / "image_encoder" / "config.json").read_text())
    config["projection_dim"] = 64
    (folder / "image_encoder" / "config.json").write_text(json.dumps(config))
    shutil.copy(adapter, folder / "a.safetensors")
    with pytest.raises(UserError) as excinfo:
        _engine(tiny_lcm_dir, folder / "a.safetensors")
    assert "gives 64" in excinfo.value.message
    state = load_file(str(adapter))
    plus = {("image_proj.latents" if k == "image_proj.proj.weight" else k): v for k, v in state.items()}
    save_file(plus, str(folder / "plus.safetensors"))
    with pytest.raises(UserError) as excinfo:
        _engine(tiny_lcm_dir, folder / "plus.safetensors")
    assert "Plus or FaceID" in excinfo.value.message


def test_what_is_not_a_safetensors_adapter_with_its_encoder_is_refused(adapter, tmp_path):
    (tmp_path / "ip-adapter_sd15.bin").write_bytes(b"not loaded")
    (tmp_path / "alone").mkdir()
    shutil.copy(adapter, tmp_path / "alone" / "a.safetensors")
    cases = {
        str(tmp_path / "ip-adapter_sd15.bin"): "not a safetensors file",
        str(tmp_path / "alone" / "a.safetensors"): "no image encoder beside it",
        str(tmp_path / "missing.safetensors"): "no such file",
        str(adapter.parent): "is a folder",
    }
    for source, needle in cases.items():
        with pytest.raises(UserError) as excinfo:
            ip_adapter_location(source, cache_dir=None, progress=False)
        assert needle in excinfo.value.message and excinfo.value.field == "ip_adapter", source


def test_the_openvino_backend_is_refused_with_an_ip_adapter(tiny_lcm_dir, adapter):
    with pytest.raises(UserError) as excinfo:
        _engine(tiny_lcm_dir, adapter, backend="openvino")
    assert excinfo.value.field == "backend" and "--ip-adapter" in excinfo.value.message


def test_sdxl_takes_an_sdxl_adapter_as_diffusers_does(tmp_path):
    """SDXL's added_cond_kwargs (pooled text, size ids) with the image embeddings beside them."""
    import torch
    from diffusers import LCMScheduler, StableDiffusionXLPipeline

    from lcm_live.engine.tiny import save_tiny_sdxl_pipeline

    model = save_tiny_sdxl_pipeline(tmp_path / "sdxl")
    adapter = _save_adapter(tmp_path / "ipa", model, seed=2)
    engine = _engine(model, adapter)
    ours = engine.generate(_request(ip_adapter_image=_reference()))
    pipe = StableDiffusionXLPipeline.from_pretrained(model)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_ip_adapter(str(adapter.parent), subfolder="", weight_name=adapter.name)
    reference = pipe("a red circle", ip_adapter_image=_reference(), num_inference_steps=4,
                     guidance_scale=engine.info.default_guidance_scale, width=TINY_SIZE, height=TINY_SIZE,
                     generator=torch.Generator("cpu").manual_seed(3), output_type="np").images[0]
    assert np.abs(_pixels(ours) - reference * 255).max() <= 1.0
    assert np.abs(_pixels(ours) - _pixels(engine.generate(_request()))).mean() > 1
