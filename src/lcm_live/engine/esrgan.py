"""An ESRGAN-family super-resolution model (ESRGAN, Real-ESRGAN, their compact and Swin cousins) loaded through
``spandrel`` from a ``.safetensors`` file: step 2 of the upscale recipe (engine/upscale.py).

Only safetensors: a ``.pth``/``.ckpt`` is a pickle, which can run code when loaded. The state dict is read with
``safetensors`` here and handed to spandrel, which detects the architecture from its keys and shapes; anything
that is not a single-image super-resolution model is refused. ``spandrel`` is the optional extra
``lcm-live[upscale]``. torchvision is not needed: spandrel's two architectures that use it (LaMa, RestoreFormer:
neither is super-resolution) are refused by name where it does not import (engine/spandrel_import.py).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lcm_live.errors import UserError, first_line


@dataclass
class Upscaler:
    name: str  # the file's own name (never its folder: it goes into image metadata)
    architecture: str  # spandrel's name for it: "ESRGAN", "RealESRGAN Compact", ...
    scale: int  # its fixed upscaling factor (2, 4, ...)
    model: Any  # spandrel.ImageModelDescriptor, in eval mode on ``device``
    device: str = "cpu"
    # One run at a time (the studio's upscales share one loaded model; a copy made with dataclasses.replace shares
    # the lock too).
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)
    # Progress: on_tile(tile, tiles) after each tile of run_upscaler (1-based). The studio sets it on a copy
    # (dataclasses.replace) per request.
    on_tile: Callable[[int, int], None] | None = field(default=None, repr=False, compare=False)

    def public(self) -> dict[str, Any]:
        """What a client may know (GET /api/info): the file's name, never its folder."""
        return {"name": self.name, "architecture": self.architecture, "scale": self.scale}


def _import_spandrel() -> Any:
    from lcm_live.engine.spandrel_import import import_spandrel

    try:
        return import_spandrel()
    except ImportError as exc:
        raise UserError(f"--upscaler needs spandrel ({first_line(exc)}): pip install 'lcm-live[upscale]'",
                        field="upscaler") from None


def load_upscaler(path: str | Path, *, device: str = "cpu") -> Upscaler:
    """The super-resolution model in ``path`` (a .safetensors file), on ``device``; UserError naming the flag and
    the fix for a file that is not one."""
    file = Path(path).expanduser()
    if file.suffix.lower() != ".safetensors":
        raise UserError(f"--upscaler {str(path)!r}: only .safetensors files are loaded (a .pth or .ckpt is a "
                        "pickle, which can run code when loaded); convert it once with safetensors' save_file, or "
                        "get the model's .safetensors release", field="upscaler")
    if not file.is_file():
        raise UserError(f"--upscaler {str(path)!r}: no such file", field="upscaler")
    spandrel = _import_spandrel()
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(file), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"--upscaler {str(path)!r}: cannot read it as safetensors ({first_line(exc)})",
                        field="upscaler") from None
    try:
        descriptor = spandrel.ModelLoader("cpu").load_from_state_dict(state)
    except spandrel.UnsupportedModelError:
        raise UserError(f"--upscaler {str(path)!r}: spandrel recognises no architecture in it; give an ESRGAN-family "
                        "super-resolution model (ESRGAN, Real-ESRGAN, ...)", field="upscaler") from None
    except Exception as exc:  # a known architecture with inconsistent weights
        raise UserError(f"--upscaler {str(path)!r}: its weights do not load ({first_line(exc)})",
                        field="upscaler") from None
    from lcm_live.engine.spandrel_import import NEEDS_TORCHVISION, torchvision_works

    if descriptor.architecture.id in NEEDS_TORCHVISION and not torchvision_works():
        raise UserError(f"--upscaler {str(path)!r} is a {descriptor.architecture.name} model, whose code needs "
                        "torchvision, which does not import here; give an ESRGAN-family super-resolution model "
                        "(ESRGAN, Real-ESRGAN, ...)", field="upscaler")
    if not isinstance(descriptor, spandrel.ImageModelDescriptor) or descriptor.purpose != "SR":
        raise UserError(f"--upscaler {str(path)!r} is a {descriptor.architecture.name} model for "
                        f"{descriptor.purpose}, not super-resolution: give an upscaling model", field="upscaler")
    descriptor.to(device).eval()
    return Upscaler(name=file.name, architecture=descriptor.architecture.name, scale=int(descriptor.scale),
                    model=descriptor, device=str(device))


# The model runs on tiles of the input (with context around each, cropped away after): a 4x model's activations on a
# whole 1024² input would take gigabytes; a 256² tile with 16 px of context on each side takes a few hundred MB.
TILE = 256  # input pixels per tile side
PAD = 16  # context pixels on each side of a tile (ESRGAN's receptive field is wider; 16 px hides the seams)


def tile_count(width: int, height: int, tile: int = TILE) -> int:
    """How many tiles run_upscaler runs on a ``width`` x ``height`` input."""
    return math.ceil(width / tile) * math.ceil(height / tile)


def run_upscaler(upscaler: Upscaler, image: Any, *, tile: int = TILE, pad: int = PAD) -> Any:
    """``image`` (PIL) times the model's own scale, as PIL RGB, tile by tile (``upscaler.on_tile`` after each).
    Pixels go in and come out in [0, 1], float32."""
    import numpy as np
    import torch
    from PIL import Image

    rgb = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0  # (H, W, 3)
    x = torch.from_numpy(rgb).permute(2, 0, 1).unsqueeze(0).to(upscaler.device)  # (1, 3, H, W)
    h, w = x.shape[-2:]
    s = upscaler.scale
    out = torch.empty(1, 3, h * s, w * s)
    tiles, done = tile_count(w, h, tile), 0
    with upscaler.lock, torch.inference_mode():
        for y0 in range(0, h, tile):
            for x0 in range(0, w, tile):
                y1, x1 = min(y0 + tile, h), min(x0 + tile, w)
                cy0, cx0 = max(y0 - pad, 0), max(x0 - pad, 0)  # the tile with its context
                y = upscaler.model(x[:, :, cy0:min(y1 + pad, h), cx0:min(x1 + pad, w)])  # (1, 3, ch * s, cw * s)
                oy, ox = (y0 - cy0) * s, (x0 - cx0) * s
                out[:, :, y0 * s:y1 * s, x0 * s:x1 * s] = y[:, :, oy:oy + (y1 - y0) * s, ox:ox + (x1 - x0) * s].cpu()
                done += 1
                if upscaler.on_tile is not None:
                    upscaler.on_tile(done, tiles)
    pixels = (out[0].clamp(0, 1).permute(1, 2, 0).float().numpy() * 255.0).round().astype(np.uint8)
    return Image.fromarray(pixels, "RGB")
