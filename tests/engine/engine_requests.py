"""Requests and pixels for the engine tests on the tiny models (imported by test_pipeline*.py)."""

from __future__ import annotations

import numpy as np

from lcm_live.engine.request import GenerationRequest

SIZE = 64  # the smallest size the engine accepts; the tiny VAE downsamples by 2, so latents are 32x32


def req(prompt, **kwargs) -> GenerationRequest:
    """A request with 2 steps unless the test says otherwise (keeps the suite fast on a 2-core CPU)."""
    kwargs.setdefault("num_inference_steps", 2)
    return GenerationRequest(prompt, **kwargs)


def px(image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


def init_image():
    """A SIZE x SIZE gradient: an init image whose every region differs."""
    from PIL import Image

    x = np.linspace(0, 255, SIZE, dtype=np.uint8)
    rgb = np.stack([np.tile(x, (SIZE, 1)), np.tile(x[:, None], (1, SIZE)), np.full((SIZE, SIZE), 90, np.uint8)], -1)
    return Image.fromarray(rgb, "RGB")
