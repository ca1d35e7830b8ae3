"""A tiny ESRGAN (RRDBNet of 8 filters, 1 block; the real ones: 64 and 23) saved as safetensors, for the studio's
ESRGAN tests. spandrel is imported as the engine imports it (engine/spandrel_import.py: no torchvision needed);
ESRGAN's code is spandrel's own."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from lcm_live.engine.spandrel_import import import_spandrel

needs_spandrel = pytest.mark.skipif(importlib.util.find_spec("spandrel") is None,
                                    reason="spandrel (the [upscale] extra) is not installed")


def save_tiny_esrgan(folder: Path, scale: int = 4) -> Path:
    """A random tiny RRDBNet (x``scale``) as ``folder/tiny-esrgan-x4.safetensors``."""
    import torch
    from safetensors.torch import save_file

    import_spandrel()
    from spandrel.architectures.ESRGAN import ESRGAN

    torch.manual_seed(0)
    model = ESRGAN(in_nc=3, out_nc=3, num_filters=8, num_blocks=1, scale=scale).eval()
    path = folder / f"tiny-esrgan-x{scale}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path
