"""bench_attack runs end to end: a live client's frames alone and under a decode-cost attack (figures in docs)."""

from __future__ import annotations

import pytest

from lcm_live.bench.bench_attack import build_parser, run, scan_flood
from lcm_live.studio.images import count_jpeg_scans

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


def test_the_flood_payload_is_what_the_issue_describes():
    data = scan_flood(200_000, side=256)
    assert 150_000 < len(data) <= 200_000 and count_jpeg_scans(data, 10**6) > 1000


def test_attack_bench_reports_both_phases_and_the_attack_is_refused():
    result = run(build_parser().parse_args(["--seconds", "2", "--attackers", "2", "--flood-bytes", "300000"]))
    assert result["baseline"]["frames"] > 0 and result["under_attack"]["frames"] > 0
    assert result["latency_ratio_p50"] is not None
    assert set(result["attack_statuses"]) <= {"422", "429"}  # refused (scans) or capacity; never decoded, never 5xx
