"""The studio on the real Engine with the tiny LCM built in code: the cancel hook works inside diffusers' loop,
and a WebSocket session gets real frames (txt2img, previews, img2img)."""

from __future__ import annotations

import io
import threading

import pytest
from PIL import Image

from lcm_live.config import EngineSettings, StudioSettings
from lcm_live.studio.metrics import StudioMetrics
from lcm_live.studio.params import default_params_model
from lcm_live.studio.worker import Job, Worker

from .conftest import next_final, next_of, params, receive, running_studio, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


@pytest.fixture(scope="module")
def engine(tiny_lcm_dir):
    from lcm_live.engine.pipeline import Engine

    return Engine.from_settings(EngineSettings(model=str(tiny_lcm_dir), device="cpu", dtype="float32"),
                                progress=False)


class Sink:
    def __init__(self):
        self.events, self.done = [], threading.Event()

    def wants_preview(self):
        return False

    def on_frame(self, job, image, *, final, **kwargs):
        self.events.append(("frame", final))

    def on_error(self, job, code, message, field):
        self.events.append(("error", code, message))

    def on_done(self, job, outcome):
        self.events.append(("done", outcome))
        self.done.set()


def test_cancel_hook_stops_the_real_denoising_loop(engine):
    worker = Worker(lambda: engine, StudioSettings(warmup_width=256, warmup_height=256), StudioMetrics())
    worker.start()
    wait_until(lambda: worker.ready, timeout=120, what="the tiny engine to warm up")
    steps = []

    def cancel_after_first_step(job, event):
        steps.append((event.step, event.total))
        worker.cancel("s")  # as a disconnect would: the next step's hook raises Cancelled

    worker.step_observer = cancel_after_first_step
    sink = Sink()
    worker.submit("s", Job(params=default_params_model()(prompt="a red circle", num_inference_steps=6, width=256,
                                                          height=256), sink=sink))
    assert sink.done.wait(60)
    worker.stop()
    assert steps == [(1, 6)]  # diffusers' loop ran one step of six, then stopped
    assert sink.events == [("done", "cancelled")]
    assert worker.metrics.cancelled._value.get() == 1


def test_websocket_session_on_the_real_engine(engine):
    with running_studio(engine, warmup_width=256, warmup_height=256) as (client, _, state), \
            client.websocket_connect("/ws") as ws:
        wait_until(lambda: state.worker.ready, timeout=120, what="ready")
        hello = receive(ws)
        assert hello["info"]["kind"] == "lcm" and hello["schema"]["properties"]["guidance_scale"]["default"] == 8.0
        assert "/" not in hello["info"]["model"]  # a local folder shows by its name only
        ws.send_text(params(prompt="a blue square", seed=3, width=256, height=256, num_inference_steps=2,
                            previews=True))
        frames = []
        while not frames or not frames[-1]["final"]:
            frames.append(next_of(ws, "frame"))
        assert frames[-1]["seed"] == 3 and frames[-1]["total"] == 2
        assert Image.open(io.BytesIO(frames[-1]["_bytes"])).size == (256, 256)
        # img2img from a canvas
        buf = io.BytesIO()
        Image.new("RGB", (300, 200), (250, 250, 250)).save(buf, format="PNG")
        ws.send_text(params(mode="img2img", prompt="a blue square", seed=3, width=256, height=256,
                            num_inference_steps=2, strength=0.5))
        ws.send_bytes(buf.getvalue())
        frame = next_final(ws)
        assert frame["type"] == "frame" and frame["params"]["mode"] == "img2img"
        # a negative prompt on a full LCM is the engine's clear error, and the session goes on
        ws.send_text(params(prompt="x", negative_prompt="blurry", width=256, height=256))
        error = next_final(ws)
        assert error["type"] == "error" and error["code"] == "invalid_params" and error["field"] == "negative_prompt"
