"""Region prompts and blends in the studio page (issue 14), in real Chromium.

What is sent for a list of regions (planRegions) and the blend fields read from a schema, alone; then the page
against `lcm-live serve --fake-engine`, whose frames paint each region's own flat colour where its mask is white
and echo the params they were made with: a painted region with a prompt reaches the server (its layer before the
params that name it), one without a prompt is not sent (and the palette says so), removing a region renumbers the
others, and the blend sliders reach the params.
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import pytest

from .chromium import (
    CHROMIUM,
    FRAME_TIMEOUT_MS,
    NO_CHROMIUM,
    block_columns,
    drag,
    js_module_page,
    logged_studio_page,
    mean_abs_diff,
    pixels,
    serving,
    set_slider,
    wait_settled_frame,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

if not CHROMIUM.exists():
    pytest.skip(NO_CHROMIUM, allow_module_level=True)

ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"
FAKE = json.dumps({"step_latency_s": 0.02})
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LEFT, RIGHT = range(0, 5), range(11, 16)


# ---------------------------------------------------------------- modules alone


def test_plan_regions_sends_those_with_a_prompt_and_paint_and_says_why_not_the_others(browser):
    with js_module_page(browser) as page:
        got = page.evaluate("""async () => {
            const { planRegions } = await import('./regions.js');
            const one = planRegions([
                { prompt: 'a barn', painted: true },
                { prompt: '   ', painted: true },
                { prompt: 'a moon', painted: false },
                { prompt: '', painted: false },
                { prompt: 'a tree', painted: true },
            ]);
            const many = planRegions([
                { prompt: '', painted: true }, { prompt: '', painted: true }, { prompt: 'x', painted: false },
                { prompt: 'y', painted: false }, { prompt: '', painted: false }, { prompt: '', painted: false },
            ]);
            return { one, many, none: planRegions([]) };
        }""")
    assert got["one"]["sent"] == [0, 4]  # numbered 0 and 1 on the wire: the list order, the others left out
    assert got["one"]["notes"] == ["Region 2 has no prompt: it is not sent.",
                                   "Region 3 is not painted yet: it is not sent.",
                                   "Region 4: give it a prompt and paint it."]
    assert got["many"] == {"sent": [], "notes": [
        "Regions 1, 2 have no prompt: they are not sent.", "Regions 3, 4 are not painted yet: they are not sent.",
        "Regions 5, 6: give each a prompt and paint it."]}
    assert got["none"] == {"sent": [], "notes": []}


def test_blend_fields_are_read_from_a_pydantic_schema(browser):
    schema = {
        "properties": {
            "prompt_blend": {"anyOf": [{"$ref": "#/$defs/PromptBlendParams"}, {"type": "null"}], "default": None},
            "seed_blend": {"anyOf": [{"$ref": "#/$defs/SeedBlendParams"}, {"type": "null"}], "default": None},
        },
        "$defs": {
            "PromptBlendParams": {"type": "object", "properties": {
                "prompt": {"type": "string", "maxLength": 30},
                "weight": {"type": "number", "minimum": 0, "maximum": 1, "default": 0.5}}},
            "SeedBlendParams": {"type": "object", "properties": {
                "seed": {"type": "integer", "minimum": 0, "maximum": 99},
                "weight": {"type": "number", "minimum": 0, "maximum": 1, "default": 0.5}}},
        },
    }
    with js_module_page(browser) as page:
        got = page.evaluate("""async (schema) => {
            const { blendProperties } = await import('./blends.js');
            return { prompt: blendProperties(schema, 'prompt_blend'), seed: blendProperties(schema, 'seed_blend'),
                     none: blendProperties(schema, 'regions') };
        }""", schema)
    assert got["prompt"]["prompt"]["maxLength"] == 30 and got["prompt"]["weight"]["maximum"] == 1
    assert got["seed"]["seed"]["maximum"] == 99
    assert got["none"] is None


# ---------------------------------------------------------------- the page against a server


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    with serving(tmp_path_factory.mktemp("serve"), "--fake-engine", FAKE) as url:
        yield url


@pytest.fixture
def page(browser, studio):
    with logged_studio_page(browser, studio) as page:
        yield page


def _wait(page, predicate, what: str, timeout_s: float = 30.0):
    deadline = time.monotonic() + timeout_s
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        page.wait_for_timeout(50)
    return value


def _paint_right(page) -> None:
    set_slider(page, "#brush-size", page.eval_on_selector("#brush-size", "el => el.max"))
    for k in range(11):
        y = 0.02 + 0.096 * k
        drag(page, "#sketch", [(0.75, y), (1.0, y)])
    page.ws.wait_layer(b"r", 0, (0.9, 0.98))  # the last stroke's


def _frame_with(page, predicate, what: str) -> dict:
    """Wait until the newest final frame's params satisfy ``predicate``, it is on screen and nothing is left
    generating; returns its JSON."""
    def ok():
        frames = page.ws.frames()
        if not frames or not predicate(frames[-1]["params"]):
            return None
        shown = page.evaluate("""(id) => {
            const img = document.getElementById('output');
            return img.dataset.frameId === String(id) && img.dataset.final === 'true' && img.complete
                && document.body.dataset.busy === 'false';
        }""", frames[-1]["id"])
        return frames[-1] if shown else None
    return _wait(page, ok, what, 60)


def test_a_painted_region_with_a_prompt_reaches_the_server_and_removing_renumbers(page):
    page.click("#prompt")
    page.keyboard.type("a green field", delay=5)
    wait_settled_frame(page, 0, "txt2img")
    plain = pixels(page, "#output")

    page.click("#region-add")  # region 1, picked for painting
    assert page.get_attribute(".region-swatch", "aria-pressed") == "true"
    assert page.get_attribute("#layer-sketch", "aria-pressed") == "false"
    page.fill("#region-prompt-1", "a red barn")
    assert "Region 1 is not painted yet" in page.inner_text("#region-status")
    _paint_right(page)
    _frame_with(page, lambda p: p["regions"] == [{"prompt": "a red barn"}], "region 1")
    assert page.inner_text("#region-status").startswith("1 region sent.")

    # Its layer went before the params that name it: the server never had to wait for it.
    sent = page.ws.sent
    layer_at = next(i for i, m in enumerate(sent) if isinstance(m, bytes) and m[:8] == b"LCMLr\0\0\0" and m[8:])
    params_at = next(i for i, m in enumerate(sent) if isinstance(m, str) and '"a red barn"' in m)
    assert layer_at < params_at
    from PIL import Image

    assert sent[layer_at][8:].startswith(PNG_MAGIC)
    with Image.open(io.BytesIO(page.ws.layers_sent(b"r", 0)[-1])) as png:  # the stroke's end
        assert png.size == (256, 256)
        grey = png.convert("L")
        assert grey.getpixel((250, 128)) == 255 and grey.getpixel((10, 128)) == 0
    # The FakeEngine paints the region's own colour where it is white: the right changes, the left does not.
    painted = pixels(page, "#output")
    assert mean_abs_diff(block_columns(plain, RIGHT), block_columns(painted, RIGHT)) > 10
    assert mean_abs_diff(block_columns(plain, LEFT), block_columns(painted, LEFT)) < 1.5

    # Region 2 without a prompt, painted on the left: not sent, and said.
    page.click("#region-add")
    drag(page, "#sketch", [(0.05, 0.5), (0.3, 0.5)])
    page.wait_for_function("() => document.getElementById('region-status').textContent.includes("
                           "'Region 2 has no prompt: it is not sent.')")
    time.sleep(0.3)
    assert all(p["regions"] == [{"prompt": "a red barn"}] for p in page.ws.params_sent() if p.get("regions"))
    assert page.ws.layers_sent(b"r", 1) == []

    # Remove region 1: region 2 becomes region 1 (renumbered), nothing is sent for it (no prompt), the server's
    # region 0 is cleared and the params name no region.
    page.click("[aria-label='Remove region 1']")
    assert page.eval_on_selector_all(".region-prompt", "els => els.map((e) => e.id)") == ["region-prompt-1"]
    assert page.inner_text("label[for=region-prompt-1]") == "Region 1 prompt"
    assert page.get_attribute(".region-remove", "aria-label") == "Remove region 1"
    _wait(page, lambda: page.ws.layers_sent(b"r", 0)[-1] == b"", "region 0 cleared")
    _frame_with(page, lambda p: p["regions"] == [], "no regions")

    # Give it a prompt: it is sent as region 0 with its own (left) mask.
    page.fill("#region-prompt-1", "a blue pond")
    _frame_with(page, lambda p: p["regions"] == [{"prompt": "a blue pond"}], "the pond")
    with Image.open(io.BytesIO(page.ws.layers_sent(b"r", 0)[-1])) as png:
        grey = png.convert("L")
        assert grey.getpixel((40, 128)) == 255 and grey.getpixel((250, 128)) == 0
    pond = pixels(page, "#output")
    assert mean_abs_diff(block_columns(plain, RIGHT), block_columns(pond, RIGHT)) < 1.5

    # Save re-renders the frame through POST /api/generate, the regions' masks inline.
    with page.expect_download(timeout=FRAME_TIMEOUT_MS) as download:
        page.click("#save")
    with Image.open(download.value.path()) as png:
        saved = json.loads(dict(png.text)["parameters"])
        saved_pixels = png.convert("RGB").getpixel((20, 128)), png.convert("RGB").getpixel((240, 128))
    assert saved["regions"] == [{"prompt": "a blue pond"}]
    assert saved_pixels[0] != saved_pixels[1]  # the pond's colour on the left, the field's on the right
    assert page.is_hidden("#banner-error"), page.inner_text("#banner-error")

    # At most 8 regions.
    for _ in range(7):
        page.click("#region-add")
    assert page.is_disabled("#region-add") and page.locator(".region").count() == 8
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "studio_regions.png"), full_page=True)
    assert page.is_hidden("#banner-error"), page.inner_text("#banner-error")
    assert page.problems == []


def test_blend_sliders_reach_the_params(page):
    page.click("#prompt")
    page.keyboard.type("a cat", delay=5)
    frame = _frame_with(page, lambda p: p["prompt"] == "a cat", "the first frame")
    assert frame["params"]["prompt_blend"] is None and frame["params"]["seed_blend"] is None  # off by default

    page.click("#blends summary")
    page.fill("#prompt-blend-text", "a dog")  # typing a second prompt turns its blend on
    assert page.is_checked("#prompt-blend-on")
    set_slider(page, "#prompt-blend-weight", "0.25")
    assert page.inner_text("#prompt-blend-weight-value") == "0.25"
    frame = _frame_with(page, lambda p: p["prompt_blend"] == {"prompt": "a dog", "weight": 0.25},
                               "the prompt blend")

    page.fill("#seed-blend-seed", "7")
    set_slider(page, "#seed-blend-weight", "0.75")  # moving the weight turns the seed blend on
    assert page.is_checked("#seed-blend-on")
    frame = _frame_with(page, lambda p: p["seed_blend"] == {"seed": 7, "weight": 0.75},
                               "the seed blend")
    assert frame["params"]["prompt_blend"] == {"prompt": "a dog", "weight": 0.25}

    page.uncheck("#prompt-blend-on")  # off again: null
    frame = _frame_with(page, lambda p: p["prompt_blend"] is None, "no prompt blend")
    assert frame["params"]["seed_blend"] == {"seed": 7, "weight": 0.75}
    # The bounds are the server's (its schema): weight 0..1.
    assert page.get_attribute("#seed-blend-weight", "max") == "1"
    assert page.is_hidden("#banner-error"), page.inner_text("#banner-error")
    assert page.problems == []


def test_the_region_palette_works_from_the_keyboard(page):
    page.focus("#region-add")
    page.keyboard.press("Enter")  # a region, picked for painting, its prompt focused
    assert page.evaluate("document.activeElement.id") == "region-prompt-1"
    assert page.get_attribute("[aria-label='Paint region 1']", "aria-pressed") == "true"
    page.keyboard.type("a tower")
    page.keyboard.press("Tab")  # to its Remove button
    assert page.evaluate("document.activeElement.getAttribute('aria-label')") == "Remove region 1"
    page.keyboard.press("Shift+Tab")
    page.keyboard.press("Shift+Tab")  # to its colour: Space toggles painting it
    assert page.evaluate("document.activeElement.getAttribute('aria-label')") == "Paint region 1"
    page.keyboard.press("Space")
    assert page.get_attribute("[aria-label='Paint region 1']", "aria-pressed") == "false"
    assert page.get_attribute("#layer-sketch", "aria-pressed") == "true"  # strokes go to the drawing again
    page.focus("#region-add")
    page.keyboard.press("Enter")
    page.keyboard.press("Tab")
    page.keyboard.press("Enter")  # remove region 2: the focus stays in the palette, on region 1's prompt
    assert page.locator(".region").count() == 1
    assert page.evaluate("document.activeElement.id") == "region-prompt-1"
    assert page.input_value("#region-prompt-1") == "a tower"
    assert page.problems == []
