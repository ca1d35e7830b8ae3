"""A tiny ESRGAN (RRDBNet of 8 filters, 1 block; the real ones: 64 and 23) saved as safetensors, for the studio's
ESRGAN tests. As in tests/engine/test_esrgan.py: spandrel's registry imports torchvision for two architectures these
tests do not use (LaMa, RestoreFormer); where torchvision is missing or not the build for this torch, placeholders
stand in for those imports while spandrel is imported. ESRGAN's code is spandrel's own."""

from __future__ import annotations

import contextlib
import importlib.util
import sys
import types
from pathlib import Path

import pytest

needs_spandrel = pytest.mark.skipif(importlib.util.find_spec("spandrel") is None,
                                    reason="spandrel (the [upscale] extra) is not installed")
TORCHVISION = ("torchvision", "torchvision.transforms", "torchvision.transforms.functional")


@contextlib.contextmanager
def _torchvision_placeholders():
    try:
        import torchvision  # noqa: F401

        yield
        return
    except Exception:
        pass
    functional = types.ModuleType("torchvision.transforms.functional")
    functional.InterpolationMode, functional.rotate, functional.normalize = object, None, None
    transforms = types.ModuleType("torchvision.transforms")
    transforms.functional = functional
    root = types.ModuleType("torchvision")
    root.transforms = transforms
    saved = {k: sys.modules.get(k) for k in TORCHVISION}
    sys.modules.update({"torchvision": root, "torchvision.transforms": transforms,
                        "torchvision.transforms.functional": functional})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


def import_spandrel():
    with _torchvision_placeholders():
        import spandrel
    return spandrel


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
