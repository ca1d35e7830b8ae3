"""The machine's own peak, and how close a path comes to it (``roofline_fraction``).

The peak is a large GEMM measured in the backend and dtype the path runs: OpenVINO (bf16, f32, or int8 through
FakeQuantize layers, as NNCF's int8 IR runs) with the engine's compile settings, torch on the CPU (float32,
bfloat16; int8 as torch's dynamic quantized Linear, the kernel ``--quantize int8`` uses with the torch backend), or
CUDA (float16/bfloat16, synchronised). A GEMM is the best case for every kernel a UNet runs (convolutions and
attention are GEMMs underneath), so the fraction of it a path reaches is a fair ceiling check: 1.0 is the limit.

    achieved FLOP/s = FLOPs of one call (counted, bench/flops.py) / median seconds per call
    roofline_fraction = achieved FLOP/s / peak FLOP/s

Measure the peak in the same process, right beside the path's timed runs: on a shared machine both see the same
load, so their ratio is meaningful when their absolute values are not. The peak is the best of its timed rounds
(a peak is what the machine can do; other processes only take from it), and the bench measures it before and
after its timed runs and keeps the better (``best_of``): a peak caught during a burst of someone else's work would
make the fraction look better than it is.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

# Square GEMM sizes: large enough for the kernels' steady state, small enough for a few seconds on 2 cores.
CPU_N, CUDA_N = 2048, 8192
CHAIN = 4  # matmuls per OpenVINO inference (one call's overhead spread over four GEMMs)


@dataclass(frozen=True)
class Peak:
    backend: str  # "openvino", "torch" or "cuda"
    dtype: str  # "bfloat16", "float32", "float16" or "int8"
    tflops: float  # the best of the timed rounds, 1e12 FLOP/s
    n: int  # square GEMM size
    seconds: float  # the measurement's own wall time
    threads: int
    median_tflops: float = 0.0  # the rounds' median: how much the load moved it
    measurements: int = 1  # how many measurements `best_of` kept the best of

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def best_of(*peaks: Peak | None) -> Peak:
    """The best of several measurements of one peak (before and after a path's runs)."""
    import dataclasses

    found = [p for p in peaks if p is not None]
    best = max(found, key=lambda p: p.tflops)
    return dataclasses.replace(best, seconds=sum(p.seconds for p in found), measurements=len(found))


_PEAKS: dict[tuple[str, str, int], Peak] = {}


def path_precision(backend: str, dtype: str, quantize: str = "none", device: str = "cpu") -> tuple[str, str]:
    """(backend, dtype) of the GEMM that bounds a path: its UNet's backend, int8 when quantized."""
    if device == "cuda":  # nf4 weights are dequantized to the compute dtype: its GEMMs bound the path
        return "cuda", dtype
    if quantize == "int8":
        return backend, "int8"
    return backend, dtype


def measure_peak(backend: str, dtype: str, *, repeats: int = 5, refresh: bool = False) -> Peak:
    """The peak GEMM rate of ``backend`` in ``dtype`` on this machine (cached per process unless ``refresh``)."""
    import torch

    key = (backend, dtype, torch.get_num_threads())
    if key in _PEAKS and not refresh:
        return _PEAKS[key]
    t0 = time.perf_counter()
    if backend == "openvino":
        n, rates = CPU_N, _openvino_rates(dtype, CPU_N, repeats)
    elif backend == "cuda":
        n, rates = CUDA_N, _cuda_rates(dtype, CUDA_N, repeats)
    elif backend == "torch":
        n, rates = CPU_N, _torch_rates(dtype, CPU_N, repeats)
    else:
        raise ValueError(f"backend {backend!r}: expected openvino, torch or cuda")
    peak = Peak(backend, dtype, max(rates) / 1e12, n, time.perf_counter() - t0, torch.get_num_threads(),
                median_tflops=statistics.median(rates) / 1e12)
    _PEAKS[key] = peak
    return peak


def _timed_rounds(run, flops: float, repeats: int, warmup: int = 2) -> list[float]:
    for _ in range(warmup):
        run()
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        rates.append(flops / (time.perf_counter() - t0))
    return rates


def _torch_rates(dtype: str, n: int, repeats: int) -> list[float]:
    import torch

    if dtype == "int8":
        # torch's dynamic int8 Linear (fbgemm, VNNI): the kernel of --quantize int8 on the torch backend.
        linear = torch.nn.Linear(n, n, bias=False)
        quantized = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(linear), {torch.nn.Linear},
                                                           dtype=torch.qint8)
        x = torch.randn(n, n)
        with torch.no_grad():
            return _timed_rounds(lambda: [quantized(x) for _ in range(4)], 2.0 * n**3 * 4, repeats)
    torch_dtype = getattr(torch, dtype)
    a, b = torch.randn(n, n, dtype=torch_dtype), torch.randn(n, n, dtype=torch_dtype)
    out = torch.empty(n, n, dtype=torch_dtype)
    return _timed_rounds(lambda: [torch.mm(a, b, out=out) for _ in range(4)], 2.0 * n**3 * 4, repeats)


def _cuda_rates(dtype: str, n: int, repeats: int) -> list[float]:
    import torch

    torch_dtype = getattr(torch, "float16" if dtype == "int8" else dtype)
    a = torch.randn(n, n, dtype=torch_dtype, device="cuda")
    b = torch.randn(n, n, dtype=torch_dtype, device="cuda")

    def run():
        for _ in range(10):
            a @ b
        torch.cuda.synchronize()

    return _timed_rounds(run, 2.0 * n**3 * 10, repeats)


def _openvino_rates(dtype: str, n: int, repeats: int) -> list[float]:
    """A chain of CHAIN n x n MatMuls with constant weights, compiled as the engine compiles its IRs (latency
    hint; inference precision bf16/f32). int8: FakeQuantize on each activation and weight (256 levels), the
    pattern of an NNCF-quantized IR, which the CPU plugin runs as int8 GEMMs (VNNI/AMX)."""
    import numpy as np
    import openvino as ov
    import openvino.opset13 as ops

    from lcm_live.engine.openvino_module import compile_request

    rng = np.random.default_rng(0)
    x = ops.parameter([1, n, n], ov.Type.f32, name="x")
    node = x
    for _ in range(CHAIN):
        # Weights [out, in] as a Linear holds them (transpose_b): the plugin's FullyConnected, as in the UNet's IR.
        weight = ops.constant((rng.standard_normal((n, n), dtype=np.float32) / np.sqrt(n)).astype(np.float32))
        if dtype == "int8":
            # NNCF's pattern: signed 8-bit activations (256 levels), symmetric weights (255 levels).
            limit = 4.0 / np.sqrt(n)
            node, weight = _fake_quantize(node, -4.0, 4.0 * 127 / 128, 256), _fake_quantize(weight, -limit, limit, 255)
        node = ops.matmul(node, weight, False, True)
    model = ov.Model([node], [x], "gemm_chain")
    precision = "float32" if dtype == "int8" else dtype  # int8 comes from the FakeQuantize layers
    request = compile_request(ov.Core(), model, "CPU", precision)
    data = rng.standard_normal((1, n, n), dtype=np.float32)
    return _timed_rounds(lambda: request.infer([data]), 2.0 * n**3 * CHAIN, repeats)


def _fake_quantize(node: Any, low: float, high: float, levels: int) -> Any:
    import numpy as np
    import openvino.opset13 as ops

    lo, hi = ops.constant(np.float32(low)), ops.constant(np.float32(high))
    return ops.fake_quantize(node, lo, hi, lo, hi, levels)


def roofline(flops_per_call: float, seconds_per_call: float, peak: Peak) -> dict[str, float]:
    """Achieved TFLOP/s and its fraction of ``peak`` for one call of ``flops_per_call`` taking ``seconds``."""
    achieved = flops_per_call / seconds_per_call / 1e12 if seconds_per_call > 0 else 0.0
    return {"achieved_tflops": achieved, "peak_tflops": peak.tflops,
            "roofline_fraction": achieved / peak.tflops if peak.tflops > 0 else 0.0}


VAE_STAGES = ("encode", "decode")


def vae_stage_peaks(quantize_vae: str, backend: str) -> dict[str, Peak]:
    """The stages that run at another precision than the UNet: ``--quantize-vae int8`` puts the tiny
    autoencoder's encode and decode on OpenVINO's int8 kernels (their own, higher, peak)."""
    if quantize_vae != "int8" or backend != "openvino":
        return {}
    peak = measure_peak("openvino", "int8", refresh=True)
    return {stage: peak for stage in VAE_STAGES}


def flops_by_stage(samples: dict[str, int], flops: dict[str, float], stage_of: dict[str, str]) -> dict[str, float]:
    """FLOPs per stage: each component's sample count times its FLOPs per sample, components merged into the
    stage ``stage_of`` names (e.g. SDXL's second text encoder into ``text_encoder``)."""
    by_stage: dict[str, float] = {}
    for name, count in samples.items():
        stage = stage_of.get(name, name)
        by_stage[stage] = by_stage.get(stage, 0.0) + count * flops.get(name, 0.0)
    return by_stage


def mixed_peak(flops_by_stage: dict[str, float], stage_peaks: dict[str, Peak], default: Peak) -> Peak:
    """The peak of a path whose stages are bounded by different GEMMs (the UNet in bf16, the tiny autoencoder in
    int8): the rate that would finish every stage's FLOPs at its own peak, total / sum(flops_s / peak_s).
    Stages not in ``stage_peaks`` run at ``default``; without any, ``default`` itself."""
    import dataclasses

    used = {s: f for s, f in flops_by_stage.items() if f > 0}
    if not stage_peaks or not any(s in stage_peaks for s in used):
        return default
    total = sum(used.values())

    def rate(attr: str) -> float:
        seconds = sum(f / (getattr(stage_peaks.get(s, default), attr) or default.tflops) for s, f in used.items())
        return total / seconds

    dtypes = [default.dtype] + sorted({p.dtype for s, p in stage_peaks.items() if s in used} - {default.dtype})
    return dataclasses.replace(default, dtype="+".join(dtypes), tflops=rate("tflops"),
                               median_tflops=rate("median_tflops"),
                               seconds=default.seconds + sum({id(p): p.seconds for p in stage_peaks.values()}.values()))


def path_roofline(samples: dict[str, int], stage_seconds: dict[str, float], flops: dict[str, float],
                  seconds_per_call: float, peak: Peak, stage_peaks: dict[str, Peak] | None = None) -> dict[str, Any]:
    """The roofline of one path: FLOPs of one call (what each component processed, ``samples`` from the stage
    timer, times its FLOPs per sample), the achieved rate over the call's median time and its fraction of
    ``peak``; per stage, the same for the time spent inside that component (the UNet's is the kernel-level
    efficiency, the whole call's includes the scheduler, the Python around the calls and the decode).
    ``stage_peaks``: stages bounded by another GEMM than ``peak`` (see ``mixed_peak``)."""
    by_stage = flops_by_stage(samples, flops, {"text_encoder_2": "text_encoder"})
    total = sum(by_stage.values())
    stage_peaks = stage_peaks or {}
    whole = mixed_peak(by_stage, stage_peaks, peak)
    out = {"flops_per_call": total, "flops_by_stage": by_stage, "peak": whole.to_dict(),
           **roofline(total, seconds_per_call, whole)}
    out["stage_fractions"] = {stage: roofline(f, stage_seconds[stage], stage_peaks.get(stage, peak))["roofline_fraction"]
                              for stage, f in by_stage.items() if f > 0 and stage_seconds.get(stage, 0) > 0}
    return out


def format_roofline(label: str, r: dict[str, Any], images_per_call: int = 1) -> str:
    """One line: FLOPs per image, achieved and peak TFLOP/s, the fraction, and the UNet stage's own fraction."""
    p = r["peak"]
    unet = r["stage_fractions"].get("unet")
    return (f"  roofline: {flop_text(r['flops_per_call'] / images_per_call)} per image, "
            f"{r['achieved_tflops']:.3g} TFLOP/s of {r['peak_tflops']:.3g} ({p['backend']} {p['dtype']} "
            f"{p['n']}x{p['n']} GEMM, {p['threads']} threads, best of {p.get('measurements', 1)}) = "
            f"{r['roofline_fraction']:.2f}"
            + (f"; UNet stage {unet:.2f}" if unet is not None else "") + (f"  [{label}]" if label else ""))


def flop_text(flops: float) -> str:
    return f"{flops / 1e12:.2f} TFLOP" if flops >= 1e12 else f"{flops / 1e9:.3g} GFLOP"
