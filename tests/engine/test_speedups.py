"""Every fast path against the float32 reference on the tiny model: same seed, final latents, cosine threshold.
Speed is never asserted here (that is `lcm-live bench`)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from lcm_live.config import EngineSettings
from lcm_live.engine.architectures import build_pipeline
from lcm_live.engine.speedups import apply_speedups, check_speedups
from lcm_live.errors import UserError

has_openvino = importlib.util.find_spec("openvino") is not None
has_nncf = importlib.util.find_spec("nncf") is not None
needs_openvino = pytest.mark.skipif(not has_openvino, reason="openvino not installed (the [openvino] extra)")


def final_latents(pipe, seed: int = 0, size: int = 64) -> torch.Tensor:
    out = pipe("a red square on a blue floor", num_inference_steps=2, guidance_scale=1.5, width=size, height=size,
               generator=torch.Generator("cpu").manual_seed(seed), output_type="latent")
    return out.images.float()


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))


def tiny(dtype=torch.float32):
    """The tiny LCM, built in float32 and cast, so every variant holds the reference's weights."""
    pipe = build_pipeline("tiny", dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(dtype=dtype)


@pytest.fixture(scope="module")
def reference():
    return final_latents(tiny())


def test_bf16_channels_last_parity(reference):
    pipe = tiny(torch.bfloat16)
    applied = apply_speedups(pipe, EngineSettings(model="tiny", backend="torch"), "cpu", torch.bfloat16)
    assert applied == ["channels_last"]
    conv = pipe.unet.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert cosine(final_latents(pipe), reference) > 0.99


def test_channels_last_float32_matches_reference(reference):
    pipe = tiny()
    apply_speedups(pipe, EngineSettings(model="tiny"), "cpu", torch.float32)
    assert cosine(final_latents(pipe), reference) > 0.9999


def test_torch_int8_parity(reference):
    pipe = tiny()
    applied = apply_speedups(pipe, EngineSettings(model="tiny", quantize="int8"), "cpu", torch.float32)
    assert applied[-1].startswith("int8:torch-dynamic(")
    assert not any(type(m) is torch.nn.Linear for m in pipe.unet.modules())  # every Linear was replaced
    assert cosine(final_latents(pipe), reference) > 0.99


@pytest.mark.parametrize(
    "settings, device, dtype, field",
    [
        (dict(quantize="int8", backend="torch"), "cpu", torch.bfloat16, "quantize"),  # dynamic int8: float32
        (dict(quantize="nf4"), "cpu", torch.float32, "quantize"),  # bitsandbytes: CUDA only
        (dict(backend="openvino"), "cuda", torch.float16, "backend"),  # OpenVINO runs on the CPU
        (dict(quantize="int8"), "mps", torch.float16, "quantize"),
        (dict(compile_mode="max-autotune"), "cuda", torch.float16, "compile_mode"),  # without --compile
        (dict(compile=True, compile_mode="reduce-overhead"), "cpu", torch.bfloat16, "compile_mode"),  # CUDA graphs
    ],
)
def test_impossible_combinations_are_one_clear_error(settings, device, dtype, field):
    with pytest.raises(UserError) as err:
        check_speedups(EngineSettings(model="tiny", **settings), device, dtype)
    assert err.value.field == field
    assert "\n" not in err.value.message and "--" in err.value.message  # names the flag


@pytest.mark.parametrize("device, mode, called, applied", [
    ("cpu", "auto", "default", "torch.compile(default, freezing)"),
    ("cpu", "max-autotune", "max-autotune", "torch.compile(max-autotune, freezing)"),
    ("cuda", "auto", "reduce-overhead", "torch.compile(reduce-overhead)"),
    ("cuda", "max-autotune", "max-autotune", "torch.compile(max-autotune)"),
])
def test_compile_mode_reaches_torch_compile(monkeypatch, device, mode, called, applied):
    """--compile-mode is torch.compile's mode (auto: CUDA graphs on CUDA, default on a CPU); torch.compile is
    replaced by a spy here, so nothing compiles (and the CUDA rows run without a GPU: channels_last and the
    compile step only label and wrap the modules)."""
    import torch._inductor.config as inductor_config

    calls = []

    def spy(module, **kwargs):
        calls.append(kwargs)
        return module

    monkeypatch.setattr(torch, "compile", spy)
    pipe = tiny()
    freezing = inductor_config.freezing
    try:
        out = apply_speedups(pipe, EngineSettings(model="tiny", backend="torch", compile=True, compile_mode=mode),
                             torch.device(device), torch.float32)
    finally:
        inductor_config.freezing = freezing
    assert len(calls) == 1 and calls[0]["mode"] == called and out[-1] == applied
    assert pipe.unet._forward_pre_hooks  # contiguous_inputs, ahead of the compiled code's guards


@needs_openvino
def test_openvino_with_compile_is_refused():
    with pytest.raises(UserError, match="--compile"):
        check_speedups(EngineSettings(model="tiny", backend="openvino", compile=True), "cpu", torch.float32)


@needs_openvino
@pytest.mark.parametrize("dtype, threshold", [(torch.float32, 0.9999), (torch.bfloat16, 0.99)])
def test_openvino_parity_and_disk_cache(reference, tmp_path, dtype, threshold):
    settings = EngineSettings(model="tiny", backend="openvino", openvino_cache_dir=str(tmp_path))
    pipe = tiny(dtype)
    applied = apply_speedups(pipe, settings, "cpu", dtype)
    assert applied[-1] == f"openvino:{str(dtype).removeprefix('torch.')}"
    # What the pipelines read from a UNet is still there.
    assert pipe.unet.config.time_cond_proj_dim == 32 and pipe.unet.dtype == dtype
    assert pipe.unet.device == torch.device("cpu")
    assert cosine(final_latents(pipe), reference) > threshold
    assert pipe.unet.conversions == 1  # one shape: converted once, reused for the second step
    assert len(list(tmp_path.rglob("unet.xml"))) == 1

    # A second engine with the same weights reads the IR from the disk cache.
    again = tiny(dtype)
    apply_speedups(again, settings, "cpu", dtype)
    assert cosine(final_latents(again), reference) > threshold
    assert again.unet.conversions == 0


@needs_openvino
def test_openvino_offloads_torch_unet_and_reconverts_new_sizes(tmp_path):
    settings = EngineSettings(model="tiny", backend="openvino", openvino_cache_dir=str(tmp_path))
    pipe = tiny()
    apply_speedups(pipe, settings, "cpu", torch.float32)
    final_latents(pipe, size=64)
    torch_unet = pipe.unet._torch_unet[0]
    assert torch_unet.conv_in.weight.is_meta  # weights left memory for a safetensors file in the cache
    assert len(list(tmp_path.rglob("torch-unet-float32.safetensors"))) == 1
    # A new size needs a new conversion: the weights come back from the file and give the reference's result.
    assert cosine(final_latents(pipe, size=32), final_latents(tiny(), size=32)) > 0.9999
    assert pipe.unet.conversions == 2


@needs_openvino
@pytest.mark.skipif(not has_nncf, reason="nncf not installed")
def test_openvino_int8_calibrates_quantizes_and_caches(reference, tmp_path):
    settings = EngineSettings(model="tiny", backend="openvino", quantize="int8", openvino_cache_dir=str(tmp_path))
    pipe = tiny()
    applied = apply_speedups(pipe, settings, "cpu", torch.float32)
    assert applied[-1] == "openvino:float32:int8-ptq"
    pipe.unet.calibration_calls = 4  # two generations of 2 steps
    first = final_latents(pipe)  # runs the float IR, records its 2 calls
    assert pipe.unet.calibrating and pipe.unet.quantized_shapes == 0
    assert cosine(first, reference) > 0.9999  # not quantized yet: the float path's result
    final_latents(pipe, seed=1)  # the 4th call starts the quantization, in a thread
    assert not pipe.unet.recording
    pipe.unet.wait_quantized()
    assert not pipe.unet.calibrating and pipe.unet.quantized_shapes == 1 and not pipe.unet.quantize_errors
    quantized_irs = [p for p in tmp_path.rglob("unet.xml") if "int8-ptq" in str(p)]
    assert len(quantized_irs) == 1
    assert quantized_irs[0].read_text().count('type="FakeQuantize"') > 10  # activations and weights quantized
    int8 = final_latents(pipe)
    assert 0.97 < cosine(int8, reference) < 0.99999  # int8 now runs: close to the reference, not identical

    # A second engine reads the int8 IR from the cache: nothing to calibrate, same result.
    again = tiny()
    apply_speedups(again, settings, "cpu", torch.float32)
    assert cosine(final_latents(again), int8) > 0.9999
    assert not again.unet.calibrating and again.unet.quantized_shapes == 0 and again.unet.conversions == 0


@needs_openvino
def test_weights_fingerprint_tells_weights_apart():
    from lcm_live.engine.openvino_backend import weights_fingerprint

    a = build_pipeline("tiny", seed=0).unet
    assert weights_fingerprint(a) == weights_fingerprint(build_pipeline("tiny", seed=0).unet)
    assert weights_fingerprint(a) != weights_fingerprint(build_pipeline("tiny", seed=1).unet)


def test_contiguous_inputs_puts_every_tensor_in_the_default_layout():
    from lcm_live.engine.speedups import contiguous_inputs

    latents = torch.randn(2, 4, 8, 8).to(memory_format=torch.channels_last)  # what img2img's encoder gives
    states = torch.randn(2, 77, 32)
    args, kwargs = contiguous_inputs(None, (latents, 999), {"encoder_hidden_states": states, "return_dict": False})
    assert args[0].is_contiguous() and torch.equal(args[0], latents) and args[1] == 999
    assert kwargs["encoder_hidden_states"] is states and kwargs["return_dict"] is False  # already so: untouched


@pytest.mark.slow
def test_a_compiled_unet_does_not_recompile_for_img2img(tiny_lcm_dir, monkeypatch):
    """img2img's latents come from a channels_last encoder with other strides than txt2img's noise; the
    compiled UNet's pre-hook makes them contiguous, so the graph compiled by a txt2img warm-up serves sketch
    frames too (without the hook: a second graph, compiled at the first frame).

    Graphs and recompilations are TorchDynamo's (its guards on strides), whatever backend compiles each graph:
    the eager backend here counts the same graphs in a second where Inductor's C++ build took 50 s
    (``test_torch_compile_parity`` runs Inductor itself)."""
    import numpy as np
    from PIL import Image
    from torch._dynamo.utils import counters

    from lcm_live.engine.pipeline import Engine
    from lcm_live.engine.request import GenerationRequest

    real_compile = torch.compile
    asked = []

    def eager_compile(model, **kwargs):
        asked.append(kwargs)
        return real_compile(model, backend="eager", fullgraph=kwargs.get("fullgraph", False))

    monkeypatch.setattr(torch, "compile", eager_compile)
    torch._dynamo.reset()
    counters.clear()
    try:
        engine = Engine.from_settings(EngineSettings(model=str(tiny_lcm_dir), device="cpu", dtype="float32",
                                                     backend="torch", compile=True), progress=False)
        assert "channels_last" in engine.info.speedups and engine.compiled
        canvas = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
        for extra in ({}, {"image": canvas, "strength": 0.5}, {"image": canvas, "strength": 0.7}):
            engine.generate(GenerationRequest("a red square", seed=1, num_inference_steps=1, width=64, height=64,
                                              **extra))
        assert counters["stats"]["unique_graphs"] == 1
        assert len(asked) == 1  # the engine compiled its UNet once
    finally:
        torch._dynamo.reset()


@pytest.mark.slow
def test_torch_compile_parity(reference):
    pipe = tiny()
    applied = apply_speedups(pipe, EngineSettings(model="tiny", compile=True), "cpu", torch.float32)
    assert applied[-1].startswith("torch.compile(")
    assert cosine(final_latents(pipe), reference) > 0.999


@needs_openvino
@pytest.mark.skipif(not has_nncf, reason="nncf not installed")
@pytest.mark.parametrize("failure, message", [("nncf", "out of memory"), ("memory", "NNCF needs about")])
def test_a_failed_int8_quantization_keeps_the_float_ir(reference, tmp_path, monkeypatch, failure, message):
    """nncf: NNCF itself fails. memory: less memory is available than NNCF's peak (~7.5x the IR's weights file),
    so the quantization is refused with the figures rather than left to the OOM killer, which would take the
    whole studio. Either way only the quantization fails: the shape keeps generating on its float IR."""
    import psutil

    from lcm_live.engine import openvino_int8

    if failure == "nncf":
        def broken(*args, **kwargs):
            raise RuntimeError("NNCF ran out of memory")

        monkeypatch.setattr(openvino_int8, "quantize_ir", broken)
    else:
        real = psutil.virtual_memory()
        monkeypatch.setattr(psutil, "virtual_memory", lambda: real._replace(available=1000))
    settings = EngineSettings(model="tiny", backend="openvino", quantize="int8", openvino_cache_dir=str(tmp_path))
    pipe = tiny()
    apply_speedups(pipe, settings, "cpu", torch.float32)
    pipe.unet.calibration_calls = 2
    final_latents(pipe)
    pipe.unet.wait_quantized()
    assert not pipe.unet.calibrating and pipe.unet.quantized_shapes == 0
    assert len(pipe.unet.quantize_errors) == 1 and message in pipe.unet.quantize_errors[0]
    assert cosine(final_latents(pipe), reference) > 0.9999  # still generating, on the float IR
    assert not [p for p in tmp_path.rglob("unet.xml") if "int8-ptq" in str(p)]


@needs_openvino
@pytest.mark.skipif(not has_nncf, reason="nncf not installed")
def test_engine_warmup_calibrates_the_int8_unet(tmp_path):
    from lcm_live.engine.model import LoadedModel
    from lcm_live.engine.pipeline import Engine

    settings = EngineSettings(model="tiny", backend="openvino", quantize="int8", openvino_cache_dir=str(tmp_path))
    pipe = tiny()
    applied = apply_speedups(pipe, settings, "cpu", torch.float32)
    pipe.unet.calibration_calls = 6
    engine = Engine(LoadedModel(pipe=pipe, kind="lcm", arch="sd15", name="tiny", native_width=64,
                                native_height=64), settings, speedups=applied)
    assert engine.calibrate(64, 64, 2) == 0  # nothing compiled at this size yet: nothing records
    engine.warmup(64, 64, num_inference_steps=2)  # 1 generation compiles, then 2 more fill the 6 calls
    assert not pipe.unet.calibrating and pipe.unet.quantized_shapes == 1
    assert engine.calibrate(64, 64, 2) == 0  # done: later warm-ups do not calibrate again


@needs_openvino
@pytest.mark.parametrize("dtype, threshold", [(torch.float32, 0.9999), (torch.bfloat16, 0.99)])
def test_openvino_taesd_matches_torch(dtype, threshold):
    import copy

    from lcm_live.bench.random_parts import random_taesd
    from lcm_live.engine.openvino_module import wrap_tiny_autoencoder

    reference = random_taesd("sd15", torch.float32, 0)  # taesd's architecture (8x), random weights
    taesd = copy.deepcopy(reference).to(dtype)
    assert wrap_tiny_autoencoder(taesd) and not wrap_tiny_autoencoder(taesd)  # once
    assert taesd.dtype == dtype  # what the pipelines read still answers
    image, latents = torch.rand(1, 3, 64, 64) * 2 - 1, torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        encoded = taesd.encode(image.to(dtype)).latents
        decoded = taesd.decode(latents.to(dtype)).sample
        assert encoded.dtype == decoded.dtype == dtype and decoded.shape == (1, 3, 64, 64)
        assert cosine(encoded.float(), reference.encode(image).latents) > threshold
        assert cosine(decoded.float(), reference.decode(latents).sample) > threshold
        taesd.decode(torch.randn(1, 4, 8, 8, dtype=dtype))  # same shape: reuses the compiled model
        assert taesd.decoder.conversions == 1
        taesd.decode(torch.randn(2, 4, 16, 8, dtype=dtype))  # a new shape: converted and compiled once more
        assert taesd.decoder.conversions == 2


@needs_openvino
def test_openvino_backend_runs_taesd_in_openvino_too(reference, tmp_path):
    from lcm_live.bench.random_parts import random_taesd

    pipe, plain = tiny(), tiny()
    pipe.vae = random_taesd("tiny", torch.float32, 0)
    plain.vae = random_taesd("tiny", torch.float32, 0)
    settings = EngineSettings(model="tiny", backend="openvino", openvino_cache_dir=str(tmp_path))
    applied = apply_speedups(pipe, settings, "cpu", torch.float32)
    assert applied[-2:] == ["openvino:float32", "openvino:taesd"]
    image = pipe("a red square", num_inference_steps=2, width=64, height=64, output_type="np",
                 generator=torch.Generator("cpu").manual_seed(0)).images
    expected = plain("a red square", num_inference_steps=2, width=64, height=64, output_type="np",
                     generator=torch.Generator("cpu").manual_seed(0)).images
    assert cosine(torch.from_numpy(image), torch.from_numpy(expected)) > 0.999
