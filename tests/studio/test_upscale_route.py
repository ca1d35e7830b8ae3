"""POST /api/upscale on a FakeEngine: the PNG with parameters (the frame's own read from its chunk), each tile a
worker job, progress per tile over NDJSON, and the refusals (token, size, pixel cap, one at a time per client)."""

from __future__ import annotations

import base64
import io
import json
import threading

from PIL import Image

from lcm_live.engine.metadata import png_info
from lcm_live.studio.upscale_route import png_parameters

from .conftest import TOKEN, running_studio

AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _png(size=(256, 256), parameters=None, color=(40, 90, 200)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG", pnginfo=png_info(parameters) if parameters else None)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _read_png(content: bytes) -> tuple[Image.Image, dict]:
    image = Image.open(io.BytesIO(content))
    image.load()
    return image, json.loads(image.text["parameters"])


def test_upscale_returns_png_with_parameters_from_the_frame(tmp_path):
    frame = {"prompt": "a red fox", "seed": 7, "num_inference_steps": 4, "guidance_scale": 6.0, "mode": "txt2img"}
    with running_studio(token=TOKEN) as (client, engine, studio):
        tile = studio.params_model.model_fields["width"].default
        r = client.post("/api/upscale", headers=AUTH, json={"image": _png(parameters=frame), "scale": 2})
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "image/png"
        image, params = _read_png(r.content)
        assert image.size == (512, 512) and (params["width"], params["height"]) == (512, 512)
        assert (params["prompt"], params["seed"], params["num_inference_steps"]) == ("a red fox", 7, 4)
        assert params["guidance_scale"] == 6.0
        u = params["upscale"]
        assert (u["scale"], u["source_width"], u["method"], u["tile_size"]) == (2, 256, "lanczos+lcm-tiled", tile)
        # Each tile ran as its own worker job: img2img at the tile size, the frame's prompt and seed, strength 0.3.
        assert len(engine.calls) == u["tiles"] >= 1
        assert {(c.prompt, c.seed, c.width, c.height, c.strength) for c in engine.calls} == \
            {("a red fox", 7, tile, tile, 0.3)}
        assert all(c.image is not None and c.image.size == (tile, tile) for c in engine.calls)
        # Fields in the body override the frame's.
        r = client.post("/api/upscale", headers=AUTH,
                        json={"image": _png(parameters=frame), "scale": 2, "prompt": "a blue fox", "seed": 9})
        _, params = _read_png(r.content)
        assert (params["prompt"], params["seed"]) == ("a blue fox", 9)


def test_progress_per_tile_streams_as_ndjson():
    with running_studio(token=TOKEN) as (client, engine, studio):
        headers = {**AUTH, "Accept": "application/x-ndjson"}
        with client.stream("POST", "/api/upscale", headers=headers,
                           json={"image": _png((512, 384)), "scale": 2, "prompt": "x", "seed": 1}) as r:
            assert r.status_code == 200
            lines = [json.loads(line) for line in r.iter_lines() if line]
        progress, last = lines[:-1], lines[-1]
        tiles = last["parameters"]["upscale"]["tiles"]
        assert tiles > 1 and progress == [{"type": "upscale", "tile": k, "tiles": tiles} for k in range(1, tiles + 1)]
        assert last["type"] == "upscaled" and (last["width"], last["height"]) == (1024, 768)
        image, params = _read_png(base64.b64decode(last["image"].split(",", 1)[1]))
        assert image.size == (1024, 768) and params["seed"] == 1


def test_refusals_name_the_field():
    with running_studio(token=TOKEN, max_upscale_pixels=600 * 600, max_body_bytes=64 * 1024) as (client, _, _s):
        # no token
        assert client.post("/api/upscale", json={"image": _png()}).status_code == 401
        # the pixel cap: one clear error naming scale and the cap
        r = client.post("/api/upscale", headers=AUTH, json={"image": _png((256, 256)), "scale": 4})
        body = r.json()
        assert r.status_code == 422 and body["field"] == "scale"
        assert "--scale 4" in body["message"] and "360000" in body["message"] and "--scale 2" in body["message"]
        # scale other than 2 or 4, unknown fields, a bad strength, no image, bad base64
        for extra, field in [({"scale": 3}, "scale"), ({"tile": 64}, "tile"), ({"strength": 0.0}, "strength"),
                             ({"image": None}, "image"), ({"image": "%%%"}, "image")]:
            r = client.post("/api/upscale", headers=AUTH, json={"image": _png(), "scale": 2, **extra})
            assert r.status_code == 422 and r.json()["field"] == field, (extra, r.text)
        # a body past max_body_bytes
        noise = Image.frombytes("RGB", (256, 256), bytes(range(256)) * 768)
        buf = io.BytesIO()
        noise.save(buf, format="BMP")
        r = client.post("/api/upscale", headers=AUTH,
                        json={"image": base64.b64encode(buf.getvalue()).decode(), "scale": 2})
        assert r.status_code == 413


def test_one_upscale_at_a_time_per_client():
    with running_studio(token=TOKEN) as (client, engine, studio):
        gate = threading.Event()
        studio.worker.step_observer = lambda job, event: gate.wait(10)
        results = {}

        def first():
            results["first"] = client.post("/api/upscale", headers=AUTH, json={"image": _png(), "scale": 2})

        thread = threading.Thread(target=first)
        thread.start()
        try:
            from .conftest import wait_until

            wait_until(lambda: studio.worker.load() > 0, what="the first upscale's tile")
            second = client.post("/api/upscale", headers=AUTH, json={"image": _png(), "scale": 2})
            assert second.status_code == 429 and second.json()["code"] == "busy"
        finally:
            gate.set()
            thread.join(30)
        assert results["first"].status_code == 200
        # once it is over, the client may upscale again
        assert client.post("/api/upscale", headers=AUTH, json={"image": _png(), "scale": 2}).status_code == 200


def test_png_parameters_reads_each_chunk_kind_without_decoding():
    params = {"prompt": "ü", "seed": 3}
    raw = base64.b64decode(_png((8, 8), params))
    assert json.loads(png_parameters(raw, 10_000)) == params
    buf = io.BytesIO()
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", json.dumps(params), zip=True)  # zTXt
    Image.new("RGB", (8, 8)).save(buf, format="PNG", pnginfo=info)
    assert json.loads(png_parameters(buf.getvalue(), 10_000)) == {"prompt": "ü", "seed": 3}
    assert png_parameters(b"GIF89a....", 100) is None
    assert png_parameters(base64.b64decode(_png((8, 8))), 100) is None


def test_live_frames_go_on_between_tiles():
    from lcm_live.studio.fake_engine import FakeEngine

    from .conftest import next_final, params, receive, wait_until

    engine = FakeEngine(step_latency_s=0.02)
    with running_studio(engine) as (client, engine, studio):
        results = {}
        thread = threading.Thread(target=lambda: results.update(r=client.post(
            "/api/upscale", json={"image": _png(), "scale": 4, "prompt": "tile", "seed": 2})))
        with client.websocket_connect("/ws") as ws:
            receive(ws)  # hello
            thread.start()
            wait_until(lambda: any(c.prompt == "tile" for c in engine.calls), what="the first tile")
            ws.send_text(params(prompt="live", seed=1))
            assert next_final(ws)["final"] is True
        thread.join(60)
        assert results["r"].status_code == 200
        order = [c.prompt for c in engine.calls]
        tiles = [k for k, p in enumerate(order) if p == "tile"]
        # The session's frame ran while the upscale was under way, not after its last tile.
        assert len(tiles) == 9 and tiles[0] < order.index("live") < tiles[-1]


def test_a_failed_tile_fails_the_upscale_and_only_it():
    from lcm_live.studio.fake_engine import FakeEngine

    with running_studio(FakeEngine(failures=["ok", "error", "ok", "oom"])) as (client, engine, studio):
        r = client.post("/api/upscale", json={"image": _png((512, 384)), "scale": 2, "prompt": "x"})
        assert r.status_code == 500 and r.json()["code"] == "engine_error" and "tile 2" in r.json()["message"]
        assert len(engine.calls) == 2  # no tile after the failed one
        # streamed: the error is the last line (the 200 went out with the first progress line)
        with client.stream("POST", "/api/upscale", headers={"Accept": "application/x-ndjson"},
                           json={"image": _png((512, 384)), "scale": 2, "prompt": "x"}) as s:
            lines = [json.loads(line) for line in s.iter_lines() if line]
        assert lines[0] == {"type": "upscale", "tile": 1, "tiles": lines[0]["tiles"]}
        assert lines[-1]["type"] == "error" and lines[-1]["code"] == "oom" and "tile 2" in lines[-1]["message"]
        # the client may upscale again, and live generation goes on
        assert client.post("/api/upscale", json={"image": _png(), "scale": 2}).status_code == 200
        assert client.post("/api/generate", json={"prompt": "after"}).status_code == 200


def test_a_client_that_goes_away_stops_the_upscale(tmp_path):
    """Over a real socket (uvicorn in a thread): the client closes after the first tile; no more than the tile then
    running or queued follows, of the six."""
    import socket
    import time

    import uvicorn

    from lcm_live.bench.local_http import free_port
    from lcm_live.studio.app import create_app
    from lcm_live.studio.fake_engine import FakeEngine

    from .conftest import studio_settings, wait_until

    engine = FakeEngine(step_latency_s=0.05)
    app = create_app(studio_settings(allowed_hosts=[]), lambda: engine)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started and app.state.studio.worker.ready, what="the server")
        body = json.dumps({"image": _png((512, 384)), "scale": 2, "prompt": "tile"}).encode()
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b"POST /api/upscale HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n" % len(body) + body)
            wait_until(lambda: len(engine.calls) >= 1, what="the first tile")
        wait_until(lambda: app.state.studio.worker.load() == 0, what="the worker to be idle")
        time.sleep(1.0)  # a tile would be submitted within a tile's time (0.2 s) if it were going on
        assert 1 <= len(engine.calls) <= 2
    finally:
        server.should_exit = True
        thread.join(10)


def test_default_strength_runs_a_step_where_img2img_runs_steps_times_strength():
    # The FakeEngine's img2img is SD's (steps * strength steps run): at 2 steps the default 0.3 would run none.
    with running_studio() as (client, engine, studio):
        assert not studio.params_model.lcm_img2img
        r = client.post("/api/upscale", json={"image": _png(), "num_inference_steps": 2, "prompt": "x"})
        assert r.status_code == 200, r.text
        assert {c.strength for c in engine.calls} == {0.5} and _read_png(r.content)[1]["upscale"]["strength"] == 0.5
        # given, it is used as it is, and refused with the fix when it runs no step
        r = client.post("/api/upscale", json={"image": _png(), "num_inference_steps": 2, "strength": 0.3})
        assert r.status_code == 422 and r.json()["field"] == "strength" and "at least 0.50" in r.json()["message"]


def test_model_presets_the_frames_or_the_bodys_never_a_path():
    from fastapi.testclient import TestClient

    from .conftest import wait_until
    from .test_models import fake_factory, models_app, two_presets

    engines: dict = {}
    app = models_app(two_presets(), fake_factory(engines), max_loaded_models=2)
    with TestClient(app) as client:
        wait_until(lambda: app.state.studio.worker.ready, what="ready")
        r = client.post("/api/upscale", json={"image": _png(), "prompt": "x", "model": "b"})
        assert r.status_code == 200, r.text
        assert len(engines["b"].calls) == _read_png(r.content)[1]["upscale"]["tiles"]
        r = client.post("/api/upscale", json={"image": _png(), "model": "/etc/passwd"})
        assert r.status_code == 422 and r.json()["field"] == "model"
        # A frame that names a preset runs on it; one that names something else runs on the default preset.
        before = len(engines["b"].calls)
        assert client.post("/api/upscale", json={"image": _png(parameters={"model": "b", "seed": 1})}).status_code == 200
        assert len(engines["b"].calls) > before
        r = client.post("/api/upscale", json={"image": _png(parameters={"model": "/srv/models/zzz", "seed": 1})})
        assert r.status_code == 200 and engines["a"].calls


def test_host_and_origin_rules_as_the_other_routes():
    with running_studio(allowed_hosts=[]) as (client, engine, _):
        body = {"image": _png(), "prompt": "x"}
        assert client.post("/api/upscale", json=body, headers={"Host": "evil.example"}).status_code in (400, 403)
        r = client.post("/api/upscale", json=body, headers={"Host": "127.0.0.1", "Origin": "https://evil.example"})
        assert r.status_code == 403 and r.json()["code"] == "forbidden_origin"
        assert engine.calls == []
        assert client.post("/api/upscale", json=body, headers={"Host": "127.0.0.1"}).status_code == 200
