"""bench_ws --workers R --in-flight R: a client keeping R inputs unanswered against R workers (the figures are in
docs/benchmarks.md; here only that the run is sound: frames in input order, no error, both phases measured)."""

from __future__ import annotations

import pytest

from lcm_live.bench.bench_ws import build_parser, run

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


def test_pipelined_client_on_two_workers(tmp_path):
    result = run(build_parser().parse_args(
        ["--clients", "1", "--faults", "none", "--workers", "2", "--in-flight", "2", "--step-latency", "0.1",
         "--num-inference-steps", "2", "--duration", "3", "--max-sessions", "1"]))
    assert result["workers"] == 2 and result["in_flight"] == 2
    assert result["frames"] > 0 and result["errors"] == {} and result["passed"]
