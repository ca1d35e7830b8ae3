"""A real `lcm-live serve` (uvicorn subprocess, FakeEngine) and a real `websockets` client: handshake refusals,
the 2 MB message cap, latest-wins, cancellation on disconnect, graceful shutdown (R3, R6, R8, R10, R13)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from lcm_live.bench.local_http import free_port, stop_process

from .conftest import TOKEN

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]

LCM_LIVE = str(Path(sys.executable).with_name("lcm-live"))


def _get(url: str, headers: dict | None = None, context=None) -> tuple[int, str]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=5, context=context) as res:
            return res.status, res.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


class Server:
    def __init__(self, tmp_path: Path, fake: dict, *extra: str, token: str | None = None, tls=None):
        """``tls``: an ssl.SSLContext trusting the certificate given in ``extra`` (--ssl-certfile): https/wss."""
        self.port = free_port()
        self.tls = tls
        self.base = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self.ws_url = f"{'wss' if tls else 'ws'}://127.0.0.1:{self.port}/ws"
        self.log_path = tmp_path / f"serve-{self.port}.log"
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        env = {k: v for k, v in os.environ.items() if k != "LCM_LIVE_TOKEN"}
        if token:
            env["LCM_LIVE_TOKEN"] = token
        cmd = [LCM_LIVE, "serve", "--port", str(self.port), "--fake-engine", json.dumps(fake), *extra]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited {self.proc.returncode}:\n{self.log()}")
            with contextlib.suppress(OSError):
                if _get(self.base + "/readyz", self.headers, self.tls)[0] == 200:
                    break
            if time.monotonic() > deadline:
                raise AssertionError(f"serve not ready:\n{self.log()}")
            time.sleep(0.1)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metric(self, name: str) -> float:
        status, text = _get(self.base + "/metrics", self.headers, self.tls)
        assert status == 200
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def wait_metric(self, name: str, at_least: float, timeout: float = 10) -> float:
        deadline = time.monotonic() + timeout
        while (value := self.metric(name)) < at_least:
            assert time.monotonic() < deadline, f"{name} stayed at {value}"
            time.sleep(0.05)
        return value

    def stop(self) -> int:
        return stop_process(self.proc, timeout=15)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("serve"), {"step_latency_s": 0.1}, "--max-sessions", "4")
    yield srv
    assert srv.stop() == 0
    assert "Traceback" not in srv.log(), srv.log()


def params(**fields) -> str:
    return json.dumps({"type": "params", **fields})


async def next_message(ws, *types: str) -> dict:
    """The next JSON message of one of ``types`` (a frame's binary is read and attached as "_bytes")."""
    while True:
        raw = await asyncio.wait_for(ws.recv(), timeout=20)
        assert isinstance(raw, str), "binary without frame info"
        msg = json.loads(raw)
        if msg["type"] == "frame":
            msg["_bytes"] = await asyncio.wait_for(ws.recv(), timeout=20)
            assert isinstance(msg["_bytes"], bytes)
        if msg["type"] in types:
            return msg


async def next_final(ws) -> dict:
    while True:
        msg = await next_message(ws, "frame", "error")
        if msg["type"] == "error" or msg["final"]:
            return msg


@pytest.mark.parametrize("origin", ["http://evil.example", "null", "http://127.0.0.1:1"])
def test_foreign_origin_gets_403_at_the_handshake(server, origin):
    async def go():
        with pytest.raises(InvalidStatus) as info:
            async with connect(server.ws_url, origin=origin):
                pass
        assert info.value.response.status_code == 403

    asyncio.run(go())


def test_same_origin_is_served(server):
    async def go():
        async with connect(server.ws_url, origin=f"http://127.0.0.1:{server.port}") as ws:
            assert (await next_message(ws, "hello"))["info"]["model"] == "fake"
            await ws.send(params(prompt="hi", num_inference_steps=1))
            frame = await next_final(ws)
            assert frame["type"] == "frame" and frame["_bytes"][:3] == b"\xff\xd8\xff"

    asyncio.run(go())


def test_3mb_message_is_refused_alone_5mb_closes_with_1009_and_others_are_still_served(server):
    """Past the studio's 2 MB message limit a message is refused alone (too_large, the session stays); past the
    protocol's cap, twice that, uvicorn closes the connection with 1009."""
    async def go():
        async with connect(server.ws_url) as other:
            await next_message(other, "hello")
            async with connect(server.ws_url, max_size=None) as ws:
                await next_message(ws, "hello")
                await ws.send(b"\x89PNG" + b"\0" * (3 * 1024 * 1024))
                error = await next_message(ws, "error")
                assert error["code"] == "too_large" and "3145732 bytes" in error["message"]
                await ws.send(params(prompt="the session goes on", num_inference_steps=1))
                assert (await next_final(ws))["params"]["prompt"] == "the session goes on"
            async with connect(server.ws_url, max_size=None) as ws:
                await next_message(ws, "hello")
                with pytest.raises(ConnectionClosed) as info:
                    # The server refuses the frame from its header, without reading the 5 MB: when it closes
                    # while the client is still writing them, the client's send fails with a reset (seen on a
                    # loaded machine) and the close frame may be lost with it.
                    await ws.send(b"\x89PNG" + b"\0" * (5 * 1024 * 1024))
                    while True:
                        await asyncio.wait_for(ws.recv(), timeout=20)
                if info.value.rcvd is not None:  # the close frame arrived: it says why
                    assert info.value.rcvd.code == 1009
                else:
                    assert isinstance(info.value.__cause__, ConnectionResetError), info.value
            await other.send(params(prompt="still here", num_inference_steps=1))
            frame = await next_final(other)
            assert frame["params"]["prompt"] == "still here"

    asyncio.run(go())
    assert _get(server.base + "/healthz")[0] == 200


def test_latest_params_win_over_a_burst(server):
    before = server.metric("lcm_live_generation_seconds_count")

    async def go():
        async with connect(server.ws_url) as ws:
            await next_message(ws, "hello")
            for seed in range(300):
                await ws.send(params(prompt=f"p{seed}", seed=seed, num_inference_steps=2))
            while True:
                frame = await next_final(ws)
                assert frame["type"] == "frame"
                if frame["seed"] == 299:
                    break
            assert frame["params"]["prompt"] == "p299"

    asyncio.run(go())
    finished = server.metric("lcm_live_generation_seconds_count") - before
    assert 1 <= finished < 300


def test_disconnect_mid_generation_cancels_it(server):
    before = server.metric("lcm_live_cancelled_total")

    async def go():
        async with connect(server.ws_url) as ws:
            await next_message(ws, "hello")
            await ws.send(params(prompt="long", num_inference_steps=8, previews=True))
            preview = await next_message(ws, "frame")
            assert preview["final"] is False  # it is mid-generation now

    asyncio.run(go())
    server.wait_metric("lcm_live_cancelled_total", before + 1)
    status, _ = _get(server.base + "/healthz")
    assert status == 200


def test_event_loop_stays_responsive_while_generating(server):
    async def go():
        async with connect(server.ws_url) as ws:
            await next_message(ws, "hello")
            await ws.send(params(prompt="busy", num_inference_steps=8))
            await next_message(ws, "status")
            codes = await asyncio.gather(*(asyncio.to_thread(_get, server.base + "/healthz") for _ in range(20)))
            assert all(code == 200 for code, _ in codes)
            assert (await next_final(ws))["type"] == "frame"

    asyncio.run(go())


def test_token_server_refuses_handshake_and_shuts_down_gracefully(tmp_path):
    srv = Server(tmp_path, {"step_latency_s": 0.3}, "--max-sessions", "2", token=TOKEN)
    try:
        assert _get(srv.base + "/readyz")[0] == 401
        assert _get(srv.base + "/healthz")[0] == 200

        async def go():
            with pytest.raises(InvalidStatus) as info:
                async with connect(srv.ws_url):
                    pass
            assert info.value.response.status_code == 403
            clients = [await connect(srv.ws_url, additional_headers=srv.headers) for _ in range(2)]
            for ws in clients:
                await next_message(ws, "hello")
                await ws.send(params(prompt="mid", num_inference_steps=8))
                await next_message(ws, "status")
            srv.proc.send_signal(signal.SIGTERM)
            codes = []
            for ws in clients:
                with pytest.raises(ConnectionClosed) as closed:
                    while True:
                        await asyncio.wait_for(ws.recv(), timeout=10)
                codes.append(closed.value.rcvd.code if closed.value.rcvd else None)
            return codes

        codes = asyncio.run(go())
        assert all(code in (1001, 1012) for code in codes), codes
        assert srv.proc.wait(timeout=15) == 0
        log = srv.log()
        assert "Traceback" not in log and "studio: stopped" in log
        assert TOKEN not in log.replace(f"?token={TOKEN}", "")  # only the printed URL carries it
    finally:
        srv.stop()


def test_slow_reader_gets_the_newest_frame_and_memory_stays_bounded(tmp_path):
    import psutil

    srv = Server(tmp_path, {"noise": True, "record_calls": False}, "--max-sessions", "2")
    try:
        big = dict(width=768, height=768, num_inference_steps=1)

        async def go() -> None:
            # A small receive buffer (no autotuning) and max_queue=2 (the client library buffers at most 2
            # messages): a client that stops reading makes TCP push back on the server within a frame or two.
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
            sock.connect(("127.0.0.1", srv.port))
            async with connect(srv.ws_url, sock=sock, max_queue=2, max_size=None) as ws:
                await next_message(ws, "hello")
                await ws.send(params(seed=10_000, **big))
                assert len((await next_final(ws))["_bytes"]) > 256 * 1024  # incompressible frames
                rss_before = psutil.Process(srv.proc.pid).memory_info().rss
                for seed in range(40):  # keep asking, never read
                    await ws.send(params(seed=seed, **big))
                    await asyncio.sleep(0.02)
                await asyncio.sleep(1.0)
                rss_after = psutil.Process(srv.proc.pid).memory_info().rss
                while (frame := await next_final(ws))["seed"] != 39:
                    assert frame["type"] == "frame"
                assert (rss_after - rss_before) < 30 * 2**20, (rss_after - rss_before) / 2**20

        asyncio.run(go())
        assert srv.metric("lcm_live_frames_dropped_total") > 0
        assert srv.metric("lcm_live_frames_sent_total") < 41
    finally:
        assert srv.stop() == 0


def test_warmup_failure_exits_non_zero(tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "LCM_LIVE_TOKEN"}
    done = subprocess.run([LCM_LIVE, "serve", "--port", str(port), "--fake-engine", '{"warmup_failure": true}'],
                          capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 3
    assert "error: model load or warmup failed: RuntimeError: fake warmup failure" in done.stderr


def test_a_broken_optional_package_is_named_when_the_model_fails_to_load(tmp_path):
    """A bitsandbytes that fails at import takes diffusers down with it: the studio names the package and the fix."""
    site = tmp_path / "site" / "bitsandbytes"
    site.mkdir(parents=True)
    (site / "__init__.py").write_text("raise RuntimeError('CUDA Setup failed')\n")
    (tmp_path / "site" / "bitsandbytes-0.41.1.dist-info").mkdir()
    (tmp_path / "site" / "bitsandbytes-0.41.1.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: bitsandbytes\nVersion: 0.41.1\n")
    env = {k: v for k, v in os.environ.items() if k != "LCM_LIVE_TOKEN"}
    env["PYTHONPATH"] = str(tmp_path / "site")
    done = subprocess.run([LCM_LIVE, "serve", "--port", str(free_port()), "--model", "builtin:shapes"],
                          capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 3
    assert ("error: model load or warmup failed: the installed bitsandbytes fails to import (CUDA Setup failed)"
            in done.stderr)
    assert "pip uninstall bitsandbytes" in done.stderr
