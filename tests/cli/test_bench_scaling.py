"""`lcm-live bench --live --workers R` and `--live --ray --replicas R` (bench/bench_scaling.py): the flags that do
not go together fail with one error line naming the fix; the flags become bench_ws's; one short real run on two
local workers (the figures are in docs/benchmarks.md, not asserted here)."""

from __future__ import annotations

import json

import pytest

from lcm_live.bench.bench_scaling import bench_ws_argv
from lcm_live.bench.bench_ws import build_parser as bench_ws_parser
from lcm_live.cli import main


@pytest.mark.parametrize(("argv", "says"), [
    (["--workers", "2", "--fake-engine-seconds", "0.5"], "add --live"),
    (["--live", "--workers", "2", "--ray", "--fake-engine-seconds", "0.5"], "use --replicas 2"),
    (["--live", "--replicas", "2", "--fake-engine-seconds", "0.5"], "go with --ray"),
    (["--live", "--workers", "2"], "--fake-engine-seconds S"),
    (["--live", "--workers", "2", "--fake-engine-seconds", "0.5", "--model", "builtin:shapes"], "one of them"),
    (["--live", "--workers", "2", "--model", "builtin:shapes", "--width", "256", "--height", "128"], "squares"),
    (["--live", "--ray", "--model", "builtin:shapes", "--compile"], "--compile"),
])
def test_flags_that_do_not_go_together(capsys, argv, says):
    assert main(["bench", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and says in err and "Traceback" not in err


@pytest.mark.parametrize("bad", [["--workers", "0"], ["--fake-engine-seconds", "0"], ["--replicas", "-1"]])
def test_bad_numbers_are_refused_by_the_parser(capsys, bad):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--live", *bad])
    assert exc.value.code == 2


def _argv(*flags: str) -> list[str]:
    """What `bench --live ...` hands bench_ws, parsed by bench_ws's own parser."""
    import argparse

    from lcm_live.cli import bench

    parser = argparse.ArgumentParser()
    bench.add_parser(parser.add_subparsers())
    args = parser.parse_args(["bench", "--live", *flags])
    return vars(bench_ws_parser().parse_args(bench_ws_argv(args)))


def test_one_client_keeps_one_input_in_flight_per_worker_or_replica():
    pool = _argv("--workers", "4", "--fake-engine-seconds", "0.5")
    assert (pool["workers"], pool["in_flight"], pool["ray"], pool["engine"]) == (4, 4, False, "fake")
    assert pool["step_latency"] == 0.25 and pool["num_inference_steps"] == 2 and pool["faults"] == "none"
    assert pool["pipelined"]  # the same client (no previews) at every worker count
    ray = _argv("--ray", "--replicas", "2", "--cpus-per-replica", "1", "--model", "builtin:shapes")
    assert (ray["ray"], ray["replicas"], ray["workers"], ray["in_flight"]) == (True, 2, 1, 2)
    assert (ray["engine"], ray["model"], ray["cpus_per_replica"]) == ("model", "builtin:shapes", 1.0)
    many = _argv("--workers", "4", "--sessions", "8", "--fake-engine-seconds", "0.5", "--seconds", "15")
    assert (many["clients"], many["max_sessions"], many["in_flight"], many["duration"]) == (8, 8, 1, 15.0)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_short_run_on_two_workers(tmp_path, capsys):
    out = tmp_path / "scaling.json"
    assert main(["bench", "--live", "--workers", "2", "--fake-engine-seconds", "0.2", "--seconds", "3",
                 "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "2 local worker(s)" in text and "live_fps: " in text and "latency p50 / p95" in text
    report = json.loads(out.read_text())
    assert report["workers"] == 2 and report["in_flight"] == 2 and report["frames"] > 0 and report["passed"]
    assert report["errors"] == {} and report["frames_dropped"] >= 0
