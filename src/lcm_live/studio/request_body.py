"""Reading a REST request's body: a JSON object within the studio's limits, and its base64 image fields.

Shared by ``POST /api/generate`` (rest.py) and ``POST /api/upscale`` (upscale_route.py): the same caps
(``max_body_bytes``, ``json_max_depth``, the canvas limits), the same error codes and the same metrics.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from functools import partial
from typing import TYPE_CHECKING, Any

from fastapi import Request
from starlette.requests import ClientDisconnect

from lcm_live.errors import UserError
from lcm_live.studio.http_errors import ApiError
from lcm_live.studio.json_input import JsonRefused, loads_checked

if TYPE_CHECKING:
    from lcm_live.studio.app import StudioState

SMALL_BODY = 64 * 1024  # bytes: parsed on the event loop; a larger body is parsed on a thread


async def read_json_object(request: Request, studio: StudioState, shape: str) -> dict[str, Any]:
    """The body as a JSON object; 400 when it never arrived, 413/422 (counted in ``rejected``) when it is too
    large, too deep or not JSON, 422 naming ``shape`` (what the body should look like) when it is not an object."""
    s = studio.settings.studio
    try:
        body = await request.body()  # GuardMiddleware caps it at max_body_bytes while it streams in
    except ClientDisconnect:  # gone mid-body, or cut by the body deadline (connections.py)
        raise ApiError(400, "invalid_params", "the body did not arrive") from None
    parse = partial(loads_checked, body, max_bytes=s.max_body_bytes, max_depth=s.json_max_depth, what="the body")
    try:  # a body of megabytes is parsed off the event loop (other sessions' frames go out meanwhile)
        data = parse() if len(body) < SMALL_BODY else await asyncio.to_thread(parse)
    except JsonRefused as exc:
        studio.metrics.rejected.labels(reason=exc.code).inc()
        raise ApiError(413 if exc.code == "too_large" else 422, exc.code, exc.message) from None
    if not isinstance(data, dict):
        raise ApiError(422, "invalid_params", f"the body must be a JSON object: {shape}")
    return data


async def b64_bytes(text: Any, field: str = "image") -> bytes:
    """A body's base64 image field (or a ``data:`` URL from a canvas) as bytes; 422 naming ``field`` otherwise."""
    if not isinstance(text, str) or not text:
        raise ApiError(422, "invalid_image", f"\"{field}\" must be a base64 PNG, JPEG or WebP", field)
    if text.startswith("data:") and "," in text[:100]:
        text = text.split(",", 1)[1]  # a data: URL from a canvas.toDataURL() or a fetched blob
    try:
        return await asyncio.to_thread(base64.b64decode, text, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(422, "invalid_image", f"\"{field}\" is not valid base64", field) from None


async def decode_picture(raw: bytes, studio: StudioState, field: str = "image", **options: Any) -> Any:
    """The studio's checked decode (size and pixel caps) of an image field's bytes (``options``: decode_canvas's,
    e.g. ``background``); 422 naming ``field``."""
    try:
        return await studio.decode_canvas(raw, **options)
    except UserError as exc:
        studio.metrics.rejected.labels(reason="invalid_image").inc()
        raise ApiError(422, "invalid_image", exc.message, field) from None
