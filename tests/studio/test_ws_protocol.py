"""The WebSocket protocol (docs/protocol.md) on a FakeEngine, in process with TestClient."""

from __future__ import annotations

import contextlib
import io
import json
import threading

import pytest
from PIL import Image

from lcm_live.errors import UserError
from lcm_live.studio.fake_engine import FakeEngine
from lcm_live.studio.params import default_params_model, parse_params

from .conftest import next_final, next_of, params, receive, running_studio, wait_until

pytestmark = pytest.mark.timeout(60)


def png_bytes(size=(96, 80), color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def test_hello_then_params_give_frame_info_and_one_jpeg(studio):
    client, engine, state = studio
    with client.websocket_connect("/ws") as ws:
        hello = receive(ws)
        assert hello["type"] == "hello" and hello["session"]
        assert hello["schema"]["properties"]["num_inference_steps"]["maximum"] == 8
        assert hello["info"] == {"model": "fake", "kind": "lcm", "device": "cpu", "dtype": "float32", "notice": None}
        ws.send_text(params(prompt="a red fox", seed=7, width=256, height=320, num_inference_steps=2))
        assert next_of(ws, "status")["state"] == "busy"
        frame = next_final(ws)
        assert frame["type"] == "frame" and frame["final"] is True
        assert (frame["id"], frame["step"], frame["total"], frame["seed"]) == (1, 2, 2, 7)
        assert (frame["width"], frame["height"]) == (256, 320)
        assert set(frame["timings"]) == {"queue_ms", "generation_ms", "encode_ms", "total_ms"}
        assert frame["params"]["prompt"] == "a red fox" and frame["params"]["mode"] == "txt2img"
        assert frame["_bytes"][:3] == b"\xff\xd8\xff"  # JPEG
        assert Image.open(io.BytesIO(frame["_bytes"])).size == (256, 320)
        assert next_of(ws, "status")["state"] == "idle"
    request = engine.calls[0]
    assert (request.prompt, request.seed, request.num_inference_steps, request.guidance_scale) == ("a red fox", 7, 2, 8.0)
    assert request.image is None


def test_webp_frames_when_configured():
    with running_studio(frame_format="webp") as (client, _, _), client.websocket_connect("/ws") as ws:
        receive(ws)
        ws.send_text(params(prompt="x"))
        data = next_final(ws)["_bytes"]
        assert data[:4] == b"RIFF" and data[8:12] == b"WEBP"


@pytest.mark.parametrize(
    ("message", "field"),
    [
        ({"num_inference_steps": 9}, "num_inference_steps"),
        ({"num_inference_steps": "4"}, "num_inference_steps"),
        ({"width": 500}, "width"),
        ({"height": 1024}, "height"),
        ({"guidance_scale": 25.0}, "guidance_scale"),
        ({"seed": -1}, "seed"),
        ({"strength": 1.5}, "strength"),
        ({"mode": "inpaint"}, "mode"),
        ({"prompt": "x" * 1001}, "prompt"),
        ({"model": "/etc/passwd"}, "model"),
        ({"lora": "../x.safetensors"}, "lora"),
    ],
)
def test_invalid_params_error_names_the_field(studio, message, field):
    client, engine, _ = studio
    with client.websocket_connect("/ws") as ws:
        receive(ws)
        ws.send_text(params(**message))
        error = next_of(ws, "error")
        assert error["code"] == "invalid_params" and error["field"] == field
        assert "Traceback" not in error["message"]
    assert engine.calls == []


def test_session_survives_garbage_and_keeps_last_good_params(studio):
    client, engine, state = studio
    with client.websocket_connect("/ws") as ws:
        receive(ws)
        ws.send_text(params(prompt="good", seed=1))
        assert next_final(ws)["params"]["prompt"] == "good"
        for bad in ["not json", "[1, 2]", json.dumps({"type": "hello"}), params(num_inference_steps=0)]:
            ws.send_text(bad)
            assert next_of(ws, "error")["code"] == "invalid_params"
        ws.send_bytes(b"definitely not an image")
        assert next_of(ws, "error")["code"] == "invalid_image"
        # The last good params are still "good": sending them again is unchanged input (no frame) ...
        ws.send_text(params(prompt="good", seed=1))
        # ... so the next frame is the one for the new prompt, and the engine ran exactly twice.
        ws.send_text(params(prompt="better", seed=1))
        assert next_final(ws)["params"]["prompt"] == "better"
    assert [c.prompt for c in engine.calls] == ["good", "better"]
    assert state.metrics.rejected.labels(reason="invalid_params")._value.get() == 4


def test_unchanged_input_makes_no_new_frame(studio):
    client, engine, _ = studio
    with client.websocket_connect("/ws") as ws:
        receive(ws)
        for _ in range(3):
            ws.send_text(params(prompt="same", seed=3))
        assert next_final(ws)["params"]["prompt"] == "same"
        ws.send_text(params(prompt="same", seed=3))
        ws.send_text(params(prompt="same", seed=4))
        assert next_final(ws)["seed"] == 4
    assert [(c.prompt, c.seed) for c in engine.calls] == [("same", 3), ("same", 4)]


def test_statuses_count_the_inputs_read_and_unchanged_input_is_answered_idle(studio):
    """A client that sent more inputs than an "idle" counts knows that it came before its newest one was read."""
    client, engine, _ = studio
    with client.websocket_connect("/ws") as ws:
        receive(ws)
        ws.send_text(params(prompt="a", seed=1))
        status = next_of(ws, "status")
        assert (status["state"], status["inputs"]) == ("busy", 1)
        next_final(ws)
        assert next_of(ws, "status")["state"] == "idle"
        ws.send_text(params(prompt="a", seed=1))  # unchanged: no frame, and said so (nothing runs)
        status = next_of(ws, "status")
        assert (status["state"], status["inputs"]) == ("idle", 2)
        ws.send_bytes(png_bytes())  # a canvas in txt2img: read, counted, nothing to run
        assert next_of(ws, "status")["inputs"] == 3
    assert len(engine.calls) == 1


def test_latest_params_win():
    engine = FakeEngine(step_latency_s=0.02)
    with running_studio(engine) as (client, _, state), client.websocket_connect("/ws") as ws:
        receive(ws)
        for seed in range(60):
            ws.send_text(params(prompt=f"p{seed}", seed=seed, num_inference_steps=4))
        seeds = []
        while not seeds or seeds[-1] != 59:
            frame = next_final(ws)
            assert frame["type"] == "frame"
            seeds.append(frame["seed"])
        assert seeds == sorted(seeds)  # never an older input after a newer one
        assert frame["params"]["prompt"] == "p59"
    assert len(engine.calls) < 60


def test_new_params_cancel_the_running_generation_at_its_next_step():
    engine = FakeEngine(step_latency_s=0.05)
    started = threading.Event()
    with running_studio(engine) as (client, _, state), client.websocket_connect("/ws") as ws:
        state.worker.step_observer = lambda job, event: started.set()
        receive(ws)
        ws.send_text(params(prompt="slow", num_inference_steps=8))
        assert started.wait(10)
        ws.send_text(params(prompt="fast", num_inference_steps=1))
        frame = next_final(ws)
        assert frame["params"]["prompt"] == "fast"
        wait_until(lambda: state.metrics.cancelled._value.get() == 1, what="cancelled_total")
    assert engine.steps_run < 8 + 1  # the 8-step run stopped early


def test_disconnect_cancels_the_generation():
    engine = FakeEngine(step_latency_s=0.05)
    steps = []
    with running_studio(engine) as (client, _, state):
        state.worker.step_observer = lambda job, event: steps.append(event.step)
        with client.websocket_connect("/ws") as ws:
            receive(ws)
            ws.send_text(params(prompt="x", num_inference_steps=8))
            wait_until(lambda: steps, what="the first step")
        wait_until(lambda: state.metrics.cancelled._value.get() == 1, what="cancelled_total")
        assert max(steps) < 8
        assert state.sessions == {}


def test_img2img_waits_for_the_canvas_then_uses_it_fitted_to_the_size(studio):
    client, engine, _ = studio
    with client.websocket_connect("/ws") as ws:
        receive(ws)
        ws.send_text(params(mode="img2img", prompt="sketch", width=256, height=256, strength=0.5))
        assert "canvas" in next_of(ws, "warning")["message"]
        canvas = png_bytes()
        ws.send_bytes(canvas)
        frame = next_final(ws)
        assert frame["total"] == 2  # 4 steps * strength 0.5
        ws.send_bytes(canvas)  # the same canvas: no new frame
        ws.send_bytes(png_bytes(color=(0, 0, 255)))
        next_final(ws)
    assert len(engine.calls) == 2
    assert engine.calls[0].image.size == (256, 256)
    assert engine.calls[0].image.getpixel((10, 10)) == (200, 30, 30)
    assert engine.calls[1].image.getpixel((10, 10)) == (0, 0, 255)


def test_previews_come_before_the_final_frame(studio):
    client, engine, _ = studio
    with client.websocket_connect("/ws") as ws:
        receive(ws)
        ws.send_text(params(prompt="x", num_inference_steps=3, previews=True))
        frames = []
        while not frames or not frames[-1]["final"]:
            frames.append(next_of(ws, "frame"))
        assert frames[-1]["step"] == 3
        assert all(not f["final"] for f in frames[:-1])
        assert [f["id"] for f in frames] == list(range(1, len(frames) + 1))
    assert engine.previews_decoded >= 1


@pytest.mark.parametrize("device, previews", [("cpu", True), ("cuda", False)])
def test_previews_are_on_by_default_on_a_cpu_only(device, previews):
    """On a CPU a 4-step SD1.5 frame takes seconds: the first step's picture comes at a quarter of that."""
    # default_previews=None: the device decides (the tests' settings fix it off); steps slow enough for a
    # preview to go out before the final frame
    with running_studio(FakeEngine(device=device, step_latency_s=0.05), default_previews=None) as (client, engine, _):
        with client.websocket_connect("/ws") as ws:
            receive(ws)
            ws.send_text(params(prompt="x", num_inference_steps=3))  # previews not given
            frames = []
            while not frames or not frames[-1]["final"]:
                frames.append(next_of(ws, "frame"))
        assert (len(frames) > 1) is previews and (engine.previews_decoded >= 1) is previews


def test_new_params_stop_the_running_generation_inside_its_step():
    """A step takes seconds on a CPU: superseded, the generation stops inside it (engine/interrupt.py; the
    FakeEngine reads the same stop check in its step's sleep), not at its end."""
    engine = FakeEngine(step_latency_s=1.0)
    with running_studio(engine) as (client, _, _), client.websocket_connect("/ws") as ws:
        receive(ws)
        ws.send_text(params(prompt="first", num_inference_steps=1))
        wait_until(lambda: engine.generate_count == 1, what="the first generation to start")
        ws.send_text(params(prompt="second", num_inference_steps=1))
        assert next_final(ws)["params"]["prompt"] == "second"
    # The first one's only step never finished: it stopped inside it.
    assert engine.stopped_mid_step == 1 and engine.steps_run == 1


def test_long_prompt_warning(studio):
    client, _, _ = studio
    with client.websocket_connect("/ws") as ws:
        receive(ws)
        ws.send_text(params(prompt=" ".join(["word"] * 90)))
        assert "77" in next_of(ws, "warning")["message"]
        assert next_final(ws)["type"] == "frame"


def test_oom_fails_only_that_frame(monkeypatch):
    import lcm_live.studio.failures as failures_module

    freed = []
    monkeypatch.setattr(failures_module, "free_device_memory", lambda: freed.append(1))
    engine = FakeEngine(failures=["oom", "ok"])
    with running_studio(engine) as (client, _, state), client.websocket_connect("/ws") as ws:
        receive(ws)
        ws.send_text(params(prompt="big"))
        error = next_final(ws)
        assert error["type"] == "error" and error["code"] == "oom"
        assert "Traceback" not in error["message"] and "fake CUDA" not in error["message"]
        ws.send_text(params(prompt="big", seed=1))
        assert next_final(ws)["type"] == "frame"
        assert state.metrics.errors.labels(type="oom")._value.get() == 1
        assert freed == [1]
        assert client.get("/readyz").status_code == 200


def test_consecutive_failures_make_readyz_503_until_a_success():
    engine = FakeEngine(failures=["error", "oom", "error"])
    with running_studio(engine) as (client, _, state), client.websocket_connect("/ws") as ws:
        receive(ws)
        for seed in range(3):
            ws.send_text(params(seed=seed))
            assert next_final(ws)["code"] in ("engine_error", "oom")
        assert client.get("/readyz").status_code == 503
        assert client.get("/readyz").json()["status"] == "unhealthy"
        ws.send_text(params(seed=9))
        assert next_final(ws)["type"] == "frame"
        assert client.get("/readyz").status_code == 200


def test_engine_user_error_is_invalid_params_with_field():
    with running_studio(FakeEngine(failures=["user"])) as (client, _, _), client.websocket_connect("/ws") as ws:
        receive(ws)
        ws.send_text(params(prompt="x"))
        error = next_final(ws)
        assert (error["code"], error["field"]) == ("invalid_params", "prompt")


def test_generation_deadline_gives_timeout():
    engine = FakeEngine(step_latency_s=0.1)
    with running_studio(engine, generation_timeout_s=0.05) as (client, _, state), client.websocket_connect("/ws") as ws:
        receive(ws)
        ws.send_text(params(num_inference_steps=8))
        assert next_final(ws)["code"] == "timeout"
        assert state.metrics.errors.labels(type="timeout")._value.get() == 1


def test_queue_wait_deadline_gives_timeout():
    engine = FakeEngine(step_latency_s=0.1)
    with running_studio(engine, max_sessions=2, queue_wait_timeout_s=0.1) as (client, _, state):
        started = threading.Event()
        state.worker.step_observer = lambda job, event: started.set()
        with client.websocket_connect("/ws") as first, client.websocket_connect("/ws") as second:
            receive(first), receive(second)
            first.send_text(params(num_inference_steps=4))
            assert started.wait(10)
            second.send_text(params(num_inference_steps=1))
            assert next_final(second)["code"] == "timeout"
            assert next_final(first)["type"] == "frame"


def test_capacity_refuses_the_extra_session_with_1013():
    with running_studio(max_sessions=1) as (client, _, state):
        with client.websocket_connect("/ws") as first:
            assert receive(first)["type"] == "hello"
            with client.websocket_connect("/ws") as second:
                error = receive(second)
                assert (error["type"], error["code"]) == ("error", "capacity")
                assert receive(second) == {"type": "close", "code": 1013, "reason": "server full"}
            assert state.metrics.rejected.labels(reason="capacity")._value.get() == 1
            first.send_text(params(prompt="still served"))
            assert next_final(first)["type"] == "frame"
        wait_until(lambda: not state.sessions, what="the first session to end")
        with client.websocket_connect("/ws") as third:  # a place is free again
            assert receive(third)["type"] == "hello"


def test_idle_session_is_closed():
    with running_studio(idle_timeout_s=0.2) as (client, _, _), client.websocket_connect("/ws") as ws:
        receive(ws)
        msg = receive(ws)
        assert msg["type"] == "close" and msg["code"] == 1000


def test_too_big_message_is_refused_alone_and_counted():
    with running_studio(max_ws_message_bytes=4096, max_ws_text_bytes=2048) as (client, _, state), \
            client.websocket_connect("/ws") as ws:
        receive(ws)
        ws.send_bytes(b"\0" * 5000)
        error = next_of(ws, "error")
        assert error["code"] == "too_large" and "5000 bytes" in error["message"] and "4096" in error["message"]
        ws.send_text(json.dumps({"type": "params", "prompt": "x" * 3000}))
        error = next_of(ws, "error")
        assert error["code"] == "too_large" and "2048" in error["message"]
        assert state.metrics.rejected.labels(reason="too_large")._value.get() == 2
        ws.send_text(params(prompt="still here"))  # the session goes on
        assert next_final(ws)["params"]["prompt"] == "still here"


def test_200_random_malformed_messages_never_reach_the_engine(studio):
    import random

    client, engine, _ = studio
    rng = random.Random(1234)
    junk_values = [None, -1, 10**30, "x", [], {}, 1.5, True, "\u0000"]
    with client.websocket_connect("/ws") as ws:
        receive(ws)
        for _ in range(200):
            kind = rng.randrange(4)
            if kind == 0:
                ws.send_bytes(rng.randbytes(rng.randrange(0, 2048)))
            elif kind == 1:
                ws.send_text("".join(chr(rng.randrange(32, 0x2FF)) for _ in range(rng.randrange(0, 80))))
            elif kind == 2:
                field = rng.choice(["num_inference_steps", "width", "seed", "guidance_scale", "strength", "mode",
                                    "prompt", "previews", "model", "lora_path", "type"])
                body = {field: rng.choice(junk_values)}
                with contextlib.suppress(UserError):  # a junk value that happens to be valid: make it unknown
                    parse_params(default_params_model(), body)
                    body = {"not_a_field": body[field]}
                ws.send_text(json.dumps({"type": "params", **body}))
            else:
                ws.send_text(json.dumps(rng.choice([[], 1, "params", None, {"type": rng.choice(junk_values)}])))
            error = next_of(ws, "error")
            assert error["code"] in ("invalid_params", "invalid_image") and "Traceback" not in error["message"]
        assert engine.calls == []
        ws.send_text(params(prompt="after the storm"))
        assert next_final(ws)["params"]["prompt"] == "after the storm"
