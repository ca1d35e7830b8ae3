"""The binary layers a session holds: the canvas, the mask, the region masks, the IP-Adapter's reference image and
the extra ControlNets' images (docs/protocol.md).

A binary WebSocket message is either a bare image (the canvas, as clients before layers sent it) or an 8-byte
envelope followed by an image, or by nothing to clear that layer::

    b"LCML" + layer + index + b"\\0\\0" + image
    layer: b"c" canvas | b"m" mask | b"r" region (index 0-7) | b"i" reference image (IP-Adapter)
           | b"n" ControlNet image (index 1-7: net k's; net 0's image is the canvas)

No image format starts with ``LCML``, so the two forms cannot be confused.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from lcm_live.engine.request import MAX_REGIONS
from lcm_live.errors import UserError

MAGIC = b"LCML"
HEADER_BYTES = 8
LAYER_CODES = {b"c": "canvas", b"m": "mask", b"r": "region", b"i": "reference", b"n": "control"}
PICTURE_LAYERS = ("canvas", "reference", "control")  # decoded as RGB pictures; the others are masks
MAX_CONTROLNETS = 8  # net indexes 0-7 (0: the canvas)


@dataclass(frozen=True)
class LayerMessage:
    layer: str  # "canvas" | "mask" | "region" | "reference" | "control"
    index: int  # the region's or ControlNet's index; 0 for the others
    image: bytes  # empty: clear the layer

    @property
    def key(self) -> str:
        return f"{self.layer}:{self.index}" if self.layer in ("region", "control") else self.layer


def parse_layer_message(data: bytes) -> LayerMessage:
    """A binary message as (layer, index, image bytes); raises UserError (field "layer") for a bad envelope."""
    if not data.startswith(MAGIC):
        return LayerMessage("canvas", 0, data)
    if len(data) < HEADER_BYTES:
        raise UserError(f"a layer envelope is {HEADER_BYTES} bytes (LCML, layer, index, 0, 0); this one is "
                        f"{len(data)}", field="layer")
    layer = LAYER_CODES.get(data[4:5])
    if layer is None:
        raise UserError(f"layer {data[4:5]!r}: use b'c' (canvas), b'm' (mask), b'r' (region), b'i' (reference "
                        "image) or b'n' (a ControlNet's image)", field="layer")
    index = data[5]
    if layer == "region" and index >= MAX_REGIONS:
        raise UserError(f"region {index}: regions are numbered 0 to {MAX_REGIONS - 1}", field="layer")
    if layer == "control" and not 1 <= index < MAX_CONTROLNETS:
        raise UserError(f"ControlNet {index}: its image layer is numbered 1 to {MAX_CONTROLNETS - 1} (net 0's image "
                        "is the canvas)", field="layer")
    if layer not in ("region", "control") and index != 0:
        raise UserError(f"the {layer} layer has index 0, not {index}", field="layer")
    if data[6:8] != b"\0\0":
        raise UserError("bytes 6-7 of a layer envelope are reserved: send two zero bytes", field="layer")
    return LayerMessage(layer, index, data[HEADER_BYTES:])


def as_mask(image: Any, what: str) -> Any:
    """A decoded mask as greyscale (white = selected); an all-black one is refused: it would select nothing."""
    grey = image.convert("L")
    if grey.point(lambda v: 255 if v >= 128 else 0).getbbox() is None:
        raise UserError(f"the {what} is all black, so nothing would change: paint white where the picture should "
                        "change (or clear the layer)", field=what.replace(" ", "_"))
    return grey


@dataclass
class Layers:
    """A session's decoded layers, each with the digest of the bytes it came from (what makes input "unchanged")."""

    images: dict[str, Any] = field(default_factory=dict)  # "canvas", "mask", "region:K" -> PIL image
    digests: dict[str, str] = field(default_factory=dict)
    canvas_sizes: list[tuple[int, int]] = field(default_factory=list)  # the canvas's last two sizes

    @staticmethod
    def digest(data: bytes) -> str:
        return hashlib.blake2b(data, digest_size=16).hexdigest()

    def has(self, key: str) -> bool:
        return key in self.images

    def same(self, key: str, data: bytes) -> bool:
        return self.digests.get(key) == self.digest(data)

    def put(self, key: str, image: Any, data: bytes) -> None:
        self.images[key], self.digests[key] = image, self.digest(data)
        if key == "canvas" and (not self.canvas_sizes or self.canvas_sizes[-1] != image.size):
            self.canvas_sizes = [*self.canvas_sizes[-1:], image.size]

    def clear(self, key: str) -> bool:
        """Forget a layer; True when there was one."""
        self.digests.pop(key, None)
        return self.images.pop(key, None) is not None

    def get(self, key: str) -> Any:
        return self.images.get(key)

    def key_of(self, keys: list[str]) -> tuple:
        """The digests of ``keys`` (what a generation used), for the unchanged-input check."""
        return tuple(self.digests.get(k) for k in keys)


@dataclass
class JobInputs:
    """What one generation takes from the session's layers, and the key that makes the same input "unchanged"."""

    canvas: Any = None
    mask: Any = None
    init_image: Any = None
    region_masks: list[Any] = field(default_factory=list)
    # The conditionings' pictures, as GenerationParams.to_request takes them: "reference" (the IP-Adapter's) and
    # "control_images" (net k's layer for k >= 1, None where none was sent).
    images: dict[str, Any] = field(default_factory=dict)
    key: tuple = ()
    notes: list[str] = field(default_factory=list)  # said to the client once each (a mask fitted, ...)


def job_inputs(params: Any, layers: Layers, last_frame: tuple[int, Any] | None) -> JobInputs | str:
    """The layers ``params`` need, or why the session must wait (a message for the client).

    ``last_frame``: (its number, the image) of the session's last final frame: in control mode with a mask it is
    the picture kept outside the mask."""
    from lcm_live.studio.params import CANVAS_MODES, CONTROL_MODE

    mode = params.mode
    uses_canvas = mode in CANVAS_MODES
    canvas = layers.get("canvas") if uses_canvas else None
    if uses_canvas and canvas is None:
        return f"{mode}: waiting for the canvas (send it as a binary PNG, JPEG or WebP message)"
    out = JobInputs(canvas=canvas)
    keys = ["canvas"] if uses_canvas else []
    mask = layers.get("mask") if uses_canvas else None
    if mask is not None and mode == CONTROL_MODE:
        if last_frame is None:
            out.notes.append("lines mode with a mask redraws the masked part of the last picture: this first "
                             "picture is made without the mask")
            mask = None
        else:
            out.init_image = last_frame[1]
    if mask is not None:
        # A mask of the canvas's size before its last resize is the page's own, about to follow: fitted silently.
        if mask.size != canvas.size and mask.size not in layers.canvas_sizes:
            out.notes.append(f"the mask is {mask.size[0]}x{mask.size[1]}; fitted to the canvas's "
                             f"{canvas.size[0]}x{canvas.size[1]}")
        if mask.size != canvas.size:
            mask = mask.resize(canvas.size)
        out.mask = mask
        keys.append("mask")
    for k in range(len(params.regions)):
        region = layers.get(f"region:{k}")
        if region is None:
            return f"regions[{k}]: waiting for its mask (a binary message with the layer envelope r{k})"
        out.region_masks.append(region)
        keys.append(f"region:{k}")
    fields = type(params).model_fields
    if "ip_adapter_scale" in fields and layers.has("reference"):  # an IP-Adapter is loaded: any mode
        out.images["reference"] = layers.get("reference")
        keys.append("reference")
    nets = getattr(type(params), "controlnets", 0)
    if mode == CONTROL_MODE and nets > 1:
        out.images["control_images"] = [layers.get(f"control:{k}") for k in range(1, nets)]
        keys += [f"control:{k}" for k in range(1, nets) if layers.has(f"control:{k}")]
    frame_no = last_frame[0] if out.init_image is not None else None
    out.key = (params.model_dump_json(), frame_no, *zip(keys, layers.key_of(keys), strict=True))
    return out
