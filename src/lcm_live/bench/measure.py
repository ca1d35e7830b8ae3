"""Measuring tools for the benchmarks: per-stage timers on a pipeline's components, a resident-memory sampler,
device synchronisation, summary statistics and a description of the machine."""

from __future__ import annotations

import platform
import statistics
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any


def synchronize(device: Any) -> None:
    """Wait for queued GPU work before reading the clock (a no-op on the CPU)."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class StageTimer:
    """Accumulates wall time spent in the text encoder(s), the UNet and the decoder of a pipeline, by wrapping
    those components' ``forward`` / ``decode`` on the instances (the classes are untouched).

    Times are seconds since the last :meth:`reset`; ``calls`` counts UNet calls (one per step, or two with CFG
    run as two calls; diffusers batches CFG into one call of batch 2). On CUDA each timed stage synchronizes the
    device before and after, which stops the host from queueing work ahead of the GPU: a run's total time is
    taken with ``enabled = False`` (the wrappers then only pass the call on) and its stages in a run of their
    own.

    ``samples`` counts what each wrapped component processed (the batch size of each call, summed) under its
    own name ("text_encoder", "text_encoder_2", "unet", "controlnet", "decode", "encode"): with FLOPs per sample
    (bench/flops.py) they give the FLOPs a run did, CFG's doubled batch and several images per call included."""

    device: Any = "cpu"
    enabled: bool = True
    seconds: dict[str, float] = field(default_factory=lambda: {"text_encoder": 0.0, "unet": 0.0, "decode": 0.0})
    calls: dict[str, int] = field(default_factory=lambda: {"text_encoder": 0, "unet": 0, "decode": 0})
    samples: dict[str, int] = field(default_factory=dict)
    _undo: list = field(default_factory=list)

    def attach(self, pipe: Any, controlnet: Any = None) -> StageTimer:
        """Wrap ``pipe``'s components, and ``controlnet`` (its own stage) where given."""
        for name in ("text_encoder", "text_encoder_2"):
            module = getattr(pipe, name, None)
            if module is not None:
                self._wrap(module, "forward", "text_encoder", name)
        self._wrap(pipe.unet, "forward", "unet")
        self._wrap(pipe.vae, "decode", "decode")
        self._wrap(pipe.vae, "encode", "encode")  # image-to-image: its own stage, only when called
        if controlnet is not None:
            self.seconds["controlnet"], self.calls["controlnet"] = 0.0, 0
            self._wrap(controlnet, "forward", "controlnet")
        return self

    def _wrap(self, obj: Any, method: str, stage: str, name: str | None = None) -> None:
        if getattr(obj, method, None) is None or f"_timed_{method}" in obj.__dict__:
            return
        original = getattr(obj, method)
        name = name or stage

        def timed(*args, **kwargs):
            if not self.enabled:
                return original(*args, **kwargs)
            synchronize(self.device)
            t0 = time.perf_counter()
            out = original(*args, **kwargs)
            synchronize(self.device)
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - t0
            self.calls[stage] = self.calls.get(stage, 0) + 1
            self.samples[name] = self.samples.get(name, 0) + _batch_size(args, kwargs)
            return out

        previous = obj.__dict__.get(method)  # an instance's own (e.g. an OpenVINO runner): put back on detach
        obj.__dict__[method] = timed
        obj.__dict__[f"_timed_{method}"] = True
        self._undo.append((obj, method, previous))

    def reset(self) -> None:
        for key in self.seconds:
            self.seconds[key] = 0.0
            self.calls[key] = 0
        self.samples.clear()

    def detach(self) -> None:
        for obj, method, previous in self._undo:
            obj.__dict__.pop(method, None)
            obj.__dict__.pop(f"_timed_{method}", None)
            if previous is not None:
                obj.__dict__[method] = previous
        self._undo.clear()


def _batch_size(args: tuple, kwargs: dict) -> int:
    """The leading dimension of a call's first tensor (sample, latents, image or input_ids)."""
    for value in (*args, *kwargs.values()):
        if hasattr(value, "shape") and len(value.shape) > 0:
            return int(value.shape[0])
    return 1


class RssSampler:
    """Peak resident memory (RSS, bytes) of this process while a block runs, sampled every ``interval`` s by a
    thread (psutil), plus the peak of ``torch.cuda.max_memory_allocated`` on CUDA (the device's peak is reset at
    the start of each block). Use as ``with sampler.measure(): ...``.

    Both are the process's, not one pipeline's: with two pipelines resident on the GPU the CUDA peak of a block
    includes the other's weights (the bench takes its per-path figure from a run made with that path alone)."""

    def __init__(self, device: Any = "cpu", interval: float = 0.01):
        import psutil

        self._proc = psutil.Process()
        self.device = device
        self.interval = interval
        self.peak_rss = 0
        self.peak_cuda = 0

    def rss(self) -> int:
        return self._proc.memory_info().rss

    @contextmanager
    def measure(self):
        import torch

        device = torch.device(self.device)
        cuda = device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        stop = threading.Event()
        peak = [self.rss()]

        def sample():
            while not stop.wait(self.interval):
                peak[0] = max(peak[0], self.rss())

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            thread.join()
            self.peak_rss = max(self.peak_rss, peak[0], self.rss())
            if cuda:
                self.peak_cuda = max(self.peak_cuda, torch.cuda.max_memory_allocated(device))


def summarize(values: list[float]) -> dict[str, float]:
    """Median, min, max and the spread (max - min) / median of a list of timings (seconds)."""
    median = statistics.median(values)
    return {
        "median": median,
        "min": min(values),
        "max": max(values),
        "spread": (max(values) - min(values)) / median if median > 0 else 0.0,
        "n": len(values),
    }


def describe_machine(device: Any) -> dict[str, Any]:
    """CPU model, cores, torch threads, the GPU when there is one, library versions, and when (UTC) and under
    what load (1-minute load average: other processes on a shared machine skew absolute times) it started."""
    import datetime

    import diffusers
    import psutil
    import torch

    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cpu_cores": psutil.cpu_count(logical=True),
        "torch_threads": torch.get_num_threads(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "cpu_flags": _cpu_flags(),  # the matrix extensions that set the peak: amx_* (Sapphire Rapids+), VNNI, bf16
        "amx": any(flag.startswith("amx") for flag in _cpu_flags()),
        "started_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "load_average_1m": current_load(),
    }
    try:
        import openvino

        info["openvino"] = openvino.__version__
    except ImportError:
        info["openvino"] = None
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
        info["gpu_memory_gb"] = round(torch.cuda.get_device_properties(torch.device(device)).total_memory / 2**30, 1)
        info["cuda"] = torch.version.cuda
    return info


def current_load() -> float | None:
    """The 1-minute load average (other processes on a shared machine skew absolute times)."""
    import os

    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def _cpu_flags() -> list[str]:
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_int8", "amx_tile")
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    present = set(line.split(":", 1)[1].split())
                    return [flag for flag in wanted if flag in present]
    except OSError:
        pass
    return []


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
