"""The broadcast's MJPEG stream on a real `lcm-live serve --fake-engine` (uvicorn, the connection guard): parts as
frames come, "off" and shutdown end the streams, the viewer cap, and a viewer that reads nothing."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from websockets.sync.client import connect

from lcm_live.bench.local_http import free_port, http_get, stop_process

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

KEY = "broadcast-key-for-tests-0123456789"
BOUNDARY = b"--lcmlive-frame"


@contextlib.contextmanager
def server(tmp_path: Path, fake: dict | None = None, **studio: object):
    """`lcm-live serve --fake-engine` with StudioSettings from the environment; yields (port, process)."""
    port = free_port()
    env = {**os.environ, "LCM_LIVE_STUDIO__BROADCAST_KEY": KEY}
    env.pop("LCM_LIVE_TOKEN", None)
    env.update({f"LCM_LIVE_STUDIO__{k.upper()}": str(v) for k, v in studio.items()})
    cmd = [str(Path(sys.executable).with_name("lcm-live")), "serve", "--host", "127.0.0.1", "--port", str(port),
           "--fake-engine", json.dumps(fake or {})]
    log_path = tmp_path / f"serve-{port}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log_path.read_text()
            with contextlib.suppress(OSError):
                if http_get(f"http://127.0.0.1:{port}/readyz")[0] == 200:
                    break
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.1)
        yield port, proc
    finally:
        stop_process(proc)
    # printed once at the start, as the token's URL is; the access log masks it (studio/redact.py)
    assert log_path.read_text(errors="replace").count(KEY) == 1


class Page:
    """A studio client over the WebSocket, as the page: params in, frames out, the broadcast toggle."""

    def __init__(self, port: int):
        self.ws = connect(f"ws://127.0.0.1:{port}/ws", max_size=None)
        self.next("hello")
        self.seed = 0

    def next(self, kind: str) -> dict:
        while True:
            msg = json.loads(self.ws.recv(timeout=30))
            if msg["type"] == "frame":
                msg["_bytes"] = self.ws.recv(timeout=30)
            if msg["type"] == kind and (kind != "frame" or msg["final"]):
                return msg
            assert msg["type"] != "error", msg

    def broadcast(self, on: bool) -> dict:
        self.ws.send(json.dumps({"type": "broadcast", "on": on}))
        return self.next("broadcast")

    def frame(self, **fields) -> bytes:
        self.seed += 1
        self.ws.send(json.dumps({"type": "params", "prompt": "a broadcast", "seed": self.seed, "width": 256,
                                 "height": 256, "num_inference_steps": 1, **fields}))
        return self.next("frame")["_bytes"]


class Viewer:
    """An MJPEG client, as OBS or ffmpeg: reads the parts of /broadcast/<key>.mjpeg."""

    def __init__(self, port: int):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        self.conn.request("GET", f"/broadcast/{KEY}.mjpeg")
        self.response = self.conn.getresponse()

    def part(self) -> bytes | None:
        """The next JPEG, or None where the stream ended (the closing boundary)."""
        fp = self.response  # chunked: http.client undoes it
        line = fp.readline()
        if line.strip() == BOUNDARY + b"--":
            return None
        assert line.strip() == BOUNDARY, line
        headers = {}
        while (line := fp.readline().strip()):
            name, _, value = line.decode().partition(":")
            headers[name.lower()] = value.strip()
        assert headers["content-type"] == "image/jpeg"
        data = fp.read(int(headers["content-length"]))
        assert fp.read(2) == b"\r\n"
        return data

    def new_part(self, shown: bytes) -> bytes | None:
        """The next part that is not ``shown`` (a new viewer's first frame comes several times when it is small:
        studio/broadcast.py PROBE_BYTES), or None at the end."""
        while (part := self.part()) == shown:
            pass
        return part

    def close(self) -> None:
        self.conn.close()


def metric(port: int, name: str) -> float:
    status, body = http_get(f"http://127.0.0.1:{port}/metrics")
    text = body.decode() if isinstance(body, bytes) else body
    assert status == 200
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith((name + " ", name + "{")))


def wait_metric(port: int, name: str, predicate, timeout: float = 20.0) -> float:
    deadline = time.monotonic() + timeout
    while not predicate(value := metric(port, name)):
        assert time.monotonic() < deadline, f"{name} stayed at {value}"
        time.sleep(0.05)
    return value


def test_a_viewer_gets_each_new_frame_and_off_ends_the_stream(tmp_path):
    with server(tmp_path) as (port, _):
        page = Page(port)
        assert page.broadcast(True)["url"] == f"/broadcast/{KEY}.mjpeg"
        first = page.frame()
        viewer = Viewer(port)
        assert viewer.response.status == 200
        assert viewer.response.getheader("content-type") == "multipart/x-mixed-replace; boundary=lcmlive-frame"
        assert viewer.part() == first  # what is up now comes at once
        assert page.broadcast(True)["viewers"] == 1
        second = page.frame(prompt="another")
        assert second != first and viewer.new_part(first) == second
        page.broadcast(False)
        assert viewer.new_part(second) is None  # the closing boundary: the stream ended
        viewer.close()
        wait_metric(port, "lcm_live_broadcast_viewers", lambda v: v == 0)
        assert metric(port, "lcm_live_broadcast_frames_total") >= 2


def test_viewers_past_the_cap_get_503_and_a_viewer_that_leaves_frees_its_place(tmp_path):
    with server(tmp_path, max_broadcast_viewers=1) as (port, _):
        page = Page(port)
        page.broadcast(True)
        first = Viewer(port)
        wait_metric(port, "lcm_live_broadcast_viewers", lambda v: v == 1)
        refused = Viewer(port)
        assert refused.response.status == 503
        body = json.loads(refused.response.read())
        assert body["code"] == "capacity" and "max_broadcast_viewers" in body["message"]
        refused.close()
        first.close()
        wait_metric(port, "lcm_live_broadcast_viewers", lambda v: v == 0)
        again = Viewer(port)
        assert again.response.status == 200
        frame = page.frame()
        assert again.part() == frame
        again.close()
        wait_metric(port, "lcm_live_broadcast_viewers", lambda v: v == 0)
        # A burst at once: exactly one gets the place
        burst: list[Viewer] = []
        threads = [threading.Thread(target=lambda: burst.append(Viewer(port))) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        assert sorted(v.response.status for v in burst) == [200] + [503] * 5
        for viewer in burst:
            viewer.close()


def test_a_viewer_that_reads_nothing_is_aborted_and_the_others_keep_their_frames(tmp_path):
    # Incompressible 512x512 frames (a few hundred KB each) fill the stuck viewer's buffers in a few frames.
    with server(tmp_path, {"noise": True}, write_timeout_s=1) as (port, _):
        page = Page(port)
        page.broadcast(True)
        stuck = socket.socket()
        stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stuck.connect(("127.0.0.1", port))
        stuck.sendall(f"GET /broadcast/{KEY}.mjpeg HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        reader = Viewer(port)
        wait_metric(port, "lcm_live_broadcast_viewers", lambda v: v == 2)
        got: list[bytes] = []
        def read_on() -> None:
            with contextlib.suppress(OSError, ValueError, AttributeError):  # until the test closes it
                got.extend(iter(reader.part, None))

        thread = threading.Thread(target=read_on, daemon=True)
        thread.start()
        deadline = time.monotonic() + 60
        while metric(port, 'lcm_live_connections_closed_total{reason="write_timeout"}') < 1:
            assert time.monotonic() < deadline, "the stuck viewer was never aborted"
            page.frame(width=512, height=512)
        wait_metric(port, "lcm_live_broadcast_viewers", lambda v: v == 1)
        last = page.frame(width=512, height=512)
        deadline = time.monotonic() + 20
        while not got or got[-1] != last:
            assert time.monotonic() < deadline, "the reading viewer stopped getting frames"
            time.sleep(0.05)
        stuck.close()
        reader.close()


def test_shutdown_ends_the_streams_instead_of_waiting_out_the_graceful_deadline(tmp_path):
    with server(tmp_path, graceful_shutdown_timeout_s=90) as (port, proc):
        page = Page(port)
        page.broadcast(True)
        frame = page.frame()
        viewer = Viewer(port)
        assert viewer.part() == frame
        proc.send_signal(signal.SIGTERM)
        assert viewer.new_part(frame) is None  # ended with the closing boundary
        assert proc.wait(timeout=30) == 0  # far inside the 90 s graceful deadline (a deadline against a hang)
        viewer.close()


def test_ffmpeg_opens_the_stream_as_obs_and_vlc_do(tmp_path):
    """libavformat (through PyAV), which OBS's Media Source and VLC use: it finds the stream by its content type,
    at once even for a small flat frame, and decodes each new frame."""
    av = pytest.importorskip("av", reason="PyAV is in the dev extra (make test installs it)")
    with server(tmp_path) as (port, _):
        page = Page(port)
        page.broadcast(True)
        page.frame(prompt="flat")  # the fake engine's flat colour: a ~2 KB JPEG, under ffmpeg's first probe
        started = time.monotonic()
        container = av.open(f"http://127.0.0.1:{port}/broadcast/{KEY}.mjpeg", timeout=10)
        try:
            assert container.format.name == "mpjpeg"
            frames = container.decode(video=0)
            first = next(frames).to_ndarray(format="rgb24")
            # Found without a second frame: with the small frame sent once, ffmpeg waited for the heartbeat's
            # copy, 5 s later (a few ms otherwise: this is that behaviour's deadline, not a speed check).
            assert time.monotonic() - started < 4.5
            page.frame(prompt="another flat picture")
            while (image := next(frames).to_ndarray(format="rgb24")).tolist() == first.tolist():
                pass
            assert image.shape == (256, 256, 3)
            assert abs(image.astype(int) - first.astype(int)).mean() > 5  # the new frame, not a copy
        finally:
            container.close()
