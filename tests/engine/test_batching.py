"""Stream batching on tiny random models (CPU, float32): a batch equals its members run alone, grouping by key,
per-member callbacks and cancellation, per-member errors."""

from __future__ import annotations

import numpy as np
import pytest

from lcm_live.engine.batching import StepFanout, batch_key, group_indices
from lcm_live.engine.hooks import Cancelled
from lcm_live.engine.request import GenerationRequest
from lcm_live.errors import UserError

SIZE = 64


def _req(prompt, **kwargs):
    kwargs.setdefault("num_inference_steps", 2)
    kwargs.setdefault("width", SIZE)
    kwargs.setdefault("height", SIZE)
    return GenerationRequest(prompt, **kwargs)


def _init_image(shift):
    from PIL import Image

    x = np.linspace(0, 255, SIZE, dtype=np.uint8)
    rgb = np.stack([np.tile(x, (SIZE, 1)), np.tile(x[:, None], (1, SIZE)), np.full((SIZE, SIZE), shift, np.uint8)], -1)
    return Image.fromarray(rgb, "RGB")


class UnetBatches:
    """Records the batch size of every UNet call (one call per step, whatever the batch)."""

    def __init__(self, engine):
        self.unet, self.sizes = engine.pipe.unet, []
        original = self.unet.forward

        def forward(sample, *args, **kwargs):
            self.sizes.append(int(sample.shape[0]))
            return original(sample, *args, **kwargs)

        self.unet.forward = forward

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.unet.__dict__.pop("forward", None)


def _assert_same(batch_result, single_result):
    assert batch_result.error is None
    a, b = batch_result.images[0], single_result.images[0]
    if hasattr(a, "shape"):  # latents
        assert a.shape == b.shape
        np.testing.assert_allclose(a.float().numpy(), b.float().numpy(), rtol=1e-4, atol=1e-4)
    else:
        assert a.size == b.size
        assert np.abs(np.asarray(a).astype(int) - np.asarray(b).astype(int)).max() <= 1
    assert batch_result.parameters == single_result.parameters


def test_text_to_image_batch_equals_each_request_alone(lcm):
    requests = [_req("a red circle", seed=1, output_type="latent"), _req("a blue square", seed=2, output_type="latent"),
                _req("a red circle", seed=3, output_type="latent")]
    with UnetBatches(lcm) as unet:
        batch = lcm.generate_batch(requests)
    assert unet.sizes == [3, 3]  # one UNet call per step for the three of them
    singles = [lcm.generate(r) for r in requests]
    for got, alone in zip(batch, singles, strict=True):
        _assert_same(got, alone)
    assert [r.parameters["seed"] for r in batch] == [1, 2, 3]
    assert not np.allclose(batch[0].images[0].numpy(), batch[2].images[0].numpy())  # same prompt, other seed


def test_pil_images_of_a_batch_equal_singles(lcm):
    requests = [_req("a lighthouse", seed=5), _req("a forest", seed=6)]
    batch = lcm.generate_batch(requests)
    for got, alone in zip(batch, [lcm.generate(r) for r in requests], strict=True):
        _assert_same(got, alone)
        assert len(got.images) == 1 and got.images[0].size == (SIZE, SIZE)


def test_img2img_batch_equals_singles(lcm):
    requests = [_req("ink", seed=7, image=_init_image(20), strength=0.6, output_type="latent"),
                _req("oil", seed=8, image=_init_image(200), strength=0.6, output_type="latent")]
    with UnetBatches(lcm) as unet:
        batch = lcm.generate_batch(requests)
    assert unet.sizes == [2, 2]
    for got, alone in zip(batch, [lcm.generate(r) for r in requests], strict=True):
        _assert_same(got, alone)
        assert got.parameters["mode"] == "img2img" and got.parameters["strength"] == 0.6


def test_lcm_lora_with_cfg_and_different_negative_prompts(lora):
    requests = [_req("a cat", seed=1, guidance_scale=1.5, negative_prompt="blurry", output_type="latent"),
                _req("a dog", seed=2, guidance_scale=1.5, output_type="latent")]
    with UnetBatches(lora) as unet:
        batch = lora.generate_batch(requests)
    assert unet.sizes == [4, 4]  # CFG: unconditional + conditional halves of both members
    for got, alone in zip(batch, [lora.generate(r) for r in requests], strict=True):
        _assert_same(got, alone)
    assert batch[0].parameters["negative_prompt"] == "blurry" and batch[1].parameters["negative_prompt"] is None


def test_requests_are_grouped_by_key(lcm):
    requests = [_req("a", seed=1), _req("b", seed=2, num_inference_steps=3), _req("c", seed=3),
                _req("d", seed=4, num_images_per_prompt=2), _req("e", seed=5, width=None, height=None)]
    keys = [batch_key(r) for r in requests]
    assert keys[0] == keys[2] and keys[0] != keys[1] and keys[3] is None
    assert group_indices(keys) == [[0, 2], [1], [3], [4]]
    with UnetBatches(lcm) as unet:
        results = lcm.generate_batch(requests)
    # The engine groups on resolved values: width=None is the native 64, so "e" joins "a" and "c".
    assert sorted(unet.sizes) == sorted([3, 3, 1, 1, 1, 2, 2])
    assert [len(r.images) for r in results] == [1, 1, 1, 2, 1]
    assert [r.parameters["prompt"] for r in results] == ["a", "b", "c", "d", "e"]
    assert results[3].parameters["num_images_per_prompt"] == 2


def test_batch_keys_differ_on_every_shared_value():
    base = _req("x", seed=1)
    image = _init_image(0)
    variants = [_req("x", width=128), _req("x", height=128), _req("x", num_inference_steps=4),
                _req("x", guidance_scale=3.0), _req("x", output_type="latent"), _req("x", image=image),
                _req("x", image=image, strength=0.8)]
    keys = {batch_key(base)} | {batch_key(v) for v in variants}
    assert len(keys) == 1 + len(variants)
    assert batch_key(_req("other prompt", seed=9, negative_prompt="n")) == batch_key(base)  # per-member values
    # Without a size, img2img takes the init image's size: that size is then part of the key.
    small = _req("x", image=image, width=None, height=None)
    from PIL import Image

    large = _req("x", image=Image.new("RGB", (128, 128)), width=None, height=None)
    assert batch_key(small) != batch_key(large)


def test_a_bad_member_gets_its_error_and_the_others_run(lcm):
    requests = [_req("good", seed=1, output_type="latent"), _req("bad", num_inference_steps=99),
                _req("also good", seed=2, output_type="latent")]
    results = lcm.generate_batch(requests)
    assert isinstance(results[1].error, UserError) and results[1].error.field == "num_inference_steps"
    assert results[1].images == []
    _assert_same(results[0], lcm.generate(requests[0]))
    _assert_same(results[2], lcm.generate(requests[2]))


def test_a_failed_call_fails_only_its_group(lcm, monkeypatch):
    original = lcm._call

    def failing(preps, on_step):
        if preps[0].request.num_inference_steps == 3:
            raise RuntimeError("boom")
        return original(preps, on_step)

    monkeypatch.setattr(lcm, "_call", failing)
    results = lcm.generate_batch([_req("a", seed=1, num_inference_steps=3), _req("b", seed=2),
                                  _req("c", seed=3, num_inference_steps=3)])
    assert [type(r.error).__name__ if r.error else None for r in results] == ["RuntimeError", None, "RuntimeError"]
    assert results[0].parameters["seed"] == 1 and len(results[1].images) == 1


def test_per_member_callbacks_and_cancellation(lcm):
    events = {0: [], 1: []}

    def record(k):
        return lambda event: events[k].append(event)

    def cancel_at_first_step(event):
        raise Cancelled("superseded")

    requests = [_req("a", seed=1, num_inference_steps=3), _req("b", seed=2, num_inference_steps=3),
                _req("c", seed=3, num_inference_steps=3)]
    with UnetBatches(lcm) as unet:
        results = lcm.generate_batch(requests, [record(0), cancel_at_first_step, record(1)])
    assert unet.sizes == [3, 3, 3]  # one member out: the others run on, in the same calls
    assert isinstance(results[1].error, Cancelled) and results[1].images == []
    for k in (0, 1):
        assert [(e.step, e.total) for e in events[k]] == [(1, 3), (2, 3), (3, 3)]
        assert all(tuple(e.latents.shape) == (1, 4, 32, 32) for e in events[k])
    assert not np.allclose(events[0][-1].latents.numpy(), events[1][-1].latents.numpy())  # each its own slice
    preview = lcm.decode_preview(events[1][-1].latents)
    assert preview.size == (SIZE, SIZE)
    assert results[0].error is None and results[2].error is None


def test_batch_stops_when_every_member_is_cancelled(lcm):
    def cancel(event):
        raise Cancelled("closed")

    with UnetBatches(lcm) as unet:
        results = lcm.generate_batch([_req("a", num_inference_steps=4), _req("b", num_inference_steps=4)],
                                     [cancel, cancel])
    assert unet.sizes == [2]  # stopped after the first step
    assert all(isinstance(r.error, Cancelled) and str(r.error) == "closed" for r in results)


def test_callbacks_must_match_requests(lcm):
    with pytest.raises(UserError, match="2 callbacks for 1 requests"):
        lcm.generate_batch([_req("a")], [None, None])


def test_fanout_without_tensors_passes_values_as_they_are():
    seen = []
    fanout = StepFanout([seen.append, seen.append], split=False)
    fanout(1, 2, 500, 1)
    assert [e.latents for e in seen] == [1, 1]


def test_sdxl_batch_with_cfg_equals_singles(tmp_path):
    """SDXL: pooled embeddings (and their negatives) concatenated, micro-conditioning repeated per member."""
    from test_pipeline_sdxl import _engine as sdxl_engine
    from test_pipeline_sdxl import _tiny_sdxl

    engine = sdxl_engine(_tiny_sdxl(tmp_path, full_lcm=False), "lcm-lora")
    requests = [_req("a cat", seed=1, guidance_scale=1.5, negative_prompt="blurry", output_type="latent"),
                _req("a dog", seed=2, guidance_scale=1.5, output_type="latent")]
    with UnetBatches(engine) as unet:
        batch = engine.generate_batch(requests)
    assert unet.sizes == [4, 4]
    for got, alone in zip(batch, [engine.generate(r) for r in requests], strict=True):
        _assert_same(got, alone)
