"""`lcm-live upscale` in-process on the tiny full LCM: the frame's parameters round-trip, the refusals come before
any model loads."""

from __future__ import annotations

import pytest
from PIL import Image

from lcm_live.cli import main
from lcm_live.engine.metadata import read_png_parameters, read_sidecar

ENGINE = ["--device", "cpu", "--dtype", "float32", "--backend", "torch", "--no-progress"]


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


def test_metadata_round_trip(tiny_lcm_dir, tmp_path, capsys):
    frame = tmp_path / "frame.png"
    assert main(["generate", "a red fox", "--model", str(tiny_lcm_dir), *ENGINE, "--num-inference-steps", "2",
                 "--width", "64", "--height", "64", "--seed", "3", "--output", str(frame)]) == 0
    made = read_png_parameters(frame)
    out = tmp_path / "frame-x2.png"
    assert main(["upscale", str(frame), "--scale", "2", "--model", str(tiny_lcm_dir), *ENGINE, "--output", str(out),
                 "--metadata", "json"]) == 0
    assert f"saved {out}" in capsys.readouterr().out
    params = read_png_parameters(out)
    assert params == read_sidecar(out) and Image.open(out).size == (128, 128)
    # The frame's own prompt, seed, steps and guidance ran again (no flags), its other fields carried over.
    for key in ("prompt", "seed", "num_inference_steps", "guidance_scale", "mode", "model"):
        assert params[key] == made[key], key
    assert (params["width"], params["height"]) == (128, 128)
    assert params["upscale"] == {"scale": 2, "method": "lanczos+lcm-tiled", "source_width": 64, "source_height": 64,
                                 "tile_size": 64, "tile_overlap": 16, "tiles": 9, "strength": 0.3}
    # Flags override the frame's; without --model, the frame's own model (a path that exists here) is used.
    again = tmp_path / "again.png"
    assert main(["upscale", str(frame), *ENGINE, "--output", str(again),
                 "--prompt", "a blue fox", "--seed", "8", "--strength", "0.4"]) == 0
    assert f"refining with {made['model']}, the image's own model" in capsys.readouterr().err
    params = read_png_parameters(again)
    assert (params["prompt"], params["seed"], params["upscale"]["strength"]) == ("a blue fox", 8, 0.4)
    assert params["model"] == made["model"]


@pytest.mark.parametrize("extra, needle", [
    (["--scale", "4", "--max-pixels", "65535"], "past the pixel cap of 65535"),
    (["--scale", "3"], "invalid choice"),
    (["--output", "out.jpg"], ".png"),
    (["--upscaler", "RealESRGAN_x4plus.pth"], "only .safetensors"),
    (["--no-refine"], "--no-refine leaves nothing to do"),
    (["--tile-size", "60"], "tile_size=60"),
    (["--num-inference-steps", "9"], "num_inference_steps=9"),
    (["--strength", "0"], "strength=0.0"),
    (["--seed", "-1"], "seed=-1"),
])
def test_refused_before_any_model_loads(tmp_path, capsys, extra, needle):
    image = tmp_path / "in.png"
    Image.new("RGB", (64, 64), (10, 20, 30)).save(image)
    # A model that does not exist: each of these must fail on its own flag first.
    try:
        code = main(["upscale", str(image), "--model", str(tmp_path / "no-such-model"), *ENGINE, *extra])
    except SystemExit as exc:  # argparse's own refusals
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err
    assert needle in err and "no-such-model" not in err


def test_unreadable_input(tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    assert main(["upscale", str(bad), *ENGINE]) == 2
    assert "cannot read it as an image" in _error_lines(capsys.readouterr().err)[0]
