"""The reference image (IP-Adapter) and several ControlNets on the studio page (issue 16), in real Chromium.

The envelope of the new layers alone, then the page against `lcm-live serve` on the tiny LCM with two tiny
ControlNets and a tiny IP-Adapter (random weights, CPU float32): the page shows what the server loaded, a reference
image goes as layer "i" and a net's own image as layer "n" 1, the per-net sliders reach the params as lists, and a
frame comes with them; History keeps those layers with the frame and Restore sends them again.
"""

from __future__ import annotations

import base64
import io
import json

import pytest
from PIL import Image, ImageDraw

from .chromium import (
    CHROMIUM,
    FRAME_TIMEOUT_MS,
    NO_CHROMIUM,
    js_module_page,
    logged_studio_page,
    serving,
    set_slider,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

if not CHROMIUM.exists():
    pytest.skip(NO_CHROMIUM, allow_module_level=True)


def test_reference_and_control_envelopes(browser):
    with js_module_page(browser) as page:
        got = page.evaluate("""async () => {
            const { envelopeHeader } = await import('./layers.js');
            const errors = [];
            for (const [layer, index] of [['control', 0], ['control', 8], ['reference', 1]]) {
                try { envelopeHeader(layer, index); } catch (err) { errors.push(err.message); }
            }
            return { reference: Array.from(envelopeHeader('reference')),
                     control: Array.from(envelopeHeader('control', 3)), errors };
        }""")
    assert got["reference"] == [76, 67, 77, 76, ord("i"), 0, 0, 0]
    assert got["control"] == [76, 67, 77, 76, ord("n"), 3, 0, 0]
    assert got["errors"] == ["layer control cannot have index 0", "layer control cannot have index 8",
                             "layer reference cannot have index 1"]  # net 0's image is the canvas


@pytest.fixture(scope="module")
def studio(tiny_lcm_dir, tmp_path_factory):
    from diffusers import UNet2DConditionModel

    from lcm_live.bench.bench_conditioning import TINY_ENCODER, random_ip_adapter, save_ip_adapter
    from lcm_live.engine.tiny import save_tiny_controlnet

    folder = tmp_path_factory.mktemp("conditioning")
    unet = UNet2DConditionModel.from_pretrained(tiny_lcm_dir / "unet")
    nets = [str(save_tiny_controlnet(folder / f"cn{k}", unet, seed=k)) for k in range(2)]
    adapter = save_ip_adapter(folder / "ipa", *random_ip_adapter(unet, TINY_ENCODER))
    with serving(folder, "--model", str(tiny_lcm_dir), "--device", "cpu", "--dtype", "float32",
                 "--controlnet", nets[0], "--controlnet", nets[1], "--ip-adapter", str(adapter),
                 env={"LCM_LIVE_STUDIO__DEFAULT_WIDTH": "256", "LCM_LIVE_STUDIO__DEFAULT_HEIGHT": "256"}) as url:
        yield url


@pytest.fixture
def page(browser, studio):
    with logged_studio_page(browser, studio) as page:
        yield page


def _png_file(tmp_path, name: str, draw) -> str:
    image = Image.new("RGB", (96, 64), "white")
    draw(ImageDraw.Draw(image))
    path = tmp_path / name
    image.save(path)
    return str(path)


def _wait_params(page, predicate, what: str) -> dict:
    """The newest final frame whose params satisfy ``predicate`` (nothing generating after it)."""
    waited = 0
    while waited < FRAME_TIMEOUT_MS:
        frames = page.ws.frames()
        if frames and predicate(frames[-1]["params"]) and page.get_attribute("body", "data-busy") == "false":
            return frames[-1]
        page.wait_for_timeout(200)
        waited += 200
    raise AssertionError(f"no frame with {what}")


def test_reference_image_and_two_controlnets_from_the_page(page, tmp_path):
    # What the server loaded: a reference image; two nets by name, per-net rows (the plain fields are not built).
    page.wait_for_selector("#reference:not([hidden])")
    page.wait_for_selector("#controlnets:not([hidden])")
    assert page.eval_on_selector_all(".controlnet strong", "els => els.map((e) => e.textContent)") == ["cn0", "cn1"]
    assert page.locator("#ctl-controlnet_conditioning_scale").count() == 0
    assert page.locator("#ctl-control_guidance_end").count() == 0

    # The reference image: fitted, sent as layer i, shown; its strength in the params.
    page.set_input_files("#reference-file", _png_file(tmp_path, "ref.png", lambda d: d.ellipse((10, 10, 80, 56), fill="red")))
    page.wait_for_selector("#reference-image:not([hidden])")
    sent = page.ws.layers_sent(b"i")
    assert len(sent) == 1 and sent[0][:4] == b"RIFF"  # WebP
    with Image.open(io.BytesIO(sent[0])) as image:
        assert image.size == (96, 64)
    set_slider(page, "#reference-scale-input", "0.6")

    # Lines mode: net 2's own image (layer n 1) and its "until" at 0.5; a frame comes with both lists.
    page.click("label.mode-option:has(input[value=control])")
    page.set_input_files("#cn-1-file", _png_file(tmp_path, "depth.png", lambda d: d.line((0, 0, 95, 63), fill="black", width=5)))
    page.wait_for_selector('.controlnet img[data-key="control:1"]:not([hidden])')
    assert len(page.ws.layers_sent(b"n", 1)) == 1
    set_slider(page, "#cn-1-control_guidance_end", "0.5")
    set_slider(page, "#cn-0-controlnet_conditioning_scale", "0.7")
    frame = _wait_params(page, lambda p: p.get("control_guidance_end") == [1.0, 0.5]
                         and p.get("controlnet_conditioning_scale", [None])[0] == 0.7, "the per-net lists")
    assert frame["params"]["mode"] == "control" and frame["params"]["ip_adapter_scale"] == 0.6
    assert len(frame["params"]["control_guidance_start"]) == 2

    # Clear sends the empty envelope; History kept the images with the frame: Restore sends them again.
    page.wait_for_function("(n) => document.querySelectorAll('.history-thumb').length >= n",
                           arg=1, timeout=10_000)
    kept = page.locator(".history-thumb").count() - 1  # the frame above, the newest kept
    page.click("#reference-clear")
    page.ws.last_layer(b"i", 0, lambda image: image == b"")
    assert page.is_hidden("#reference-image")
    page.locator(".history-thumb").nth(kept).click()
    page.click("#history-restore")
    page.wait_for_selector("#reference-image:not([hidden])")
    page.ws.last_layer(b"i", 0, lambda image: image == sent[0])  # the very picture the frame was made with
    page.ws.last_layer(b"n", 1, lambda image: image[:4] == b"RIFF")
    assert page.input_value("#cn-1-control_guidance_end") == "0.5"
    assert page.is_hidden("#banner-error"), page.inner_text("#banner-error")

    # Save re-renders through POST /api/generate with the frame's reference image and net 2's image inline.
    with page.expect_request("**/api/generate") as request, \
            page.expect_download(timeout=FRAME_TIMEOUT_MS) as download:
        page.click("#history-save")
    body = request.value.post_data_json
    assert base64.b64decode(body["ip_adapter_image"]) == sent[0]
    assert len(body["control_images"]) == 1 and base64.b64decode(body["control_images"][0])[:4] == b"RIFF"
    with Image.open(download.value.path()) as png:
        assert json.loads(png.text["parameters"])["mode"] == "control+ip_adapter"  # the reference went along
    assert page.is_hidden("#banner-error"), page.inner_text("#banner-error")
    assert page.problems == [], json.dumps(page.problems)


@pytest.fixture(scope="module")
def one_net_studio(tmp_path_factory):
    with serving(tmp_path_factory.mktemp("serve"), "--fake-engine", json.dumps({"controlnet": "fake/scribble"})) as url:
        yield url


def test_one_controlnet_gets_from_and_until_settings(browser, one_net_studio):
    with logged_studio_page(browser, one_net_studio) as page:
        page.click("label.mode-option:has(input[value=control])")
        assert page.is_hidden("#controlnets") and page.is_hidden("#reference")  # no per-net rows, no adapter
        set_slider(page, "#ctl-control_guidance_end", "0.5")
        frame = _wait_params(page, lambda p: p.get("control_guidance_end") == 0.5, "control_guidance_end 0.5")
        assert frame["params"]["control_guidance_start"] == 0.0 and "ip_adapter_scale" not in frame["params"]
        assert page.problems == []
