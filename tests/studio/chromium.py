"""What the Chromium tests share: the browser's flags, `lcm-live serve` in a subprocess, the page's JS modules under
a static HTTP server, and readers of the page's frame state."""

from __future__ import annotations

import contextlib
import functools
import http.server
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import lcm_live
from lcm_live.bench.local_http import free_port, http_get, stop_process

WEB = Path(lcm_live.__file__).resolve().parent / "web"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 # a fake camera (an animated test pattern), allowed without asking: the Camera button's tests
                 "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"]
NO_CHROMIUM = ("Debian's chromium is not installed at /usr/bin/chromium (`make test` installs it: "
               "apt-get install -y chromium)")
READY_TIMEOUT_S = 180  # model load + warm-up of the tiny model on a busy 2-core CPU
FRAME_TIMEOUT_MS = 120_000  # a frame of the tiny model takes seconds on a 2-core CPU shared with other work


@contextlib.contextmanager
def serving(log_dir: Path, *args: str, env: dict[str, str] | None = None):
    """`lcm-live serve ARGS` on a free loopback port; yields its URL once /readyz is 200, stops it after."""
    port = free_port()
    log_path = log_dir / "serve.log"
    cmd = [str(Path(sys.executable).with_name("lcm-live")), "serve", *args, "--host", "127.0.0.1",
           "--port", str(port)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    env.pop("LCM_LIVE_TOKEN", None)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"`lcm-live serve` exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                if http_get(url + "readyz")[0] == 200:
                    break
            except OSError:
                pass  # not listening yet
            if time.monotonic() > deadline:
                pytest.fail(f"`lcm-live serve` not ready in {READY_TIMEOUT_S} s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.25)
        yield url
    finally:
        stop_process(proc)


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # no request lines in the test output
        pass


@contextlib.contextmanager
def static_js_server():
    """The page's JS modules (`web/js/`) under a static HTTP server; yields the URL of `js/`."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(WEB)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/js/"
    finally:
        server.shutdown()


@contextlib.contextmanager
def js_module_page(browser=None):
    """A Chromium page on the page's JS modules: no server, no model. In ``browser``, or in a Chromium of its own."""
    with static_js_server() as url, (contextlib.nullcontext(browser) if browser else chromium()) as b:
        page = b.new_page()
        page.goto(url)
        yield page
        page.close()


@contextlib.contextmanager
def chromium():
    """A headless Chromium (Playwright's sync API)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def set_slider(page, selector: str, value: str | None = None) -> None:
    """Move a slider the way a user would (input events, then change on release); None: to its minimum."""
    page.eval_on_selector(selector, """(el, value) => {
        el.value = value === null ? el.min : value;
        el.dispatchEvent(new Event('input', {bubbles: true}));
        el.dispatchEvent(new Event('change', {bubbles: true}));
    }""", value)


def frame_seq(page) -> int:
    """How many frames the page has shown (the server's frame ids restart on each connection)."""
    value = page.get_attribute("#output", "data-seq")
    return int(value) if value else 0


def wait_settled_frame(page, after_id: int, mode: str) -> int:
    """Wait for a final frame shown after frame number ``after_id`` and made in ``mode``, with nothing left
    generating; returns its number."""
    page.wait_for_function(
        """([after, mode]) => {
            const img = document.getElementById('output');
            return Number(img.dataset.seq || 0) > after && img.dataset.final === 'true'
                && img.dataset.mode === mode && img.complete && img.naturalWidth > 0
                && document.body.dataset.busy === 'false';
        }""",
        arg=[after_id, mode], timeout=FRAME_TIMEOUT_MS,
    )
    return frame_seq(page)


def pixels(page, selector: str) -> list[float]:
    """The element's picture (img or canvas) at its own size, averaged over 16x16 blocks of RGB: a signature
    that does not depend on how the browser resamples (an img and a canvas are scaled differently)."""
    return page.eval_on_selector(selector, """el => {
        const w = el.naturalWidth || el.width, h = el.naturalHeight || el.height, n = 16;
        const c = document.createElement('canvas');
        c.width = w; c.height = h;
        const ctx = c.getContext('2d');
        ctx.drawImage(el, 0, 0);
        const data = ctx.getImageData(0, 0, w, h).data;
        const sums = new Array(n * n * 3).fill(0), counts = new Array(n * n).fill(0);
        for (let y = 0; y < h; y++) {
            for (let x = 0; x < w; x++) {
                const b = Math.floor(y * n / h) * n + Math.floor(x * n / w), i = (y * w + x) * 4;
                for (let k = 0; k < 3; k++) sums[b * 3 + k] += data[i + k];
                counts[b] += 1;
            }
        }
        return sums.map((v, i) => v / counts[Math.floor(i / 3)]);
    }""")


def mean_abs_diff(a: list[float], b: list[float]) -> float:
    return sum(abs(x - y) for x, y in zip(a, b, strict=True)) / len(a)


_RECORD_SENDS = """(() => {
    // Every WebSocket send, in order: text as it is, binary (ArrayBuffer, typed array or Blob) as base64.
    const sent = window.__wsSent = [];
    const b64 = (buffer) => {
        const bytes = new Uint8Array(buffer);
        let s = '';
        for (let i = 0; i < bytes.length; i += 0x8000) s += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
        return { b64: btoa(s) };
    };
    const send = WebSocket.prototype.send;
    WebSocket.prototype.send = function (data) {
        const i = sent.length;
        sent.push(null);
        if (typeof data === 'string') sent[i] = data;
        else if (data instanceof Blob) data.arrayBuffer().then((b) => { sent[i] = b64(b); });
        else sent[i] = b64(data instanceof ArrayBuffer ? data : data.buffer.slice(data.byteOffset, data.byteOffset + data.byteLength));
        return send.call(this, data);
    };
})()"""


class WebSocketLog:
    """What the page sent (recorded in the page: DevTools does not report Blob frames) and received on its
    WebSockets, in order: str (text) or bytes (binary). Attach before ``page.goto``."""

    def __init__(self, page):
        self.page = page
        self.received: list[str | bytes] = []
        page.add_init_script(_RECORD_SENDS)
        page.on("websocket", self._attach)

    def _attach(self, ws) -> None:
        # Playwright tags its handlers with an attribute: a function, not a bound builtin like list.append.
        ws.on("framereceived", lambda payload: self.received.append(payload))

    @property
    def sent(self) -> list[str | bytes]:
        import base64

        raw = self.page.evaluate("() => window.__wsSent || []")
        return [base64.b64decode(m["b64"]) if isinstance(m, dict) else m for m in raw if m is not None]

    def layers_sent(self, code: bytes, index: int = 0) -> list[bytes]:
        """The images sent in ``LCML`` envelopes of this layer (``b"m"``, ``b"r"``): b"" for a clear."""
        head = b"LCML" + code + bytes([index, 0, 0])
        return [m[8:] for m in self.sent if isinstance(m, bytes) and m[:8] == head]

    def last_layer(self, code: bytes, index: int, expected, timeout_s: float = 15.0) -> bytes:
        """The newest image sent for this layer once ``expected(image)`` holds (a page encodes and sends a layer
        asynchronously after the click that changes it)."""
        import time

        deadline = time.monotonic() + timeout_s
        while True:
            images = self.layers_sent(code, index)
            if images and expected(images[-1]):
                return images[-1]
            assert time.monotonic() < deadline, f"the newest {code!r}{index} layer sent is not the one expected"
            self.page.wait_for_timeout(50)

    def params_sent(self) -> list[dict]:
        return [m for m in map(_json_or_none, self.sent) if m and m.get("type") == "params"]

    def wait_layer(self, code: bytes, index: int, point: tuple[float, float], timeout_s: float = 60.0) -> bytes:
        """Wait until the newest image sent for this layer is white at ``point`` (fractions of its size: a stroke's
        end is encoded after the mouse is up), then until the page has its frame (nothing generating); returns it."""
        import io
        import time

        from PIL import Image

        deadline = time.monotonic() + timeout_s
        while True:
            images = self.layers_sent(code, index)
            if images and images[-1]:
                with Image.open(io.BytesIO(images[-1])) as png:
                    grey = png.convert("L")
                    if grey.getpixel((int(point[0] * (grey.width - 1)), int(point[1] * (grey.height - 1)))) == 255:
                        break
            assert time.monotonic() < deadline, f"no {code!r}{index} layer painted at {point} was sent"
            self.page.wait_for_timeout(50)
        self.page.wait_for_function("""() => {
            const img = document.getElementById('output');
            return document.body.dataset.busy === 'false' && img.dataset.final === 'true' && img.complete;
        }""", timeout=FRAME_TIMEOUT_MS)
        return images[-1]

    def frames(self) -> list[dict]:
        """The final frames' JSON (with the params the server validated for them)."""
        return [m for m in map(_json_or_none, self.received) if m and m.get("type") == "frame" and m.get("final")]


def _json_or_none(message):
    import json

    if not isinstance(message, str):
        return None
    try:
        return json.loads(message)
    except ValueError:
        return None


def drag(page, selector: str, points: list[tuple[float, float]]) -> None:
    """One mouse stroke through ``points`` (fractions of the element's box: 0,0 top left), 6 moves a segment."""
    box = page.locator(selector).bounding_box()
    at = [(box["x"] + box["width"] * x, box["y"] + box["height"] * y) for x, y in points]
    page.mouse.move(*at[0])
    page.mouse.down()
    for (x0, y0), (x1, y1) in zip(at, at[1:], strict=False):
        for i in range(1, 7):
            page.mouse.move(x0 + (x1 - x0) * i / 6, y0 + (y1 - y0) * i / 6)
    page.mouse.up()


def block_columns(signature: list[float], columns: range, n: int = 16) -> list[float]:
    """The part of a ``pixels()`` signature (n x n blocks of RGB) in these block columns."""
    return [signature[(row * n + col) * 3 + k] for row in range(n) for col in columns for k in range(3)]


@contextlib.contextmanager
def logged_studio_page(browser, url: str):
    """The studio page at `url`, connected, at its smallest size and 2 steps, with its WebSocket sends recorded
    (``page.ws``) and its errors collected (``page.problems``)."""
    context = browser.new_context(viewport={"width": 1360, "height": 1000})
    page = context.new_page()
    page.problems = []
    page.on("pageerror", lambda exc: page.problems.append(f"page error: {exc}"))
    page.on("console", lambda msg: msg.type == "error" and page.problems.append(f"console: {msg.text}"))
    page.ws = WebSocketLog(page)
    try:
        page.goto(url)
        page.wait_for_selector("body[data-connection=open][data-session]", state="attached",
                               timeout=FRAME_TIMEOUT_MS)
        page.wait_for_selector("#ctl-num_inference_steps", state="attached", timeout=FRAME_TIMEOUT_MS)
        set_slider(page, "#ctl-width")  # the smallest size: quicker encodes
        set_slider(page, "#ctl-height")
        set_slider(page, "#ctl-num_inference_steps", "2")
        yield page
    finally:
        context.close()
