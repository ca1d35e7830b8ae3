"""Control mode (a ControlNet loaded): offered only then; the canvas becomes the control image, inverted by default
(a canvas has dark lines on white, a line ControlNet takes white on black), over the WebSocket and REST alike."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image, ImageDraw

from lcm_live.engine.metadata import read_png_parameters
from lcm_live.studio.fake_engine import FakeEngine

from .conftest import next_final, next_of, params, receive, running_studio

pytestmark = pytest.mark.timeout(60)


def _canvas() -> Image.Image:
    """A sketch as the page draws it: dark strokes on white."""
    img = Image.new("RGB", (96, 80), "white")
    ImageDraw.Draw(img).rectangle([0, 0, 40, 79], fill=(20, 20, 20))
    return img


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def control_studio():
    with running_studio(FakeEngine(controlnet="fake/scribble")) as running:
        yield running


def test_control_mode_and_its_fields_only_with_a_controlnet(control_studio, studio):
    with_cn = control_studio[0].get("/api/schema").json()["properties"]
    without = studio[0].get("/api/schema").json()["properties"]
    assert with_cn["mode"]["enum"] == ["txt2img", "img2img", "control"]
    assert with_cn["controlnet_conditioning_scale"]["maximum"] == 2.0
    assert with_cn["control_preprocess"]["enum"] == ["invert", "edges", "none"]
    assert with_cn["control_preprocess"]["default"] == "invert"
    assert without["mode"]["enum"] == ["txt2img", "img2img"]
    assert "controlnet_conditioning_scale" not in without and "control_preprocess" not in without
    r = studio[0].post("/api/generate", json={"mode": "control", "image": base64.b64encode(_png(_canvas())).decode()})
    assert r.status_code == 422 and r.json()["field"] == "mode"


def test_the_canvas_is_the_control_image_inverted_or_its_edges_or_as_drawn(control_studio):
    client, engine, _ = control_studio
    with client.websocket_connect("/ws") as ws:
        receive(ws)
        ws.send_text(params(mode="control", prompt="a house", width=256, height=256, controlnet_conditioning_scale=0.8))
        assert "control: waiting for the canvas" in next_of(ws, "warning")["message"]
        ws.send_bytes(_png(_canvas()))
        frame = next_final(ws)
        assert frame["params"]["mode"] == "control"
        ws.send_text(params(mode="control", prompt="a house", width=256, height=256, control_preprocess="none"))
        next_final(ws)
        ws.send_text(params(mode="control", prompt="a house", width=256, height=256, control_preprocess="edges"))
        next_final(ws)
    first, second, third = engine.calls
    assert first.image is None and first.control_image.size == (256, 256)
    assert first.controlnet_conditioning_scale == 0.8
    assert first.control_image.getpixel((5, 5)) == (235, 235, 235)  # the dark stroke, inverted
    assert first.control_image.getpixel((250, 5)) == (0, 0, 0)  # the white paper, inverted
    assert second.control_image.getpixel((250, 5)) == (255, 255, 255)  # as drawn
    assert second.controlnet_conditioning_scale == 1.0
    # A photo's (or the camera's) edges: white where the dark rectangle meets the paper, black on both sides.
    edges = third.control_image
    assert edges.getpixel((50, 128)) == (0, 0, 0) and edges.getpixel((200, 128)) == (0, 0, 0)
    assert max(edges.getpixel((x, 128))[0] for x in range(100, 120)) == 255


def test_rest_control_mode_needs_an_image_and_records_its_parameters(control_studio):
    client, engine, _ = control_studio
    r = client.post("/api/generate", json={"mode": "control", "prompt": "x"})
    assert r.status_code == 422 and r.json()["field"] == "image" and "control needs" in r.json()["message"]
    r = client.post("/api/generate", json={"image": base64.b64encode(_png(_canvas())).decode()})
    assert r.status_code == 422 and '"img2img" or "control"' in r.json()["message"]
    r = client.post("/api/generate", json={"mode": "control", "prompt": "x", "seed": 5, "width": 256, "height": 256,
                                           "image": base64.b64encode(_png(_canvas())).decode(),
                                           "controlnet_conditioning_scale": 1.5})
    assert r.status_code == 200
    meta = read_png_parameters(io.BytesIO(r.content))
    assert meta["mode"] == "control" and meta["controlnet_conditioning_scale"] == 1.5
    assert meta["controlnet"] == "fake/scribble" and "strength" not in meta
    img2img = client.post("/api/generate", json={"mode": "img2img", "prompt": "x", "width": 256, "height": 256,
                                                 "image": base64.b64encode(_png(_canvas())).decode()})
    meta = read_png_parameters(io.BytesIO(img2img.content))
    assert "controlnet_conditioning_scale" not in meta and "control_preprocess" not in meta
    assert engine.calls[-1].control_image is None and engine.calls[-1].image is not None
