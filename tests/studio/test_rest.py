"""POST /api/generate, /api/schema, /api/info, health and readiness, on a FakeEngine."""

from __future__ import annotations

import base64
import io
import json
import threading

import pytest
from PIL import Image

from lcm_live.studio.fake_engine import FakeEngine

from .conftest import running_studio, wait_until

pytestmark = pytest.mark.timeout(60)


def png_b64(size=(64, 64), color=(10, 200, 10)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_generate_returns_png_with_parameters(studio):
    client, engine, _ = studio
    r = client.post("/api/generate", json={"prompt": "a lighthouse", "seed": 42, "width": 256, "height": 384,
                                          "num_inference_steps": 2, "guidance_scale": 6.5})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    img = Image.open(io.BytesIO(r.content))
    assert img.size == (256, 384)
    meta = json.loads(img.text["parameters"])
    assert (meta["prompt"], meta["seed"], meta["num_inference_steps"], meta["guidance_scale"]) == ("a lighthouse", 42, 2, 6.5)
    assert img.text["seed"] == "42" and img.text["prompt"] == "a lighthouse"
    assert "strength" not in meta and "previews" not in meta
    # Seeds are exact: the same params give the same pixels (Save reproduces the shown frame).
    again = client.post("/api/generate", json={"prompt": "a lighthouse", "seed": 42, "width": 256, "height": 384,
                                              "num_inference_steps": 2, "guidance_scale": 6.5})
    assert Image.open(io.BytesIO(again.content)).tobytes() == img.tobytes()


def test_generate_img2img_with_base64_image(studio):
    client, engine, _ = studio
    r = client.post("/api/generate", json={"mode": "img2img", "prompt": "x", "image": png_b64(), "strength": 0.5})
    assert r.status_code == 200
    assert engine.calls[-1].image.size == (512, 512) and engine.calls[-1].strength == 0.5
    assert json.loads(Image.open(io.BytesIO(r.content)).text["parameters"])["strength"] == 0.5
    data_url = "data:image/png;base64," + png_b64()
    assert client.post("/api/generate", json={"mode": "img2img", "image": data_url}).status_code == 200


@pytest.mark.parametrize(
    ("body", "code", "field"),
    [
        ({"num_inference_steps": 100}, "invalid_params", "num_inference_steps"),
        ({"width": 4096}, "invalid_params", "width"),
        ({"model_path": "/tmp/evil"}, "invalid_params", "model_path"),
        ({"mode": "img2img"}, "invalid_params", "image"),
        ({"mode": "img2img", "image": "@@@not base64"}, "invalid_image", "image"),
        ({"mode": "img2img", "image": base64.b64encode(b"GIF89a....").decode()}, "invalid_image", "image"),
        ({"image": png_b64()}, "invalid_params", "image"),
        ({"mode": "img2img", "image": png_b64(), "num_inference_steps": 1, "strength": 0.5}, "invalid_params", "strength"),
    ],
)
def test_generate_rejects_bad_input_with_422(studio, body, code, field):
    client, engine, _ = studio
    r = client.post("/api/generate", json=body)
    assert r.status_code == 422
    assert (r.json()["code"], r.json()["field"]) == (code, field)
    assert engine.calls == []


def test_not_json_is_422(studio):
    client, _, _ = studio
    assert client.post("/api/generate", content=b"{nope", headers={"content-type": "application/json"}).status_code == 422
    assert client.post("/api/generate", json=[1, 2]).status_code == 422


def test_body_over_the_limit_is_413_even_when_content_length_lies(studio):
    client, engine, state = studio
    big = b'{"prompt": "' + b"x" * (3 * 1024 * 1024) + b'"}'
    r = client.post("/api/generate", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["code"] == "too_large"

    def chunks():  # no Content-Length at all: counted while streaming
        for _ in range(48):
            yield b"x" * 65536

    assert client.post("/api/generate", content=chunks()).status_code == 413
    r = client.post("/api/generate", content=big, headers={"content-length": "20"})
    assert r.status_code == 413
    assert engine.calls == []
    assert state.metrics.rejected.labels(reason="too_large")._value.get() == 3


def test_third_concurrent_generate_gets_429_with_retry_after():
    gate = threading.Event()
    engine = FakeEngine()
    with running_studio(engine, rest_queue_size=2) as (client, _, state):
        state.worker.step_observer = lambda job, event: gate.wait(10)
        results = []
        threads = [threading.Thread(target=lambda: results.append(client.post("/api/generate", json={"seed": 1})))
                   for _ in range(2)]
        for t in threads:
            t.start()
        wait_until(lambda: state.rest_waiting == 2, what="two REST generations in the worker")
        third = client.post("/api/generate", json={"seed": 3})
        assert third.status_code == 429 and third.headers["retry-after"] and third.json()["code"] == "capacity"
        gate.set()
        for t in threads:
            t.join(10)
        assert sorted(r.status_code for r in results) == [200, 200]


def test_engine_failures_map_to_http_statuses():
    with running_studio(FakeEngine(failures=["oom", "error"])) as (client, _, _):
        r = client.post("/api/generate", json={})
        assert (r.status_code, r.json()["code"]) == (500, "oom")
        r = client.post("/api/generate", json={})
        assert (r.status_code, r.json()["code"]) == (500, "engine_error")
        assert "Traceback" not in r.text
        assert client.post("/api/generate", json={}).status_code == 200


def test_schema_publishes_the_bounds(studio):
    client, _, _ = studio
    props = client.get("/api/schema").json()["properties"]
    steps = props["num_inference_steps"]
    assert {k: steps[k] for k in ("minimum", "maximum", "default", "type")} == {
        "minimum": 1, "maximum": 8, "default": 4, "type": "integer"}
    assert props["guidance_scale"]["minimum"] == 0 and props["guidance_scale"]["maximum"] == 20
    assert props["guidance_scale"]["default"] == 8.0  # the FakeEngine is a full LCM
    for side in ("width", "height"):
        assert {k: props[side][k] for k in ("minimum", "maximum", "multipleOf", "default")} == {
            "minimum": 256, "maximum": 768, "multipleOf": 8, "default": 512}
    assert props["seed"]["minimum"] == 0 and props["seed"]["maximum"] == 2**32 - 1
    assert props["strength"]["minimum"] == 0.05 and props["strength"]["maximum"] == 1
    assert props["mode"]["enum"] == ["txt2img", "img2img"]
    assert props["prompt"]["maxLength"] == 1000 and props["previews"]["type"] == "boolean"


@pytest.mark.parametrize("native, device, default, bounds", [
    (64, "cpu", 64, (64, 768)), (512, "cpu", 512, (256, 768)), (1024, "cuda", 1024, (256, 1024)),
    (1024, "cpu", 512, (256, 1024)),  # SDXL on a CPU: 1024 would take minutes a frame
])
def test_the_default_size_is_the_models_native_size(native, device, default, bounds):
    """A model made at 64 px (builtin:shapes) tiles its shapes over a 512 px image; SDXL is made at 1024: the
    studio starts at the model's own size (on a CPU at most 512), the bounds widened to take it in, and warms up
    at it."""
    with running_studio(FakeEngine(native_size=native, device=device)) as (client, engine, _):
        props = client.get("/api/schema").json()["properties"]
        for side in ("width", "height"):
            assert (props[side]["default"], props[side]["minimum"], props[side]["maximum"]) == (default, *bounds)
        assert engine.warmup_size == (default, default)
        assert client.post("/api/generate", json={"prompt": "x"}).headers["content-type"] == "image/png"
        assert engine.calls[-1].width == default


def test_sizes_set_in_the_settings_win_over_the_models():
    with running_studio(FakeEngine(native_size=64), default_width=256, default_height=320,
                        max_size=512) as (client, engine, _):
        props = client.get("/api/schema").json()["properties"]
        assert (props["width"]["default"], props["height"]["default"]) == (256, 320)
        assert (props["width"]["minimum"], props["width"]["maximum"]) == (64, 512)
        assert engine.warmup_size == (256, 320)


def test_lcm_lora_model_gets_guidance_default_1():
    with running_studio(FakeEngine(kind="lcm-lora")) as (client, _, _):
        assert client.get("/api/schema").json()["properties"]["guidance_scale"]["default"] == 1.0
        assert client.get("/api/info").json()["kind"] == "lcm-lora"


def test_info_names_no_path(tmp_path):
    from lcm_live.studio.app import public_info

    folder = tmp_path / "my-model"
    folder.mkdir()
    info = public_info({"model": str(folder), "kind": "lcm", "device": "cpu", "dtype": "float32", "notice": None})
    assert info["model"] == "my-model" and str(tmp_path) not in json.dumps(info)
    assert public_info({"model": "SimianLuo/LCM_Dreamshaper_v7"})["model"] == "SimianLuo/LCM_Dreamshaper_v7"


def test_readyz_is_503_until_the_model_is_loaded_and_warm():
    release = threading.Event()
    engine = FakeEngine()

    def slow_factory():
        release.wait(10)
        return engine

    with running_studio(engine_factory=slow_factory, wait_ready=False) as (client, _, state):
        assert client.get("/healthz").status_code == 200
        r = client.get("/readyz")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        assert client.get("/api/info").status_code == 503
        assert client.post("/api/generate", json={}).status_code == 503
        with client.websocket_connect("/ws") as ws:
            msg = json.loads(ws.receive_text())
            assert msg["code"] == "not_ready"
            assert ws.receive()["code"] == 1013
        release.set()
        wait_until(lambda: client.get("/readyz").status_code == 200, what="readyz 200")
        assert engine.warmups == 1


def test_warmup_failure_never_becomes_ready_and_reports_fatal():
    from fastapi.testclient import TestClient

    from lcm_live.studio.app import create_app

    from .conftest import studio_settings

    fatal = []
    app = create_app(studio_settings(), lambda: FakeEngine(warmup_failure=True), on_fatal=fatal.append)
    with TestClient(app) as client:
        wait_until(lambda: fatal, what="on_fatal")
        r = client.get("/readyz")
        assert r.status_code == 503 and r.json()["status"] == "failed"
        assert "warmup" in fatal[0]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_dead_worker_thread_makes_readyz_503(studio):
    client, _, state = studio

    class Boom(BaseException):
        pass

    def explode(job):
        raise Boom()

    state.worker._execute = explode
    from lcm_live.studio.worker import Job

    class NullSink:
        def wants_preview(self):
            return False

        def on_frame(self, *a, **k):
            pass

        def on_error(self, *a, **k):
            pass

        def on_done(self, *a, **k):
            pass

    state.worker.submit("x", Job(params=state.params_model(), sink=NullSink()))
    wait_until(lambda: not state.worker.alive, what="the worker to die")
    r = client.get("/readyz")
    assert r.status_code == 503 and r.json()["status"] == "failed"


def test_metrics_count_frames_and_generations(studio):
    from prometheus_client.parser import text_string_to_metric_families

    client, _, _ = studio
    assert client.post("/api/generate", json={}).status_code == 200
    families = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").text)}
    for name in ("lcm_live_sessions_active", "lcm_live_queue_depth", "lcm_live_frames_sent",
                 "lcm_live_frames_dropped", "lcm_live_rejected", "lcm_live_errors", "lcm_live_cancelled",
                 "lcm_live_generation_seconds", "lcm_live_first_frame_seconds"):
        assert name in families, name
    count = [s for s in families["lcm_live_generation_seconds"].samples if s.name.endswith("_count")][0]
    assert count.value == 1


def test_the_page_starts_at_the_model_familys_step_count():
    from lcm_live.engine.protocol import EngineInfo

    class OneStepFamily(FakeEngine):
        @property
        def info(self):
            base = super().info
            return EngineInfo(**{**base.to_dict(), "family": "sdxs", "default_num_inference_steps": 1})

    with running_studio(OneStepFamily()) as (client, _, _):
        assert client.get("/api/schema").json()["properties"]["num_inference_steps"]["default"] == 1
    with running_studio(OneStepFamily(), default_steps=2) as (client, _, _):  # the settings win
        assert client.get("/api/schema").json()["properties"]["num_inference_steps"]["default"] == 2
