"""bench/profile.py: one call under torch.profiler, its trace and summary (on the CPU here)."""

from __future__ import annotations

import json

import torch

from lcm_live.bench.profile import format_profile, profile_call


def test_a_profiled_call_writes_a_trace_and_counts_host_waits(tmp_path):
    def run():
        x = torch.randn(64, 64)
        for _ in range(3):
            x = x @ x
            x = x / x.abs().max().item()  # .item(): a host wait on a GPU

    summary = profile_call(run, "cpu", tmp_path / "t.json", top=5)
    assert json.loads((tmp_path / "t.json").read_text())["traceEvents"]
    assert summary["host_waits"] == {"aten::_local_scalar_dense": 3}
    names = [row["name"] for row in summary["top"]]
    assert len(names) == 5 and "aten::mm" in names
    assert summary["sorted_by"] == "self_cpu_time_total" and "device_busy_ms" not in summary
    lines = format_profile(summary)
    assert lines[0].startswith("profile: one lcm-live call") and "aten::_local_scalar_dense x3" in lines[1]
    assert len(lines) == 3 + 5


def test_a_failing_profiler_leaves_the_figures(monkeypatch, capsys):
    import lcm_live.bench.profile as profile
    from lcm_live.cli import main

    def broken(*args, **kwargs):
        raise RuntimeError("CUPTI unavailable")

    monkeypatch.setattr(profile, "profile_call", broken)
    assert main(["bench", "--arch", "tiny", "--backend", "torch", "--runs", "1", "--baseline", "none",
                 "--no-progress", "--profile", "unused.json"]) == 0
    out = capsys.readouterr().out
    assert "profile: failed (RuntimeError: CUPTI unavailable)" in out and "ms per image: median" in out


def test_the_profiled_call_runs_without_the_stage_timers_synchronizations(monkeypatch, tmp_path, capsys):
    """On CUDA the stage timer synchronizes around every UNet call: inside the profiled call those waits would
    be counted as the engine's own. Counted here through measure.synchronize, which the timer calls."""
    import lcm_live.bench.measure as measure
    import lcm_live.bench.profile as profile
    from lcm_live.cli import main

    inside = {"now": False, "syncs": 0, "profiled": 0}
    real_sync, real_profile = measure.synchronize, profile.profile_call

    def counting_sync(device):
        inside["syncs"] += inside["now"]
        return real_sync(device)

    def watched_profile(run, device, path, **kwargs):
        inside["now"], inside["profiled"] = True, inside["profiled"] + 1
        try:
            return real_profile(run, device, path, **kwargs)
        finally:
            inside["now"] = False

    monkeypatch.setattr(measure, "synchronize", counting_sync)
    monkeypatch.setattr(profile, "profile_call", watched_profile)
    assert main(["bench", "--arch", "tiny", "--backend", "torch", "--runs", "1", "--baseline", "none",
                 "--no-progress", "--profile", str(tmp_path / "t.json")]) == 0
    assert inside["profiled"] == 1 and inside["syncs"] == 0
    assert "profile: one lcm-live call" in capsys.readouterr().out
