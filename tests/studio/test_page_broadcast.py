"""The page's Broadcast button (web/js/broadcast.js) in real Chromium against `lcm-live serve --fake-engine`: the
URL it shows serves the frame on screen, viewers are counted on the page, and another page taking the broadcast
turns it off here with a notice."""

from __future__ import annotations

import http.client
import io
from urllib.parse import urlsplit

import pytest
from PIL import Image

from .chromium import (
    CHROMIUM,
    FRAME_TIMEOUT_MS,
    NO_CHROMIUM,
    _json_or_none,
    logged_studio_page,
    serving,
    wait_settled_frame,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

if not CHROMIUM.exists():
    pytest.skip(NO_CHROMIUM, allow_module_level=True)


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    with serving(tmp_path_factory.mktemp("serve"), "--fake-engine", "{}",
                 env={"LCM_LIVE_STUDIO__MAX_SESSIONS": "2"}) as url:  # two pages: one takes it from the other
        yield url


def _output_rgb(page) -> list[int]:
    return page.eval_on_selector("#output", """img => {
        const c = document.createElement('canvas');
        c.width = img.naturalWidth; c.height = img.naturalHeight;
        const ctx = c.getContext('2d');
        ctx.drawImage(img, 0, 0);
        const d = ctx.getImageData(c.width >> 1, c.height >> 1, 1, 1).data;
        return [d[0], d[1], d[2]];
    }""")


def test_broadcast_publishes_the_frames_at_the_url_it_shows(browser, studio):
    with logged_studio_page(browser, studio) as page, logged_studio_page(browser, studio) as other:
        page.fill("#prompt", "a broadcast lighthouse")
        wait_settled_frame(page, 0, "txt2img")
        assert page.is_hidden("#broadcast-line")

        page.click("#broadcast")
        page.wait_for_selector("body[data-broadcast=on]", state="attached", timeout=30_000)
        assert page.get_attribute("#broadcast", "aria-pressed") == "true"
        assert {"type": "broadcast", "on": True} in [_json_or_none(m) for m in page.ws.sent]
        url = page.inner_text("#broadcast-url")
        assert url.startswith(studio + "broadcast/") and url.endswith(".mjpeg")

        # The still beside the stream is the frame on screen (flat-colour fake frames: compare the centre).
        still = page.request.get(url.removesuffix(".mjpeg") + ".jpg")
        assert still.status == 200 and still.headers["content-type"] == "image/jpeg"
        centre = Image.open(io.BytesIO(still.body())).convert("RGB")
        rgb = centre.getpixel((centre.width // 2, centre.height // 2))
        assert max(abs(a - b) for a, b in zip(rgb, _output_rgb(page), strict=True)) < 8

        # A viewer (as OBS would open it) is counted on the page.
        parts = urlsplit(url)
        viewer = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
        viewer.request("GET", parts.path)
        assert viewer.getresponse().status == 200
        page.wait_for_function("() => document.getElementById('broadcast-viewers').textContent.startsWith('1 ')",
                               timeout=30_000)
        viewer.close()
        page.wait_for_function("() => document.getElementById('broadcast-viewers').textContent.startsWith('0 ')",
                               timeout=30_000)

        # Typing goes on as before: the control message is not an input the pacing waits for.
        page.fill("#prompt", "a broadcast harbour")
        page.wait_for_function("() => document.getElementById('output').alt.endsWith('a broadcast harbour')",
                               timeout=FRAME_TIMEOUT_MS)

        # Another page takes it: this one turns off and says why.
        other.click("#broadcast")
        other.wait_for_selector("body[data-broadcast=on]", state="attached", timeout=30_000)
        page.wait_for_selector("body[data-broadcast=off]", state="attached", timeout=30_000)
        assert page.get_attribute("#broadcast", "aria-pressed") == "false"
        assert page.is_hidden("#broadcast-line")
        assert "another page took the broadcast" in page.inner_text("#banner-error")  # the amber warning style

        other.click("#broadcast")  # off: the still is gone
        other.wait_for_selector("body[data-broadcast=off]", state="attached", timeout=30_000)
        assert other.request.get(url.removesuffix(".mjpeg") + ".jpg").status == 404
        assert page.problems == [] and other.problems == []


def test_the_page_takes_the_broadcast_again_after_an_idle_close(browser, tmp_path):
    # A 3 s idle timeout: the server closes the quiet session; the next keystroke reconnects, and the page, still
    # wanting Broadcast on, asks again after the hello.
    with serving(tmp_path, "--fake-engine", "{}", env={"LCM_LIVE_STUDIO__IDLE_TIMEOUT_S": "3"}) as url, \
            logged_studio_page(browser, url) as page:
        page.click("#broadcast")
        page.wait_for_selector("body[data-broadcast=on]", state="attached", timeout=30_000)
        page.wait_for_selector("body:not([data-connection=open])", state="attached", timeout=30_000)
        assert page.get_attribute("#broadcast", "aria-pressed") == "true"  # still wanted while away
        page.fill("#prompt", "back again")
        page.wait_for_selector("body[data-connection=open]", state="attached", timeout=30_000)
        page.wait_for_selector("body[data-broadcast=on]", state="attached", timeout=30_000)
        page.wait_for_function("() => document.getElementById('output').alt.endsWith('back again')",
                               timeout=FRAME_TIMEOUT_MS)
        still = page.inner_text("#broadcast-url").removesuffix(".mjpeg") + ".jpg"
        assert page.request.get(still).status == 200
        sent = [m for m in map(_json_or_none, page.ws.sent) if m and m.get("type") == "broadcast"]
        assert sent == [{"type": "broadcast", "on": True}] * 2  # the click, then again after the reconnect
        assert page.problems == []
