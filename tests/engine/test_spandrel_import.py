"""spandrel without torchvision (engine/spandrel_import.py): the super-resolution architectures load and run through
spandrel's own code, torchvision stays absent for everyone else, and the two architectures that call it are refused
by name (their stand-ins raise if ever called)."""

from __future__ import annotations

import importlib
import importlib.util
import sys

import numpy as np
import pytest
from PIL import Image

from lcm_live.engine.spandrel_import import TorchvisionMissing, import_spandrel, torchvision_works
from lcm_live.errors import UserError

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("spandrel") is None, reason="spandrel is not installed"),
    pytest.mark.skipif(torchvision_works(), reason="torchvision imports here: no stand-ins are used"),
]


def _save(model, path):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def test_no_torchvision_is_left_behind_and_its_stand_ins_raise():
    import_spandrel()
    assert "torchvision" not in sys.modules and importlib.util.find_spec("torchvision") is None
    lama = importlib.import_module("spandrel.architectures.LaMa.__arch.LaMa")
    with pytest.raises(TorchvisionMissing, match="rotate"):
        lama.rotate(None, 0)


def test_a_real_esrgan_compact_loads_and_upscales_tiled(tmp_path):
    """Real-ESRGAN's compact net (SRVGGNetCompact) of random weights, saved as safetensors, through load_upscaler
    and the tiled run; the output is the network's own."""
    import torch

    import_spandrel()
    from spandrel.architectures.Compact import Compact

    from lcm_live.engine.esrgan import load_upscaler, run_upscaler

    torch.manual_seed(0)
    model = Compact(num_feat=8, num_conv=2, upscale=2).eval()
    upscaler = load_upscaler(_save(model, tmp_path / "compact-x2.safetensors"))
    assert (upscaler.architecture, upscaler.scale) == ("RealESRGAN Compact", 2)
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (20, 24, 3), dtype=np.uint8))
    ticks = []
    upscaler.on_tile = lambda done, total: ticks.append((done, total))
    out = np.asarray(run_upscaler(upscaler, image, tile=8, pad=8)).astype(int)  # 3 x 3 tiles
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    with torch.no_grad():
        direct = (model(x)[0].clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(int)
    assert out.shape == (40, 48, 3) and ticks[-1] == (9, 9)
    assert np.abs(out - direct).max() <= 1  # 8 px of context covers the compact net's 4-conv receptive field


def test_an_architecture_that_needs_torchvision_is_refused_by_name(tmp_path):
    import_spandrel()
    from spandrel.architectures.LaMa import LaMa

    from lcm_live.engine.esrgan import load_upscaler

    path = _save(LaMa(), tmp_path / "big-lama.safetensors")
    with pytest.raises(UserError, match="LaMa model, whose code needs torchvision") as caught:
        load_upscaler(path)
    assert caught.value.field == "upscaler"
