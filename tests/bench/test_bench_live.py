"""`lcm-live bench --live --arch tiny`: the real studio (uvicorn, in-process) and a websockets client drawing."""

from __future__ import annotations

import json

import pytest

from lcm_live.bench.bench_live import (
    LiveConfig,
    stroke_canvas,
    stroke_point,
    typed_prompt,
    with_live_defaults,
)
from lcm_live.cli import main


@pytest.mark.slow
def test_live_bench_tiny_end_to_end(capsys):
    assert main(["bench", "--live", "--arch", "tiny", "--backend", "torch", "--seconds", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    name, value = lines[-1].split(": ")
    assert name == "live_fps" and float(value) > 0
    name, value = lines[-2].split(": ")
    assert name == "roofline_fraction" and float(value) > 0
    assert "errors 0" in lines[-6]
    assert "1 steps x strength 0.5: 1 UNet evaluation(s) per frame (counted)" in lines[0]  # the default: 1 step
    # The studio's own split of a frame (its `timings`, medians): the engine call is part of the total.
    assert lines[-4].startswith("server medians: queue ")
    split = dict(part.rsplit(" ", 2)[:2] for part in lines[-4].removeprefix("server medians: ").split(", "))
    assert set(split) == {"queue", "engine call", "JPEG", "total"}
    assert 0 < float(split["engine call"]) <= float(split["total"])


def test_live_bench_lines_mode_with_a_controlnet(capsys):
    assert main(["bench", "--live", "--arch", "tiny", "--backend", "torch", "--seconds", "2", "--controlnet"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("live_fps: ") and float(lines[-1].split(": ")[1]) > 0
    assert "errors 0" in lines[-6]
    assert lines[-3].startswith("roofline: ") and "torch " in lines[-3]
    assert "lines (ControlNet), 1 steps: 1 UNet evaluation(s) per frame (counted)" in lines[0]
    assert "controlnet" in lines[1] and "UNet" in lines[1]  # its own stage, timed


@pytest.mark.slow
def test_live_bench_two_sessions_batched(capsys):
    assert main(["bench", "--live", "--arch", "tiny", "--backend", "torch", "--seconds", "2", "--sessions", "2",
                 "--batch-size", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    name, total = lines[-1].split(": ")
    assert name == "live_fps" and float(total) > 0
    assert "errors 0" in lines[-6]
    sessions = next(line for line in lines if line.startswith("sessions 2: per-client fps "))
    per_client = [float(x) for x in sessions.split("per-client fps ")[1].split(" (")[0].split(", ")]
    assert len(per_client) == 2 and all(x > 0 for x in per_client)
    assert sum(per_client) == pytest.approx(float(total), abs=0.02)
    assert "up to 2 frame(s) per engine call" in sessions


def test_stroke_canvases_change_from_frame_to_frame():
    points = [stroke_point(i, 64, 64) for i in range(3)]
    first, second = stroke_canvas(64, 64, points[:2]), stroke_canvas(64, 64, points)
    assert first[:2] == b"\xff\xd8" and first != second  # JPEG, and the stroke moved


def test_live_defaults_make_one_unet_evaluation_a_frame_for_every_family():
    from lcm_live.engine.architectures import family

    sd15 = with_live_defaults(LiveConfig(arch="sd15"), family("sd15"))
    assert (sd15.num_inference_steps, sd15.guidance_scale) == (1, 8.0)  # LCM img2img: every step runs
    sdxs = with_live_defaults(LiveConfig(arch="sdxs"), family("sdxs"))
    assert (sdxs.num_inference_steps, sdxs.guidance_scale) == (2, 0.0)  # SD img2img: int(2 x 0.5) = 1
    third = with_live_defaults(LiveConfig(arch="bk-sdm-tiny", strength=0.3), family("bk-sdm-tiny"))
    assert third.num_inference_steps == 4 and int(4 * 0.3) == 1 and third.guidance_scale == 1.0
    given = with_live_defaults(LiveConfig(arch="sdxs", num_inference_steps=3, guidance_scale=1.5), family("sdxs"))
    assert (given.num_inference_steps, given.guidance_scale) == (3, 1.5)


def test_live_bench_with_feature_reuse_counts_full_and_reused_evaluations(capsys):
    assert main(["bench", "--live", "--arch", "tiny", "--backend", "torch", "--seconds", "2",
                 "--feature-reuse", "3"]) == 0
    out = capsys.readouterr().out
    assert "feature_reuse:3" in out
    line = next(x for x in out.splitlines() if x.startswith("feature reuse (K=3): "))
    full, reused = (int(w) for w in line.split() if w.isdigit())
    assert full >= 1 and full <= reused  # every 3rd evaluation a full one (and the first)


def test_typing_over_a_sketch_sends_a_new_prompt_a_frame_over_the_same_canvas(capsys, tmp_path):
    """--typing: one sketch, then a letter more of the prompt after each frame; the engine keeps the sketch's
    encoding (engine/init_latents.py), so only the first frame encodes it."""
    assert [typed_prompt("a fox", n) for n in range(4)] == ["a fox", "a fox, o", "a fox, on", "a fox, on "]
    assert len({typed_prompt("a fox", n) for n in range(300)}) == 300  # every frame a new prompt
    assert main(["bench", "--live", "--arch", "tiny", "--backend", "torch", "--seconds", "2", "--typing",
                 "--json", str(tmp_path / "live.json")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert "img2img sketch, typing, 1 steps x strength 0.5" in lines[0]
    assert "errors 0" in lines[-6]
    samples = json.loads((tmp_path / "live.json").read_text())["roofline"]["samples"]
    assert samples["unet"] >= 3 and samples["encode"] == 1, samples  # every frame denoised, the sketch encoded once


def test_broadcast_viewers_watch_while_the_client_draws(capsys, tmp_path):
    """--broadcast-viewers N: the first client broadcasts (as the page's button) and N MJPEG clients count the
    frames they got; each viewer gets at least the frames drawn after it connected."""
    assert main(["bench", "--live", "--arch", "tiny", "--backend", "torch", "--seconds", "2",
                 "--broadcast-viewers", "2", "--json", str(tmp_path / "live.json")]) == 0
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "live.json").read_text())
    parts, frames = report["broadcast"]["parts"], report["frames"]
    assert len(parts) == 2 and all(frames - 2 <= n for n in parts), (parts, frames)
    assert min(report["broadcast"]["bytes"]) > 0
    assert "broadcast: 2 viewer(s) got" in out
