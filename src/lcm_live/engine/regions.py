"""Region prompts, MultiDiffusion (Bar-Tal et al. 2023): each region's prompt denoises a window around its mask,
and the predictions are averaged where they meet.

Every region gets a window of the same size (the largest region's bounding box, each window centred on its own
region and kept inside the picture), so the R windows are ONE UNet call of batch R per step (twice that with
classifier-free guidance). A window is a picture of its own to the model, which is what a model trained on whole
pictures needs: asked for "a blue square" on a window, it draws the square there (run on the whole canvas, it
might draw it anywhere, and the region's mask would keep only background). The base prompt runs on the whole
canvas, in a call of its own, only where the regions leave area uncovered.

In each latent cell the result is ``sum_k w_k eps_k`` with the weights of engine/masks.py (``region_weights``:
a region's coverage of the cell, the base prompt what is left, normalised to 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

Box = tuple[int, int, int, int]  # (y0, y1, x0, x1) in latent cells


def windows(weights: torch.Tensor) -> list[Box]:
    """One window per region (``weights[1:]``, (R, 1, h, w)): all of the size of the largest bounding box rounded up
    to a quarter of the picture (so that backends which compile per shape, OpenVINO and torch.compile, meet at
    most 16 window shapes per picture size), each centred on its region's box and moved inside the picture."""
    h, w = weights.shape[-2:]
    boxes = []
    for region in weights[1:, 0]:
        ys, xs = torch.nonzero(region > 0, as_tuple=True)
        boxes.append((int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1))
    wh = min(h, _round_up(max(b[1] - b[0] for b in boxes), -(-h // 4)))
    ww = min(w, _round_up(max(b[3] - b[2] for b in boxes), -(-w // 4)))
    out = []
    for y0, y1, x0, x1 in boxes:
        top = min(max((y0 + y1 - wh) // 2, 0), h - wh)
        left = min(max((x0 + x1 - ww) // 2, 0), w - ww)
        out.append((top, top + wh, left, left + ww))
    return out


def _round_up(value: int, step: int) -> int:
    return -(-value // step) * step


def crop(per_latent: torch.Tensor, boxes: list[Box], scale: int = 1) -> torch.Tensor:
    """(B, C, H, W) -> (B * R, C, wh, ww): latent b's R windows side by side (``scale``: pixels per latent cell,
    for control images)."""
    parts = [per_latent[:, :, y0 * scale:y1 * scale, x0 * scale:x1 * scale] for y0, y1, x0, x1 in boxes]
    return torch.stack(parts, dim=1).flatten(0, 1)


@dataclass
class RegionDenoiser:
    """The model function with region prompts: ``windows`` is a Denoiser over the R windows of each latent (its
    prompt rows latent-major: latent b's R region prompts in a row), ``base`` one over the whole canvas, or None
    when the regions cover everything."""

    windows: Any
    base: Any
    boxes: list[Box]
    weights: torch.Tensor  # (1 + R, 1, h, w): base first, summing to 1 in each cell

    def __call__(self, latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        b, r = latents.shape[0], len(self.boxes)
        predictions = self.windows(crop(latents, self.boxes), t).unflatten(0, (b, r))  # (B, R, C, wh, ww)
        if self.base is not None:
            out = self.base(latents, t) * self.weights[0]
        else:
            out = predictions.new_zeros(latents.shape)
        for k, (y0, y1, x0, x1) in enumerate(self.boxes):
            out[:, :, y0:y1, x0:x1] += predictions[:, k] * self.weights[k + 1, :, y0:y1, x0:x1]
        return out
