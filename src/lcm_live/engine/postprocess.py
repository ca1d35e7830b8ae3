"""Decoded images to PIL, quantized to 8 bits on the device that decoded them.

diffusers' ``output_type="pil"`` copies the decoded batch to the host as float16, widens it to float32 and
scales, rounds and casts it with numpy there: for 8 images at 512x512 that is ~25 MB of float work on the host,
which measured 72 ms of a 165 ms call on an H200 (the UNet steps took 84). The engine asks the pipeline for
``output_type="pt"`` (the same denormalized [0, 1] tensor) and does the same arithmetic here in float32 on the
tensor's own device, so only uint8 pixels (4x fewer bytes) cross to the host. The pixels are identical to
diffusers' (the same float32 ``x * 255``, round half to even, cast).
"""

from __future__ import annotations

from typing import Any


def to_uint8_hwc(images: Any) -> Any:
    """``(B, 3, H, W)`` floats in [0, 1] -> a host ``(B, H, W, 3)`` uint8 numpy array (diffusers' rounding)."""
    import torch

    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected decoded images of shape (B, 3, H, W), got {tuple(images.shape)}")
    pixels = (images.float() * 255).round().to(torch.uint8)  # in [0, 1] already: diffusers clamps on denormalize
    return pixels.permute(0, 2, 3, 1).contiguous().cpu().numpy()


def to_pil(images: Any) -> list[Any]:
    """Decoded images (a ``(B, 3, H, W)`` tensor in [0, 1]) as a list of PIL RGB images."""
    from PIL import Image

    array = to_uint8_hwc(images)
    if array.shape[-1] == 1:
        return [Image.fromarray(a[..., 0]) for a in array]  # 2-D uint8: mode "L"
    return [Image.fromarray(a) for a in array]
