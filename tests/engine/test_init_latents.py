"""engine/init_latents.py: the init picture's encoding is kept, by pixels, for the next call with the same picture;
what comes out is what the encoder would have given (the full VAE's posterior is sampled again with the call's
generator), on the tiny full LCM (CPU, float32, the full VAE)."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
from engine_requests import init_image, px, req  # tests/engine/engine_requests.py
from PIL import Image

from lcm_live.engine.init_latents import InitLatents


def _count_encodes(engine, monkeypatch) -> list[int]:
    calls = [0]
    real = engine.pipe.vae.encode

    def encode(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(engine.pipe.vae, "encode", encode)
    return calls


def test_typing_over_the_same_picture_encodes_it_once_and_changes_nothing(tiny_engine, tiny_lcm_dir, monkeypatch):
    engine = tiny_engine(tiny_lcm_dir, "lcm")
    calls = _count_encodes(engine, monkeypatch)
    picture = init_image()
    first = engine.generate(req("a sunset", image=picture, strength=0.5, seed=3))
    # New prompts and seeds over the same pixels (a new PIL object each time, as the studio composes its canvas).
    typed = [engine.generate(req(prompt, image=picture.copy(), strength=0.5, seed=seed))
             for prompt, seed in (("a sunset o", 3), ("a sunset ov", 4), ("a sunset over", 5))]
    assert calls[0] == 1 and engine.init_latents.hits == 3
    # The same images as with nothing kept: the posterior is sampled again with each call's generator.
    fresh = tiny_engine(tiny_lcm_dir, "lcm")
    fresh.init_latents = InitLatents(size=0)  # keeps nothing: every call encodes
    for result, (prompt, seed) in zip([first, *typed], (("a sunset", 3), ("a sunset o", 3), ("a sunset ov", 4),
                                                       ("a sunset over", 5)), strict=True):
        again = fresh.generate(req(prompt, image=init_image(), strength=0.5, seed=seed))
        assert np.array_equal(px(result.images[0]), px(again.images[0])), prompt
    assert fresh.init_latents.hits == 0


def test_a_new_picture_or_a_new_vae_encodes_again(tiny_engine, tiny_lcm_dir, monkeypatch):
    engine = tiny_engine(tiny_lcm_dir, "lcm")
    calls = _count_encodes(engine, monkeypatch)
    picture = init_image()
    engine.generate(req("x", image=picture, strength=0.5, seed=1))
    stroke = picture.copy()
    stroke.putpixel((10, 10), (255, 255, 255))  # one pixel drawn
    engine.generate(req("x", image=stroke, strength=0.5, seed=1))
    assert calls[0] == 2
    engine.generate(req("x", image=picture, strength=0.5, seed=1))  # the first picture: still kept
    assert calls[0] == 2
    other = engine.init_latents
    other._entries = OrderedDict((key, (object(), output)) for key, (_, output) in other._entries.items())  # not ours
    engine.generate(req("x", image=picture, strength=0.5, seed=1))
    assert calls[0] == 3


def test_at_most_size_pictures_are_kept(tiny_engine, tiny_lcm_dir, monkeypatch):
    engine = tiny_engine(tiny_lcm_dir, "lcm")
    engine.init_latents = InitLatents(size=2)
    calls = _count_encodes(engine, monkeypatch)
    pictures = [Image.new("RGB", (64, 64), colour) for colour in ("red", "green", "blue")]
    for picture in pictures:
        engine.generate(req("x", image=picture, strength=0.5, seed=1, num_inference_steps=1))
    assert calls[0] == 3 and len(engine.init_latents._entries) == 2
    engine.generate(req("x", image=pictures[2], strength=0.5, seed=1, num_inference_steps=1))  # kept
    engine.generate(req("x", image=pictures[0], strength=0.5, seed=1, num_inference_steps=1))  # evicted first
    assert calls[0] == 4


def test_a_batch_keeps_each_picture_and_draws_with_each_generator(tiny_engine, tiny_lcm_dir, monkeypatch):
    """Stream batching: two sessions' frames in one call, each its own picture and seed; a later frame of one of
    them alone finds its picture kept, and every image equals the one made with nothing kept."""
    engine = tiny_engine(tiny_lcm_dir, "lcm")
    calls = _count_encodes(engine, monkeypatch)
    a, b = init_image(), init_image().transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    batch = engine.generate_batch([req("x", image=a, strength=0.5, seed=1), req("y", image=b, strength=0.5, seed=2)])
    alone = engine.generate(req("y", image=b.copy(), strength=0.5, seed=7))
    assert calls[0] == 2 and engine.init_latents.hits == 1  # the batch encoded each picture once
    fresh = tiny_engine(tiny_lcm_dir, "lcm")
    fresh.init_latents = InitLatents(size=0)
    want = fresh.generate_batch([req("x", image=a, strength=0.5, seed=1), req("y", image=b, strength=0.5, seed=2)])
    for got, expected in zip(batch, want, strict=True):
        assert np.array_equal(px(got.images[0]), px(expected.images[0]))
    assert np.array_equal(px(alone.images[0]), px(fresh.generate(req("y", image=b, strength=0.5, seed=7)).images[0]))
