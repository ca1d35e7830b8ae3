"""``--quantize-vae int8``: the tiny autoencoder's halves recorded, quantized by NNCF and swapped in per shape
(engine/openvino_module.py), calibrated by the engine's warm-up, refused where it cannot run. Speed is
``lcm-live bench --quantize-vae int8``'s business, never asserted here."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch

from lcm_live.config import EngineSettings
from lcm_live.engine.speedups import apply_speedups, check_speedups
from lcm_live.errors import UserError

pytestmark = pytest.mark.skipif(importlib.util.find_spec("openvino") is None
                                or importlib.util.find_spec("nncf") is None,
                                reason="openvino and nncf not installed (the [openvino] extra)")


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten().float(), b.flatten().float(), dim=0))


def taesd_pair():
    from lcm_live.bench.random_parts import random_taesd

    reference = random_taesd("sd15", torch.float32, 0)  # taesd's architecture (8x), random weights
    return reference, copy.deepcopy(reference)


def test_a_shape_runs_float_while_recording_then_int8():
    from lcm_live.engine.openvino_module import OpenVINOModule

    reference, taesd = taesd_pair()
    decoder = OpenVINOModule(taesd.decoder, quantize="int8", calibration_calls=2)
    gen = torch.Generator().manual_seed(0)
    latents = [torch.randn(1, 4, 8, 8, generator=gen) for _ in range(3)]
    with torch.no_grad():
        assert decoder.recording  # nothing met yet: waiting for inputs
        first = decoder(latents[0])
        assert torch.allclose(first, reference.decoder(latents[0]), atol=1e-3)  # float32 while recording
        assert decoder.recording and not decoder.quantized
        decoder(latents[1])  # the 2nd input: quantization starts
        assert not decoder.recording
        decoder.wait_quantized()
        assert decoder.quantized == {(1, 4, 8, 8)} and not decoder.quantize_errors
        out = decoder(latents[2])
        expected = reference.decoder(latents[2])
    assert out.shape == expected.shape and not torch.equal(out, expected)  # int8: close, not the same numbers
    assert cosine(out, expected) > 0.99
    assert decoder.conversions == 1  # the int8 model came from the converted one, not a second conversion
    with torch.no_grad():
        decoder(torch.randn(1, 4, 16, 8))  # a new shape records on its own
    assert decoder.recording


def test_a_failed_quantization_keeps_the_float_model(monkeypatch):
    from lcm_live.engine import openvino_int8
    from lcm_live.engine.openvino_module import OpenVINOModule

    def broken(model, samples):
        raise RuntimeError("nncf fell over")

    monkeypatch.setattr(openvino_int8, "quantize_small_model", broken)
    reference, taesd = taesd_pair()
    encoder = OpenVINOModule(taesd.encoder, quantize="int8", calibration_calls=1)
    image = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        encoder(image)
        encoder.wait_quantized()
        assert not encoder.quantized and "nncf fell over" in encoder.quantize_errors[0]
        assert not encoder.recording  # not tried again on every frame
        assert torch.allclose(encoder(image), reference.encoder(image), atol=1e-3)


def test_engine_calibration_quantizes_both_halves(tmp_path):
    from lcm_live.bench.random_parts import random_taesd
    from lcm_live.engine.architectures import build_pipeline
    from lcm_live.engine.model import LoadedModel
    from lcm_live.engine.openvino_module import vae_modules
    from lcm_live.engine.pipeline import Engine

    pipe = build_pipeline("tiny", dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    pipe.vae = random_taesd("tiny", torch.float32, 0)
    settings = EngineSettings(model="tiny", backend="openvino", quantize_vae="int8", decoder="taesd",
                              openvino_cache_dir=str(tmp_path))
    applied = apply_speedups(pipe, settings, "cpu", torch.float32)
    assert applied[-1] == "openvino:taesd:int8-ptq"
    engine = Engine(LoadedModel(pipe=pipe, kind="lcm", arch="sd15", name="tiny", native_width=64,
                                native_height=64), settings, speedups=applied)
    halves = vae_modules(pipe.vae)
    assert len(halves) == 2
    engine.warmup(64, 64, num_inference_steps=2)  # generations until each half has recorded, then quantized
    assert all(half.quantized and not half.recording and not half.quantize_errors for half in halves)
    assert engine.calibrate(64, 64, 2) == 0  # done: no more calibrating generations


@pytest.mark.parametrize("overrides, words", [
    ({"backend": "torch"}, "--backend openvino"),
    ({"backend": "openvino", "decoder": "vae"}, "--decoder taesd"),
])
def test_quantize_vae_is_refused_where_it_cannot_run(overrides, words):
    settings = EngineSettings(model="tiny", quantize_vae="int8", **overrides)
    with pytest.raises(UserError) as err:
        check_speedups(settings, "cpu", torch.float32)
    assert err.value.field == "quantize_vae" and words in str(err.value)


def test_quantize_vae_on_a_full_vae_model_is_refused(tmp_path):
    from lcm_live.engine.architectures import build_pipeline

    pipe = build_pipeline("tiny", dtype=torch.float32)  # decodes with its own AutoencoderKL
    settings = EngineSettings(model="tiny", backend="openvino", quantize_vae="int8", decoder="auto",
                              openvino_cache_dir=str(tmp_path))
    with pytest.raises(UserError, match="full VAE") as err:
        apply_speedups(pipe, settings, "cpu", torch.float32)
    assert err.value.field == "quantize_vae"
