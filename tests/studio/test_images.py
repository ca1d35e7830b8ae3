"""Canvas decoding with pixel caps, frame encoding, PNG metadata."""

from __future__ import annotations

import io
import struct
import time
import tracemalloc
import zlib

import pytest
from PIL import Image

from lcm_live.errors import UserError
from lcm_live.studio.images import (
    decode_canvas,
    encode_frame,
    encode_png_with_parameters,
    fit_canvas,
    sniff_format,
)

LIMITS = dict(max_pixels=1024 * 1024, max_side=1024)


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A ~100-byte PNG whose header claims width x height (its data would be a pixel bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_decodes_the_three_formats(fmt):
    img = decode_canvas(_encode(Image.new("RGB", (40, 30), (255, 0, 0)), fmt), **LIMITS)
    assert img.mode == "RGB" and img.size == (40, 30)
    assert sniff_format(_encode(img, fmt)) == fmt


def test_transparent_canvas_becomes_white():
    img = decode_canvas(_encode(Image.new("RGBA", (8, 8), (0, 0, 0, 0)), "PNG"), **LIMITS)
    assert img.getpixel((0, 0)) == (255, 255, 255)


@pytest.mark.parametrize("data", [b"", b"GIF89a" + b"\0" * 20, b"BM" + b"\0" * 60, b"\x89PNG\r\n\x1a\nbroken"])
def test_refuses_other_formats_and_garbage(data):
    with pytest.raises(UserError) as info:
        decode_canvas(data, **LIMITS)
    assert info.value.field == "image"


def test_pixel_bomb_is_refused_fast_without_allocating():
    bomb = png_claiming(50000, 50000)
    assert len(bomb) < 1024
    tracemalloc.start()
    t0 = time.perf_counter()
    with pytest.raises(UserError, match="50000x50000|too many pixels"):
        decode_canvas(bomb, **LIMITS)
    elapsed = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 20 * 1024 * 1024
    assert elapsed < 5  # generous: it is microseconds; a decoded 50000^2 image would take minutes and 7.5 GB


def test_too_big_but_honest_image_is_refused():
    with pytest.raises(UserError, match="1025x8"):
        decode_canvas(_encode(Image.new("RGB", (1025, 8)), "PNG"), **LIMITS)
    with pytest.raises(UserError):
        decode_canvas(_encode(Image.new("RGB", (600, 600)), "PNG"), max_pixels=512 * 512, max_side=1024)


def test_fit_and_encode():
    img = Image.new("RGB", (100, 50), (0, 128, 255))
    assert fit_canvas(img, 100, 50) is img
    assert fit_canvas(img, 64, 64).size == (64, 64)
    assert encode_frame(img, "jpeg", 80)[:3] == b"\xff\xd8\xff"
    assert encode_frame(img, "webp", 80)[8:12] == b"WEBP"


def test_png_metadata_round_trip():
    data = encode_png_with_parameters(Image.new("RGB", (8, 8)), {"prompt": "a cat", "seed": 5, "loras": []})
    img = Image.open(io.BytesIO(data))
    assert img.text["prompt"] == "a cat" and img.text["seed"] == "5"
    assert '"seed": 5' in img.text["parameters"]
