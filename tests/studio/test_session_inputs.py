"""A session's statuses and params under racing input (issue 13, item 8)."""

from __future__ import annotations

import asyncio
import io

import pytest
from PIL import Image

from lcm_live.cli import main
from lcm_live.studio.fake_engine import FakeEngine
from lcm_live.studio.security import is_loopback_host

from .conftest import next_final, next_of, params, receive, running_studio

pytestmark = pytest.mark.timeout(60)


def png(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), color).save(buf, format="PNG")
    return buf.getvalue()


def test_no_idle_for_an_input_comes_before_its_busy():
    """A canvas decoding while another job ends: that job's "idle" must not carry the new canvas's count (the
    page would take the session for settled while the canvas is still unread, then see busy for it)."""
    with running_studio(FakeEngine(step_latency_s=0.05)) as (client, _, studio), client.websocket_connect("/ws") as ws:
        receive(ws)
        real = studio.decode_canvas

        async def slow_decode(data):
            await asyncio.sleep(0.4)  # the first job ends while this canvas decodes
            return await real(data)

        ws.send_text(params(mode="img2img", prompt="p", strength=0.5, num_inference_steps=2))
        ws.send_bytes(png("white"))
        next_final(ws)
        studio.decode_canvas = slow_decode
        ws.send_text(params(mode="img2img", prompt="q", strength=0.5, num_inference_steps=2))  # input 3: a job
        ws.send_bytes(png("black"))  # input 4: decoded slowly while input 3's job ends
        statuses = []
        while True:
            message = next_of(ws, "status", "frame")
            if message["type"] == "status":
                statuses.append((message["state"], message["inputs"]))
                if message == statuses[-1] and message["state"] == "idle" and message["inputs"] == 4:
                    break
            if ("idle", 4) in statuses:
                break
        busy_for = {inputs for state, inputs in statuses if state == "busy"}
        for i, (state, inputs) in enumerate(statuses):
            if state == "idle":
                assert not any(s == "busy" and n == inputs for s, n in statuses[i + 1:]), statuses
        assert 4 in busy_for, statuses


def test_params_the_engine_refuses_do_not_become_the_sessions():
    engine = FakeEngine(failures=["ok", "ok", "user"])
    with running_studio(engine) as (client, _, _), client.websocket_connect("/ws") as ws:
        receive(ws)
        ws.send_text(params(mode="img2img", prompt="good", strength=0.5))
        ws.send_bytes(png("white"))
        next_final(ws)
        ws.send_text(params(mode="img2img", prompt="good", strength=0.5, seed=3))
        next_final(ws)
        ws.send_text(params(mode="img2img", prompt="refused by the engine", strength=0.5))
        assert next_final(ws)["code"] == "invalid_params"
        ws.send_bytes(png("black"))  # a new canvas runs with the last params the engine accepted
        frame = next_final(ws)
        assert frame["params"]["prompt"] == "good" and frame["params"]["seed"] == 3
    assert engine.calls[-1].prompt == "good"


@pytest.mark.parametrize(("host", "loopback"), [
    ("localhost", True), ("LOCALHOST.", True), ("127.0.0.2", True), ("::1", True),
    ("evil.localhost", False), ("localhost.evil.com", False), ("0.0.0.0", False),
])
def test_only_real_loopback_names_count(host, loopback):
    assert is_loopback_host(host) is loopback


def test_serve_refuses_a_dot_localhost_host_without_a_token(monkeypatch, capsys):
    monkeypatch.delenv("LCM_LIVE_TOKEN", raising=False)
    assert main(["serve", "--host", "evil.localhost", "--fake-engine", "{}"]) == 2
    assert "--host evil.localhost" in capsys.readouterr().err
