"""The soak (issue 13, R15): `lcm-live serve` with a faulty FakeEngine and 16 clients drawing for 60 s with faults
injected: disconnects mid-generation, slow readers, bursts, malformed and deeply nested JSON, bad images (bombs,
scan floods, garbage), oversize messages, engine errors and OOMs. Nothing is lost: every session's last input
gets its frame. ``make soak`` runs the long version (`python -m lcm_live.bench.bench_ws`, 300 s, 32 clients)."""

from __future__ import annotations

import os

import pytest

from lcm_live.bench.bench_ws import DOCUMENTED_CLOSE_CODES, DOCUMENTED_ERROR_CODES, build_parser, run

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]
SECONDS = os.environ.get("LCM_LIVE_SOAK_SECONDS", "60")


def test_soak_16_clients_with_faults_loses_nothing(tmp_path):
    args = build_parser().parse_args(["--clients", "16", "--max-sessions", "16", "--duration", SECONDS,
                                      "--faults", "default", "--json", str(tmp_path / "out.json")])
    result = run(args)
    assert result["healthz_failed"] == 0 and result["healthz_total"] > 0
    assert result["unhandled_in_log"] == []
    assert result["undocumented"] == []
    assert result["server_exit_code"] == 0
    assert result["frames"] > 0 and result["sessions_served"] >= 16
    assert result["last_inputs"] > 0 and result["last_inputs_lost"] == []
    assert result["sessions_aborted"] > 0
    assert set(result["errors"]) <= DOCUMENTED_ERROR_CODES
    assert {"too_large", "invalid_image", "invalid_params"} <= set(result["errors"])  # the faults were sent
    assert set(result["rejected"]) <= DOCUMENTED_ERROR_CODES
    assert {int(c) for c in result["close_codes"]} <= DOCUMENTED_CLOSE_CODES
    assert result["rss_growth_mb"] < 50
    assert result["metrics"]["lcm_live_frames_sent_total"] >= result["frames"]
    assert result["passed"]
