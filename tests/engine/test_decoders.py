"""The engine's decoders on tiny random models (CPU): TAESD, tiled VAE decoding, ``--decoder auto``."""

from __future__ import annotations

import pytest
from PIL import Image

from lcm_live.config import EngineSettings
from lcm_live.engine.pipeline import Engine
from lcm_live.engine.request import GenerationRequest

SIZE = 64  # the tiny VAE downsamples by 2: 32x32 latents


def _req(prompt, **kwargs):
    kwargs.setdefault("num_inference_steps", 2)
    return GenerationRequest(prompt, **kwargs)


def test_taesd_decoder(tiny_lcm_dir, tiny_engine, tmp_path):
    import torch
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    AutoencoderTiny(encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8), num_encoder_blocks=(1, 1),
                    num_decoder_blocks=(1, 1), latent_channels=4).save_pretrained(tmp_path / "taesd")
    engine = tiny_engine(tiny_lcm_dir, "lcm", decoder="taesd", taesd=str(tmp_path / "taesd"))
    assert engine.info.decoder == "taesd" and type(engine.pipe.vae).__name__ == "AutoencoderTiny"
    events = []
    r = engine.generate(_req("a cat", seed=0), callback=events.append)
    assert r.images[0].size == (SIZE, SIZE) and r.parameters["decoder"] == "taesd"
    assert engine.decode_preview(events[-1].latents).size == (SIZE, SIZE)
    r2 = engine.generate(_req("a cat", seed=0, image=Image.new("RGB", (SIZE, SIZE), (200, 90, 30)),
                                   strength=0.5))  # TAESD encodes
    assert r2.images[0].size == (SIZE, SIZE)
    loaded = Engine.from_settings(EngineSettings(model=str(tiny_lcm_dir), device="cpu", dtype="float32",
                                                 decoder="taesd", taesd=str(tmp_path / "taesd")), progress=False)
    assert type(loaded.pipe.vae).__name__ == "AutoencoderTiny" and loaded.info.decoder == "taesd"


def test_taesd_that_cannot_be_had_is_one_clear_error(tiny_lcm_dir, tiny_engine, tmp_path):
    from lcm_live.errors import ModelUnavailableError

    with pytest.raises(ModelUnavailableError) as err:
        tiny_engine(tiny_lcm_dir, "lcm", decoder="taesd", taesd=str(tmp_path / "missing"))
    assert "--decoder vae" in err.value.message


def test_tiled_vae_on_and_off(tiny_lcm_dir, tiny_engine):
    on = tiny_engine(tiny_lcm_dir, "lcm", tiled_vae="on")
    on.generate(_req("x", num_inference_steps=1, seed=0))
    assert on.pipe.vae.use_tiling is True
    off = tiny_engine(tiny_lcm_dir, "lcm", tiled_vae="off")
    off.generate(_req("x", num_inference_steps=1, seed=0))
    assert off.pipe.vae.use_tiling is False


def test_wants_tiling_auto_threshold():
    from lcm_live.engine.decoders import wants_tiling

    assert not wants_tiling("auto", 1024, 1024) and wants_tiling("auto", 1024, 1032)
    assert wants_tiling("on", 64, 64) and not wants_tiling("off", 2048, 2048)


def test_decoder_auto_keeps_the_full_vae_where_taesd_does_not_fit(tiny_lcm_dir, tiny_engine):
    # The tiny model's VAE (2x down, its own scaling) is not SD's latent space: TAESD would decode noise.
    engine = tiny_engine(tiny_lcm_dir, "lcm", decoder="auto")
    assert engine.info.decoder == "vae" and engine.settings.decoder == "vae"
    assert type(engine.pipe.vae).__name__ == "AutoencoderKL"
    loaded = Engine.from_settings(EngineSettings(model=str(tiny_lcm_dir), device="cpu", dtype="float32",
                                                 decoder="auto", backend="torch"), progress=False)
    assert any(s.startswith("decoder:vae (auto: this model's VAE has its own latent space") for s in loaded.info.speedups)


def test_decoder_auto_takes_taesd_where_it_fits_and_loads(tmp_path, caplog):
    import torch
    from diffusers import AutoencoderKL, AutoencoderTiny

    from lcm_live.engine.architectures import build_vae
    from lcm_live.engine.decoders import resolve_decoder, taesd_fits

    assert taesd_fits(build_vae("sd15", meta=True), "sd15") is None
    assert taesd_fits(build_vae("sdxl", meta=True), "sdxl") is None
    assert "own latent space" in taesd_fits(build_vae("sd15", meta=True), "sdxl")  # SDXL's TAESD, SD1.5's VAE
    # A small VAE with SD's shape of latent space (8x down, 4 channels, scaling 0.18215).
    vae = AutoencoderKL(block_out_channels=(8, 8, 8, 8), norm_num_groups=8, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        scaling_factor=0.18215)
    torch.manual_seed(0)
    AutoencoderTiny(encoder_block_out_channels=(8,) * 4, decoder_block_out_channels=(8,) * 4).save_pretrained(
        tmp_path / "taesd")
    ok = EngineSettings(model="m", decoder="auto", taesd=str(tmp_path / "taesd"))
    taesd, why = resolve_decoder(ok, vae, "sd15", device="cpu", dtype=torch.float32)
    assert type(taesd).__name__ == "AutoencoderTiny" and why.startswith("taesd (auto")
    missing = EngineSettings(model="m", decoder="auto", taesd=str(tmp_path / "missing"))
    with caplog.at_level("WARNING"):
        taesd, why = resolve_decoder(missing, vae, "sd15", device="cpu", dtype=torch.float32)
    assert taesd is None and why.startswith("vae (auto: the tiny decoder is not available")
    assert any("--decoder auto: using the full VAE" in r.getMessage() for r in caplog.records)
