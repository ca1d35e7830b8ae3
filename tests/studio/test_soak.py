"""A short soak (R15): `lcm-live serve` with a faulty FakeEngine, many clients with disconnects, slow readers,
bursts and malformed messages. The full-length run is `python -m lcm_live.bench.bench_ws` (60 s, 16 clients)."""

from __future__ import annotations

import pytest

from lcm_live.bench.bench_ws import DOCUMENTED_CLOSE_CODES, DOCUMENTED_ERROR_CODES, build_parser, run

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


def test_short_soak_with_faults(tmp_path):
    args = build_parser().parse_args(["--clients", "10", "--max-sessions", "6", "--duration", "8",
                                      "--faults", "default", "--json", str(tmp_path / "out.json")])
    result = run(args)
    assert result["healthz_failed"] == 0 and result["healthz_total"] > 0
    assert result["unhandled_in_log"] == []
    assert result["undocumented"] == []
    assert result["server_exit_code"] == 0
    assert result["frames"] > 0 and result["sessions_served"] > 0
    assert set(result["errors"]) <= DOCUMENTED_ERROR_CODES
    assert set(result["rejected"]) <= DOCUMENTED_ERROR_CODES
    assert {int(c) for c in result["close_codes"]} <= DOCUMENTED_CLOSE_CODES
    assert result["rss_growth_mb"] < 50
    assert result["metrics"]["lcm_live_frames_sent_total"] >= result["frames"]
    assert result["passed"]
