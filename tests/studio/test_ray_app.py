"""The studio on Ray Serve (issue 15, requirement 2).

On one local Ray cluster for the module (2 logical CPUs, no dashboard; marked slow): the app of studio/ray_app.py
with 2 generator replicas of the FakeEngine, real WebSocket clients on Serve's HTTP proxy. The protocol and its
checks as in the single-process studio, 4 clients on 2 replicas, Serve's cancellation reaching the engine's step
hook, and a replica killed mid-generation. Without a cluster: the CLI without the extra, the builder's arguments and
docs/serve-config.yaml (test_ray_worker.py: the RayWorker's rules on a scripted handle). Everything but the first
two skips, saying why, when ``import ray`` fails."""

from __future__ import annotations

import io
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from lcm_live.bench.local_http import free_port, http_get
from lcm_live.cli import main as cli_main
from lcm_live.config import Settings, StudioSettings

try:
    import ray
    from ray import serve

    RAY_MISSING = None
except ImportError as exc:
    RAY_MISSING = f"Ray Serve is the optional `ray` extra: pip install 'lcm-live[ray]' (make test installs it): {exc}"
needs_ray = pytest.mark.skipif(RAY_MISSING is not None, reason=RAY_MISSING or "")
DOCS = Path(__file__).resolve().parents[2] / "docs"

TOKEN = "ray-t0k3n-for-tests-0123456789abcdefghij"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
STEP_S = 0.25  # FakeEngine seconds per denoising step (at most 8 steps: 2 s)


# ---- without a cluster ---------------------------------------------------------------------------------------------
def test_serve_ray_without_ray_says_how_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if the extra were not installed
    monkeypatch.setitem(sys.modules, "ray.serve", None)
    assert cli_main(["serve", "--ray", "--fake-engine", "{}"]) == 2
    assert "pip install 'lcm-live[ray]'" in capsys.readouterr().err


def test_serve_ray_flags_need_ray_and_exclude_each_other(capsys):
    assert cli_main(["serve", "--replicas", "2", "--fake-engine", "{}"]) == 2
    assert "go with --ray" in capsys.readouterr().err
    assert cli_main(["serve", "--ray", "--replicas", "2", "--autoscale", "1:4", "--fake-engine", "{}"]) == 2
    assert "exclude each other" in capsys.readouterr().err


@needs_ray
def test_builder_args_and_the_serve_config_in_docs(monkeypatch):
    """``serve run lcm_live.studio.ray_app:app k=v``: replicas or autoscaling, GPUs, the token rule off loopback;
    docs/serve-config.yaml parses against Serve's own schema and builds."""
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from lcm_live.errors import UserError
    from lcm_live.studio.ray_app import app

    monkeypatch.delenv("LCM_LIVE_TOKEN", raising=False)
    built = app({"replicas": "3", "gpus_per_replica": "1", "fake_engine": "{}"})
    generator = built._bound_deployment.init_args[0]._bound_deployment
    assert generator.num_replicas == 3 and generator.ray_actor_options["num_gpus"] == 1
    assert generator.max_ongoing_requests == 4  # a GPU replica batches a few sessions
    # a request that finds every replica busy tries again within 0.05 s (Serve's default waits up to 0.5 s)
    assert generator._deployment_config.request_router_config.max_backoff_s == 0.05
    scaled = app({"autoscale": "1:4"})._bound_deployment.init_args[0]._bound_deployment
    config = scaled._deployment_config.autoscaling_config
    assert (config.min_replicas, config.max_replicas, scaled.max_ongoing_requests) == (1, 4, 1)
    with pytest.raises(UserError, match="LCM_LIVE_TOKEN"):
        app({"host": "0.0.0.0"})
    with pytest.raises(UserError, match="unknown argument"):
        app({"replica": "2"})
    for bad in ("4:1", "0:2", "two"):
        with pytest.raises(UserError, match="MIN:MAX"):
            app({"autoscale": bad})
    monkeypatch.setenv("LCM_LIVE_TOKEN", "a-long-random-token-0123456789abcdefgh")
    assert app({"host": "0.0.0.0"}) is not None
    deploy = ServeDeploySchema.model_validate(yaml.safe_load((DOCS / "serve-config.yaml").read_text()))
    (application,) = deploy.applications
    assert application.import_path == "lcm_live.studio.ray_app:app"
    assert application.args["host"] == deploy.http_options.host
    assert app(application.args) is not None


# ---- on a local cluster --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_studio():
    """(http base URL, ws URL) of the studio on a fresh local cluster; torn down after the module."""
    from lcm_live.studio.ray_app import RayOptions

    settings = Settings(studio=StudioSettings(max_sessions=8, default_previews=False, token=TOKEN))
    options = RayOptions(replicas=2, cpus_per_replica=0.5,
                         fake_engine=json.dumps({"step_latency_s": STEP_S, "record_calls": False}))
    yield from local_studio(settings, options, "lcm-live-tests")


def local_studio(settings: Settings, options: Any, namespace: str):
    """A fixture's body: a local cluster (2 CPUs), Serve's proxy on a free port and the app of ``settings`` and
    ``options``; yields (http base URL, ws URL) once every replica is ready, then shuts it all down."""
    from lcm_live.studio.ray_app import APP_NAME, build_application

    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False, namespace=namespace)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_application(settings, options), name=APP_NAME, route_prefix="/")
        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: _readyz(base).get("workers", {}).get("ready") == options.replicas, 60,
                 f"{options.replicas} ready replica(s) in /readyz")
        yield base, f"ws://127.0.0.1:{port}/ws"
    finally:
        serve.shutdown()
        ray.shutdown()


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _readyz(base: str) -> dict[str, Any]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(urllib.request.Request(base + "/readyz", headers=AUTH), timeout=5) as res:
            return json.loads(res.read())
    except urllib.error.HTTPError as err:
        return json.loads(err.read() or b"{}")
    except OSError:
        return {}


def params(**fields: Any) -> str:
    return json.dumps({"type": "params", **fields})


def next_message(ws, timeout: float) -> dict[str, Any]:
    """The next JSON message; a frame's info comes with its binary as "_bytes"."""
    msg = json.loads(ws.recv(timeout=timeout))
    if msg["type"] == "frame":
        data = ws.recv(timeout=timeout)
        assert isinstance(data, bytes), "a frame's info must be followed by its binary message"
        msg["_bytes"] = data
    return msg


def next_of(ws, kind: str, timeout: float = 10.0, seen: list | None = None) -> dict[str, Any]:
    """Skip messages (kept in ``seen``) until one of type ``kind`` (a final frame for "final")."""
    deadline = time.monotonic() + timeout
    while True:
        msg = next_message(ws, max(0.01, deadline - time.monotonic()))
        if seen is not None:
            seen.append(msg)
        if kind == "final" and msg["type"] == "frame" and msg["final"]:
            return msg
        if msg["type"] == kind:
            return msg
        if msg["type"] == "error" and kind != "error":
            raise AssertionError(f"error while waiting for {kind}: {msg}")


def next_busy(ws) -> None:
    """Until the session says its new input runs ("idle" of the previous one may come first)."""
    while next_of(ws, "status")["state"] != "busy":
        pass


def generator_stats() -> dict[int, dict[str, Any]]:
    """Each generator replica's stats, by pid (Serve routes each call to one of them: ask until both answer)."""
    from lcm_live.studio.ray_app import APP_NAME, GENERATOR

    handle = serve.get_deployment_handle(GENERATOR, APP_NAME)
    found: dict[int, dict[str, Any]] = {}
    for _ in range(40):
        stats = handle.stats.remote().result(timeout_s=10)
        found[stats["pid"]] = stats
        if len(found) == 2:
            break
    return found


@pytest.mark.slow
@pytest.mark.timeout(240)
@needs_ray
def test_protocol_over_serve(ray_studio):
    base, url = ray_studio
    assert _readyz(base) == {"status": "ready", "workers": {"ready": 2, "total": 2}}
    with connect(url, additional_headers=AUTH, open_timeout=10) as ws:
        hello = next_message(ws, 10)
        assert hello["type"] == "hello" and hello["workers"] == 2
        assert hello["info"]["model"] == "fake" and "prompt" in hello["schema"]["properties"]
        ws.send(params(prompt="over serve", num_inference_steps=2, seed=7))
        frame = next_of(ws, "final")
        assert frame["params"]["prompt"] == "over serve" and frame["seed"] == 7 and frame["input"] == 1
        assert frame["_bytes"][:2] == b"\xff\xd8"  # the studio's JPEG, re-encoded from the replica's PNG
        assert frame["timings"]["generation_ms"] >= 2 * STEP_S * 1000 * 0.9
        ws.send("{not json")
        error = next_of(ws, "error")
        assert error["code"] == "invalid_json" or error["code"].startswith("invalid")
        ws.send(params(prompt="after the error", num_inference_steps=101))
        assert next_of(ws, "error")["field"] == "num_inference_steps"
        ws.send(params(prompt="still here", num_inference_steps=1, seed=8))
        frame = next_of(ws, "final")
        assert frame["params"]["prompt"] == "still here" and frame["input"] == 4
    status, body = http_get(base + "/metrics")
    assert status == 401  # the token guards /metrics as in the single-process studio


@pytest.mark.slow
@pytest.mark.timeout(240)
@needs_ray
def test_broadcast_streams_through_serves_proxy(ray_studio):
    """The broadcast lives in the ingress, with the sessions: its MJPEG stream passes Serve's proxy part by part."""
    import http.client
    from urllib.parse import urlsplit

    base, url = ray_studio
    with connect(url, additional_headers=AUTH, open_timeout=10) as ws:
        next_message(ws, 10)
        ws.send(json.dumps({"type": "broadcast", "on": True}))
        path = next_of(ws, "broadcast")["url"]
        ws.send(params(prompt="broadcast over serve", num_inference_steps=1, seed=3))
        frame = next_of(ws, "final")["_bytes"]
        viewer = http.client.HTTPConnection(urlsplit(base).hostname, urlsplit(base).port, timeout=30)
        viewer.request("GET", path)  # the key alone, no token
        response = viewer.getresponse()
        assert response.status == 200 and response.getheader("content-type").startswith("multipart/x-mixed-replace")
        assert response.readline().strip() == b"--lcmlive-frame"
        headers = dict(line.decode().strip().split(": ", 1) for line in iter(response.readline, b"\r\n"))
        assert response.read(int(headers["Content-Length"])) == frame
        viewer.close()


@pytest.mark.slow
@pytest.mark.timeout(240)
@needs_ray
def test_token_origin_and_metrics_as_in_one_process(ray_studio):
    base, url = ray_studio
    with pytest.raises(InvalidStatus) as no_token:
        connect(url, open_timeout=10)
    assert no_token.value.response.status_code in (401, 403)
    with pytest.raises(InvalidStatus) as cross_site:
        connect(url, additional_headers=AUTH, origin="http://evil.example", open_timeout=10)
    assert cross_site.value.response.status_code == 403
    import urllib.request

    with urllib.request.urlopen(urllib.request.Request(base + "/metrics", headers=AUTH), timeout=5) as res:
        text = res.read().decode()
    assert "lcm_live_frames_sent_total" in text and 'lcm_live_rejected_total{reason="origin"}' in text


@pytest.mark.slow
@pytest.mark.timeout(240)
@needs_ray
def test_four_clients_on_two_replicas_all_get_frames(ray_studio):
    base, url = ray_studio
    results: dict[int, dict[str, Any]] = {}
    errors: list[BaseException] = []

    def client(i: int) -> None:
        try:
            with connect(url, additional_headers=AUTH, open_timeout=10) as ws:
                next_of(ws, "hello")
                ws.send(params(prompt=f"client {i}", num_inference_steps=2, seed=i))
                results[i] = next_of(ws, "final", timeout=30)
        except BaseException as exc:  # reported below
            errors.append(exc)

    before = {pid: s for pid, s in generator_stats().items()}
    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert sorted(results) == [0, 1, 2, 3]
    assert all(results[i]["params"]["prompt"] == f"client {i}" for i in results)
    assert len(before) == 2  # two replica processes answered
    counts = [line for line in _metrics(base).splitlines() if line.startswith("lcm_live_batch_size_count")]
    assert counts and float(counts[0].split()[-1]) >= 4  # the replicas' engine calls, counted in the ingress


def _metrics(base: str) -> str:
    import urllib.request

    with urllib.request.urlopen(urllib.request.Request(base + "/metrics", headers=AUTH), timeout=5) as res:
        return res.read().decode()


@pytest.mark.slow
@pytest.mark.timeout(240)
@needs_ray
def test_closing_mid_generation_cancels_it_in_the_replica(ray_studio):
    """Serve's request cancellation reaches the engine's step hook: the FakeEngine stops inside a step."""
    _, url = ray_studio
    before = sum(s["stopped_mid_step"] for s in generator_stats().values())
    with connect(url, additional_headers=AUTH, open_timeout=10) as ws:
        next_of(ws, "hello")
        ws.send(params(prompt="long", num_inference_steps=8))  # 2 s
        next_busy(ws)
        time.sleep(0.6)  # it runs in a replica now
    wait_for(lambda: sum(s["stopped_mid_step"] for s in generator_stats().values()) > before, 10,
             "the replica's engine to stop mid-step")
    with connect(url, additional_headers=AUTH, open_timeout=10) as ws:  # both replicas free again at once
        next_of(ws, "hello")
        t0 = time.monotonic()
        ws.send(params(prompt="next", num_inference_steps=1))
        next_of(ws, "final", timeout=10)
        assert time.monotonic() - t0 < 2.0


@pytest.mark.slow
@pytest.mark.timeout(240)
@needs_ray
def test_killed_replica_mid_session_reruns_the_newest_input(ray_studio):
    """Next to last in the module (it kills a replica). Each of two sessions draws (a canvas and an inpainting mask) and has
    a generation running, one per replica; one replica's actor is killed: every session gets its next frame within
    10 s, of its last params and its own drawing (the FakeEngine keeps the canvas outside the mask)."""
    from lcm_live.studio.ray_app import GENERATOR

    base, url = ray_studio
    colours = [(200, 30, 30), (30, 30, 200)]
    sockets = [connect(url, additional_headers=AUTH, open_timeout=10) for _ in range(2)]
    drawn = {"mode": "img2img", "strength": 1.0, "width": 256, "height": 256}
    try:
        for i, ws in enumerate(sockets):  # a drawing and a first frame each
            next_of(ws, "hello")
            ws.send(_png(Image.new("RGB", (256, 256), colours[i])))
            ws.send(b"LCMLm\0\0\0" + _png(_left_half_mask()))  # redraw the left half, keep the right
            ws.send(params(prompt=f"first {i}", num_inference_steps=1, **drawn))
            next_of(ws, "final")
        for i, ws in enumerate(sockets):  # the input that will be running at the kill
            ws.send(params(prompt=f"last {i}", num_inference_steps=8, seed=100 + i, guidance_scale=2.5, **drawn))
            next_busy(ws)
        time.sleep(0.8)  # both running, one on each replica (one request at a time per replica)
        names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                 if f"#{GENERATOR}#" in a["name"]]
        assert len(names) == 2, names
        ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)
        t_kill = time.monotonic()
        warned = 0
        for i, ws in enumerate(sockets):
            seen: list[dict[str, Any]] = []
            frame = next_of(ws, "final", timeout=10 - (time.monotonic() - t_kill), seen=seen)
            assert time.monotonic() - t_kill < 10
            p = frame["params"]
            assert (p["prompt"], p["seed"], p["num_inference_steps"], p["guidance_scale"], p["mode"]) == (
                f"last {i}", 100 + i, 8, 2.5, "img2img")
            image = Image.open(io.BytesIO(frame["_bytes"])).convert("RGB")
            kept = image.getpixel((200, 128))
            assert all(abs(a - b) <= 12 for a, b in zip(kept, colours[i], strict=True)), (kept, colours[i])
            warned += any(m["type"] == "warning" and "runs again" in m["message"] for m in seen)
        assert warned == 1  # the session whose replica was killed was told; the other had nothing to tell
    finally:
        for ws in sockets:
            ws.close()
    wait_for(lambda: _readyz(base).get("workers") == {"ready": 2, "total": 2}, 60, "Serve to replace the replica")


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _left_half_mask() -> Image.Image:
    mask = Image.new("L", (256, 256), 0)
    mask.paste(255, (0, 0, 128, 256))
    return mask


@pytest.mark.slow
@pytest.mark.timeout(240)
@needs_ray
def test_a_tiny_real_model_on_a_replica(ray_studio, tiny_lcm_dir):
    """Last in the module: the application is deployed again in place, its generator the tiny diffusers LCM built
    in code (tests/conftest.py), loaded by path in the replica. A session gets real frames (previews, then the
    final), and a param change gets a frame of the new params."""
    from lcm_live.config import EngineSettings
    from lcm_live.studio.ray_app import APP_NAME, RayOptions, build_application

    base, url = ray_studio
    settings = Settings(engine=EngineSettings(model=str(tiny_lcm_dir), device="cpu", dtype="float32"),
                        studio=StudioSettings(max_sessions=2, token=TOKEN, warmup_width=64, warmup_height=64))
    serve.run(build_application(settings, RayOptions(replicas=1, cpus_per_replica=1)), name=APP_NAME,
              route_prefix="/")
    wait_for(lambda: _readyz(base).get("workers") == {"ready": 1, "total": 1}, 120, "the tiny model's replica")
    wait_for(lambda: _hello(url)["info"]["model"] == tiny_lcm_dir.name, 60, "the new ingress (the old one drains)")
    with connect(url, additional_headers=AUTH, open_timeout=10) as ws:
        hello = next_of(ws, "hello")
        assert hello["info"]["model"] == tiny_lcm_dir.name and hello["info"]["kind"] == "lcm"
        assert hello["workers"] == 1
        seen: list[dict[str, Any]] = []
        ws.send(params(prompt="a red circle", seed=3, width=64, height=64, num_inference_steps=3, previews=True))
        first = next_of(ws, "final", timeout=60, seen=seen)
        previews = [m for m in seen if m["type"] == "frame" and not m["final"]]
        assert previews and all(m["step"] < m["total"] for m in previews)  # step previews, streamed back
        assert (first["seed"], first["total"], first["params"]["prompt"]) == (3, 3, "a red circle")
        image = Image.open(io.BytesIO(first["_bytes"])).convert("RGB")
        assert image.size == (64, 64) and len(set(image.getdata())) > 16  # a decoded picture, not a flat colour
        ws.send(params(prompt="a blue square", seed=4, width=64, height=64, num_inference_steps=2, previews=False))
        second = next_of(ws, "final", timeout=60)
        assert (second["seed"], second["total"], second["params"]["prompt"]) == (4, 2, "a blue square")
        assert second["_bytes"] != first["_bytes"]


def _hello(url: str) -> dict[str, Any]:
    try:
        with connect(url, additional_headers=AUTH, open_timeout=10) as ws:
            return next_of(ws, "hello")
    except (OSError, InvalidStatus, TimeoutError):
        return {"info": {}}
