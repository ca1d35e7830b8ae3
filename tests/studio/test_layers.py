"""Masks, region prompts and blends through the studio (issue 14): the binary layer envelope, the session's
layers, REST's mask and regions. The FakeEngine composites as the engine does: outside the mask the canvas's
pixels, each region its prompt's colour."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from lcm_live.errors import UserError
from lcm_live.studio.fake_engine import FakeEngine
from lcm_live.studio.layers import parse_layer_message

from .conftest import next_final, next_of, params, receive, running_studio

pytestmark = pytest.mark.timeout(60)
SIZE = 64


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def envelope(layer: bytes, index: int, data: bytes) -> bytes:
    return b"LCML" + layer + bytes([index]) + b"\0\0" + data


def half_mask(side: str = "left", size: int = SIZE) -> bytes:
    img = Image.new("L", (size, size), 0)
    box = (0, 0, size // 2, size) if side == "left" else (size // 2, 0, size, size)
    img.paste(255, box)
    return png(img)


def pixels(frame) -> Image.Image:
    return Image.open(io.BytesIO(frame["_bytes"])).convert("RGB")


def test_envelope_parsing():
    assert parse_layer_message(b"\x89PNG...").layer == "canvas"  # a bare image: the canvas, as before
    msg = parse_layer_message(envelope(b"r", 3, b"img"))
    assert (msg.layer, msg.index, msg.image, msg.key) == ("region", 3, b"img", "region:3")
    assert parse_layer_message(envelope(b"m", 0, b"")).image == b""  # clear
    for bad in (b"LCML", envelope(b"x", 0, b""), envelope(b"r", 8, b""), envelope(b"m", 1, b""),
                b"LCMLm\0\1\0"):
        with pytest.raises(UserError) as info:
            parse_layer_message(bad)
        assert info.value.field == "layer"


def test_mask_redraws_only_the_masked_half():
    engine = FakeEngine()
    with running_studio(engine, default_width=SIZE, default_height=SIZE, min_size=64) as (client, _, _), \
            client.websocket_connect("/ws") as ws:
        receive(ws)
        canvas = Image.new("RGB", (SIZE, SIZE), (10, 200, 30))
        ws.send_text(params(mode="img2img", prompt="a", strength=0.5, width=SIZE, height=SIZE))
        ws.send_bytes(png(canvas))
        plain = pixels(next_final(ws))
        ws.send_bytes(envelope(b"m", 0, half_mask("left")))
        first = next_final(ws)
        assert first["params"]["mode"] == "img2img"
        out = pixels(first)
        assert out.getpixel((SIZE - 5, 5)) == pytest.approx((10, 200, 30), abs=12)  # kept (JPEG rounding)
        assert out.getpixel((5, 5)) == pytest.approx(plain.getpixel((5, 5)), abs=12)  # redrawn
        ws.send_text(params(mode="img2img", prompt="b", strength=0.5, width=SIZE, height=SIZE))
        changed = pixels(next_final(ws))
        assert changed.getpixel((SIZE - 5, 5)) == pytest.approx((10, 200, 30), abs=12)  # still kept
        assert changed.getpixel((5, 5)) != pytest.approx(out.getpixel((5, 5)), abs=12)  # the masked half moved
        ws.send_bytes(envelope(b"m", 0, b""))  # clear the mask: plain img2img again
        cleared = pixels(next_final(ws))
        assert cleared.getpixel((SIZE - 5, 5)) != pytest.approx((10, 200, 30), abs=12)
    request = engine.calls[-2]
    assert request.mask_image is not None and request.image is not None


def test_bad_masks_get_one_error_and_the_session_goes_on():
    with running_studio(default_width=SIZE, default_height=SIZE, min_size=64) as (client, _, _), \
            client.websocket_connect("/ws") as ws:
        receive(ws)
        ws.send_bytes(envelope(b"m", 0, png(Image.new("L", (SIZE, SIZE), 0))))
        error = receive_error(ws)
        assert error["code"] == "invalid_image" and "all black" in error["message"] and error["field"] == "mask"
        ws.send_bytes(envelope(b"m", 0, b"not an image"))
        assert receive_error(ws)["code"] == "invalid_image"
        ws.send_bytes(envelope(b"q", 0, b""))
        assert receive_error(ws)["field"] == "layer"
        ws.send_text(params(prompt="fine", width=SIZE, height=SIZE))
        assert next_final(ws)["params"]["prompt"] == "fine"


def receive_error(ws):
    while True:
        message = receive(ws)
        if isinstance(message, dict) and message.get("type") == "error":
            return message


def test_a_mask_of_another_size_is_fitted_and_said():
    with running_studio(default_width=SIZE, default_height=SIZE, min_size=64) as (client, _, _), \
            client.websocket_connect("/ws") as ws:
        receive(ws)
        ws.send_text(params(mode="img2img", prompt="a", strength=0.5, width=SIZE, height=SIZE))
        ws.send_bytes(png(Image.new("RGB", (SIZE, SIZE), "white")))
        next_final(ws)
        ws.send_bytes(envelope(b"m", 0, half_mask(size=32)))
        warning = next_of(ws, "warning")
        assert "32x32" in warning["message"] and "fitted" in warning["message"]
        assert next_final(ws)["type"] == "frame"


def test_regions_wait_for_their_masks_and_draw_their_prompts():
    engine = FakeEngine()
    with running_studio(engine, default_width=SIZE, default_height=SIZE, min_size=64) as (client, _, _), \
            client.websocket_connect("/ws") as ws:
        receive(ws)
        ws.send_text(params(prompt="base", width=SIZE, height=SIZE, regions=[{"prompt": "left thing"}]))
        assert "regions[0]" in next_of(ws, "warning")["message"]
        ws.send_bytes(envelope(b"r", 0, half_mask("left")))
        frame = next_final(ws)
        assert frame["params"]["regions"] == [{"prompt": "left thing"}]
        out = pixels(frame)
        assert out.getpixel((5, 5)) != pytest.approx(out.getpixel((SIZE - 5, 5)), abs=12)  # two prompts, two halves
    request = engine.calls[-1]
    assert [r.prompt for r in request.regions] == ["left thing"] and request.regions[0].mask_image.size == (SIZE, SIZE)


def test_blends_reach_the_engine():
    engine = FakeEngine()
    with running_studio(engine) as (client, _, _), client.websocket_connect("/ws") as ws:
        receive(ws)
        ws.send_text(params(prompt="a cat", prompt_blend={"prompt": "a dog", "weight": 0.25},
                            seed_blend={"seed": 9, "weight": 0.75}))
        next_final(ws)
    request = engine.calls[-1]
    assert (request.prompt_blend.prompt, request.prompt_blend.weight) == ("a dog", 0.25)
    assert (request.seed_blend.seed, request.seed_blend.weight) == (9, 0.75)


def test_control_mode_with_a_mask_keeps_the_last_picture():
    engine = FakeEngine(controlnet="fake-lines")
    with running_studio(engine, default_width=SIZE, default_height=SIZE, min_size=64) as (client, _, _), \
            client.websocket_connect("/ws") as ws:
        receive(ws)
        ws.send_bytes(envelope(b"m", 0, half_mask("left")))
        ws.send_bytes(png(Image.new("RGB", (SIZE, SIZE), "white")))
        ws.send_text(params(mode="control", prompt="first", width=SIZE, height=SIZE))
        assert "first picture is made without the mask" in next_of(ws, "warning")["message"]
        first = pixels(next_final(ws))
        ws.send_text(params(mode="control", prompt="second", width=SIZE, height=SIZE))
        second = pixels(next_final(ws))
        assert second.getpixel((SIZE - 5, 5)) == pytest.approx(first.getpixel((SIZE - 5, 5)), abs=12)
        assert second.getpixel((5, 5)) != pytest.approx(first.getpixel((5, 5)), abs=12)
    assert engine.calls[-1].mask_image is not None and engine.calls[-1].image is not None


def test_rest_takes_a_mask_and_regions():
    engine = FakeEngine()
    b64 = lambda data: base64.b64encode(data).decode()  # noqa: E731
    with running_studio(engine, default_width=SIZE, default_height=SIZE, min_size=64) as (client, _, _):
        canvas = png(Image.new("RGB", (SIZE, SIZE), (10, 200, 30)))
        body = {"mode": "img2img", "prompt": "p", "strength": 0.5, "image": b64(canvas), "mask": b64(half_mask()),
                "regions": [{"prompt": "r", "mask": b64(half_mask("right"))}], "num_inference_steps": 2}
        response = client.post("/api/generate", json=body)
        assert response.status_code == 200, response.text
        request = engine.calls[-1]
        assert request.mask_image is not None and request.regions[0].prompt == "r"
        response = client.post("/api/generate", json={**body, "mask": b64(png(Image.new("L", (SIZE, SIZE))))})
        assert response.status_code == 422 and response.json()["field"] == "mask"
        response = client.post("/api/generate", json={**body, "regions": [{"prompt": "r"}]})
        assert response.status_code == 422 and response.json()["field"] == "regions.0.mask"
        response = client.post("/api/generate", json={"prompt": "p", "mask": b64(half_mask())})
        assert response.status_code == 422 and response.json()["field"] == "mask"


def test_a_mask_of_the_canvas_size_before_a_resize_is_fitted_silently():
    with running_studio(default_width=SIZE, default_height=SIZE, min_size=64) as (client, _, _), \
            client.websocket_connect("/ws") as ws:
        receive(ws)
        ws.send_text(params(mode="img2img", prompt="a", strength=0.5, width=SIZE, height=SIZE))
        ws.send_bytes(png(Image.new("RGB", (SIZE, SIZE), "white")))
        ws.send_bytes(envelope(b"m", 0, half_mask()))
        next_final(ws)
        ws.send_bytes(png(Image.new("RGB", (2 * SIZE, 2 * SIZE), "white")))  # the page resized its canvas...
        while True:  # ...and its mask follows: no "fitted" warning meanwhile
            message = next_of(ws, "frame", "warning")
            assert message["type"] != "warning", message
            if message["final"]:
                break
