"""Lines mode ("control": the canvas is a ControlNet's control image) in the studio page, in real Chromium.

The Controls module alone (no server) with a ControlNet's schema, then the page against `lcm-live serve --fake-engine`
with a fake ControlNet (its control frames are the prompt's flat colour blended with the control image, so a stroke
shows in the picture) and without one (no lines mode, no control settings).
"""

from __future__ import annotations

import json

import pytest

from .chromium import (
    CHROMIUM,
    FRAME_TIMEOUT_MS,
    NO_CHROMIUM,
    frame_seq,
    js_module_page,
    mean_abs_diff,
    pixels,
    serving,
    set_slider,
    wait_settled_frame,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

if not CHROMIUM.exists():
    pytest.skip(NO_CHROMIUM, allow_module_level=True)

WITH_CONTROLNET = json.dumps({"controlnet": "fake/scribble", "step_latency_s": 0.05})
LINES_RADIO = "label.mode-option:has(input[value=control])"
SCALE = "#ctl-controlnet_conditioning_scale"
PREPROCESS = "#ctl-control_preprocess"

CONTROL_SCHEMA = {
    "properties": {
        "mode": {"enum": ["txt2img", "img2img", "control"], "type": "string", "default": "txt2img"},
        "strength": {"type": "number", "minimum": 0.05, "maximum": 1, "default": 0.6},
        "controlnet_conditioning_scale": {"type": "number", "minimum": 0, "maximum": 2, "default": 1.0},
        "control_preprocess": {"enum": ["invert", "edges", "none"], "type": "string", "default": "invert"},
    },
}


def test_controls_build_the_control_fields_and_the_canvas_modes_are_named_once(browser):
    with js_module_page(browser) as page:
        got = page.evaluate("""async (schema) => {
            const { Controls } = await import('./controls.js');
            const { CANVAS_MODES, usesCanvas } = await import('./canvas.js');
            const form = document.createElement('form');
            document.body.append(form);
            const c = new Controls(form, schema);
            const names = [];
            c.addEventListener('input', (e) => names.push(e.detail.name));
            const preprocess = document.getElementById('ctl-control_preprocess');
            const scale = document.getElementById('ctl-controlnet_conditioning_scale');
            const out = {
                values: c.values(), preprocessTag: preprocess.tagName,
                options: Array.from(preprocess.options, (o) => [o.value, o.textContent]),
                scale: { min: scale.min, max: scale.max, value: scale.value },
                controlOnly: Array.from(form.querySelectorAll('[data-control-only=true]'), (w) => w.dataset.field),
                img2imgOnly: Array.from(form.querySelectorAll('[data-img2img-only=true]'), (w) => w.dataset.field),
                labels: [preprocess.labels[0].textContent.trim(), scale.labels[0].textContent.trim()],
                canvasModes: [...CANVAS_MODES],
                uses: ['txt2img', 'img2img', 'control'].map(usesCanvas),
            };
            preprocess.value = 'edges';  // a user picks another: an "input" event, and the value is its enum value
            preprocess.dispatchEvent(new Event('change'));
            out.afterChange = c.values().control_preprocess;
            out.names = names;
            form.remove();
            return out;
        }""", CONTROL_SCHEMA)
    assert got["values"] == {"strength": 0.6, "controlnet_conditioning_scale": 1.0, "control_preprocess": "invert"}
    assert got["preprocessTag"] == "SELECT"
    assert got["options"] == [["invert", "Drawing (inverted)"], ["edges", "Photo or camera (its edges)"],
                              ["none", "As it is"]]
    assert got["scale"] == {"min": "0", "max": "2", "value": "1"}
    assert got["controlOnly"] == ["controlnet_conditioning_scale", "control_preprocess"]
    assert got["img2imgOnly"] == ["strength"]
    assert got["labels"] == ["Canvas as", "Control strength"]
    assert sorted(got["canvasModes"]) == ["control", "img2img"]
    assert got["uses"] == [False, True, True]
    assert got["afterChange"] == "edges"
    assert got["names"] == ["control_preprocess"]


def _open(browser, url):
    """A fresh page on the studio, with its console errors recorded in ``page.problems``."""
    context = browser.new_context(viewport={"width": 1360, "height": 900}, accept_downloads=True)
    page = context.new_page()
    page.problems = []
    page.on("pageerror", lambda exc: page.problems.append(f"page error: {exc}"))
    page.on("console", lambda msg: msg.type == "error" and page.problems.append(f"console: {msg.text}"))
    page.goto(url)
    page.wait_for_selector("body[data-connection=open][data-session]", state="attached", timeout=FRAME_TIMEOUT_MS)
    page.wait_for_selector("#ctl-num_inference_steps", state="attached", timeout=FRAME_TIMEOUT_MS)
    return context, page


@pytest.fixture(scope="module")
def control_studio(tmp_path_factory):
    with serving(tmp_path_factory.mktemp("serve"), "--fake-engine", WITH_CONTROLNET) as url:
        yield url


@pytest.fixture
def page(browser, control_studio):
    context, page = _open(browser, control_studio)
    set_slider(page, "#ctl-num_inference_steps", "2")
    yield page
    context.close()


def _opacity(page, field: str) -> str:
    return page.eval_on_selector(f".control[data-field={field}]", "el => getComputedStyle(el).opacity")


def _stroke(page) -> None:
    """One thick black stroke across the canvas with the mouse."""
    set_slider(page, "#brush-size", page.eval_on_selector("#brush-size", "el => el.max"))
    page.click(".swatch[data-color='#000000']")
    box = page.locator("#sketch").bounding_box()
    x0, y0 = box["x"] + box["width"] * 0.15, box["y"] + box["height"] * 0.5
    page.mouse.move(x0, y0)
    page.mouse.down()
    for i in range(1, 25):
        page.mouse.move(x0 + box["width"] * 0.028 * i, y0 + box["height"] * 0.01 * i)
    page.mouse.up()


def test_lines_mode_draws_from_the_canvas_and_its_settings_make_frames(page):
    assert page.is_visible(LINES_RADIO)
    assert page.inner_text(LINES_RADIO).strip() == "Lines to image"
    assert page.is_visible(SCALE) and page.is_visible(PREPROCESS)
    # Line ControlNets take white lines on black: the page's black on white is inverted by default.
    assert page.input_value(PREPROCESS) == "invert"
    # Text to image: the control settings are dimmed, the canvas hint shows.
    assert _opacity(page, "controlnet_conditioning_scale") == "0.5" and _opacity(page, "strength") == "0.5"
    assert page.is_visible("#canvas-hint")

    page.click("#prompt")
    page.keyboard.type("a red barn", delay=10)
    page.click(LINES_RADIO)
    assert page.get_attribute("body", "data-mode") == "control"
    assert page.is_checked("input[name=mode][value=control]")
    blank_id = wait_settled_frame(page, 0, "control")
    blank = pixels(page, "#output")
    # Lines mode: its settings are the bright ones, sketch mode's strength is dimmed, the canvas is in use.
    assert _opacity(page, "controlnet_conditioning_scale") == "1" and _opacity(page, "control_preprocess") == "1"
    assert _opacity(page, "strength") == "0.5"
    assert page.is_hidden("#canvas-hint")

    _stroke(page)
    stroked_id = wait_settled_frame(page, blank_id, "control")
    stroked = pixels(page, "#output")
    assert mean_abs_diff(blank, stroked) > 1.0, "drawing on the canvas did not change the control frame"

    set_slider(page, SCALE, "0")  # the drawing no longer guides the picture: another frame, without it
    unguided_id = wait_settled_frame(page, stroked_id, "control")
    unguided = pixels(page, "#output")
    assert mean_abs_diff(stroked, unguided) > 1.0, "a control strength of 0 gave the same picture"

    set_slider(page, SCALE, "1")
    page.select_option(PREPROCESS, "none")  # the choice sends too: the drawing as drawn, dark lines on white
    plain_id = wait_settled_frame(page, unguided_id, "control")
    assert plain_id > unguided_id and page.input_value(PREPROCESS) == "none"
    assert mean_abs_diff(stroked, pixels(page, "#output")) > 1.0, "un-inverting gave the same picture"
    assert page.is_hidden("#banner-error"), page.inner_text("#banner-error")
    assert page.problems == []


def test_save_apply_and_upload_keep_lines_mode(page, tmp_path):
    page.click(LINES_RADIO)
    _stroke(page)
    shown_id = wait_settled_frame(page, 0, "control")

    # Save re-renders the frame through POST /api/generate: lines mode needs the canvas sent along.
    with page.expect_download(timeout=FRAME_TIMEOUT_MS) as download:
        page.click("#save")
    from PIL import Image

    with Image.open(download.value.path()) as png:
        params = json.loads(dict(png.text)["parameters"])
    assert params["mode"] == "control"
    assert page.is_hidden("#banner-error"), page.inner_text("#banner-error")

    # Apply and an upload put a picture on the canvas: lines mode stays lines mode.
    page.click("#apply")
    assert page.get_attribute("body", "data-mode") == "control"
    upload = tmp_path / "lines.png"
    Image.new("RGB", (40, 40), (0, 160, 0)).save(upload)
    page.set_input_files("#upload", str(upload))
    page.wait_for_function("""() => {
        const c = document.getElementById('sketch');
        const d = c.getContext('2d').getImageData(c.width / 2, c.height / 2, 1, 1).data;
        return d[0] === 0 && d[1] === 160 && d[2] === 0;
    }""", timeout=10_000)
    assert page.get_attribute("body", "data-mode") == "control"
    wait_settled_frame(page, shown_id, "control")

    # From text to image, Apply still switches to sketch mode.
    before = frame_seq(page)
    page.click("label.mode-option:has(input[value=txt2img])")
    text_id = wait_settled_frame(page, before, "txt2img")
    page.click("#apply")
    assert page.get_attribute("body", "data-mode") == "img2img"
    wait_settled_frame(page, text_id, "img2img")
    assert page.is_hidden("#banner-error"), page.inner_text("#banner-error")
    assert page.problems == []


@pytest.fixture(scope="module")
def plain_studio(tmp_path_factory):
    with serving(tmp_path_factory.mktemp("serve"), "--fake-engine", "{}") as url:
        yield url


def test_the_camera_in_lines_mode_sends_its_edges(page):
    """A camera frame is a photo: starting the camera in lines mode turns "Canvas as" from the drawing's inversion
    to its edges, and its frames make control frames."""
    page.click(LINES_RADIO)
    first = wait_settled_frame(page, frame_seq(page), "control")
    page.click("#camera")
    page.wait_for_selector("#camera[aria-pressed=true]", timeout=FRAME_TIMEOUT_MS)
    assert page.input_value(PREPROCESS) == "edges"
    assert page.get_attribute("body", "data-mode") == "control"  # lines mode stays
    wait_settled_frame(page, first, "control")
    page.click("#camera")
    page.wait_for_selector("#camera[aria-pressed=false]")
    assert page.problems == []


def test_without_a_controlnet_there_is_no_lines_mode(browser, plain_studio):
    context, page = _open(browser, plain_studio)
    try:
        assert page.is_visible("label.mode-option:has(input[value=img2img])")
        assert page.is_hidden(LINES_RADIO)
        assert page.locator(SCALE).count() == 0 and page.locator(PREPROCESS).count() == 0
        assert page.locator(".control[data-control-only]").count() == 0
        page.click("label.mode-option:has(input[value=img2img])")
        wait_settled_frame(page, 0, "img2img")
        assert page.problems == []
    finally:
        context.close()
