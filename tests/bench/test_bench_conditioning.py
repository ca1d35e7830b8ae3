"""bench --ip-adapter's baseline: the UNet with the adapter detached (bench/bench_conditioning.py) gives the picture a
request without a reference image gives with the adapter loaded (scale 0), and the adapter comes back after it."""

from __future__ import annotations

import numpy as np
import torch

from lcm_live.bench.bench_conditioning import (
    ConditioningConfig,
    _engine,
    adapter_detached,
    format_conditioning,
    reference_image,
    run_conditioning_bench,
)
from lcm_live.engine.request import GenerationRequest


def _pixels(engine, **extra) -> np.ndarray:
    request = GenerationRequest(prompt="a lighthouse", seed=1, width=64, height=64, num_inference_steps=2, **extra)
    return np.asarray(engine.generate(request).images[0], dtype=np.int16)


def test_no_reference_is_the_picture_without_the_adapter_and_detaching_is_undone():
    config = ConditioningConfig(arch="tiny", ip_adapter=True, dtype="float32", device="cpu", progress=False)
    engine, _ = _engine(config, torch.device("cpu"), torch.float32)
    guided = _pixels(engine, ip_adapter_image=reference_image())
    no_reference = _pixels(engine)
    with adapter_detached(engine):
        detached = _pixels(engine)
        assert engine.pipe.unet.encoder_hid_proj is None
    assert np.array_equal(no_reference, detached)
    assert np.abs(guided - no_reference).mean() > 1  # the adapter acts when it has a reference
    assert np.array_equal(_pixels(engine, ip_adapter_image=reference_image()), guided)  # restored, scale included


def test_the_ip_adapter_bench_reports_each_variant_against_the_detached_baseline():
    report = run_conditioning_bench(ConditioningConfig(arch="tiny", width=64, height=64, num_inference_steps=2,
                                                       runs=2, ip_adapter=True, dtype="float32", progress=False))
    assert report["baseline"] == "no_adapter"
    assert list(report["variants"]) == ["no_adapter", "no_reference", "ip_adapter"]
    assert report["variants"]["no_adapter"]["ratio_to_plain"] == 1.0
    assert report["embedding_cache"]["hits"] >= 2  # the timed rounds reuse the reference's embedding
    assert "x1.00 of no_adapter" in format_conditioning(report)
