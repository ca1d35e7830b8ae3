"""Keep and upscale with the server's ESRGAN model (serve --upscaler), in real Chromium: the method picker is
offered only when /api/info names a model, and the ESRGAN choice reaches POST /api/upscale. The studio runs in this
process (uvicorn on a thread, a FakeEngine) with a tiny RRDBNet loaded: a `serve` subprocess could not import
spandrel on a machine without torchvision (tests/studio/tiny_esrgan.py)."""

from __future__ import annotations

import contextlib
import io
import json
import threading
import time
from pathlib import Path

import pytest

from lcm_live.bench.local_http import free_port, http_get

from .chromium import CHROMIUM, NO_CHROMIUM, js_module_page, logged_studio_page, wait_settled_frame
from .tiny_esrgan import import_spandrel, needs_spandrel, save_tiny_esrgan

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
if not CHROMIUM.exists():
    pytest.skip(NO_CHROMIUM, allow_module_level=True)


def test_the_picker_follows_the_info_and_the_body_carries_the_choice(browser):
    with js_module_page(browser) as page:
        got = page.evaluate("""async () => {
            const { showUpscalers, pickedUpscaler, upscaleBody } = await import('./upscale.js');
            const select = document.createElement('select');
            select.hidden = true;
            document.body.append(select);
            const out = {};
            showUpscalers({ model: 'fake' }, select);
            out.none = [select.hidden, pickedUpscaler(select), select.options.length];
            showUpscalers({ upscaler: { name: 'x4.safetensors', architecture: 'ESRGAN', scale: 4 } }, select);
            out.shown = [select.hidden, pickedUpscaler(select), [...select.options].map((o) => o.value),
                         select.options[1].textContent];
            select.value = 'esrgan+lcm';
            out.picked = pickedUpscaler(select);
            showUpscalers({ upscaler: { name: 'x4.safetensors', architecture: 'ESRGAN', scale: 4 } }, select);
            out.kept = pickedUpscaler(select);  // the info again (a reconnect's hello): the choice stays
            showUpscalers({}, select);
            out.gone = [select.hidden, pickedUpscaler(select)];
            const info = { seed: 5, params: { prompt: 'p', num_inference_steps: 4 } };
            out.lcm = upscaleBody(info, 'AAAA', 2, 'lcm');
            out.esrgan = upscaleBody(info, 'AAAA', 4, 'esrgan');
            return out;
        }""")
    assert got["none"] == [True, "lcm", 0]
    assert got["shown"] == [False, "lcm", ["lcm", "esrgan", "esrgan+lcm"], "ESRGAN (ESRGAN 4×)"]
    assert got["picked"] == got["kept"] == "esrgan+lcm"
    assert got["gone"] == [True, "lcm"]
    assert "upscaler" not in got["lcm"]  # today's body, unchanged
    assert got["esrgan"]["upscaler"] == "esrgan" and got["esrgan"]["scale"] == 4


@contextlib.contextmanager
def studio_in_process(upscaler):
    """The studio app with a FakeEngine and ``upscaler`` loaded, on uvicorn in a thread; yields its URL."""
    import uvicorn

    from lcm_live.config import Settings, StudioSettings
    from lcm_live.studio.app import create_app
    from lcm_live.studio.fake_engine import FakeEngine

    app = create_app(Settings(studio=StudioSettings()), lambda: FakeEngine(), upscaler=upscaler)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if http_get(url + "readyz")[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the in-process studio was not ready in 60 s"
            time.sleep(0.1)
        yield url
    finally:
        server.should_exit = True
        thread.join(30)


@needs_spandrel
def test_keep_and_upscale_with_the_servers_esrgan(browser, tmp_path):
    from PIL import Image

    from lcm_live.engine.esrgan import load_upscaler

    import_spandrel()
    path = save_tiny_esrgan(tmp_path)
    with studio_in_process(load_upscaler(path)) as url, logged_studio_page(browser, url) as page:
        page.wait_for_selector("#upscale-method", state="attached")
        page.wait_for_function("() => !document.getElementById('upscale-method').hidden", timeout=60_000)
        assert page.eval_on_selector_all("#upscale-method option", "os => os.map((o) => o.value)") == \
            ["lcm", "esrgan", "esrgan+lcm"]
        before = page.locator(".history-thumb").count()
        page.fill("#prompt", "a small lighthouse")
        page.wait_for_function("(n) => document.querySelectorAll('.history-thumb').length > n", arg=before,
                               timeout=60_000)
        wait_settled_frame(page, 0, page.get_attribute("body", "data-mode"))
        page.locator(".history-thumb").last.click()
        page.select_option("#upscale-scale", "4")
        page.select_option("#upscale-method", "esrgan")
        with page.expect_download(timeout=60_000) as download:
            page.click("#history-upscale")
        with Image.open(io.BytesIO(Path(download.value.path()).read_bytes())) as png:
            size, parameters = png.size, json.loads(png.text["parameters"])
        frame = page.ws.frames()[-1]
        assert size == (4 * frame["width"], 4 * frame["height"])
        assert parameters["upscale"]["method"] == "esrgan" and parameters["upscale"]["upscaler"] == path.name
        assert parameters["prompt"] == "a small lighthouse" and parameters["seed"] == frame["seed"]
        assert page.inner_text("#upscale-status") == f"Upscaled to {size[0]}×{size[1]}: saved."
        assert page.is_hidden("#banner-error") and page.problems == []
