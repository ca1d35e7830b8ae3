"""One frame in flight while input streams in (`web/js/pacing.js`): a stroke, typing or a slider drag on a machine
slower than the stream still gets pictures while it goes on, and the stream's end is never lost.

The FramePacer alone in Chromium (no server), then the page against `lcm-live serve --fake-engine` with frames of
0.6 s (2 steps of 0.3 s; a real model on a CPU takes that or more).
"""

from __future__ import annotations

import json
import time

import pytest

from .chromium import (
    CHROMIUM,
    FRAME_TIMEOUT_MS,
    NO_CHROMIUM,
    js_module_page,
    serving,
    set_slider,
    wait_settled_frame,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

if not CHROMIUM.exists():
    pytest.skip(NO_CHROMIUM, allow_module_level=True)

SLOW_FRAMES = json.dumps({"step_latency_s": 0.3})
COUNT_FINALS = """window.__finals = 0;
new MutationObserver(() => {
    if (document.getElementById('output').dataset.final === 'true') window.__finals += 1;
}).observe(document.getElementById('output'), { attributes: true, attributeFilter: ['data-seq'] });"""


@pytest.fixture(scope="module")
def module_page(browser):
    with js_module_page(browser) as page:
        yield page


def _pacer_js(body: str) -> str:
    return f"""async () => {{
        const {{ FramePacer }} = await import('./pacing.js');
        const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
        const sent = [];
        {body}
    }}"""


def test_input_goes_at_once_when_nothing_is_in_flight_and_waits_for_the_frame_otherwise(module_page):
    got = module_page.evaluate(_pacer_js("""
        const pacer = new FramePacer({ settleMs: 10000, minHoldMs: 10000 });
        pacer.offer('params', () => { sent.push('p1'); pacer.sent(); });
        pacer.offer('params', () => sent.push('p2'));
        pacer.offer('canvas', () => sent.push('c1'));
        pacer.offer('params', () => sent.push('p3'));  // replaces p2
        const before = [...sent];
        pacer.done(800);
        return { before, after: sent, frameMs: pacer.frameMs, hold: pacer.holdLimitMs(), held: pacer.heldCount };"""))
    assert got["before"] == ["p1"]
    assert sorted(got["after"]) == ["c1", "p1", "p3"]  # the newest of each kind, once the frame came
    assert got["frameMs"] == 800 and got["hold"] == 10000 and got["held"] == 3


def test_with_several_workers_as_many_frames_may_be_in_flight(module_page):
    """hello "workers": 2 (serve --devices): a second input goes while the first frame is on its way; a third
    waits; the frame of the first answers it (its "input" says how many inputs the server had read)."""
    got = module_page.evaluate(_pacer_js("""
        const pacer = new FramePacer({ settleMs: 10000, minHoldMs: 10000 });
        pacer.slots = 2;
        pacer.offer('params', () => { sent.push('p1'); pacer.sent(1); });
        pacer.offer('params', () => { sent.push('p2'); pacer.sent(2); });
        pacer.offer('params', () => { sent.push('p3'); pacer.sent(3); });  // two in flight: held
        const before = [...sent];
        pacer.done(500, 1);  // the frame of input 1: one in flight now, p3 goes
        const afterFirst = [...sent];
        pacer.done(500, 3);
        return { before, afterFirst, pending: pacer.pending, inFlight: pacer.inFlight() };"""))
    assert got["before"] == ["p1", "p2"]
    assert got["afterFirst"] == ["p1", "p2", "p3"]
    assert got["pending"] is False and got["inFlight"] is False


def test_a_new_connection_counts_from_zero_again(module_page):
    got = module_page.evaluate(_pacer_js("""
        const pacer = new FramePacer({ settleMs: 10000, minHoldMs: 10000 });
        for (let i = 1; i <= 5; i++) pacer.sent(i);
        pacer.done();  // idle: all five answered
        pacer.reset();  // the connection closed
        pacer.sent(1);  // the first input on the new connection
        pacer.offer('params', () => sent.push('held'));
        return { sent, inFlight: pacer.inFlight() };"""))
    assert got == {"sent": [], "inFlight": True}  # one frame in flight on the new connection: input waits


def test_a_final_input_supersedes_at_once(module_page):
    got = module_page.evaluate(_pacer_js("""
        const pacer = new FramePacer({ settleMs: 10000, minHoldMs: 10000 });
        pacer.sent();
        pacer.offer('canvas', () => sent.push('mid-stroke'));
        pacer.offer('canvas', () => sent.push('stroke end'), { final: true });
        pacer.done();
        return sent;"""))
    assert got == ["stroke end"]  # the held mid-stroke canvas is dropped: the end carries the newest drawing


def test_typing_that_settles_goes_without_waiting_for_the_frame(module_page):
    got = module_page.evaluate(_pacer_js("""
        const pacer = new FramePacer({ settleMs: 60, minHoldMs: 10000 });
        pacer.sent();
        pacer.offer('params', () => sent.push('a'), { settle: true });
        await sleep(30);
        pacer.offer('params', () => sent.push('ab'), { settle: true });  // restarts the settle time
        await sleep(40);
        const typing = [...sent];
        await sleep(80);
        return { typing, settled: sent };"""))
    assert got["typing"] == []
    assert got["settled"] == ["ab"]


def test_held_input_goes_after_the_hold_limit_when_no_frame_comes(module_page):
    got = module_page.evaluate(_pacer_js("""
        const pacer = new FramePacer({ minHoldMs: 50 });
        pacer.sent();
        const inFlight = pacer.inFlight();
        pacer.offer('canvas', () => sent.push('c'));
        await sleep(120);
        return { inFlight, sent, after: pacer.inFlight() };"""))
    assert got == {"inFlight": True, "sent": ["c"], "after": False}


@pytest.fixture(scope="module")
def slow_studio(tmp_path_factory):
    with serving(tmp_path_factory.mktemp("serve"), "--fake-engine", SLOW_FRAMES) as url:
        yield url


@pytest.fixture
def page(browser, slow_studio):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(slow_studio)
    page.wait_for_selector("#ctl-num_inference_steps", state="attached", timeout=FRAME_TIMEOUT_MS)
    set_slider(page, "#ctl-num_inference_steps", "2")
    yield page
    page.close()


def test_a_long_stroke_gets_frames_while_it_goes_on(page):
    """Every canvas sent mid-frame used to supersede the frame in flight: a stroke saw no picture until it ended."""
    page.click("label.mode-option:has(input[value=img2img])")
    wait_settled_frame(page, 0, "img2img")
    page.evaluate(COUNT_FINALS)
    box = page.locator("#sketch").bounding_box()
    x0, y0 = box["x"] + 20, box["y"] + 20
    page.mouse.move(x0, y0)
    page.mouse.down()
    t0 = time.monotonic()
    i = 0
    while time.monotonic() - t0 < 3.5:  # one stroke, a move every ~40 ms
        i += 1
        page.mouse.move(x0 + (i * 3) % 300, y0 + (i * 2) % 300)
        page.wait_for_timeout(40)
    during = page.evaluate("window.__finals")
    page.mouse.up()
    assert during >= 2, f"{during} final frame(s) during a 3.5 s stroke"


def test_typing_gets_frames_while_it_goes_on_and_the_last_prompt_is_drawn(page):
    """Each keystroke used to supersede the frame in flight: on a CPU, typing saw no picture until it stopped."""
    page.evaluate(COUNT_FINALS)
    page.click("#prompt")
    text = "a lighthouse on a cliff at dusk, waves below, gulls overhead"  # 60 keys, one every 60 ms: 3.6 s
    t0 = time.monotonic()
    page.keyboard.type(text, delay=60)
    typing_s = time.monotonic() - t0
    during = page.evaluate("window.__finals")
    assert during >= 2, f"{during} final frame(s) while typing for {typing_s:.1f} s"
    # Once typing stops, the whole prompt is drawn (its params settle and go, superseding the frame in flight)
    page.wait_for_function("""(text) => {
        const img = document.getElementById('output');
        return img.dataset.final === 'true' && img.alt === `Generated image: ${text}`
            && document.body.dataset.busy === 'false';
    }""", arg=text, timeout=FRAME_TIMEOUT_MS)
