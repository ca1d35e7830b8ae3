"""Images that are cheap to send and dear to decode are refused before decoding, and decoding has threads of its
own with capacity checked first (issue: a 1.4 MB progressive JPEG with its scans repeated took 5.7-9 s)."""

from __future__ import annotations

import base64
import io
import threading

import numpy as np
import pytest
from PIL import Image

from lcm_live.errors import UserError
from lcm_live.studio.images import count_jpeg_scans, decode_canvas

from .conftest import next_final, next_of, params, receive, running_studio

pytestmark = pytest.mark.timeout(60)


def jpeg(img: Image.Image, **options) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", **options)
    return buf.getvalue()


def scan_flood(side: int = 256, copies: int = 2000) -> bytes:
    """A valid progressive JPEG of a flat image whose smallest scan is repeated ``copies`` times before EOI: each
    copy is a few bytes and one more full pass of the decoder over the image."""
    data = jpeg(Image.new("RGB", (side, side), (120, 130, 140)), progressive=True, quality=90)
    starts, pos = [], data.index(b"\xff\xda")
    while pos >= 0:  # SOS markers (entropy data never holds 0xFFDA: 0xFF is stuffed)
        starts.append(pos)
        pos = data.find(b"\xff\xda", pos + 2)
    end = data.rindex(b"\xff\xd9")
    scans = [data[a:b] for a, b in zip(starts, [*starts[1:], end], strict=True)]
    return data[:end] + min(scans, key=len) * copies + data[end:]


def test_scan_count_from_the_markers():
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8))
    assert count_jpeg_scans(jpeg(photo), 100) == 1  # baseline: what canvas.toBlob("image/jpeg") makes
    progressive = jpeg(photo, progressive=True)
    assert 2 <= count_jpeg_scans(progressive, 100) <= 16  # libjpeg's progression: 10 scans in colour
    assert decode_canvas(progressive, max_pixels=1 << 20, max_side=1024).size == (96, 64)
    flood = scan_flood(copies=300)
    assert count_jpeg_scans(flood, 10**6) > 300
    assert count_jpeg_scans(flood, 20) == 21  # stops counting once past the limit


def test_scan_flood_is_refused_before_decoding(monkeypatch):
    flood = scan_flood()
    decoded = []
    monkeypatch.setattr(Image.Image, "load", lambda self: decoded.append(self) or None)
    with pytest.raises(UserError, match="more than 16 scans"):
        decode_canvas(flood, max_pixels=1 << 20, max_side=1024, max_jpeg_scans=16)
    assert decoded == []  # refused from the markers alone


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "PA", "I", "I;16", "F", "RGBA", "CMYK", "YCbCr"])
def test_odd_modes_decode_to_rgb_or_get_a_clear_error(mode):
    img = Image.new("RGB", (40, 30), (10, 200, 30)).convert(mode) if mode not in ("PA", "I;16") else \
        Image.new(mode, (40, 30))
    fmt = "JPEG" if mode in ("CMYK", "YCbCr") else "PNG" if mode not in ("F",) else "WEBP"
    buf = io.BytesIO()
    try:
        (img if fmt != "WEBP" else img.convert("RGB")).save(buf, format=fmt)
    except (OSError, ValueError, KeyError):
        pytest.skip(f"Pillow cannot write mode {mode} as {fmt}")
    try:
        out = decode_canvas(buf.getvalue(), max_pixels=1 << 20, max_side=1024)
    except UserError as exc:
        assert exc.field == "image" and exc.message
    else:
        assert out.mode == "RGB" and out.size == (40, 30)


def test_animated_images_give_their_first_frame():
    frames = [Image.new("RGB", (32, 32), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    for fmt in ("PNG", "WEBP"):
        buf = io.BytesIO()
        frames[0].save(buf, format=fmt, save_all=True, append_images=frames[1:], duration=50, loop=0)
        out = decode_canvas(buf.getvalue(), max_pixels=1 << 20, max_side=1024)
        assert out.getpixel((5, 5))[0] > 200, fmt


def test_websocket_scan_flood_gets_invalid_image_and_the_session_goes_on():
    with running_studio() as (client, _, _), client.websocket_connect("/ws") as ws:
        receive(ws)
        ws.send_text(params(mode="img2img", prompt="p", strength=0.5))
        ws.send_bytes(scan_flood())
        error = next_of(ws, "error")
        assert error["code"] == "invalid_image" and "scans" in error["message"]
        ws.send_bytes(jpeg(Image.new("RGB", (64, 64), "white")))
        assert next_final(ws)["type"] == "frame"


def test_rest_capacity_is_checked_before_any_decoding():
    with running_studio(rest_queue_size=1) as (client, _, studio):
        decodes = []
        real = studio.decode_canvas

        async def counting(data):
            decodes.append(len(data))
            return await real(data)

        studio.decode_canvas = counting
        studio.rest_waiting = 1  # the queue is full (another request waits)
        body = {"mode": "img2img", "prompt": "p", "strength": 0.5,
                "image": base64.b64encode(scan_flood()).decode()}
        response = client.post("/api/generate", json=body)
        assert response.status_code == 429 and response.json()["code"] == "capacity"
        assert decodes == []
        studio.rest_waiting = 0
        response = client.post("/api/generate", json=body)
        assert response.status_code == 422 and "scans" in response.json()["message"]
        assert len(decodes) == 1


def test_decoding_runs_on_the_studio_decode_threads():
    with running_studio(decode_threads=1) as (client, _, studio), client.websocket_connect("/ws") as ws:
        receive(ws)
        names = []
        real = decode_canvas

        def spy(*args, **kwargs):
            names.append(threading.current_thread().name)
            return real(*args, **kwargs)

        import lcm_live.studio.app as app_module

        app_module.decode_canvas, saved = spy, app_module.decode_canvas
        try:
            ws.send_text(params(mode="img2img", prompt="p", strength=0.5))
            ws.send_bytes(jpeg(Image.new("RGB", (64, 64), "white")))
            next_final(ws)
        finally:
            app_module.decode_canvas = saved
        assert names and all(name.startswith("decode") for name in names)
        assert studio.decoder._max_workers == 1
