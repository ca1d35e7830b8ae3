"""Image bytes in and out of the studio: canvas decoding with pixel caps, frame encoding, PNG with metadata.

All of these are CPU work: callers run them off the event loop (``asyncio.to_thread``).
"""

from __future__ import annotations

import io
import json
from typing import Any

from PIL import Image, PngImagePlugin

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


def decode_canvas(data: bytes, *, max_pixels: int, max_side: int) -> Image.Image:
    """Decode a PNG/JPEG/WebP canvas to RGB, refusing oversized images before any pixel is decoded.

    Pillow's ``Image.open`` reads only the header, so a tiny file that claims 50000x50000 is refused here in
    microseconds without allocating its pixels. Transparent pixels become white (the canvas background).
    """
    fmt = sniff_format(data)
    if fmt is None:
        raise UserError("the canvas is not a PNG, JPEG or WebP image: send one of those", field="image")
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
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
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


def frame_mime(fmt: str) -> str:
    return "image/webp" if fmt == "webp" else "image/jpeg"


def encode_png_with_parameters(img: Image.Image, parameters: dict[str, Any]) -> bytes:
    """PNG with the parameters as text chunks: ``parameters`` (JSON of all) plus one chunk per key."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", json.dumps(parameters, sort_keys=True, default=str))
    for key, value in parameters.items():
        info.add_text(str(key), value if isinstance(value, str) else json.dumps(value, default=str))
    buf = io.BytesIO()
    img.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()
