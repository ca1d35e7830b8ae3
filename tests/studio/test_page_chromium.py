"""The studio page in a real Chromium against a real `lcm-live serve` (uvicorn subprocess, tiny LCM on CPU).

Types a prompt and sees a picture, switches to sketch mode, draws strokes with the mouse and sees the picture
change, saves the PNG, and trips the error banner. Screenshots land in artifacts/ (git-ignored) for a human to
look at: studio_page.png (laptop) and studio_page_phone.png (phone width).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from .chromium import (
    CHROMIUM,
    FRAME_TIMEOUT_MS,
    NO_CHROMIUM,
    frame_seq,
    mean_abs_diff,
    pixels,
    serving,
    set_slider,
    wait_settled_frame,
)

# Slow: a server start (tiny model load + warm-up) and a few real generations on CPU; generous on a busy machine.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"

if not CHROMIUM.exists():
    pytest.skip(NO_CHROMIUM, allow_module_level=True)


@pytest.fixture(scope="module")
def studio_url(tiny_lcm_dir, tmp_path_factory):
    """The studio with the tiny LCM on CPU."""
    # The smallest default size: the warm-up runs at it (the tiny model is slow at 512 on a busy 2-core CPU).
    with serving(tmp_path_factory.mktemp("serve"), "--model", str(tiny_lcm_dir), "--device", "cpu",
                  "--dtype", "float32", env={"LCM_LIVE_STUDIO__DEFAULT_WIDTH": "256",
                                             "LCM_LIVE_STUDIO__DEFAULT_HEIGHT": "256"}) as url:
        yield url


@pytest.fixture
def page(browser, studio_url):
    """A fresh page on the studio, with its console errors and any request to another host recorded."""
    context = browser.new_context(viewport={"width": 1360, "height": 900}, accept_downloads=True)
    page = context.new_page()
    page.problems = []
    page.on("pageerror", lambda exc: page.problems.append(f"page error: {exc}"))
    page.on("console", lambda msg: msg.type == "error" and page.problems.append(f"console: {msg.text}"))
    page.on("request", lambda req: req.url.startswith(("http", "ws")) and not req.url.startswith(
        (studio_url, studio_url.replace("http", "ws"))) and page.problems.append(f"external request: {req.url}"))
    page.goto(studio_url)
    # A session of its own (the server said hello); a place may take a moment to free after the previous test.
    page.wait_for_selector("body[data-connection=open][data-session]", state="attached", timeout=FRAME_TIMEOUT_MS)
    page.wait_for_selector("#ctl-num_inference_steps", state="attached", timeout=FRAME_TIMEOUT_MS)
    yield page
    context.close()  # closes the WebSocket: the server (one session on CPU) is free for the next test


def test_type_a_prompt_then_sketch_and_the_output_follows(page, tmp_path):
    # The smallest size the server allows (read from the schema-built sliders; the canvas follows it), and few
    # steps: 2 for text, 2 x 0.5 = 1 for sketches (the canvas shows through more at a low strength).
    set_slider(page, "#ctl-width")
    set_slider(page, "#ctl-height")
    assert page.get_attribute("#sketch", "width") == page.eval_on_selector("#ctl-width", "el => el.min")
    set_slider(page, "#ctl-num_inference_steps", "2")
    set_slider(page, "#ctl-strength", "0.5")

    # 1. Text to image: typing makes a picture.
    page.click("#prompt")
    page.keyboard.type("a lighthouse on a cliff at dusk", delay=15)
    first_id = wait_settled_frame(page, 0, "txt2img")
    txt2img = pixels(page, "#output")
    assert page.inner_text("#latency").endswith("ms")
    assert "seed" in page.inner_text("#frame-info")

    # 2. Sketch to image: the canvas becomes the init image.
    page.click("label.mode-option:has(input[value=img2img])")
    assert page.get_attribute("body", "data-mode") == "img2img"
    blank_id = wait_settled_frame(page, first_id, "img2img")
    blank = pixels(page, "#output")

    # 3. Draw three thick strokes with the mouse, in two colours.
    set_slider(page, "#brush-size", page.eval_on_selector("#brush-size", "el => el.max"))
    box = page.locator("#sketch").bounding_box()
    for k, colour in enumerate(["#e53935", "#1e88e5", "#e53935"]):
        page.click(f".swatch[data-color='{colour}']")
        x0, y0 = box["x"] + box["width"] * 0.15, box["y"] + box["height"] * (0.2 + 0.25 * k)
        page.mouse.move(x0, y0)
        page.mouse.down()
        for i in range(1, 25):
            page.mouse.move(x0 + box["width"] * 0.028 * i, y0 + box["height"] * 0.01 * i)
        page.mouse.up()
    canvas = pixels(page, "#sketch")
    assert sum(1 for i in range(0, len(canvas), 3) if canvas[i] < 200 or canvas[i + 2] < 200) > 10, "no stroke drawn"
    assert page.is_enabled("#undo")
    sketched_id = wait_settled_frame(page, blank_id, "img2img")
    sketched = pixels(page, "#output")

    # The picture follows the input: the same params and seed on a blank and on a sketched canvas give different
    # pictures (generation is deterministic, so any difference is the canvas'). The tiny model's random VAE
    # shows a sketch only faintly (about 0.6 of 255 on average over 16x16 blocks), hence the small margin.
    assert sketched_id > blank_id > first_id
    assert mean_abs_diff(blank, sketched) > 0.2, "drawing on the canvas did not change the output"
    assert mean_abs_diff(txt2img, sketched) > 0.2

    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "studio_page.png"), full_page=True)

    # 4. Save: the shown frame re-rendered as a PNG that carries its parameters.
    with page.expect_download(timeout=FRAME_TIMEOUT_MS) as download:
        page.click("#save")
    from PIL import Image

    with Image.open(download.value.path()) as png:
        assert png.format == "PNG"
        text = dict(png.text)
    params = json.loads(text["parameters"])
    assert params["seed"] == int(page.get_attribute("#output", "data-seed"))
    assert params["prompt"] == "a lighthouse on a cliff at dusk"
    assert page.is_hidden("#banner-error"), page.inner_text("#banner-error")

    # 5. Apply copies the output onto the canvas.
    shown = pixels(page, "#output")
    page.click("#apply")
    applied = pixels(page, "#sketch")
    assert mean_abs_diff(applied, shown) < 3.0

    # 6. Upload puts an image on the canvas (letterboxed on white when its shape differs).
    upload = tmp_path / "square.png"
    Image.new("RGB", (40, 40), (0, 160, 0)).save(upload)
    page.set_input_files("#upload", str(upload))
    page.wait_for_function("""() => {
        const c = document.getElementById('sketch');
        const d = c.getContext('2d').getImageData(c.width / 2, c.height / 2, 1, 1).data;
        return d[0] === 0 && d[1] === 160 && d[2] === 0;
    }""", timeout=10_000)

    # 7. Record: the final frames from Record to Stop as a WebM video, their parameters in a JSON log beside it.
    downloads = []
    page.on("download", lambda d: downloads.append(d))
    before = frame_seq(page)
    page.click("#record")
    assert page.get_attribute("#record", "aria-pressed") == "true"
    page.click("#prompt")
    page.keyboard.press("End")
    page.keyboard.type(" at night", delay=15)
    wait_settled_frame(page, before, "img2img")
    assert page.inner_text("#record").startswith("Stop · ")
    page.click("#record")
    page.wait_for_function("() => document.getElementById('record').getAttribute('aria-pressed') === 'false'"
                           " && !document.getElementById('record').disabled", timeout=FRAME_TIMEOUT_MS)
    deadline = time.monotonic() + 30
    while len(downloads) < 2 and time.monotonic() < deadline:
        page.wait_for_timeout(100)
    by_name = {d.suggested_filename.rsplit(".", 1)[-1]: d for d in downloads}
    assert set(by_name) == {"webm", "json"}, [d.suggested_filename for d in downloads]
    assert Path(by_name["webm"].path()).stat().st_size > 0
    log = json.loads(Path(by_name["json"].path()).read_text())
    assert log["video"] == by_name["webm"].suggested_filename
    assert log["frames"] and log["frames"][-1]["params"]["prompt"] == "a lighthouse on a cliff at dusk at night"
    assert page.is_hidden("#banner-error"), page.inner_text("#banner-error")

    page.set_viewport_size({"width": 390, "height": 844})
    page.screenshot(path=str(ARTIFACTS / "studio_page_phone.png"), full_page=True)
    # Phone width: one column, nothing wider than the screen.
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    assert page.problems == []


def test_the_camera_feeds_sketch_mode_until_turned_off(page):
    set_slider(page, "#ctl-width")
    set_slider(page, "#ctl-height")
    set_slider(page, "#ctl-num_inference_steps", "1")
    page.click("#prompt")
    page.keyboard.type("a street", delay=10)
    page.click("#camera")  # in text mode: switches to sketch mode first
    page.wait_for_selector("#camera[aria-pressed=true]", timeout=FRAME_TIMEOUT_MS)
    assert page.get_attribute("body", "data-mode") == "img2img"
    first = wait_settled_frame(page, frame_seq(page), "img2img")
    second = wait_settled_frame(page, first, "img2img")  # the next camera frame followed by itself
    assert second > first
    page.click("#camera")
    page.wait_for_selector("#camera[aria-pressed=false]")
    page.click("label.mode-option:has(input[value=txt2img])")
    assert page.get_attribute("#camera", "aria-pressed") == "false"
    assert page.is_hidden("#banner-error"), page.inner_text("#banner-error")
    assert page.problems == []


def test_an_invalid_value_shows_the_error_banner_naming_the_field(page):
    page.fill("#ctl-seed", "99999999999")  # above the schema's maximum: the server says so, the page does not clamp
    page.wait_for_function("""() => {
        const banner = document.getElementById('banner-error');
        return !banner.hidden && banner.textContent.includes('seed');
    }""", timeout=FRAME_TIMEOUT_MS)
    assert page.get_attribute(".control[data-field=seed]", "data-invalid") == "true"
    assert page.input_value("#ctl-seed") == "99999999999"
    assert page.problems == []


def test_every_control_has_an_accessible_name(page):
    unnamed = page.evaluate("""() => Array.from(document.querySelectorAll('input, textarea, select, button, canvas'))
        .filter((el) => {
            if (el.getAttribute('aria-label')) return false;
            if (el.tagName === 'BUTTON') return el.textContent.trim() === '';
            if (el.tagName === 'CANVAS') return true;
            return !(el.labels && el.labels.length);
        })
        .map((el) => el.id || el.outerHTML.slice(0, 80))""")
    assert unnamed == []
    assert page.problems == []
