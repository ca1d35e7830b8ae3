"""`lcm-live bench --arch tiny` end to end (seconds), and the measuring tools. No speed is asserted."""

from __future__ import annotations

import json

import pytest

from lcm_live.bench.measure import StageTimer, summarize
from lcm_live.cli import main


def test_bench_tiny_end_to_end(tmp_path, capsys):
    out_json = tmp_path / "bench.json"
    code = main(["bench", "--arch", "tiny", "--backend", "torch", "--runs", "2", "--num-inference-steps", "3",
                 "--json", str(out_json), "--no-progress"])
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    # The three closing lines, parsed.
    name, value = lines[-3].split(": ")
    assert name == "roofline_fraction" and float(value) > 0
    name, value = lines[-2].split(": ")
    assert name == "parity_cosine" and float(value) >= 0.99  # bf16 + channels_last + TAESD vs fp32 seed path
    name, value = lines[-1].split(": ")
    assert name == "speedup_vs_seed" and float(value) > 0

    report = json.loads(out_json.read_text())
    for side in ("seed", "lcm_live"):
        r = report[side]
        assert r["ms_per_image"]["n"] == 2 and r["ms_per_image"]["median"] > 0
        assert set(r["stages_ms"]) == {"text_encoder", "unet_per_step", "decode", "other"}
        assert r["unet_calls_per_image"] == 3  # one UNet call per step (full LCM: no CFG batch)
        assert r["peak_rss_gb"] > 0
    assert report["seed"]["dtype"] == "float32" and report["seed"]["pipeline"] == "StableDiffusionPipeline"
    assert report["lcm_live"]["decoder"] == "taesd" and "channels_last" in report["lcm_live"]["speedups"]
    assert report["machine"]["cpu"] and report["device"] == "cpu"
    assert report["parity_cosine"] == pytest.approx(float(lines[-2].split(": ")[1]), abs=1e-5)
    # The roofline: counted FLOPs of one call over its median time, over the peak measured in the path's own
    # backend and dtype (torch bfloat16 here; the seed path's torch float32).
    for side, dtype in (("lcm_live", "bfloat16"), ("seed", "float32")):
        r = report[side]["roofline"]
        assert r["peak"]["backend"] == "torch" and r["peak"]["dtype"] == dtype and r["peak_tflops"] > 0
        per_call = report[side]["ms_per_call"]["median"] / 1000
        assert r["achieved_tflops"] == pytest.approx(r["flops_per_call"] / per_call / 1e12)
        assert r["roofline_fraction"] == pytest.approx(r["achieved_tflops"] / r["peak_tflops"])
        flops = r["flops_per_sample"]
        assert r["flops_by_stage"]["unet"] == pytest.approx(3 * flops["unet"])  # 3 steps, batch 1
        assert r["flops_by_stage"]["decode"] == pytest.approx(flops["decode"])
    assert "text_encoder" not in report["lcm_live"]["roofline"]["flops_by_stage"]  # cached prompt: not run
    assert report["seed"]["roofline"]["flops_by_stage"]["text_encoder"] > 0  # the seed encodes on every call
    assert report["roofline_fraction"] == pytest.approx(float(lines[-3].split(": ")[1]), abs=0.005)
    assert report["roofline_fraction"] == report["lcm_live"]["roofline"]["roofline_fraction"]
    assert "roofline: " in report_text(lines, "lcm-live") and "torch bfloat16 2048x2048 GEMM" in "\n".join(lines)
    assert report["machine"]["load_average_1m_end"] is not None and "amx" in report["machine"]


def report_text(lines: list[str], side: str) -> str:
    """The lines of one side's section (from its header to the next section)."""
    start = next(i for i, line in enumerate(lines) if line.startswith(f"{side}:"))
    end = next((i for i in range(start + 1, len(lines)) if not lines[i].startswith("  ")), len(lines))
    return "\n".join(lines[start:end])


def test_bench_batch_size_tiny_end_to_end(tmp_path, capsys):
    out_json = tmp_path / "bench.json"
    assert main(["bench", "--arch", "tiny", "--backend", "torch", "--runs", "1", "--num-inference-steps", "2",
                 "--batch-size", "2", "--json", str(out_json), "--no-progress"]) == 0
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    assert lines[-2].startswith("parity_cosine: ") and float(lines[-2].split(": ")[1]) >= 0.99
    assert lines[-1].startswith("speedup_vs_seed: ")
    assert "batch 2 images per call" in lines[0] and out.count("ms per call (2 images)") == 2
    report = json.loads(out_json.read_text())
    assert report["batch_size"] == 2 and report["config"]["batch_size"] == 2
    for side in ("seed", "lcm_live"):
        r = report[side]
        assert r["unet_calls_per_call"] == 2  # two steps, both images in each UNet call
        assert r["ms_per_image"]["median"] == pytest.approx(r["ms_per_call"]["median"] / 2)
        assert r["images_per_s"] == pytest.approx(2000 / r["ms_per_call"]["median"])
        # Both images go through each UNet call: twice one sample's FLOPs per step.
        roof = r["roofline"]
        assert roof["flops_by_stage"]["unet"] == pytest.approx(2 * 2 * roof["flops_per_sample"]["unet"])


def test_bench_controlnet_times_its_own_stage_on_the_torch_unet(tmp_path, capsys):
    out_json = tmp_path / "bench.json"
    assert main(["bench", "--arch", "tiny", "--runs", "1", "--num-inference-steps", "2", "--baseline", "none",
                 "--controlnet", "--json", str(out_json), "--no-progress"]) == 0
    assert "controlnet/step" in capsys.readouterr().out
    r = json.loads(out_json.read_text())["lcm_live"]
    assert r["stages_ms"]["controlnet_per_step"] > 0 and r["unet_calls_per_call"] == 2
    roof = r["roofline"]  # the ControlNet's FLOPs counted too: one evaluation a step
    assert roof["flops_per_sample"]["controlnet"] > 0
    assert roof["flops_by_stage"]["controlnet"] == pytest.approx(2 * roof["flops_per_sample"]["controlnet"])
    assert not any(s.startswith("backend:openvino") or s.startswith("openvino") for s in r["speedups"])
    assert main(["bench", "--arch", "tiny", "--controlnet", "--no-progress"]) == 2
    assert "--baseline none" in capsys.readouterr().err


def test_sessions_without_live_is_refused(capsys):
    assert main(["bench", "--arch", "tiny", "--sessions", "2"]) == 2
    assert capsys.readouterr().err.startswith("error: --sessions 2")


def test_bench_without_baseline_has_no_ratio_and_profiles_a_call(tmp_path, capsys):
    trace, out_json = tmp_path / "prof" / "trace.json", tmp_path / "r.json"
    assert main(["bench", "--arch", "tiny", "--backend", "torch", "--runs", "1", "--baseline", "none",
                 "--decoder", "vae", "--dtype", "float32", "--no-progress", "--profile", str(trace),
                 "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    assert "lcm-live: dtype float32" in out and "speedup_vs_seed" not in out
    assert "profile: one lcm-live call" in out and str(trace) in out
    assert "aten::" in out.split("top operators by self cpu time total:")[1]
    assert json.loads(trace.read_text())["traceEvents"]
    profile = json.loads(out_json.read_text())["profile"]
    assert profile["wall_ms"] > 0 and profile["top"][0]["self_ms"] >= profile["top"][-1]["self_ms"]
    # At most one wait a call (diffusers' scheduler finding its first step's index; none on the engine's own loop).
    assert sum(profile["host_waits"].values()) <= 1


@pytest.mark.parametrize("flag", ["--json", "--profile"])
def test_unwritable_report_paths_are_refused_before_the_benchmark(tmp_path, capsys, flag):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    assert main(["bench", "--arch", "tiny", flag, str(a_file / "r.json")]) == 2
    assert capsys.readouterr().err.startswith(f"error: {flag} {a_file / 'r.json'}: cannot make its folder")
    assert main(["bench", "--arch", "tiny", flag, str(tmp_path)]) == 2
    assert "that is a folder" in capsys.readouterr().err


def test_profile_does_not_apply_to_live(capsys):
    assert main(["bench", "--live", "--arch", "tiny", "--profile", "p.json"]) == 2
    assert capsys.readouterr().err.startswith("error: --profile times one engine call")


def test_bad_size_is_one_error_line(capsys):
    assert main(["bench", "--arch", "tiny", "--width", "100"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --width 100") and err.count("\n") == 1


def test_zero_runs_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--arch", "tiny", "--runs", "0"])
    assert exc.value.code == 2
    assert "--runs" in capsys.readouterr().err


def test_summarize():
    s = summarize([2.0, 1.0, 4.0])
    assert s["median"] == 2.0 and s["min"] == 1.0 and s["max"] == 4.0 and s["spread"] == 1.5 and s["n"] == 3


def test_stage_timer_counts_component_calls():
    import torch

    from lcm_live.engine.architectures import build_pipeline

    pipe = build_pipeline("tiny")
    pipe.set_progress_bar_config(disable=True)
    timer = StageTimer().attach(pipe)
    pipe("x", num_inference_steps=2, width=64, height=64, generator=torch.Generator("cpu").manual_seed(0))
    assert timer.calls == {"text_encoder": 1, "unet": 2, "decode": 1}
    assert timer.samples == {"text_encoder": 1, "unet": 2, "decode": 1}  # batch 1; full LCM: no CFG batch
    assert all(v > 0 for v in timer.seconds.values())
    timer.detach()
    assert "forward" not in pipe.unet.__dict__ and "decode" not in pipe.vae.__dict__


def test_on_cuda_the_total_is_timed_without_the_stage_synchronizations(monkeypatch):
    """The stage timer synchronizes the device around each stage; on CUDA a run's total comes from a run without
    those synchronizations, its stages from a second run."""
    import contextlib
    from types import SimpleNamespace

    from lcm_live.bench import bench_engine, measure

    syncs = []
    monkeypatch.setattr(measure, "synchronize", lambda device: syncs.append(device))

    class Part:  # the timer wraps methods on the instance, as on diffusers' modules
        def forward(self, x):
            return x

        decode = forward

    pipe = SimpleNamespace(unet=Part(), vae=Part())
    runs = []

    def run():
        runs.append(len(syncs))  # synchronizations before this run started
        for step in range(3):
            pipe.unet.forward(step)
        pipe.vae.decode(0)
        return f"latents of run {len(runs)}"

    for device, runs_per_timed in (("cuda", 2), ("cpu", 1)):
        syncs.clear()
        runs.clear()
        path = bench_engine._Path("lcm-live", run, pipe, device)
        path.memory = SimpleNamespace(measure=contextlib.nullcontext)  # no CUDA memory counters here
        path.timed()
        assert len(runs) == runs_per_timed and len(path.totals) == 1 and path.unet_calls == 3
        assert path.latents == "latents of run 1" and path.timer.enabled
        if device == "cuda":
            assert runs == [0, 0] and len(syncs) == 8  # none in the timed run; 2 per stage call in the second
        else:
            assert len(syncs) == 8
        path.timer.detach()


def test_the_parity_reference_is_the_seed_paths_own_image_on_a_cpu():
    """The reference run draws lcm-live's float32 noise; on a CPU in float32 that is the seed path's image, bit
    for bit (on a torch that draws half precision differently, only the reference shares lcm-live's noise)."""
    import torch

    from lcm_live.bench.bench_engine import BenchConfig
    from lcm_live.bench.seed_path import build_seed_pipeline, seed_reference, seed_run

    config = BenchConfig(arch="tiny", width=64, height=64, num_inference_steps=3, batch_size=2)
    pipe, _ = build_seed_pipeline(config, torch.device("cpu"))
    scheduler = type(pipe.scheduler)
    assert torch.equal(seed_reference(pipe, config, "cpu"), seed_run(pipe, config, "cpu"))
    assert type(pipe.scheduler) is scheduler  # the seed's own scheduler is back


@pytest.mark.parametrize("arch, sampler, family", [("sd15", "lcm", "lcm"), ("sdxl", "lcm", "lcm"),
                                                   ("sd-turbo", "euler-trailing", "sd-turbo"),
                                                   ("sdxl-turbo", "euler-a", "sdxl-turbo"),
                                                   ("sdxs", "euler-trailing", "sdxs"), ("bk-sdm-tiny", "lcm", "bk-sdm"),
                                                   ("tiny", "lcm", "lcm")])
def test_each_arch_samples_with_its_familys_own_scheduler(arch, sampler, family):
    """`bench --arch` runs the family's sampler on both paths (the engine's family, diffusers' scheduler for it)."""
    from lcm_live.bench.bench_engine import engine_family
    from lcm_live.engine.architectures import read_config
    from lcm_live.engine.families import SCHEDULER_CLASSES, make_scheduler

    fam = engine_family(arch)
    assert (fam.scheduler, fam.name) == (sampler, family)
    if arch != "tiny":
        from diffusers import LCMScheduler

        made = make_scheduler(fam, LCMScheduler.from_config(read_config(arch, "scheduler")))
        assert type(made).__name__ == SCHEDULER_CLASSES[sampler]
