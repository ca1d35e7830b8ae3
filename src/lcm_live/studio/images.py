"""Image bytes in and out of the studio: canvas decoding with pixel caps, frame encoding, PNG with metadata.

All of these are CPU work: callers run them off the event loop (``asyncio.to_thread``).
"""

from __future__ import annotations

import io
from typing import Any

from PIL import Image

from lcm_live.errors import UserError

# Magic bytes of the formats the canvas may come in; everything else is refused before Pillow sees it.
_MAGIC = {
    "PNG": (b"\x89PNG\r\n\x1a\n",),
    "JPEG": (b"\xff\xd8\xff",),
}


def sniff_format(data: bytes) -> str | None:
    """'PNG', 'JPEG', 'WEBP' from the first bytes, else None."""
    for name, prefixes in _MAGIC.items():
        if data.startswith(prefixes):
            return name
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def count_jpeg_scans(data: bytes, stop_after: int) -> int:
    """How many scans (SOS segments) a JPEG holds, counted from its markers without decoding; stops counting
    once past ``stop_after``. Each scan of a progressive JPEG is a full pass of the decoder over the image, so the
    scan count bounds the decode cost (a browser's canvas.toBlob JPEG has 1 scan, a progressive one about 10)."""
    n, pos, scans = len(data), 2, 0  # after SOI
    while pos + 4 <= n:
        if data[pos] != 0xFF:  # not at a marker: broken structure, Pillow will say so
            return scans
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0xD9:  # EOI
            return scans
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            pos += 2
            continue
        pos += 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
        if marker != 0xDA:
            continue
        scans += 1
        if scans > stop_after:
            return scans
        while True:  # entropy-coded data: runs to the next marker that is not 0xFF00 stuffing or a restart
            pos = data.find(b"\xff", pos)
            if pos < 0 or pos + 1 >= n:
                return scans
            following = data[pos + 1]
            if following == 0x00 or 0xD0 <= following <= 0xD7:
                pos += 2
            elif following == 0xFF:
                pos += 1
            else:
                break
    return scans


def decode_canvas(data: bytes, *, max_pixels: int, max_side: int, max_jpeg_scans: int = 16,
                  background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Decode a PNG/JPEG/WebP canvas to RGB, refusing oversized images before any pixel is decoded.

    Pillow's ``Image.open`` reads only the header, so a tiny file that claims 50000x50000 is refused here in
    microseconds without allocating its pixels; a JPEG with more than ``max_jpeg_scans`` scans (a progressive
    file with its scans repeated: seconds of decoding in 1.4 MB) is refused from its markers alone. Animated
    images give their first frame. Transparent pixels become ``background`` (white: the canvas's; a mask's is
    black, so that what was not painted is kept).
    """
    fmt = sniff_format(data)
    if fmt is None:
        raise UserError("the canvas is not a PNG, JPEG or WebP image: send one of those", field="image")
    if fmt == "JPEG":
        scans = count_jpeg_scans(data, max_jpeg_scans)
        if scans > max_jpeg_scans:
            raise UserError(f"the canvas is a JPEG of more than {max_jpeg_scans} scans, too costly to decode: "
                            "send a baseline JPEG, a PNG or a WebP", field="image")
    try:
        img = Image.open(io.BytesIO(data), formats=[fmt])
    except Image.DecompressionBombError:
        raise UserError(
            f"the canvas claims too many pixels: send at most {max_side}x{max_side} ({max_pixels} pixels)", field="image"
        ) from None
    except Exception:
        raise UserError(f"the canvas could not be read as {fmt}: send a valid image", field="image") from None
    width, height = img.size
    if width < 1 or height < 1 or width > max_side or height > max_side or width * height > max_pixels:
        raise UserError(
            f"the canvas is {width}x{height}: send at most {max_side}x{max_side} ({max_pixels} pixels)", field="image"
        )
    try:
        img.load()
    except Exception:
        raise UserError(f"the canvas could not be decoded as {fmt}: send a valid image", field="image") from None
    if img.mode in ("RGBA", "LA", "P", "PA"):
        rgba = img.convert("RGBA")
        under = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(under, rgba).convert("RGB")
    return img.convert("RGB")


def fit_canvas(img: Image.Image, width: int, height: int) -> Image.Image:
    """The canvas at the generation size (img2img takes its size from the init image)."""
    if img.size == (width, height):
        return img
    return img.resize((width, height), Image.Resampling.LANCZOS)


# "edges": a photo (an upload, the camera) as the white-on-black lines that line ControlNets take. The grey image is
# blurred (sensor noise), filtered with PIL's FIND_EDGES (a Laplacian) and thresholded; the frame's outer pixels,
# where the filter sees the padding as an edge, are cleared. Level and blur were picked on a noisy synthetic photo:
# about 40 % of a disc's 8-pixel boundary band lit, next to nothing elsewhere.
EDGE_BLUR = 1.5
EDGE_LEVEL = 8
EDGE_MARGIN = 2
CONTROL_PREPROCESS = ("invert", "edges", "none")


def control_edges(img: Image.Image) -> Image.Image:
    from PIL import ImageFilter

    grey = img.convert("L").filter(ImageFilter.GaussianBlur(EDGE_BLUR)).filter(ImageFilter.FIND_EDGES)
    edges = grey.point(lambda v: 255 if v >= EDGE_LEVEL else 0)
    w, h = edges.size
    framed = Image.new("L", (w, h), 0)
    inner = (EDGE_MARGIN, EDGE_MARGIN, w - EDGE_MARGIN, h - EDGE_MARGIN)
    framed.paste(edges.crop(inner), inner[:2])
    return framed.convert("RGB")


def prepare_canvas(img: Image.Image, mode: str, width: int, height: int, *, preprocess: str = "none") -> Image.Image:
    """The canvas as the engine takes it: at the generation size; in control mode made into what a line
    ControlNet takes (white lines on black): ``invert`` for a drawing (dark lines on white), ``edges`` for a photo
    or the camera, ``none`` as it is (a depth map, or lines already white on black)."""
    img = fit_canvas(img, width, height)
    if mode != "control" or preprocess == "none":
        return img
    if preprocess == "edges":
        return control_edges(img)
    from PIL import ImageOps

    return ImageOps.invert(img.convert("RGB"))


def encode_frame(img: Image.Image, fmt: str = "jpeg", quality: int = 85) -> bytes:
    """A frame for the WebSocket: JPEG or WebP bytes."""
    buf = io.BytesIO()
    if img.mode != "RGB":
        img = img.convert("RGB")
    if fmt == "webp":
        img.save(buf, format="WEBP", quality=quality, method=0)  # method 0: fastest encoder
    else:
        img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def encode_png_with_parameters(img: Image.Image, parameters: dict[str, Any]) -> bytes:
    """PNG with the parameters as text chunks, written as the CLI writes them (engine/metadata.py: one writer)."""
    from lcm_live.engine.metadata import png_info

    buf = io.BytesIO()
    img.save(buf, format="PNG", pnginfo=png_info(parameters))
    return buf.getvalue()
