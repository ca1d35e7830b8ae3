"""The ESRGAN path (engine/esrgan.py): a tiny RRDBNet built in code, saved as safetensors, loaded through spandrel;
safetensors only; what is not a super-resolution model is refused."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from PIL import Image

from lcm_live.engine.spandrel_import import import_spandrel
from lcm_live.errors import UserError

pytestmark = pytest.mark.skipif(importlib.util.find_spec("spandrel") is None,
                                reason="spandrel (the [upscale] extra) is not installed")


@pytest.fixture(scope="module")
def spandrel():
    """spandrel, imported as the engine imports it (engine/spandrel_import.py)."""
    return import_spandrel()


def tiny_esrgan(spandrel, scale: int = 4):
    """An RRDBNet of 8 filters and 1 block (the real ones: 64 and 23), random weights."""
    import torch
    from spandrel.architectures.ESRGAN import ESRGAN

    torch.manual_seed(0)
    return ESRGAN(in_nc=3, out_nc=3, num_filters=8, num_blocks=1, scale=scale).eval()


@pytest.fixture
def esrgan_file(spandrel, tmp_path):
    from safetensors.torch import save_file

    model = tiny_esrgan(spandrel)
    path = tmp_path / "tiny-esrgan-x4.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path, model


def test_loads_and_runs_the_model(esrgan_file):
    import torch

    from lcm_live.engine.esrgan import load_upscaler, run_upscaler

    path, model = esrgan_file
    upscaler = load_upscaler(path)
    assert (upscaler.name, upscaler.architecture, upscaler.scale) == (path.name, "ESRGAN", 4)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (12, 16, 3), dtype=np.uint8))
    out = run_upscaler(upscaler, image)
    assert out.size == (64, 48)
    # The very network that was saved: the same pixels as running it directly.
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    with torch.no_grad():
        direct = (model(x)[0].clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    assert np.abs(np.asarray(out).astype(int) - direct).max() <= 1
    # Tile by tile: with context covering the whole image each tile sees all of it, so the pieces must land exactly
    # where the whole run puts them; with a little context, close to it.
    tiled = np.asarray(run_upscaler(upscaler, image, tile=5, pad=16)).astype(int)
    assert np.abs(tiled - direct).max() <= 1
    near = np.asarray(run_upscaler(upscaler, image, tile=8, pad=4)).astype(int)
    assert near.shape == direct.shape and np.abs(near - direct).mean() < 2


def test_upscale_with_esrgan_alone_and_resized_to_the_scale(esrgan_file):
    from lcm_live.engine.esrgan import load_upscaler
    from lcm_live.engine.upscale import UpscaleRequest, upscale

    upscaler = load_upscaler(esrgan_file[0])
    image = Image.new("RGB", (16, 12), (200, 30, 30))
    out, params = upscale(None, UpscaleRequest(image, scale=4), upscaler=upscaler, refine=False)
    assert out.size == (64, 48)
    assert params["upscale"] == {"scale": 4, "method": "esrgan", "source_width": 16, "source_height": 12,
                                 "upscaler": esrgan_file[0].name}
    out, params = upscale(None, UpscaleRequest(image, scale=2), upscaler=upscaler, refine=False)
    assert out.size == (32, 24) and "is 4x" in params["warnings"][0]


def test_esrgan_then_tiled_refinement(esrgan_file, lcm):
    from lcm_live.engine.esrgan import load_upscaler
    from lcm_live.engine.upscale import UpscaleRequest, upscale

    out, params = upscale(lcm, UpscaleRequest(Image.new("RGB", (32, 32), (20, 90, 160)), scale=4, prompt="x",
                                              seed=1, num_inference_steps=1), upscaler=load_upscaler(esrgan_file[0]))
    assert out.size == (128, 128) and params["upscale"]["method"] == "esrgan+lcm-tiled"
    assert params["upscale"]["tiles"] == 9 and params["seed"] == 1


def test_refusals(tmp_path, spandrel):
    import torch
    from safetensors.torch import save_file

    from lcm_live.engine.esrgan import load_upscaler

    pickle = tmp_path / "RealESRGAN_x4plus.pth"
    pickle.write_bytes(b"not even read")
    with pytest.raises(UserError, match="only .safetensors") as exc:
        load_upscaler(pickle)
    assert exc.value.field == "upscaler"
    with pytest.raises(UserError, match="no such file"):
        load_upscaler(tmp_path / "missing.safetensors")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(UserError, match="cannot read it as safetensors"):
        load_upscaler(garbage)
    unknown = tmp_path / "unknown.safetensors"
    save_file({"linear.weight": torch.zeros(4, 4)}, str(unknown))
    with pytest.raises(UserError, match="recognises no architecture"):
        load_upscaler(unknown)


def test_cli_upscaler_alone_loads_no_lcm(esrgan_file, tmp_path, capsys):
    from lcm_live.cli import main
    from lcm_live.engine.metadata import read_png_parameters

    source = tmp_path / "in.png"
    Image.new("RGB", (20, 12), (90, 160, 30)).save(source)
    out = tmp_path / "out.png"
    # A model that does not exist: with --no-refine none is loaded.
    assert main(["upscale", str(source), "--scale", "4", "--upscaler", str(esrgan_file[0]), "--no-refine",
                 "--model", str(tmp_path / "no-such-model"), "--device", "cpu", "--output", str(out)]) == 0
    assert "(esrgan)" in capsys.readouterr().out
    params = read_png_parameters(out)
    assert Image.open(out).size == (80, 48) and "model" not in params
    assert params["upscale"] == {"scale": 4, "method": "esrgan", "source_width": 20, "source_height": 12,
                                 "upscaler": esrgan_file[0].name}
