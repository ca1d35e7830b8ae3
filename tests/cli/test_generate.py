"""`lcm-live generate` and `lcm-live info`, in-process (plus one real subprocess), on the tiny full LCM."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lcm_live.cli import main
from lcm_live.engine.metadata import read_png_parameters, read_sidecar


def _args(tiny, *extra):
    return ["generate", "a red fox", "--model", str(tiny), "--device", "cpu", "--dtype", "float32",
            "--num-inference-steps", "2", "--width", "64", "--height", "64", "--no-progress", *extra]


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


def test_generate_writes_png_with_parameters_and_sidecar(tiny_lcm_dir, tmp_path, capsys):
    out = tmp_path / "fox.png"
    assert main(_args(tiny_lcm_dir, "--seed", "3", "--output", str(out), "--metadata", "json")) == 0
    captured = capsys.readouterr()
    assert f"saved {out}" in captured.out and "seed 3" in captured.out
    params = read_png_parameters(out)
    assert params == read_sidecar(out)
    assert (params["prompt"], params["seed"], params["num_inference_steps"]) == ("a red fox", 3, 2)
    assert (params["width"], params["height"], params["guidance_scale"]) == (64, 64, 8.0)
    assert (params["device"], params["dtype"]) == ("cpu", "float32") and params["model"].endswith(tiny_lcm_dir.name)
    assert Image.open(out).size == (64, 64)
    # The same seed through the CLI gives the same pixels.
    again = tmp_path / "again.png"
    assert main(_args(tiny_lcm_dir, "--seed", "3", "--output", str(again))) == 0
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(again)))


def test_default_output_is_a_new_name_under_outputs(tiny_lcm_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(_args(tiny_lcm_dir, "--num-images", "2", "--seed", "1")) == 0
    files = sorted((tmp_path / "outputs").glob("*.png"))
    assert len(files) == 2 and all(f.name.startswith("lcm-") for f in files)
    assert sorted(read_png_parameters(f)["image_index"] for f in files) == [0, 1]
    out = capsys.readouterr().out
    assert all(f"saved {Path('outputs') / f.name}" in out for f in files)


def test_image_to_image(tiny_lcm_dir, tmp_path):
    init = tmp_path / "init.jpg"
    Image.new("RGB", (80, 48), (30, 120, 200)).save(init)
    out = tmp_path / "i2i.png"
    assert main(_args(tiny_lcm_dir, "--image", str(init), "--strength", "0.6", "--output", str(out))) == 0
    params = read_png_parameters(out)
    assert params["mode"] == "img2img" and params["strength"] == 0.6 and Image.open(out).size == (64, 64)


@pytest.mark.parametrize("extra, needle", [
    (["--num-inference-steps", "9"], "num_inference_steps=9"),
    (["--width", "100"], "width=100"),
    (["--negative-prompt", "blurry"], "w-embedding"),
    (["--image", "MISSING"], "no such file"),
    (["--image", "GARBAGE"], "cannot read it as an image"),
    (["--image", "INIT", "--strength", "0"], "strength=0.0"),
    (["--output", "out.jpg"], ".png"),
    (["--lora", "nowhere/style.safetensors"], "nowhere/style.safetensors"),
    (["--control-image", "INIT"], "--control-image and --controlnet go together"),
    (["--controlnet", "org/cn", "--control-image", "GARBAGE"], "--control-image"),
    (["--controlnet", "org/cn", "--control-image", "INIT", "--controlnet-conditioning-scale", "-1"],
     "controlnet_conditioning_scale=-1.0"),
    (["--mask", "MASK"], "mask_image needs an init image"),
    (["--image", "INIT", "--mask", "INIT"], "all black, so nothing would change"),
    (["--image", "INIT", "--mask", "GARBAGE"], "--mask"),
    (["--region", "MASK", " "], "regions[0].prompt is empty"),
    (["--region", "MASK", "a"] * 9, "at most 8"),
    (["--prompt-blend", "a cat", "half"], "the weight must be a number"),
    (["--seed-blend", "7", "1.5"], "seed_blend.weight=1.5"),
])
def test_bad_input_is_one_error_line_exit_2_and_no_file(tiny_lcm_dir, tmp_path, monkeypatch, capsys, extra,
                                                        needle):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    Image.new("RGB", (64, 64)).save(tmp_path / "init.png")
    Image.new("L", (64, 64), 255).save(tmp_path / "mask.png")
    names = {"MISSING": str(tmp_path / "missing.png"), "GARBAGE": str(tmp_path / "garbage.png"),
             "INIT": str(tmp_path / "init.png"), "MASK": str(tmp_path / "mask.png")}
    extra = [names.get(x, x) for x in extra]
    before = set(tmp_path.iterdir())
    assert main(_args(tiny_lcm_dir, *extra)) == 2
    err = capsys.readouterr().err
    [line] = _error_lines(err)
    assert needle in line and "Traceback" not in err
    assert set(tmp_path.iterdir()) == before  # no outputs/ folder, no partial file


def test_inpainting_keeps_the_pixels_outside_the_mask(tiny_lcm_dir, tmp_path, capsys):
    init = tmp_path / "init.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(init)
    mask = Image.new("L", (32, 32), 0)  # half the output's size: fitted, and said
    mask.paste(255, (0, 0, 12, 32))
    mask.save(tmp_path / "mask.png")
    out = tmp_path / "inpaint.png"
    assert main(_args(tiny_lcm_dir, "--image", str(init), "--mask", str(tmp_path / "mask.png"), "--mask-feather",
                      "4", "--strength", "1.0", "--seed", "1", "--output", str(out))) == 0
    assert "warning: mask_image was 32x32; fitted to the output's 64x64" in capsys.readouterr().err
    got, before = np.asarray(Image.open(out)).astype(int), np.asarray(Image.open(init)).astype(int)
    assert np.array_equal(got[:, 28:], before[:, 28:]) and np.abs(got[:, :24] - before[:, :24]).mean() > 5
    params = read_png_parameters(out)
    assert params["mode"] == "inpaint" and params["mask_feather"] == 4


def test_regions_and_blends(tiny_lcm_dir, tmp_path):
    left = tmp_path / "left.png"
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))
    mask.save(left)
    out = tmp_path / "regions.png"
    assert main(_args(tiny_lcm_dir, "--region", str(left), "a red circle", "--prompt-blend", "a blue square",
                      "0.25", "--seed-blend", "9", "0.5", "--seed", "1", "--output", str(out))) == 0
    params = read_png_parameters(out)
    assert params["mode"] == "regions" and params["regions"] == [{"prompt": "a red circle"}]
    assert params["prompt_blend"] == {"prompt": "a blue square", "weight": 0.25}
    assert params["seed_blend"] == {"seed": 9, "weight": 0.5}


def test_controlnet_with_a_control_image(tiny_lcm_dir, tmp_path):
    from diffusers import UNet2DConditionModel

    from lcm_live.engine.tiny import save_tiny_controlnet

    controlnet = save_tiny_controlnet(tmp_path / "cn", UNet2DConditionModel.from_pretrained(tiny_lcm_dir / "unet"))
    lines = tmp_path / "lines.png"
    Image.new("RGB", (100, 100), "black").save(lines)
    out = tmp_path / "control.png"
    assert main(_args(tiny_lcm_dir, "--controlnet", str(controlnet), "--control-image", str(lines),
                      "--controlnet-conditioning-scale", "0.7", "--seed", "4", "--output", str(out))) == 0
    params = read_png_parameters(out)
    assert params["mode"] == "control" and params["controlnet"] == str(controlnet)
    assert params["controlnet_conditioning_scale"] == 0.7 and Image.open(out).size == (64, 64)


def test_lcm_lora_model_with_style_lora_cfg_and_negative_prompt(tiny_sd_dir, tmp_path):
    """Plain SD + an LCM-LoRA and a style LoRA (made with peft), CFG on: the metadata names both with scales."""
    from diffusers import UNet2DConditionModel

    from lcm_live.engine.tiny import save_tiny_lora

    unet = UNet2DConditionModel.from_pretrained(tiny_sd_dir, subfolder="unet")
    lcm_lora = save_tiny_lora(tmp_path / "lcm.safetensors", unet, seed=1)
    style = save_tiny_lora(tmp_path / "style.safetensors", unet, rank=2, seed=2)
    out = tmp_path / "boat.png"
    args = _args(tiny_sd_dir, "--lcm-lora", str(lcm_lora), "--lora", f"{style}:0.5", "--guidance-scale", "1.5",
                 "--negative-prompt", "fog", "--seed", "2", "--output", str(out))
    assert main(args) == 0
    params = read_png_parameters(out)
    assert params["kind"] == "lcm-lora" and params["negative_prompt"] == "fog" and params["guidance_scale"] == 1.5
    assert params["loras"] == [{"source": str(lcm_lora), "scale": 1.0}, {"source": str(style), "scale": 0.5}]


def test_missing_model_folder(tmp_path, capsys):
    code = main(["generate", "x", "--model", str(tmp_path / "no-such-model"), "--device", "cpu", "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err
    assert len(_error_lines(err)) == 1 and "Traceback" not in err


def test_unknown_flag_exits_non_zero(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["generate", "x", "--stepz", "3"])
    assert exc.value.code == 2 and "--stepz" in capsys.readouterr().err


def test_info_text_and_json(capsys):
    assert main(["info"]) == 0
    text = capsys.readouterr().out
    assert "dtype (auto):" in text and "CPU features:" in text and "diffusers" in text
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["dtype"] in ("float32", "bfloat16", "float16") and info["dtype_reason"].startswith(("auto", "--"))
    assert info["libraries"]["torch"] and "features" in info["cpu"]
    assert info["backend"] in ("torch", "openvino") and info["backend_reason"].startswith("auto")
    assert "backend (auto):" in text


def _cli() -> list[str]:
    exe = Path(sys.executable).with_name("lcm-live")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "lcm_live.cli"]


def test_subprocess_run_has_no_traceback(tiny_lcm_dir, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    ok = subprocess.run([*_cli(), *_args(tiny_lcm_dir, "--seed", "5")], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=240)
    assert ok.returncode == 0, ok.stderr
    assert "Traceback" not in ok.stderr and "saved outputs" in ok.stdout
    [png] = (tmp_path / "outputs").glob("*.png")
    assert read_png_parameters(png)["seed"] == 5
    bad = subprocess.run([*_cli(), *_args(tiny_lcm_dir, "--image", str(tmp_path / "nope.png"))], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=240)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert _error_lines(bad.stderr) == [f"error: --image {str(tmp_path / 'nope.png')!r}: no such file"]
