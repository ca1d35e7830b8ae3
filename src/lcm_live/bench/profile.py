"""`bench --profile FILE`: one more lcm-live call under torch.profiler, after the timed runs.

It answers what the stage timers cannot: where a call's "other" time goes. The trace (Chrome trace format; open
it in https://ui.perfetto.dev or chrome://tracing) shows every operator on the host and every kernel on the GPU
on one time line, so gaps where the GPU waits for the host stand out. The report keeps the summary: the
operators that took the most time (self device time on CUDA, self CPU time on a CPU), the call's wall time, how
long the device was busy, and how often the host waited for the device (``cudaStreamSynchronize``,
``cudaDeviceSynchronize``, and the ``aten::_local_scalar_dense`` behind ``.item()``/``int(tensor)``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lcm_live.bench.measure import synchronize

# Host-side events that make the host wait until the GPU has finished what was queued.
WAIT_EVENTS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "aten::_local_scalar_dense")


def profile_call(run: Callable[[], Any], device: Any, path: str | Path, *, top: int = 15) -> dict[str, Any]:
    """Run ``run()`` once under torch.profiler; write the trace to ``path``; return the summary."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.device(device).type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    synchronize(device)
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        run()
        synchronize(device)
        wall = time.perf_counter() - t0
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(path))

    averages = prof.key_averages()
    sort_by = "self_device_time_total" if cuda else "self_cpu_time_total"
    rows = sorted(averages, key=lambda e: _self_time_us(e, cuda), reverse=True)[:top]
    summary: dict[str, Any] = {
        "trace": str(path),
        "wall_ms": wall * 1000,
        "sorted_by": sort_by,
        "top": [{"name": e.key, "calls": e.count, "self_ms": _self_time_us(e, cuda) / 1000} for e in rows],
        "host_waits": {e.key: e.count for e in averages if e.key in WAIT_EVENTS},
        "table": averages.table(sort_by=sort_by, row_limit=top),
    }
    if cuda:
        # The device-side events (kernels, copies, memsets): how long the GPU had work in this call.
        summary["device_busy_ms"] = sum(_self_time_us(e, True) for e in averages
                                        if e.device_type == torch.autograd.DeviceType.CUDA) / 1000
    return summary


def _self_time_us(event: Any, cuda: bool) -> float:
    if cuda:
        return float(getattr(event, "self_device_time_total", getattr(event, "self_cuda_time_total", 0.0)))
    return float(event.self_cpu_time_total)


def format_profile(summary: dict[str, Any]) -> list[str]:
    """The report's lines for one profiled call."""
    if "error" in summary:
        return [f"profile: failed ({summary['error']}); the figures above are not affected"]
    lines = [f"profile: one lcm-live call, {summary['wall_ms']:.1f} ms wall"
             + (f", device busy {summary['device_busy_ms']:.1f} ms" if "device_busy_ms" in summary else "")
             + f"; trace {summary['trace']}"]
    waits = summary["host_waits"]
    label = "host waits for the device" if "device_busy_ms" in summary else "host-device waits (free without a GPU)"
    lines.append(f"  {label}: " + (", ".join(f"{k} x{v}" for k, v in waits.items()) or "none seen"))
    lines.append(f"  top operators by {summary['sorted_by'].replace('_', ' ')}:")
    lines += [f"    {row['self_ms']:9.2f} ms  x{row['calls']:<5d} {row['name']}" for row in summary["top"]]
    return lines
