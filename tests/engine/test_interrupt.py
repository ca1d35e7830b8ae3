"""engine/interrupt.py: a superseded generation stops inside a UNet evaluation, not only between steps."""

from __future__ import annotations

import contextlib

import pytest
import torch

from lcm_live.config import EngineSettings
from lcm_live.engine.architectures import build_pipeline
from lcm_live.engine.hooks import Cancelled, stop_check
from lcm_live.engine.interrupt import infer_interruptible, install_block_checks
from lcm_live.engine.model import LoadedModel
from lcm_live.engine.pipeline import Engine
from lcm_live.engine.request import GenerationRequest


def tiny_engine() -> Engine:
    pipe = build_pipeline("tiny", dtype=torch.float32)
    return Engine(LoadedModel(pipe=pipe, kind="lcm", arch="sd15", name="tiny", native_width=64, native_height=64),
                  EngineSettings(model="tiny"), "cpu", torch.float32)


def test_a_stop_inside_the_unet_cancels_mid_step_and_the_engine_goes_on():
    engine = tiny_engine()
    blocks = []
    engine.pipe.unet.down_blocks[0].register_forward_pre_hook(lambda m, a: blocks.append("down0"))
    checks = {"n": 0}

    def should_stop():  # asked at each block: stop at the 3rd check of the first UNet evaluation
        checks["n"] += 1
        return "superseded" if checks["n"] >= 3 else None

    steps = []
    request = GenerationRequest("a red square", num_inference_steps=4, seed=1)
    with pytest.raises(Cancelled) as stopped:
        engine.generate(request, callback=steps.append, should_stop=should_stop)
    assert str(stopped.value) == "superseded"
    assert steps == [] and checks["n"] == 3  # inside the first evaluation: no step finished
    # The engine is fine afterwards, and without a stop check nothing is asked.
    result = engine.generate(request, callback=steps.append)
    assert result.images and [e.step for e in steps] == [1, 2, 3, 4]


def test_block_checks_leave_the_unet_output_alone():
    pipe = build_pipeline("tiny", dtype=torch.float32)
    unet = pipe.unet
    sample = torch.randn(1, 4, 32, 32)
    kwargs = {"encoder_hidden_states": torch.randn(1, 16, unet.config.cross_attention_dim),
              "timestep_cond": torch.randn(1, unet.config.time_cond_proj_dim)}
    with torch.no_grad():
        before = unet(sample, 500, **kwargs).sample
        assert install_block_checks(unet) == len(unet.down_blocks) + 1 + len(unet.up_blocks)
        plain = unet(sample, 500, **kwargs).sample
        with stop_check(lambda: None):  # a check that never stops
            checked = unet(sample, 500, **kwargs).sample
    assert torch.equal(before, plain) and torch.equal(before, checked)


class FakeRequest:
    """An OpenVINO infer request stand-in: ``done_after`` polls before it finishes."""

    def __init__(self, done_after: int):
        self.done_after, self.polls, self.calls = done_after, 0, []

    def infer(self, feed):
        self.calls.append("infer")

    def start_async(self, feed):
        self.calls.append("start_async")

    def wait_for(self, ms):
        self.polls += 1
        return self.polls > self.done_after

    def cancel(self):
        self.calls.append("cancel")

    def wait(self):
        self.calls.append("wait")
        raise RuntimeError("Infer Request was canceled")


def test_openvino_inference_is_polled_and_cancelled_on_a_stop():
    plain = FakeRequest(done_after=0)
    infer_interruptible(plain, {})  # no stop check: the plain synchronous call
    assert plain.calls == ["infer"]

    finishing = FakeRequest(done_after=3)
    with stop_check(lambda: None):
        infer_interruptible(finishing, {})
    assert finishing.calls == ["start_async"] and finishing.polls == 4

    asked = {"n": 0}

    def stop_on_second_poll():
        asked["n"] += 1
        return "closed" if asked["n"] >= 3 else None  # 1: before starting, 2: first poll, 3: second poll

    stopped = FakeRequest(done_after=100)
    with stop_check(stop_on_second_poll), pytest.raises(Cancelled, match="closed"):
        infer_interruptible(stopped, {})
    assert stopped.calls == ["start_async", "cancel", "wait"] and stopped.polls == 2

    never_started = FakeRequest(done_after=0)
    with stop_check(lambda: "superseded"), pytest.raises(Cancelled):
        infer_interruptible(never_started, {})
    assert never_started.calls == []


def test_a_cancelled_openvino_request_runs_again():
    ov = pytest.importorskip("openvino")
    from openvino import opset13 as ops

    x = ops.parameter([1, 256, 256], ov.Type.f32, name="x")
    y = x
    for _ in range(30):
        y = ops.matmul(y, ops.constant(torch.randn(256, 256).numpy()), False, False)
    request = ov.Core().compile_model(ov.Model([y], [x]), "CPU").create_infer_request()
    feed = {"x": torch.randn(1, 256, 256).numpy()}
    with stop_check(lambda: "superseded"), pytest.raises(Cancelled):
        infer_interruptible(request, feed)
    request.start_async(feed)
    request.cancel()
    with contextlib.suppress(Exception):  # cancelled (or, had it finished first, done)
        request.wait()
    infer_interruptible(request, feed)  # the same request, after a cancel: a normal inference
    assert request.get_output_tensor(0).data.shape == (1, 256, 256)
