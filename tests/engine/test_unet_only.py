"""UNet-only models (as latent-consistency/lcm-sdxl): a tiny UNet folder or hub id loaded into a tiny base."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from lcm_live.config import EngineSettings
from lcm_live.engine import unet_only
from lcm_live.engine.loading import load_model
from lcm_live.engine.tiny import put_in_hf_cache, save_tiny_sdxl_pipeline, save_tiny_unet_only
from lcm_live.errors import ModelUnavailableError, UserError


def _load(model, **kw):
    return load_model(EngineSettings(model=str(model), **kw), device="cpu", dtype=torch.float32, progress=False)


def _one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message and excinfo.value.__cause__ is None
    return message


@pytest.fixture(scope="module")
def sd15_base(tmp_path_factory, tiny_sd_dir):
    """The tiny plain SD model as a base, with SD1.5's own scheduler (PNDM), as the real base ships."""
    from diffusers import PNDMScheduler

    base = tmp_path_factory.mktemp("sd15_base") / "base"
    shutil.copytree(tiny_sd_dir, base)
    shutil.rmtree(base / "scheduler")
    PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                  set_alpha_to_one=False, steps_offset=1).save_pretrained(base / "scheduler")
    return base


@pytest.fixture(scope="module")
def sdxl_base(tmp_path_factory):
    """A tiny SDXL base without its UNet folder: a UNet-only model needs everything but the base's UNet."""
    base = save_tiny_sdxl_pipeline(tmp_path_factory.mktemp("sdxl_base") / "base", full_lcm=False, seed=3)
    shutil.rmtree(base / "unet")
    return base


@pytest.fixture(scope="module")
def sd15_unet(tmp_path_factory):
    return save_tiny_unet_only(tmp_path_factory.mktemp("unet") / "lcm-unet", seed=11)


@pytest.fixture(scope="module")
def sdxl_unet(tmp_path_factory):
    return save_tiny_unet_only(tmp_path_factory.mktemp("unet_xl") / "lcm-sdxl", sdxl=True, seed=12)


def test_local_unet_folder_runs_in_its_base(sd15_unet, sd15_base, monkeypatch):
    from diffusers import LatentConsistencyModelPipeline, LCMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    monkeypatch.setitem(unet_only.BASE_MODELS, "sd15", str(sd15_base))
    model = _load(sd15_unet, lcm_lora="ignored/for-full-lcms")
    assert isinstance(model.pipe, LatentConsistencyModelPipeline)
    assert isinstance(model.pipe.scheduler, LCMScheduler)  # made from the base's PNDM config
    assert model.pipe.scheduler.config.steps_offset == 1 and model.pipe.scheduler.config.beta_end == 0.012
    assert (model.kind, model.arch, model.name, model.loras) == ("lcm", "sd15", str(sd15_unet), [])
    assert (model.native_width, model.native_height) == (32, 32)
    # The UNet is the folder's own (not the base's); the text encoder is the base's.
    for part, want in (("unet", UNet2DConditionModel.from_pretrained(sd15_unet)),
                       ("text_encoder", CLIPTextModel.from_pretrained(sd15_base / "text_encoder"))):
        got = getattr(model.pipe, part).state_dict()
        assert all(torch.equal(got[k], v) for k, v in want.state_dict().items()), part
    out = model.pipe("a red circle", num_inference_steps=2, guidance_scale=8.0, output_type="np")
    assert out.images.shape == (1, 32, 32, 3)


def test_plain_unet_folder_is_an_lcm_lora_model(tmp_path, sd15_base, monkeypatch):
    from diffusers import StableDiffusionPipeline

    monkeypatch.setitem(unet_only.BASE_MODELS, "sd15", str(sd15_base))
    model = _load(save_tiny_unet_only(tmp_path / "plain", full_lcm=False), lcm_lora="none")
    assert isinstance(model.pipe, StableDiffusionPipeline) and model.kind == "lcm-lora"


def test_sdxl_hub_id_from_an_offline_cache(tmp_path, sdxl_unet, sdxl_base, monkeypatch, capfd):
    from diffusers import LCMScheduler, StableDiffusionXLPipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path / "cache"
    put_in_hf_cache(cache, "someorg/tiny-lcm-sdxl", sdxl_unet)
    put_in_hf_cache(cache, "someorg/tiny-sdxl-base", sdxl_base)
    monkeypatch.setitem(unet_only.BASE_MODELS, "sdxl", "someorg/tiny-sdxl-base")
    model = _load("someorg/tiny-lcm-sdxl", cache_dir=str(cache))
    assert isinstance(model.pipe, StableDiffusionXLPipeline) and isinstance(model.pipe.scheduler, LCMScheduler)
    assert (model.kind, model.arch, model.name, model.notice) == ("lcm", "sdxl", "someorg/tiny-lcm-sdxl", None)
    assert model.pipe.unet.config.time_cond_proj_dim == 32
    out = model.pipe("a red circle", num_inference_steps=1, guidance_scale=1.0, output_type="np")
    assert out.images.shape == (1, 32, 32, 3)
    assert "Could not reach the Hub" not in capfd.readouterr().err


def test_base_not_cached_names_both(tmp_path, sdxl_unet, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path / "cache"
    put_in_hf_cache(cache, "someorg/tiny-lcm-sdxl", sdxl_unet)
    monkeypatch.setitem(unet_only.BASE_MODELS, "sdxl", "someorg/missing-base")
    with pytest.raises(ModelUnavailableError) as excinfo:
        _load("someorg/tiny-lcm-sdxl", cache_dir=str(cache))
    message = _one_line(excinfo)
    for part in ("someorg/tiny-lcm-sdxl", "someorg/missing-base", "UNet only", str(cache), "HF_HUB_OFFLINE",
                 "--model PATH"):
        assert part in message


def test_real_bases_by_architecture():
    assert unet_only.base_model("latent-consistency/lcm-sdxl", "sdxl") == "stabilityai/stable-diffusion-xl-base-1.0"
    assert unet_only.base_model("someone/lcm-sd15-unet", "sd15") == "stable-diffusion-v1-5/stable-diffusion-v1-5"


def _config_only_folder(folder, **config):
    from safetensors.torch import save_file

    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel", **config}))
    save_file({"x": torch.zeros(1)}, str(folder / "diffusion_pytorch_model.safetensors"))
    return folder


def test_architecture_from_the_unet_config(tmp_path):
    read = unet_only.read_unet_info
    sdxl = read(_config_only_folder(tmp_path / "xl", cross_attention_dim=2048, addition_embed_type="text_time",
                                    time_cond_proj_dim=256), "xl")
    assert (sdxl.arch, sdxl.full_lcm, sdxl.context_width) == ("sdxl", True, 2048)
    sd15 = read(_config_only_folder(tmp_path / "v15", cross_attention_dim=768), "v15")
    assert (sd15.arch, sd15.full_lcm, sd15.context_width) == ("sd15", False, 768)
    with pytest.raises(UserError, match="2.x"):
        read(_config_only_folder(tmp_path / "v2", cross_attention_dim=1024), "v2")


def test_unet_that_does_not_fit_its_base(sd15_unet, sdxl_base, monkeypatch):
    monkeypatch.setitem(unet_only.BASE_MODELS, "sd15", str(sdxl_base))  # a 32-wide SD1.5 UNet, an 80-wide base
    with pytest.raises(UserError) as excinfo:
        _load(sd15_unet)
    assert "32 wide" in _one_line(excinfo) and "32 + 48" in str(excinfo.value)


@pytest.fixture
def no_unpickling(monkeypatch):
    import pickle

    def forbidden(*args, **kwargs):
        raise AssertionError("a pickle load was attempted")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)


def _bin_only_unet(folder, sd15_unet):
    folder.mkdir()
    shutil.copy(sd15_unet / "config.json", folder / "config.json")
    (folder / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04junk")
    return folder


def test_bin_only_unet_folder_is_refused(tmp_path, sd15_unet, no_unpickling):
    with pytest.raises(UserError, match="only pickle weights"):
        _load(_bin_only_unet(tmp_path / "bin", sd15_unet))


def test_bin_only_unet_in_the_cache_is_refused(tmp_path, sd15_unet, monkeypatch, no_unpickling):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path / "cache"
    put_in_hf_cache(cache, "someorg/pickled-unet", _bin_only_unet(tmp_path / "bin", sd15_unet))
    with pytest.raises(UserError) as excinfo:
        _load("someorg/pickled-unet", cache_dir=str(cache))
    assert "someorg/pickled-unet" in _one_line(excinfo) and "only pickle weights" in str(excinfo.value)


def test_unet_weights_not_cached(tmp_path, sd15_unet, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    shutil.copy(sd15_unet / "config.json", config_only / "config.json")
    put_in_hf_cache(tmp_path / "cache", "someorg/half-cached-unet", config_only)
    with pytest.raises(ModelUnavailableError) as excinfo:
        _load("someorg/half-cached-unet", cache_dir=str(tmp_path / "cache"))
    assert "someorg/half-cached-unet" in _one_line(excinfo) and "not cached" in str(excinfo.value)


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_real_unet_configs_fit_the_real_bases(tmp_path, arch):
    """lcm-sdxl's UNet (2048 wide, text_time, w-embedding 256) fits CLIP-L + OpenCLIP bigG (768 + 1280) as the
    shipped SDXL configs have them; an SD1.5 LCM UNet (768) fits CLIP-L; crossed, they do not."""
    from lcm_live.engine.architectures import config_dir, read_config

    folder = _config_only_folder(tmp_path / arch, **{**read_config(arch, "unet"), "time_cond_proj_dim": 256})
    info = unet_only.read_unet_info(folder, arch)
    assert (info.arch, info.full_lcm) == (arch, True)
    unet_only.check_fit(arch, info, f"{arch}-base", config_dir(arch))
    other = config_dir("sd15" if arch == "sdxl" else "sdxl")
    with pytest.raises(UserError, match="do not fit"):
        unet_only.check_fit(arch, info, "other-base", other)
