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
