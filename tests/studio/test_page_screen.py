"""Screen capture as the canvas' source and the pop-out output window (issue 16), in real Chromium against
`lcm-live serve --fake-engine` (flat-colour frames, a pure function of prompt, seed and size).

The display stream is faked by an init script: getDisplayMedia returns a canvas' captureStream() painted a known
colour (headless Chromium has no screen picker), so the canvas must turn that colour and go to the server.
"""

from __future__ import annotations

import pytest

from .chromium import (
    CHROMIUM,
    FRAME_TIMEOUT_MS,
    NO_CHROMIUM,
    logged_studio_page,
    mean_abs_diff,
    pixels,
    serving,
    wait_settled_frame,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

if not CHROMIUM.exists():
    pytest.skip(NO_CHROMIUM, allow_module_level=True)

# A "screen" that is orange, repainted so the stream has frames; window.__screen.stop() ends it like the browser's
# own "Stop sharing" would (the track's "ended" event).
FAKE_DISPLAY = """(() => {
    const c = document.createElement('canvas');
    c.width = 320; c.height = 240;
    const ctx = c.getContext('2d');
    setInterval(() => { ctx.fillStyle = '#ff8800'; ctx.fillRect(0, 0, 320, 240); }, 50);
    window.__displayCalls = 0;
    navigator.mediaDevices.getDisplayMedia = async (constraints) => {
        window.__displayCalls += 1;
        window.__displayConstraints = constraints;
        ctx.fillStyle = '#ff8800'; ctx.fillRect(0, 0, 320, 240);
        const stream = c.captureStream(20);
        const track = stream.getVideoTracks()[0];
        window.__screen = { stop: () => { track.stop(); track.dispatchEvent(new Event('ended')); } };
        return stream;
    };
})()"""


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    with serving(tmp_path_factory.mktemp("serve"), "--fake-engine", "{}") as url:
        yield url


@pytest.fixture
def page(browser, studio):
    with logged_studio_page(browser, studio) as page:
        yield page


def _centre_rgb(page) -> list[int]:
    return page.eval_on_selector("#sketch", """c => {
        const d = c.getContext('2d').getImageData(c.width >> 1, c.height >> 1, 1, 1).data;
        return [d[0], d[1], d[2]];
    }""")


def test_the_screen_feeds_the_canvas_and_stops_with_the_share(page):
    page.evaluate(FAKE_DISPLAY)  # after load: the page looks getDisplayMedia up when the button is pressed
    page.fill("#prompt", "a screen")
    wait_settled_frame(page, 0, "txt2img")
    canvases_before = sum(isinstance(m, bytes) and not m.startswith(b"LCML") for m in page.ws.sent)

    page.click("#screen")
    page.wait_for_selector("#screen[aria-pressed=true]", timeout=FRAME_TIMEOUT_MS)
    assert page.evaluate("window.__displayCalls") == 1
    assert page.evaluate("window.__displayConstraints.audio") is False
    assert page.get_attribute("body", "data-mode") == "img2img"  # the screen is a picture for sketch mode
    page.wait_for_function("""() => {
        const c = document.getElementById('sketch');
        const d = c.getContext('2d').getImageData(c.width >> 1, c.height >> 1, 1, 1).data;
        return d[0] > 230 && Math.abs(d[1] - 136) < 20 && d[2] < 30;
    }""", timeout=30_000)
    wait_settled_frame(page, 0, "img2img")
    canvases = [m for m in page.ws.sent if isinstance(m, bytes) and not m.startswith(b"LCML")]
    assert len(canvases) > canvases_before  # the screen's picture went to the server

    # The camera takes over from the screen (one source at a time)...
    page.click("#camera")
    page.wait_for_selector("#camera[aria-pressed=true]", timeout=FRAME_TIMEOUT_MS)
    assert page.get_attribute("#screen", "aria-pressed") == "false"
    page.click("#camera")
    page.wait_for_selector("#camera[aria-pressed=false]")

    # ...and the browser's own "Stop sharing" ends the screen feed.
    page.click("#screen")
    page.wait_for_selector("#screen[aria-pressed=true]", timeout=FRAME_TIMEOUT_MS)
    page.evaluate("window.__screen.stop()")
    page.wait_for_selector("#screen[aria-pressed=false]", timeout=10_000)
    assert page.is_hidden("#banner-error"), page.inner_text("#banner-error")
    assert page.problems == []


def test_a_refused_screen_share_says_so(page):
    page.evaluate("""() => { navigator.mediaDevices.getDisplayMedia = async () => {
        throw new DOMException('Permission denied', 'NotAllowedError'); }; }""")
    page.click("#screen")
    page.wait_for_selector("#banner-error:not([hidden])")
    assert "Screen unavailable (the browser or the user refused it; allow the screen" in page.inner_text("#banner-error")
    assert page.get_attribute("#screen", "aria-pressed") == "false"


def test_the_popout_window_shows_the_live_frames(page, studio):
    page.fill("#prompt", "a projected lake")
    wait_settled_frame(page, 0, "txt2img")
    with page.expect_popup() as popup_info:
        page.click("#popout")
    popup = popup_info.value
    problems = []
    popup.on("pageerror", lambda exc: problems.append(str(exc)))
    # The frame on screen comes at once (the pop-out says hello), then every new final frame. The pop-out opens on
    # about:blank and then loads its page: until it has, there is no body to read (a busy machine shows the gap).
    popup.wait_for_function("() => Number(document.body?.dataset.frames) >= 1", timeout=30_000)
    popup.wait_for_function("() => document.querySelector('img').naturalWidth > 0")
    assert mean_abs_diff(pixels(popup, "img"), pixels(page, "#output")) < 1

    shown = int(popup.evaluate("document.body.dataset.frames"))
    page.fill("#prompt", "a projected mountain")
    page.wait_for_function("() => document.getElementById('output').alt.endsWith('a projected mountain')",
                           timeout=FRAME_TIMEOUT_MS)
    popup.wait_for_function("(n) => Number(document.body.dataset.frames) > n", arg=shown, timeout=30_000)
    popup.wait_for_function("() => document.querySelector('img').alt.endsWith('a projected mountain')")
    popup.wait_for_function("() => document.querySelector('img').complete")
    assert mean_abs_diff(pixels(popup, "img"), pixels(page, "#output")) < 1

    # A reload of the studio finds its pop-out again (the channel is this tab's, kept in sessionStorage).
    name = popup.evaluate("location.hash")
    page.reload()
    page.wait_for_selector("body[data-connection=open][data-session]", state="attached", timeout=FRAME_TIMEOUT_MS)
    shown = int(popup.evaluate("document.body.dataset.frames"))
    page.fill("#prompt", "a projected river")
    popup.wait_for_function("() => document.querySelector('img').alt.endsWith('a projected river')",
                            timeout=FRAME_TIMEOUT_MS)
    assert int(popup.evaluate("document.body.dataset.frames")) > shown
    assert popup.evaluate("location.hash") == name

    # The pop-out is served as the page is: same-origin only (its CSP), never framed, no sniffing.
    response = popup.request.get(studio + "static/popout.html")
    assert response.headers["x-frame-options"] == "DENY" and response.headers["x-content-type-options"] == "nosniff"
    assert "default-src 'self'" in response.text() and "script-src 'self'" in response.text()
    assert problems == [] and page.problems == []
