"""The studio's FakeEngine takes a reference image (ip_adapter_image) as the engine does: refused without an
IP-Adapter configured (the engine's error), recorded, reported in the parameters, and visible in the frame."""

from __future__ import annotations

import pytest
from PIL import Image

from lcm_live.engine.request import GenerationRequest
from lcm_live.errors import UserError
from lcm_live.studio.fake_engine import FakeEngine, FakeEngineConfig

REFERENCE = Image.new("RGB", (32, 32), (250, 10, 10))


def _request(**extra) -> GenerationRequest:
    return GenerationRequest(prompt="a lighthouse", seed=3, width=64, height=64, **extra)


def test_a_reference_image_without_an_ip_adapter_is_the_engines_error():
    engine = FakeEngine()
    with pytest.raises(UserError) as caught:
        engine.generate(_request(ip_adapter_image=REFERENCE))
    assert caught.value.field == "ip_adapter_image"
    assert "--ip-adapter" in str(caught.value)
    assert engine.reference_images == [] and engine.steps_run == 0  # refused before any step


def test_a_reference_image_is_recorded_reported_and_shows_in_the_frame():
    engine = FakeEngine(FakeEngineConfig(ip_adapter="ip-adapter_sd15.safetensors"))
    assert engine.info.ip_adapter == "ip-adapter_sd15.safetensors"
    plain = engine.generate(_request())
    guided = engine.generate(_request(ip_adapter_image=REFERENCE, ip_adapter_scale=0.5))
    assert engine.reference_images == [(REFERENCE, 0.5)]
    assert guided.parameters["ip_adapter"] == "ip-adapter_sd15.safetensors"
    assert guided.parameters["ip_adapter_scale"] == 0.5
    assert "ip_adapter" not in plain.parameters
    red_plain, red_guided = plain.images[0].getpixel((0, 0))[0], guided.images[0].getpixel((0, 0))[0]
    assert red_guided > red_plain or red_plain > 240  # pulled toward the red reference


def test_a_scale_out_of_range_is_refused_and_a_bad_reference_fails_only_its_request():
    engine = FakeEngine(ip_adapter="adapter")
    with pytest.raises(UserError, match="ip_adapter_scale=3"):
        engine.generate(_request(ip_adapter_image=REFERENCE, ip_adapter_scale=3.0))
    results = engine.generate_batch([_request(), _request(ip_adapter_image="not an image")])
    assert results[0].error is None and results[0].images  # another batch key: its own call
    assert isinstance(results[1].error, UserError) and results[1].error.field == "ip_adapter_image"
