"""The model and style picker of the studio page (issue 16), in real Chromium.

The picker alone (its markup from index.html: labels, values, progress, a failed switch going back), then the page
against `lcm-live serve --fake-engine --models models.toml` with two presets (the second with a style LoRA and
its own default size and steps; each load takes 1.5 s): switching loads with progress, readiness is shown per
model, the style slider reaches `lora_scales`, and switching back to a loaded model is immediate.
"""

from __future__ import annotations

import json
import re

import pytest

from .chromium import (
    CHROMIUM,
    FRAME_TIMEOUT_MS,
    NO_CHROMIUM,
    WEB,
    js_module_page,
    logged_studio_page,
    serving,
    set_slider,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

if not CHROMIUM.exists():
    pytest.skip(NO_CHROMIUM, allow_module_level=True)

MODELS_HTML = re.search(r'<div class="models" id="models".*?</div>\s*</div>',
                        (WEB / "index.html").read_text(encoding="utf-8"), re.S).group(0)
MODELS_TOML = """
[models.alpha]
model = "org/alpha"

[models.beta]
model = "org/beta"
width = 320
height = 256
num_inference_steps = 2
[[models.beta.styles]]
name = "papercut"
lora = "org/papercut-lora"
scale = 0.8
min = 0.0
max = 1.5
"""
PRESETS = [
    {"name": "alpha", "family": "lcm", "ready": True, "loaded": True, "default": True, "state": "loaded",
     "error": None, "width": None, "height": None, "num_inference_steps": None, "styles": []},
    {"name": "beta", "family": None, "ready": False, "loaded": False, "default": False, "state": "unloaded",
     "error": None, "width": 320, "height": 256, "num_inference_steps": 2,
     "styles": [{"name": "papercut", "scale": 0.8, "min": 0.0, "max": 1.5}]},
]


def test_the_picker_alone(browser):
    with js_module_page(browser) as page:
        base = page.url
        page.set_content(f"<!doctype html><body>{MODELS_HTML}</body>")
        got = page.evaluate("""async ([base, presets]) => {
            const { ModelPicker, presetLabel } = await import(base + 'models.js');
            const picker = new ModelPicker();
            const events = [];
            picker.addEventListener('input', (e) => events.push(e.detail.name));
            picker.addEventListener('preset', (e) => events.push(e.detail));
            const out = { before: picker.values(), hiddenBefore: document.getElementById('models').hidden };
            picker.build({ model: { enum: ['alpha', 'beta'] } });
            picker.setPresets(presets);
            const select = document.getElementById('model-select');
            out.labels = [...select.options].map((o) => o.textContent);
            out.shown = !document.getElementById('models').hidden;
            out.first = picker.values();
            select.value = 'beta';
            select.dispatchEvent(new Event('change'));
            const slider = document.querySelector('#model-styles input[type=range]');
            out.slider = [slider.min, slider.max, slider.value, document.querySelector('#model-styles label').textContent];
            slider.value = '1.2';
            slider.dispatchEvent(new Event('input'));
            out.second = picker.values();
            const bar = document.getElementById('model-progress');
            picker.onMessage({ name: 'beta', state: 'loading', progress: 0.4, message: 'reading beta: unet',
                               component: 'unet', bytes_read: 1.5e9, bytes_total: 3.44e9 });
            out.bytes = [bar.hidden, bar.value, bar.title, bar.dataset.component];
            picker.onMessage({ name: 'beta', state: 'loading', progress: 0.9, message: 'beta: warming up' });
            out.loading = [bar.hidden, bar.value, document.getElementById('model-status').textContent];
            out.error = picker.onMessage({ name: 'beta', state: 'error', progress: null, message: 'beta: no such file' });
            out.afterError = [select.value, bar.hidden, picker.values().model];
            out.events = events;
            out.readyNotLoaded = presetLabel({ name: 'x', state: 'unloaded', ready: true });
            return out;
        }""", [base, PRESETS])
    assert got["before"] == {} and got["hiddenBefore"] is True
    assert got["labels"] == ["alpha · lcm · loaded", "beta · not loaded"] and got["shown"] is True
    assert got["first"] == {"model": "alpha", "lora_scales": {}}  # the preset's own scales until a slider moves
    assert got["slider"] == ["0", "1.5", "0.8", "papercut"]
    assert got["second"] == {"model": "beta", "lora_scales": {"papercut": 1.2}}
    assert got["bytes"] == [False, pytest.approx(0.4), "unet: 1.50 GB of 3.44 GB", "unet"]  # the bytes read
    assert got["loading"][0] is False and abs(got["loading"][1] - 0.9) < 1e-6 and got["loading"][2] == "beta: warming up"
    assert got["error"] == "beta: no such file"
    assert got["afterError"] == ["alpha", True, "alpha"]  # back to the model the session still has
    assert got["events"] == [{"width": 320, "height": 256, "num_inference_steps": 2}, "model", "lora_scales"]
    assert got["readyNotLoaded"] == "x · ready, not in memory"


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve")
    (folder / "models.toml").write_text(MODELS_TOML)
    with serving(folder, "--fake-engine", json.dumps({"load_latency_s": 1.5}), "--models",
                 str(folder / "models.toml")) as url:
        yield url


@pytest.fixture
def page(browser, studio):
    with logged_studio_page(browser, studio) as page:
        yield page


def _final_frame(page, predicate, what: str) -> dict:
    waited = 0
    while waited < FRAME_TIMEOUT_MS:
        frames = page.ws.frames()
        if frames and predicate(frames[-1]["params"]):
            return frames[-1]
        page.wait_for_timeout(100)
        waited += 100
    raise AssertionError(f"no frame with {what}")


def _model_messages(page) -> list[dict]:
    out = []
    for m in page.ws.received:
        if isinstance(m, str) and '"model"' in m:
            msg = json.loads(m)
            if msg.get("type") == "model":
                out.append(msg)
    return out


def test_switching_loads_with_progress_and_readiness_per_model(page):
    page.wait_for_selector("#models:not([hidden])")
    assert page.eval_on_selector_all("#model-select option", "os => os.map((o) => o.value)") == ["alpha", "beta"]
    page.fill("#prompt", "a paper boat")
    _final_frame(page, lambda p: p["prompt"] == "a paper boat" and p["model"] == "alpha", "alpha")

    page.select_option("#model-select", "beta")
    page.wait_for_selector("#model-progress:not([hidden])", timeout=10_000)  # the 1.5 s load shows
    frame = _final_frame(page, lambda p: p["model"] == "beta", "beta")
    # The preset's own defaults came with it: its size and steps.
    assert (frame["params"]["width"], frame["params"]["height"], frame["params"]["num_inference_steps"]) == (320, 256, 2)
    said = [(m["name"], m["state"]) for m in _model_messages(page)]
    assert said[0] == ("beta", "loading") and said[-1] == ("beta", "ready")
    rising = [m["progress"] for m in _model_messages(page) if m["name"] == "beta"]
    assert rising == sorted(rising) and rising[-1] == 1.0  # the bar only rises
    page.wait_for_selector("#model-progress[hidden]", state="attached")
    # Readiness per model: beta in memory; alpha evicted (one model loaded at a time on a CPU) but known good.
    page.wait_for_function("""() => {
        const [a, b] = [...document.querySelectorAll('#model-select option')].map((o) => o.textContent);
        return b === 'beta · lcm · loaded' && a === 'alpha · lcm · ready, not in memory';
    }""", timeout=10_000)

    set_slider(page, "#model-styles input[type=range]", "1.2")
    frame = _final_frame(page, lambda p: p["lora_scales"] == {"papercut": 1.2}, "the style's scale")
    assert frame["params"]["model"] == "beta"

    # Back to alpha: loaded already (or loaded again, if the server keeps one model), then ready.
    page.select_option("#model-select", "alpha")
    _final_frame(page, lambda p: p["model"] == "alpha", "alpha again")
    assert _model_messages(page)[-1]["state"] == "ready"
    assert page.is_hidden("#banner-error"), page.inner_text("#banner-error")
    assert page.problems == []
