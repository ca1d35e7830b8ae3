"""load_model on tiny models: folders, builtin names, single files, pickle refusal, the offline error and fallback."""

from __future__ import annotations

import shutil

import pytest
import torch

from lcm_live.config import DEFAULT_MODEL, EngineSettings
from lcm_live.engine import loading, sources
from lcm_live.engine.loading import load_model
from lcm_live.engine.tiny import put_in_hf_cache
from lcm_live.errors import ModelUnavailableError, UserError


def _load(model, **kw):
    return load_model(EngineSettings(model=str(model), **kw), device="cpu", dtype=torch.float32, progress=False)


@pytest.fixture
def builtin_dir(tmp_path, monkeypatch, tiny_lcm_dir):
    """A package builtin folder holding a tiny LCM as builtin:shapes."""
    root = tmp_path / "builtin"
    shutil.copytree(tiny_lcm_dir, root / "shapes")
    monkeypatch.setattr(sources, "builtin_root", lambda: root)
    return root


def _one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message and "Traceback" not in message
    assert excinfo.value.__cause__ is None  # raised `from None`: the CLI shows one line, not a chain
    return message


def test_full_lcm_folder(tiny_lcm_dir):
    from diffusers import LatentConsistencyModelPipeline, LCMScheduler

    model = _load(tiny_lcm_dir, lcm_lora="does-not/matter-for-full-lcms")
    assert isinstance(model.pipe, LatentConsistencyModelPipeline)
    assert isinstance(model.pipe.scheduler, LCMScheduler)
    assert (model.kind, model.arch, model.loras, model.notice) == ("lcm", "sd15", [], None)
    assert (model.native_width, model.native_height) == (32, 32)  # sample_size 16 x VAE factor 2
    assert model.pipe.unet.dtype == torch.float32


def test_plain_folder_with_lcm_lora_none_gets_lcm_scheduler(tiny_sd_dir):
    from diffusers import LCMScheduler, StableDiffusionPipeline

    model = _load(tiny_sd_dir, lcm_lora="none")
    assert isinstance(model.pipe, StableDiffusionPipeline) and isinstance(model.pipe.scheduler, LCMScheduler)
    assert (model.kind, model.loras) == ("lcm-lora", [])


def test_dtype_is_applied(tiny_lcm_dir):
    model = load_model(EngineSettings(model=str(tiny_lcm_dir)), device="cpu", dtype=torch.bfloat16, progress=False)
    assert model.pipe.unet.dtype == torch.bfloat16 and model.pipe.text_encoder.dtype == torch.bfloat16


def test_builtin_present(builtin_dir):
    model = _load("builtin:shapes")
    assert model.name == "builtin:shapes" and model.kind == "lcm"


def test_builtin_missing_names_what_is_shipped(builtin_dir):
    with pytest.raises(UserError) as excinfo:
        _load("builtin:nope")
    message = _one_line_error(excinfo)
    assert "builtin:nope" in message and "builtin:shapes" in message


def test_builtin_missing_entirely(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "builtin_root", lambda: tmp_path / "nothing")
    with pytest.raises(UserError, match="make builtin-model"):
        _load("builtin:shapes")


def test_single_file_safetensors_loads_the_same_weights(tmp_path, monkeypatch):
    from diffusers import StableDiffusionPipeline

    from lcm_live.engine.tiny import save_tiny_single_file

    file, config = save_tiny_single_file(tmp_path / "tiny-sd15.safetensors", seed=7)
    assert sources.detect_single_file_arch(file) == "sd15"
    monkeypatch.setattr(loading, "single_file_config", lambda arch: config)  # the tiny configs, not SD1.5's
    model = _load(file, lcm_lora="none")
    assert isinstance(model.pipe, StableDiffusionPipeline)
    assert (model.arch, model.kind, model.name) == ("sd15", "lcm-lora", "tiny-sd15.safetensors")
    # The weights went through the original-layout keys and diffusers' converter unchanged.
    from lcm_live.engine.tiny import tiny_components

    reference = tiny_components(time_cond_proj_dim=None, seed=7, tokenizer_dir=tmp_path / "tok")
    for part in ("unet", "vae", "text_encoder"):
        want, got = reference[part].state_dict(), getattr(model.pipe, part).state_dict()
        assert want.keys() == got.keys()
        assert all(torch.equal(want[k], got[k]) for k in want), part
    # The tokenizer is the folder's own (514 tokens), not the shipped 49408-token CLIP BPE: it runs.
    assert len(model.pipe.tokenizer) == model.pipe.text_encoder.config.vocab_size
    out = model.pipe("a red circle", num_inference_steps=1, guidance_scale=1.0, output_type="np")
    assert out.images.shape == (1, 32, 32, 3)


def test_sdxl_single_file_loads_the_same_weights(tmp_path, monkeypatch):
    from diffusers import LCMScheduler, StableDiffusionXLPipeline

    from lcm_live.engine.tiny import save_tiny_sdxl_single_file, tiny_sdxl_components

    file, config = save_tiny_sdxl_single_file(tmp_path / "tiny-sdxl.safetensors", seed=5)
    assert sources.detect_single_file_arch(file) == "sdxl"
    monkeypatch.setattr(loading, "single_file_config", lambda arch: config)
    model = _load(file, lcm_lora="none")
    assert isinstance(model.pipe, StableDiffusionXLPipeline) and isinstance(model.pipe.scheduler, LCMScheduler)
    assert (model.arch, model.kind) == ("sdxl", "lcm-lora")
    reference = tiny_sdxl_components(time_cond_proj_dim=None, seed=5, tokenizer_dir=tmp_path / "tok")
    # CLIP-L as is; OpenCLIP bigG through fused q/k/v and a transposed projection, back to the same numbers.
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        want, got = reference[part].state_dict(), getattr(model.pipe, part).state_dict()
        assert want.keys() == got.keys()
        assert all(torch.equal(want[k], got[k]) for k in want), part
    out = model.pipe("a red circle", num_inference_steps=1, guidance_scale=1.0, output_type="np")
    assert out.images.shape == (1, 32, 32, 3)


@pytest.mark.parametrize("full_lcm", [True, False])
def test_sdxl_folder(tmp_path, full_lcm):
    from diffusers import LCMScheduler, StableDiffusionXLPipeline

    from lcm_live.engine.tiny import save_tiny_sdxl_pipeline

    folder = save_tiny_sdxl_pipeline(tmp_path / "sdxl", full_lcm=full_lcm)
    model = _load(folder, lcm_lora="none")
    assert isinstance(model.pipe, StableDiffusionXLPipeline) and isinstance(model.pipe.scheduler, LCMScheduler)
    assert (model.arch, model.kind) == ("sdxl", "lcm" if full_lcm else "lcm-lora")
    assert (model.native_width, model.native_height) == (32, 32)


def _header_only_checkpoint(path, shapes: dict[str, tuple[int, ...]]):
    from safetensors.torch import save_file

    save_file({k: torch.zeros(s) for k, s in shapes.items()}, str(path))
    return path


SD15_KEYS = {
    "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
    "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (4, 768),
}


def test_detects_sd15_sdxl_and_refuses_others(tmp_path):
    detect = sources.detect_single_file_arch
    assert detect(_header_only_checkpoint(tmp_path / "a.safetensors", SD15_KEYS)) == "sd15"
    sdxl = {"model.diffusion_model.label_emb.0.0.weight": (4, 2816),
            "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": (640, 2048),
            "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": (4, 768),
            "conditioner.embedders.1.model.ln_final.weight": (1280,)}
    assert detect(_header_only_checkpoint(tmp_path / "b.safetensors", sdxl)) == "sdxl"
    refiner = {k: v for k, v in sdxl.items() if not k.startswith("conditioner.embedders.0")}
    with pytest.raises(UserError, match="refiner"):
        detect(_header_only_checkpoint(tmp_path / "c.safetensors", refiner))
    sd2 = {"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024),
           "cond_stage_model.model.token_embedding.weight": (4, 1024)}
    with pytest.raises(UserError, match="2.x"):
        detect(_header_only_checkpoint(tmp_path / "d.safetensors", sd2))
    lora = {"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": (4, 320)}
    with pytest.raises(UserError, match="LoRA"):
        detect(_header_only_checkpoint(tmp_path / "e.safetensors", lora))
    (tmp_path / "f.safetensors").write_bytes(b"not safetensors at all")
    with pytest.raises(UserError, match="not a readable safetensors"):
        detect(tmp_path / "f.safetensors")


@pytest.fixture
def no_unpickling(monkeypatch):
    """Any attempt to unpickle fails the test loudly."""
    import pickle

    def forbidden(*args, **kwargs):
        raise AssertionError("a pickle load was attempted")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)


@pytest.mark.parametrize("name", ["model.ckpt", "model.pt", "model.pth", "pytorch_model.bin"])
def test_pickle_files_are_refused(tmp_path, name, no_unpickling):
    path = tmp_path / name
    path.write_bytes(b"\x80\x04not-really-a-pickle")
    with pytest.raises(UserError) as excinfo:
        _load(path)
    message = _one_line_error(excinfo)
    assert "pickle" in message and ".safetensors" in message and excinfo.value.field == "model"


def test_folder_with_only_bin_weights_is_refused(tmp_path, no_unpickling):
    (tmp_path / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04junk")
    with pytest.raises(UserError, match="only pickle weights"):
        _load(tmp_path)


def test_diffusers_folder_with_a_bin_component_is_refused(tmp_path, tiny_lcm_dir, no_unpickling):
    folder = tmp_path / "model"
    shutil.copytree(tiny_lcm_dir, folder)
    for f in (folder / "unet").glob("*.safetensors"):
        f.unlink()
    (folder / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04junk")
    with pytest.raises(UserError) as excinfo:
        _load(folder)
    assert "unet" in _one_line_error(excinfo) and "safe_serialization" in str(excinfo.value)


def test_missing_path_is_named(tmp_path):
    with pytest.raises(UserError, match="no such file or folder"):
        _load(tmp_path / "missing" / "model.safetensors")


def test_offline_hub_id_gives_one_short_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path / "empty-cache"
    with pytest.raises(ModelUnavailableError) as excinfo:
        _load("someorg/some-lcm", cache_dir=str(cache))
    message = _one_line_error(excinfo)
    for part in ("someorg/some-lcm", "--model PATH", "builtin:shapes", str(cache), "HF_HUB_OFFLINE"):
        assert part in message


def test_default_model_falls_back_to_builtin_loudly(tmp_path, monkeypatch, builtin_dir):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = _load(DEFAULT_MODEL, cache_dir=str(tmp_path / "empty-cache"))
    assert model.name == "builtin:shapes" and model.kind == "lcm"
    assert model.notice and DEFAULT_MODEL in model.notice and "builtin:shapes" in model.notice


def test_no_fallback_when_disabled_or_not_the_default(tmp_path, monkeypatch, builtin_dir):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = str(tmp_path / "empty-cache")
    with pytest.raises(ModelUnavailableError):
        _load(DEFAULT_MODEL, cache_dir=cache, offline_fallback=False)
    with pytest.raises(ModelUnavailableError):
        _load("someorg/other-model", cache_dir=cache)


def test_fallback_missing_too_says_both(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(sources, "builtin_root", lambda: tmp_path / "nothing")
    with pytest.raises(ModelUnavailableError, match="offline fallback, is not installed"):
        _load(DEFAULT_MODEL, cache_dir=str(tmp_path / "empty-cache"))


def test_native_size_preset_for_dreamshaper():
    class Cfg:
        sample_size = 96

    class Pipe:
        unet = type("U", (), {"config": Cfg})()
        vae_scale_factor = 8

    assert loading.native_size(Pipe(), "SimianLuo/LCM_Dreamshaper_v7", "sd15") == (512, 512)
    assert loading.native_size(Pipe(), "someone/other", "sd15") == (768, 768)


def test_hub_id_loads_from_the_cache_offline(tmp_path, monkeypatch, tiny_lcm_dir, capfd):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    put_in_hf_cache(tmp_path / "cache", "someorg/tiny-lcm", tiny_lcm_dir)
    model = _load("someorg/tiny-lcm", cache_dir=str(tmp_path / "cache"))
    assert (model.name, model.kind, model.notice) == ("someorg/tiny-lcm", "lcm", None)
    assert "Could not reach the Hub" not in capfd.readouterr().err  # cached is fine: nothing to warn about


def test_cli_shows_one_error_line_no_traceback(tmp_path, monkeypatch, capsys):
    from lcm_live.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pickle_file = tmp_path / "model.ckpt"
    pickle_file.write_bytes(b"\x80\x04junk")
    for model in (str(pickle_file), "someorg/not-cached"):
        status = main(["generate", "a cat", "--model", model, "--cache-dir", str(tmp_path / "cache"),
                       "--output", str(tmp_path / "out.png")])
        err = capsys.readouterr().err.strip().splitlines()
        assert status == 2 and len(err) == 1 and err[0].startswith("error: ") and model in err[0]
    assert not (tmp_path / "out.png").exists()


def test_folder_that_is_not_stable_diffusion_is_refused(tmp_path):
    import json

    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline",
                                                           "transformer": ["diffusers", "FluxTransformer2DModel"]}))
    with pytest.raises(UserError, match="FluxPipeline is not a Stable Diffusion"):
        _load(tmp_path)
    (tmp_path / "model_index.json").write_text("{not json")
    with pytest.raises(UserError, match="unreadable model_index.json"):
        _load(tmp_path)
