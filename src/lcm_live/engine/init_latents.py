"""The init image's VAE encoding, kept for the next call with the same picture.

In the studio's sketch and image modes the picture often stays while the prompt, the seed, the strength or a style
slider changes (typing over a sketch): every one of those frames would encode the same pixels again. On the 2-core
CPU the tiny autoencoder's encoder is 38-76 ms of a 256² frame (docs/benchmarks.md). So the encoder's output is
kept per picture, by its pixels (as the IP-Adapter's image embeddings are, engine/ip_adapter.py):

- TAESD's encoder is deterministic: its latents are reused as they are;
- the full VAE's posterior is kept and sampled again with the call's generator, drawing what diffusers' pipelines
  draw, so a seed gives the same image with the cache as without it.

An entry belongs to the VAE that made it (the same object), to the call's dtype and device, and to the request's
cache scope (GenerationRequest.cache_scope: one client never hits another's picture); a model switch or a new VAE
misses. At most ``size`` pictures are kept (least recently used first out): latents are small.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch

from lcm_live.engine.ip_adapter import pixel_key
from lcm_live.engine.latents import encode_images, encoder_outputs, sample_latents

CACHE_SIZE = 4


class InitLatents:
    """``engine.init_latents(vae, image_processor, images, generator, device, dtype)``: scaled init latents of the
    PIL ``images``, one row per image, as :func:`lcm_live.engine.latents.encode_images` gives them."""

    def __init__(self, size: int = CACHE_SIZE):
        self.size = size
        self._entries: OrderedDict[tuple, tuple[Any, Any]] = OrderedDict()  # key -> (vae, output)
        self.hits = self.misses = 0

    def __call__(self, vae: Any, image_processor: Any, images: list[Any], generator: Any, device: Any,
                 dtype: torch.dtype, scopes: list[str | None] | None = None) -> torch.Tensor:
        if not isinstance(generator, list) and len(images) > 1:  # one draw for the batch: not kept per picture
            return encode_images(vae, image_processor.preprocess(images).to(device=device, dtype=dtype), generator)
        scopes = scopes or [None] * len(images)
        keys = [(scope, pixel_key(image), str(dtype), str(device)) for image, scope in zip(images, scopes, strict=True)]
        found = [self._entries.get(key) for key in keys]
        if all(entry is not None and entry[0] is vae for entry in found):
            self.hits += 1
            outputs = [entry[1] for entry in found]
            for key in keys:
                self._entries.move_to_end(key)
        else:
            self.misses += 1
            pixels = image_processor.preprocess(images).to(device=device, dtype=dtype)
            outputs = encoder_outputs(vae, pixels, generator)  # one a picture here
            for key, output in zip(keys, outputs, strict=True):
                self._entries[key] = (vae, output)
                self._entries.move_to_end(key)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)
        return sample_latents(vae, outputs, generator)
