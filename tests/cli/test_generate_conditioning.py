"""`lcm-live generate` with several ControlNets (repeatable flags, in order) and an IP-Adapter's reference image."""

from __future__ import annotations

import pytest
from PIL import Image, ImageDraw

from lcm_live.cli import main
from lcm_live.engine.metadata import read_png_parameters


def _args(tiny, *extra):
    return ["generate", "a red fox", "--model", str(tiny), "--device", "cpu", "--dtype", "float32",
            "--num-inference-steps", "2", "--width", "64", "--height", "64", "--no-progress", *extra]


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


def test_two_controlnets_and_a_reference_image(tiny_lcm_dir, tmp_path):
    from diffusers import UNet2DConditionModel

    from lcm_live.bench.bench_conditioning import TINY_ENCODER, random_ip_adapter, save_ip_adapter
    from lcm_live.engine.tiny import save_tiny_controlnet

    unet = UNet2DConditionModel.from_pretrained(tiny_lcm_dir / "unet")
    nets = [save_tiny_controlnet(tmp_path / f"cn{k}", unet, seed=k) for k in range(2)]
    adapter = save_ip_adapter(tmp_path / "ipa", *random_ip_adapter(unet, TINY_ENCODER))
    lines = tmp_path / "lines.png"
    image = Image.new("RGB", (64, 64))
    ImageDraw.Draw(image).line([(0, 0), (63, 63)], fill="white", width=4)
    image.save(lines)
    Image.new("RGB", (40, 40), (200, 30, 30)).save(tmp_path / "ref.png")
    out = tmp_path / "out.png"
    assert main(_args(tiny_lcm_dir, "--controlnet", str(nets[0]), "--controlnet", str(nets[1]),
                      "--control-image", str(lines), "--control-image", str(lines),
                      "--controlnet-conditioning-scale", "0.5", "--controlnet-conditioning-scale", "1.2",
                      "--control-guidance-end", "0.5", "--ip-adapter", str(adapter),
                      "--ip-adapter-image", str(tmp_path / "ref.png"), "--ip-adapter-scale", "0.6",
                      "--seed", "4", "--output", str(out))) == 0
    params = read_png_parameters(out)
    assert params["mode"] == "control+ip_adapter"
    assert params["controlnet"] == [str(n) for n in nets] and params["controlnet_conditioning_scale"] == [0.5, 1.2]
    assert params["control_guidance_end"] == 0.5
    assert params["ip_adapter"] == str(adapter) and params["ip_adapter_scale"] == 0.6


@pytest.mark.parametrize(("extra", "needle"), [
    (["--controlnet", "org/a", "--controlnet", "org/b", "--control-image", "INIT"],
     "1 --control-image for 2 --controlnet"),
    (["--controlnet", "org/a", "--controlnet", "org/b", "--control-image", "INIT", "--control-image", "INIT",
      "--controlnet-conditioning-scale", "1", "--controlnet-conditioning-scale", "1",
      "--controlnet-conditioning-scale", "1"], "3 --controlnet-conditioning-scale for 2"),
    (["--controlnet", "org/a", "--control-image", "INIT", "--control-guidance-start", "0.9",
      "--control-guidance-end", "0.2"], "control_guidance_end=0.2"),
    (["--ip-adapter-image", "INIT"], "--ip-adapter-image and --ip-adapter go together"),
    (["--ip-adapter", "x.safetensors", "--ip-adapter-image", "GARBAGE"], "--ip-adapter-image"),
    (["--ip-adapter", "x.safetensors", "--ip-adapter-image", "INIT", "--ip-adapter-scale", "5"],
     "ip_adapter_scale=5.0"),
    (["--ip-adapter", "x.bin", "--ip-adapter-image", "INIT"], "not a safetensors file"),
])
def test_bad_input_is_one_error_line_exit_2_and_no_file(tiny_lcm_dir, tmp_path, monkeypatch, capsys, extra, needle):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    (tmp_path / "x.bin").write_bytes(b"not loaded")
    Image.new("RGB", (64, 64)).save(tmp_path / "init.png")
    names = {"GARBAGE": str(tmp_path / "garbage.png"), "INIT": str(tmp_path / "init.png")}
    extra = [names.get(x, x) for x in extra]
    before = set(tmp_path.iterdir())
    assert main(_args(tiny_lcm_dir, *extra)) == 2
    err = capsys.readouterr().err
    [line] = _error_lines(err)
    assert needle in line and "Traceback" not in err
    assert set(tmp_path.iterdir()) == before
