"""The frame history strip of the studio page (issue 16), in real Chromium.

The store alone (bounded count and memory, pinned frames kept apart, which canvas and layers a frame was made
from), the strip's cost per frame (a figure, printed and written to artifacts/, never asserted), then the page
against `lcm-live serve --fake-engine` (flat-colour frames, a pure function of prompt, seed and size): scrub with the
keys and the slider, Restore a frame's parameters and canvas, and a pinned frame across a reload.
"""

from __future__ import annotations

import io
import json
import re
import time
from pathlib import Path

import pytest

from .chromium import (
    CHROMIUM,
    NO_CHROMIUM,
    WEB,
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
HISTORY_HTML = re.search(r'<section class="panel history-panel".*?</section>',
                         (WEB / "index.html").read_text(encoding="utf-8"), re.S).group(0)


# ---------------------------------------------------------------- the store alone


def test_the_store_is_bounded_keeps_pins_and_counts_a_shared_blob_once(browser):
    with js_module_page(browser) as page:
        got = page.evaluate("""async () => {
            const { FrameHistory, SentInputs } = await import('./history.js');
            const blob = (n) => new Blob([new Uint8Array(n)]);
            const canvas = blob(1000);  // one canvas behind every frame: counted once
            const h = new FrameHistory({ limit: 3, memoryCap: 10000 });
            const dropped = [];
            h.addEventListener('change', (e) => dropped.push(...e.detail.dropped.map((d) => d.info.seed)));
            const info = (seed, mode = 'img2img') => ({ seed, width: 8, height: 8, params: { mode, regions: [] } });
            const first = h.add(info(1), blob(100), { canvas, layers: new Map([['mask', blob(10)]]) });
            await h.setPinned(first, true);
            for (let seed = 2; seed <= 6; seed++) h.add(info(seed), blob(100), { canvas, layers: new Map() });
            const out = { seeds: h.entries.map((e) => e.info.seed), dropped: [...dropped], usage: h.usage() };
            h.add(info(7), blob(9000), { canvas });  // over the memory cap: the oldest unpinned ones go
            out.afterBig = h.entries.map((e) => e.info.seed);
            out.bytesAfterBig = h.bytes;
            const text = h.add(info(8, 'txt2img'), blob(5), { canvas, layers: new Map([['mask', blob(10)]]) });
            out.textKeeps = [text.canvas, text.layers.size];  // text to image used neither
            // Unpinned, a frame is back under the bounds: the oldest may go at once.
            const h2 = new FrameHistory({ limit: 2 });
            const a = h2.add(info(1), blob(1));
            await h2.setPinned(a, true);
            h2.add(info(2), blob(1));
            h2.add(info(3), blob(1));
            out.pinnedToo = h2.entries.map((e) => e.info.seed);
            await h2.setPinned(a, false);
            out.afterUnpin = h2.entries.map((e) => e.info.seed);

            // Which canvas and layers a frame was made from: the sends up to its `input` count.
            const s = new SentInputs(3);
            const c1 = blob(1), c2 = blob(2), m1 = blob(3);
            s.add(1, 'canvas', c1);
            s.add(2, 'params', {});
            s.add(3, 'layer', { key: 'mask', image: m1 });
            s.add(4, 'canvas', c2);  // the log holds 3: c1 is folded into the base
            s.add(5, 'layer', { key: 'mask', image: null });
            const at = (n) => { const st = s.stateAt(n); return [st.canvas && st.canvas.size, st.layers.has('mask')]; };
            out.inputs = [at(2), at(3), at(4), at(null)];
            s.add(1, 'canvas', c2);  // a new connection counts from 1 again
            out.reconnected = at(null);
            return out;
        }""")
    assert got["seeds"] == [1, 4, 5, 6] and got["dropped"] == [2, 3]  # the pinned one stays, 3 others
    assert got["usage"]["bytes"] == 1000 + 10 + 4 * 100 and got["usage"]["pinned"] == 1
    # Over the memory cap: every older unpinned frame goes, never the newest (even alone over the cap).
    assert got["afterBig"] == [1, 7] and got["bytesAfterBig"] == 1000 + 10 + 100 + 9000
    assert got["textKeeps"] == [None, 0]
    assert got["pinnedToo"] == [1, 2, 3] and got["afterUnpin"] == [2, 3]
    assert got["inputs"] == [[1, False], [1, True], [2, True], [2, False]]
    assert got["reconnected"] == [2, False]


def test_cost_per_frame_of_the_strip(browser):
    """Not an assertion: the main-thread cost of keeping a frame (the entry, its button, its thumbnail's <img>),
    over 300 frames of 512x512 JPEGs, 200 past the 100-frame bound (docs/benchmarks.md, "Studio page")."""
    with js_module_page(browser) as page:
        page.set_content(f"<!doctype html><body>{HISTORY_HTML}</body>")
        page.add_script_tag(content="window.__ready = true")
        got = page.evaluate("""async ({ n }) => {
            const base = location.href;  // the static server of web/js/
            const { setupHistory } = await import(base.replace(/[^/]*$/, '') + 'historybar.js');
            const conn = new EventTarget();
            conn.sentCount = 0;
            const bar = setupHistory({ conn, onRestore() {}, onApply() {}, onSave() {}, onError() {} });
            const c = document.createElement('canvas');
            c.width = 512; c.height = 512;
            const ctx = c.getContext('2d');
            const jpegs = [];
            for (let i = 0; i < 8; i++) {  // varied pictures, the sizes of real frames
                for (let k = 0; k < 400; k++) {
                    ctx.fillStyle = `hsl(${(k * 37 + i * 90) % 360} 70% ${30 + (k % 40)}%)`;
                    ctx.fillRect((k * 53) % 512, (k * 97 + i * 11) % 512, 24 + k % 60, 24 + (k * 7) % 60);
                }
                jpegs.push(await new Promise((r) => c.toBlob(r, 'image/jpeg', 0.85)));
            }
            const times = [];
            for (let i = 0; i < n; i++) {
                const info = { id: i, seed: i, width: 512, height: 512, final: true, input: 0,
                               params: { mode: 'txt2img', prompt: `frame ${i}`, num_inference_steps: 4 } };
                const frame = jpegs[i % jpegs.length].slice();  // a blob of its own, as each frame is
                const t0 = performance.now();
                bar.frame(info, frame);
                times.push(performance.now() - t0);
                await new Promise((r) => setTimeout(r, 0));
            }
            // The thumbnails come from the worker: the newest ones show their frames.
            const deadline = performance.now() + 30000;
            while (bar.thumbs.pending.size && performance.now() < deadline) await new Promise((r) => setTimeout(r, 20));
            const last = [...document.querySelectorAll('.history-thumb canvas')].at(-1);
            const probe = document.createElement('canvas');
            probe.width = last.width; probe.height = last.height;
            probe.getContext('2d').drawImage(last, 0, 0);
            const px = probe.getContext('2d').getImageData(0, 0, probe.width, probe.height).data;
            let opaque = 0;
            for (let i = 3; i < px.length; i += 4) opaque += px[i] === 255;
            times.sort((a, b) => a - b);
            return { n, median: times[Math.floor(n / 2)], p95: times[Math.floor(n * 0.95)],
                     mean: times.reduce((a, b) => a + b, 0) / n, thumbs: bar.thumbs.made,
                     thumbMs: bar.thumbs.ms / bar.thumbs.made, drawn: opaque / (px.length / 4),
                     bytes: bar.history.bytes, keptBytes: bar.history.entries.reduce((a, e) => a + e.frame.size, 0),
                     kept: bar.history.entries.length, buttons: document.querySelectorAll('.history-thumb').length,
                     jpegKB: jpegs.reduce((a, b) => a + b.size, 0) / jpegs.length / 1024,
                     usage: document.getElementById('history-usage').textContent };
        }""", {"n": 300})
    load = Path("/proc/loadavg").read_text().split()[:3]
    figure = {**got, "loadavg": load, "machine": "see docs/benchmarks.md", "when": time.strftime("%H:%M UTC", time.gmtime())}
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "page_history_cost.json").write_text(json.dumps(figure, indent=2))
    print(f"\nhistory strip per frame: median {got['median']:.3f} ms, p95 {got['p95']:.3f} ms, mean {got['mean']:.3f} "
          f"ms; showing a thumbnail {got['thumbMs']:.3f} ms ({got['thumbs']} made in the worker); load {load}")
    assert got["kept"] == 100 and got["buttons"] == 100  # the bound held while measuring
    assert got["thumbs"] >= 100 and got["drawn"] == 1.0  # the newest thumbnail shows its (opaque) frame
    assert got["usage"].startswith("100 frames · ") and "of 64 MB" in got["usage"]
    assert got["bytes"] == got["keptBytes"]  # each frame's own blob, counted once


# ---------------------------------------------------------------- the page against a server


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    with serving(tmp_path_factory.mktemp("serve"), "--fake-engine", "{}") as url:
        yield url


@pytest.fixture
def page(browser, studio):
    with logged_studio_page(browser, studio) as page:
        yield page


def _type_prompt(page, text: str) -> int:
    before = page.locator(".history-thumb").count()
    page.fill("#prompt", text)
    page.wait_for_function("(n) => document.querySelectorAll('.history-thumb').length > n", arg=before,
                           timeout=60_000)
    return wait_settled_frame(page, 0, page.get_attribute("body", "data-mode"))


def _viewed_prompt(page) -> str:
    return page.inner_text("#history-params").split('"')[1]


def test_scrub_with_keys_and_slider_then_restore_and_save(page):
    _wait_frames_settle(page)  # the frames of the smallest size (logged_studio_page) are in the strip
    before = page.locator(".history-thumb").count()
    for prompt in ("a red fox", "a blue bird", "a green frog"):
        _type_prompt(page, prompt)
    assert page.locator(".history-thumb").count() == before + 3
    assert page.inner_text("#history-usage").startswith(f"{before + 3} frames · ")
    # The thumbnails are made in a worker, which the page's Content-Security-Policy lets run ('self').
    assert page.evaluate("""() => performance.getEntriesByType('resource')
        .some((e) => e.name.endsWith('/static/js/thumbworker.js'))""")
    page.wait_for_function("""() => {
        const c = [...document.querySelectorAll('.history-thumb canvas')].at(-1);
        const probe = document.createElement('canvas');
        probe.width = c.width; probe.height = c.height;
        const ctx = probe.getContext('2d');
        ctx.drawImage(c, 0, 0);
        return ctx.getImageData(c.width >> 1, c.height >> 1, 1, 1).data[3] === 255;
    }""", timeout=10_000)
    assert page.is_hidden("#history-view")

    # The keys: from live, Left is the newest, then older; Home the oldest; Escape back to live.
    page.focus("#history-strip")
    page.keyboard.press("ArrowLeft")
    assert page.is_visible("#history-view") and _viewed_prompt(page) == "a green frog"
    page.keyboard.press("ArrowLeft")
    assert _viewed_prompt(page) == "a blue bird"
    assert page.input_value("#history-scrub") == str(before + 1)
    page.keyboard.press("ArrowLeft")
    assert _viewed_prompt(page) == "a red fox"
    red = page.get_attribute("#history-image", "data-id")
    page.keyboard.press("Home")
    assert page.input_value("#history-scrub") == "0"
    page.keyboard.press("Escape")
    assert page.is_hidden("#history-view")

    # The slider; a click on a thumbnail.
    page.eval_on_selector("#history-scrub", "(el, v) => { el.value = v; el.dispatchEvent(new Event('input')); }",
                          str(before + 1))
    assert _viewed_prompt(page) == "a blue bird"
    page.click(f'.history-thumb[data-id="{red}"]')
    assert _viewed_prompt(page) == "a red fox"
    assert page.get_attribute(f'.history-thumb[data-id="{red}"]', "aria-selected") == "true"
    page.wait_for_function("() => document.getElementById('history-image').naturalWidth > 0")
    kept = pixels(page, "#history-image")

    # Restore: the prompt, the seed (locked) and the settings come back, and the server makes the same picture.
    page.fill("#ctl-seed", "777")
    page.click("#history-restore")
    page.wait_for_function("() => document.getElementById('prompt').value === 'a red fox'")
    assert page.is_checked("#ctl-seed-lock")
    page.wait_for_function("""() => {
        const img = document.getElementById('output');
        return img.alt === 'Generated image: a red fox' && img.dataset.final === 'true' && img.complete
            && document.body.dataset.busy === 'false';
    }""", timeout=60_000)
    frame = page.ws.frames()[-1]
    assert frame["params"]["prompt"] == "a red fox" and frame["seed"] != 777
    assert mean_abs_diff(pixels(page, "#output"), kept) < 3  # the same flat colour (JPEG both times)

    # Save: the kept frame's params and seed go to POST /api/generate; the PNG comes down.
    with page.expect_download() as download:
        page.click("#history-save")
    assert download.value.suggested_filename == f"lcm-live-{frame['seed']}.png"
    assert page.problems == []


def test_restore_puts_back_the_canvas_and_apply_copies_the_frame(page):
    page.click("label.mode-option:has(input[value=img2img])")
    page.fill("#prompt", "a sketch")
    wait_settled_frame(page, 0, "img2img")
    drag(page, "#sketch", [(0.1, 0.5), (0.9, 0.5)])  # a black line across
    _wait_frames_settle(page)
    drawn = pixels(page, "#sketch")
    newest = page.locator(".history-thumb").last.get_attribute("data-id")

    page.click("#clear")
    _wait_frames_settle(page)
    assert mean_abs_diff(pixels(page, "#sketch"), drawn) > 1  # the line is gone
    page.click(f'.history-thumb[data-id="{newest}"]')
    page.click("#history-restore")
    _wait_frames_settle(page)
    assert mean_abs_diff(pixels(page, "#sketch"), drawn) < 2  # the line is back (the canvas as it was sent)

    page.click("#history-apply")  # the frame's own picture onto the canvas
    _wait_frames_settle(page)
    assert mean_abs_diff(pixels(page, "#sketch"), pixels(page, "#history-image")) < 4
    assert page.problems == []


def _wait_frames_settle(page) -> None:
    """Until the page shows a final frame and nothing is in flight or held (a canvas change sends one)."""
    page.wait_for_timeout(300)
    page.wait_for_function("""() => {
        const img = document.getElementById('output');
        return document.body.dataset.busy === 'false' && img.dataset.final === 'true' && img.complete;
    }""", timeout=60_000)


def test_a_pinned_frame_survives_a_reload_and_unpinning_lets_it_go(page):
    _type_prompt(page, "a pinned moon")
    _type_prompt(page, "an unpinned sun")
    moon = page.locator(".history-thumb").nth(-2)
    moon_id = moon.get_attribute("data-id")
    moon.click()
    page.click("#history-pin")
    page.wait_for_selector(f'.history-thumb[data-id="{moon_id}"][data-pinned="true"]')
    assert page.get_attribute("#history-pin", "aria-pressed") == "true"

    page.reload()
    page.wait_for_selector("body[data-connection=open][data-session]", state="attached", timeout=60_000)
    page.wait_for_selector(f'.history-thumb[data-id="{moon_id}"]', timeout=10_000)
    pinned = page.eval_on_selector_all(".history-thumb[data-pinned=true]", "els => els.map((e) => e.dataset.id)")
    assert pinned == [moon_id]  # the sun was not pinned: gone with the page
    assert "(1 pinned)" in page.inner_text("#history-usage")
    page.click(f'.history-thumb[data-id="{moon_id}"]')
    assert _viewed_prompt(page) == "a pinned moon"
    page.wait_for_function("() => document.getElementById('history-image').naturalWidth > 0")
    page.click("#history-pin")  # unpin: gone after the next reload
    page.wait_for_selector("#history-pin[aria-pressed=false]")
    page.reload()
    page.wait_for_selector("body[data-connection=open][data-session]", state="attached", timeout=60_000)
    page.wait_for_timeout(500)  # the pins are read at load
    assert page.locator(f'.history-thumb[data-id="{moon_id}"]').count() == 0
    assert page.problems == []


def test_keep_and_upscale_pins_the_frame_and_downloads_the_larger_png(page):
    import io

    from PIL import Image

    _type_prompt(page, "a small lighthouse")
    newest = page.locator(".history-thumb").last
    frame_id = newest.get_attribute("data-id")
    newest.click()
    page.select_option("#upscale-scale", "2")
    with page.expect_download(timeout=60_000) as download:
        page.click("#history-upscale")
    with Image.open(io.BytesIO(Path(download.value.path()).read_bytes())) as png:
        size, parameters = png.size, json.loads(png.text["parameters"])
    frame = page.ws.frames()[-1]
    assert size == (2 * frame["width"], 2 * frame["height"])
    assert parameters["prompt"] == "a small lighthouse" and parameters["seed"] == frame["seed"]
    assert download.value.suggested_filename == f"lcm-live-{frame['seed']}-x2.png"
    status = page.inner_text("#upscale-status")
    assert status == f"Upscaled to {size[0]}×{size[1]}: saved."
    assert page.get_attribute(f'.history-thumb[data-id="{frame_id}"]', "data-pinned") == "true"  # kept
    assert page.is_hidden("#banner-error") and page.problems == []


def test_restore_brings_back_a_mask_and_a_region_with_its_prompt(page):
    page.click("label.mode-option:has(input[value=img2img])")
    page.fill("#prompt", "a meadow")
    _wait_frames_settle(page)
    set_slider(page, "#brush-size", page.eval_on_selector("#brush-size", "el => el.max"))
    page.click("#layer-mask")  # the mask over the top
    drag(page, "#sketch", [(0.05, 0.15), (0.95, 0.15)])
    page.ws.wait_layer(b"m", 0, (0.5, 0.15))
    page.click("#region-add")  # a region over the bottom, with its prompt
    page.fill("#region-prompt-1", "a red barn")
    drag(page, "#sketch", [(0.05, 0.85), (0.95, 0.85)])
    page.ws.wait_layer(b"r", 0, (0.5, 0.85))
    _wait_frames_settle(page)
    frame = page.ws.frames()[-1]
    assert frame["params"]["regions"] == [{"prompt": "a red barn"}]
    newest = page.locator(".history-thumb").last.get_attribute("data-id")

    page.click(".region-remove")  # both gone from the page
    page.click("#mask-clear")
    _wait_frames_settle(page)
    assert page.locator(".region").count() == 0
    page.click(f'.history-thumb[data-id="{newest}"]')
    page.click("#history-restore")
    page.wait_for_selector("#region-prompt-1")
    assert page.input_value("#region-prompt-1") == "a red barn"
    assert page.is_checked("#mask-on")
    # The layers as they were sent: the region painted at the bottom, the mask at the top, both sent again.
    page.ws.wait_layer(b"r", 0, (0.5, 0.85))
    mask = page.ws.wait_layer(b"m", 0, (0.5, 0.15))
    from PIL import Image

    with Image.open(io.BytesIO(mask)) as png:
        grey = png.convert("L")
        assert grey.getpixel((grey.width // 2, int(0.85 * grey.height))) == 0  # not masked where the region is
    _wait_frames_settle(page)
    assert page.ws.frames()[-1]["params"]["regions"] == [{"prompt": "a red barn"}]
    assert page.problems == []


def test_restore_says_what_this_server_does_not_allow(browser):
    """A frame made under other bounds (a pinned one from another server or model): the sliders keep to this
    server's, and restoreControls names each value it could not put back instead of restoring another."""
    schema = {"properties": {
        "width": {"type": "integer", "minimum": 64, "maximum": 256, "multipleOf": 8, "default": 128},
        "guidance_scale": {"anyOf": [{"type": "number", "minimum": 0, "maximum": 20}, {"type": "null"}]},
        "num_inference_steps": {"type": "integer", "minimum": 1, "maximum": 8, "default": 4},
        "seed": {"type": "integer", "minimum": 0, "maximum": 4294967295, "default": 0},
    }}
    with js_module_page(browser) as page:
        got = page.evaluate("""async (schema) => {
            const { Controls } = await import('./controls.js');
            const { restoreControls } = await import('./restore.js');
            const controls = new Controls(document.createElement('form'), schema);
            controls.set('guidance_scale', 3);  // a manual guidance before the restore
            const off = restoreControls(controls, { width: 512, guidance_scale: null, num_inference_steps: 6,
                                                    prompt: 'x' }, 42);
            return { off, values: controls.values() };
        }""", schema)
    assert got["off"] == ["width 512 (now 256)"]
    assert got["values"] == {"width": 256, "guidance_scale": None, "num_inference_steps": 6, "seed": 42}
