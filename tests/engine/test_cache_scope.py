"""GenerationRequest.cache_scope: cached work (prompt embeddings, the init picture's encoding, the reference
image's embeddings) is shared only within one scope, so a client cannot learn from a frame's timing what another
typed or drew; the images are the same whatever the scope (the tiny full LCM, CPU, float32)."""

from __future__ import annotations

import numpy as np
from engine_requests import init_image, px, req  # tests/engine/engine_requests.py

from lcm_live.engine.ip_adapter import ImageEmbeddings


def test_prompts_are_cached_per_scope(tiny_engine, tiny_lcm_dir):
    engine = tiny_engine(tiny_lcm_dir, "lcm")
    alice = engine.generate(req("a secret garden", seed=1, cache_scope="alice"))
    engine.generate(req("a secret garden", seed=1, cache_scope="alice"))
    assert (engine.prompts.hits, engine.prompts.misses) == (1, 1)
    mallory = engine.generate(req("a secret garden", seed=1, cache_scope="mallory"))  # a guess: no hit to time
    assert (engine.prompts.hits, engine.prompts.misses) == (1, 2)
    assert np.array_equal(px(alice.images[0]), px(mallory.images[0]))
    engine.generate(req("a secret garden", seed=1))  # unscoped (the CLI): its own entries
    engine.generate(req("a secret garden", seed=1))
    assert (engine.prompts.hits, engine.prompts.misses) == (2, 3)


def test_blends_and_regions_use_the_requests_scope(tiny_engine, tiny_lcm_dir):
    from lcm_live.engine.request import PromptBlend

    engine = tiny_engine(tiny_lcm_dir, "lcm")
    blend = PromptBlend("a night sky", 0.5)
    engine.generate(req("a day sky", seed=1, prompt_blend=blend, cache_scope="alice"))
    misses = engine.prompts.misses
    engine.generate(req("a day sky", seed=1, prompt_blend=blend, cache_scope="bob"))
    assert engine.prompts.misses == misses + 2  # both prompts encoded again for bob


def test_the_init_picture_is_kept_per_scope(tiny_engine, tiny_lcm_dir):
    engine = tiny_engine(tiny_lcm_dir, "lcm")
    picture = init_image()
    first = engine.generate(req("x", image=picture, strength=0.5, seed=2, cache_scope="alice"))
    engine.generate(req("y", image=picture.copy(), strength=0.5, seed=2, cache_scope="alice"))
    assert (engine.init_latents.hits, engine.init_latents.misses) == (1, 1)
    other = engine.generate(req("x", image=picture.copy(), strength=0.5, seed=2, cache_scope="mallory"))
    assert (engine.init_latents.hits, engine.init_latents.misses) == (1, 2)
    assert np.array_equal(px(first.images[0]), px(other.images[0]))


class _CountingPipe:
    def __init__(self):
        self.calls = 0

    def encode_image(self, image, device, n, hidden):
        import torch

        self.calls += 1
        return torch.ones(1, 4), torch.zeros(1, 4)


def test_reference_image_embeddings_are_kept_per_scope():
    from PIL import Image

    pipe = _CountingPipe()
    embeddings = ImageEmbeddings(pipe, "cpu")
    picture = Image.new("RGB", (8, 8), (10, 20, 30))
    embeddings(picture, scope="alice")
    embeddings(picture.copy(), scope="alice")
    assert pipe.calls == 1
    embeddings(picture.copy(), scope="mallory")
    assert pipe.calls == 2 and embeddings.hits == 1
