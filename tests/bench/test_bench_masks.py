"""`lcm-live bench --mask` / `--regions N` on the tiny model: the report's shape and the calls it counts (no timings
are asserted: they depend on the machine)."""

from __future__ import annotations

from lcm_live.bench.bench_engine import BenchConfig
from lcm_live.bench.bench_masks import format_masks_report, run_masks_bench


def test_mask_and_region_cases_are_timed_and_counted():
    config = BenchConfig(arch="tiny", width=64, height=64, num_inference_steps=2, runs=1, warmup=0, baseline=None,
                         backend="torch", decoder="vae", dtype="float32", device="cpu")
    report = run_masks_bench(config, mask=True, regions=3)
    cases = report["cases"]
    assert set(cases) == {"img2img", "mask_whole", "mask_left_half", "txt2img", "regions_3"}
    assert all(c["unet_calls"] == 2 and c["frame_s"] >= c["unet_s"] > 0 for c in cases.values())  # one per step
    assert set(report["mask_overhead"]) == {"mask_whole", "mask_left_half"}
    assert report["regions_unet_per_step_vs_n_evaluations"] > 0
    text = format_masks_report(report)
    assert "mask_overhead_whole:" in text and "regions_unet_per_step_vs_n_evaluations:" in text
