"""``POST /api/upscale``: keep and upscale a frame, on the worker's engine between live frames.

The body is JSON: ``{"image": <base64 PNG, JPEG or WebP, or a data: URL>, "scale": 2 | 4}`` and optionally
``prompt``, ``negative_prompt``, ``seed``, ``num_inference_steps``, ``guidance_scale``, ``strength`` (default 0.3),
``upscaler``. Fields left out come from the PNG's own ``parameters`` chunk (frames the studio or the CLI saved carry
it), then from the model's defaults. The recipe is engine/upscale.py's tiled image-to-image: each tile is one worker
job in a slot of its own, served round-robin with the live sessions, so live frames keep coming between tiles (one
tile's time at most). ``"upscaler": "esrgan"`` replaces the Lanczos step with the ESRGAN model the operator loaded
(``serve --upscaler``; engine/esrgan.py) and stops there; ``"esrgan+lcm"`` follows it with the tiled pass. The
ESRGAN model runs on this request's own thread (not a worker job: one request at a time, its lock), so on a CPU it
shares the cores with the live frames while it runs. Answers with the PNG and its parameters, or, with ``Accept:
application/x-ndjson``, a stream of one JSON object per line: ``{"type": "upscale", "stage": "esrgan", "tile",
"tiles"}`` after each ESRGAN tile, ``{"type": "upscale", "tile", "tiles"}`` after each LCM tile, then ``{"type":
"upscaled", "width", "height", "parameters", "image": "data:image/png;base64,..."}`` (or ``{"type": "error", ...}``).

Limits as the other REST routes: the token and Host/Origin rules, ``max_body_bytes``, the canvas limits; one
upscale at a time per client address (another gets 429), at most ``rest_queue_size`` at once; the output at most
``max_upscale_pixels`` (a 422 naming ``scale`` and the cap). No model path comes from the request.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import dataclasses
import json
import secrets
import struct
import threading
import zlib
from functools import partial
from typing import TYPE_CHECKING, Any, Literal

from fastapi import FastAPI, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lcm_live.engine.hooks import Cancelled
from lcm_live.engine.upscale import (
    UpscaleRequest,
    check_scale,
    default_strength,
    frame_request,
    plan_tiles,
    resolve_tiling,
    upscale,
)
from lcm_live.errors import UserError
from lcm_live.studio.http_errors import ApiError
from lcm_live.studio.images import encode_png_with_parameters
from lcm_live.studio.json_input import JsonRefused, loads_checked
from lcm_live.studio.params import parse_params, validation_error_to_user_error
from lcm_live.studio.public import public_parameters
from lcm_live.studio.request_body import b64_bytes, decode_picture, read_json_object
from lcm_live.studio.worker import Job

if TYPE_CHECKING:
    from lcm_live.studio.app import StudioState

NDJSON = "application/x-ndjson"
_STATUS = {"invalid_params": 422, "invalid_image": 422, "timeout": 504, "oom": 500, "engine_error": 500, "not_ready": 503,
           "cancelled": 503}


class UpscaleBody(BaseModel):
    """The body's fields besides ``image`` (strict: unknown fields are refused). Bounds on the generation fields
    are the live params' (/api/schema), checked when the tiles' params are built."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)
    scale: Literal[2, 4] = 2
    prompt: str | None = None
    negative_prompt: str | None = None
    seed: int | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    model: str | None = Field(None, description="the model preset (GET /api/models); default: the frame's when it "
                              "names one of this server's, else the default preset")
    lora_scales: dict[str, float] | None = None
    strength: float | None = Field(None, description="how much each tile is redrawn; low keeps the frame (default: "
                                   "0.3, or 1 / steps where img2img runs steps * strength steps)")
    upscaler: Literal["lcm", "esrgan", "esrgan+lcm"] = Field(
        "lcm", description="lcm: Lanczos then the tiled LCM pass; esrgan: the server's ESRGAN model (serve "
        "--upscaler) alone; esrgan+lcm: the ESRGAN model, then the tiled pass")


class TileFailed(Exception):
    def __init__(self, code: str, message: str, field: str | None):
        super().__init__(message)
        self.code, self.message, self.field = code, message, field


class _TileSink:
    """A tile job's outcome as a concurrent future, resolved from the worker thread."""

    def __init__(self) -> None:
        self.future: concurrent.futures.Future = concurrent.futures.Future()

    def _set(self, value: tuple) -> None:
        if not self.future.done():
            self.future.set_result(value)

    def wants_preview(self) -> bool:
        return False

    def on_frame(self, job: Job, image: Any, *, final: bool, step: int, total: int, generation_s: float,
                 parameters: dict[str, Any]) -> None:
        if final:
            self._set(("frame", image, parameters))

    def on_error(self, job: Job, code: str, message: str, field: str | None) -> None:
        self._set(("error", code, message, field))

    def on_done(self, job: Job, outcome: str) -> None:
        self._set(("error", "cancelled", "the upscale was cancelled (server shutting down)", None))


def png_parameters(raw: bytes, max_chars: int) -> str | None:
    """The text of a PNG's ``parameters`` chunk (tEXt, zTXt or iTXt), read from its chunks without decoding any
    pixel; None when there is none (or the file is not a PNG). A compressed chunk inflates to ``max_chars`` at
    most (a zip bomb stops there)."""
    if not raw.startswith(b"\x89PNG\r\n\x1a\n"):
        return None
    pos = 8
    while pos + 8 <= len(raw):
        length, kind = struct.unpack(">I4s", raw[pos:pos + 8])
        data = raw[pos + 8:pos + 8 + length]
        pos += 12 + length
        if kind == b"IEND":
            break
        if kind not in (b"tEXt", b"zTXt", b"iTXt") or not data.startswith(b"parameters\0"):
            continue
        body = data[len(b"parameters\0"):]
        try:
            if kind == b"tEXt":
                return body[:max_chars].decode("latin-1")
            if kind == b"zTXt":
                return zlib.decompressobj().decompress(body[1:], max_chars).decode("latin-1")
            compressed = body[0] == 1
            rest = body[2:].split(b"\0", 2)  # language, translated keyword, text
            text = rest[2] if len(rest) == 3 else b""
            text = zlib.decompressobj().decompress(text, max_chars) if compressed else text[:max_chars]
            return text.decode("utf-8")
        except (zlib.error, UnicodeDecodeError, IndexError):
            return None
    return None


def add_upscale_routes(app: FastAPI, studio: StudioState, dependencies: list) -> None:
    s = studio.settings.studio
    active: dict[str, str] = {}  # client address -> its upscale's slot

    @app.post("/api/upscale", dependencies=dependencies)
    async def api_upscale(request: Request) -> Response:
        if not studio.worker.ready:
            raise ApiError(503, "not_ready", f"the model is not ready ({studio.worker.detail})",
                           headers={"Retry-After": "5"})
        client = request.client.host if request.client else "unknown"
        # Before the body is read: a refused request costs nothing.
        if client in active:
            studio.metrics.rejected.labels(reason="capacity").inc()
            raise ApiError(429, "busy", "an upscale of yours is running: one at a time per client, wait for it",
                           headers={"Retry-After": "5"})
        if len(active) >= s.rest_queue_size:
            studio.metrics.rejected.labels(reason="capacity").inc()
            raise ApiError(429, "capacity", f"{len(active)} upscales are running: retry shortly",
                           headers={"Retry-After": "5"})
        slot = f"upscale-{secrets.token_hex(6)}"
        active[client] = slot
        stop = threading.Event()
        handed_over = False
        try:
            upscale_request, frame, tile_params, choice = await _read(request)
            run = partial(_run_upscale, studio, asyncio.get_running_loop(), slot, stop, upscale_request, frame,
                          tile_params, choice)
            if NDJSON in request.headers.get("accept", ""):
                handed_over = True  # the stream clears ``active`` when it ends
                return StreamingResponse(_stream(run, client, slot, stop, _event_count(upscale_request, choice)),
                                         media_type=NDJSON)
            image, parameters = await _watching(request, stop, asyncio.ensure_future(asyncio.to_thread(run, None)))
            png = await asyncio.to_thread(encode_png_with_parameters, image, parameters)
            return Response(png, media_type="image/png", headers={
                "Content-Disposition": f'inline; filename="lcm-live-{parameters.get("seed")}-x{upscale_request.scale}'
                                       '.png"'})
        except TileFailed as exc:
            raise ApiError(_STATUS.get(exc.code, 500), exc.code, exc.message, exc.field) from None
        except UserError as exc:
            raise ApiError(422, "invalid_params", exc.message, exc.field) from None
        finally:
            if not handed_over:
                _finish(client, slot, stop)

    def _finish(client: str, slot: str, stop: threading.Event) -> None:
        stop.set()  # the client went away, or it is over: no tile after this one
        studio.worker.cancel(slot)
        if active.get(client) == slot:
            del active[client]

    async def _stream(run, client: str, slot: str, stop: threading.Event, tiles: int):
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue(maxsize=tiles)  # one progress event per tile, never more

        def on_progress(event: dict[str, Any]) -> None:
            loop.call_soon_threadsafe(events.put_nowait, event)

        task = asyncio.ensure_future(asyncio.to_thread(run, on_progress))
        try:
            while not task.done() or not events.empty():
                getter = asyncio.ensure_future(events.get())
                done, _ = await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
                if getter in done:
                    yield json.dumps(getter.result()) + "\n"
                else:
                    getter.cancel()
            try:
                image, parameters = task.result()
            except TileFailed as exc:
                yield _error_line(exc.code, exc.message, exc.field)
                return
            except UserError as exc:
                yield _error_line("invalid_params", exc.message, exc.field)
                return
            png = await asyncio.to_thread(encode_png_with_parameters, image, parameters)
            yield json.dumps({"type": "upscaled", "width": image.size[0], "height": image.size[1],
                              "parameters": parameters,
                              "image": "data:image/png;base64," + base64.b64encode(png).decode("ascii")}) + "\n"
        finally:
            _finish(client, slot, stop)

    async def _read(request: Request) -> tuple[UpscaleRequest, dict[str, Any], Any, str]:
        """The body, checked: the upscale request, the frame's own parameters, the tiles' live params (None
        without the tiled pass) and the ``upscaler`` choice."""
        data = await read_json_object(request, studio, "{\"image\": <base64 PNG>, \"scale\": 2}")
        image_b64 = data.pop("image", None)
        if not isinstance(image_b64, str) or not image_b64:
            raise ApiError(422, "invalid_params", "\"image\" is needed: the frame as a base64 PNG (its parameters "
                           "chunk gives the prompt and seed), JPEG or WebP", "image")
        try:
            fields = UpscaleBody.model_validate(data)
        except ValidationError as exc:
            error = validation_error_to_user_error(exc)
            raise ApiError(422, "invalid_params", error.message, error.field) from None
        if fields.upscaler != "lcm" and studio.upscaler is None:  # before the image is decoded: costs nothing
            raise ApiError(422, "invalid_params", f"upscaler={fields.upscaler!r}: this server has no ESRGAN model "
                           "(its operator loads one with lcm-live serve --upscaler PATH.safetensors; GET /api/info "
                           "names it when loaded): send \"upscaler\": \"lcm\" (the tiled LCM pass) or leave it out",
                           "upscaler")
        raw = await b64_bytes(image_b64)
        image = await decode_picture(raw, studio)
        frame = _frame(raw)
        # The cap first: one clear error naming scale and the cap, before any tile runs.
        check_scale(fields.scale, *image.size, s.max_upscale_pixels)
        req = frame_request(UpscaleRequest(
            image=image, scale=fields.scale, prompt=fields.prompt or "", negative_prompt=fields.negative_prompt,
            seed=fields.seed, num_inference_steps=fields.num_inference_steps, guidance_scale=fields.guidance_scale,
            strength=fields.strength), frame)
        if fields.upscaler == "esrgan":  # the ESRGAN model alone: no tile runs, no generation values to check;
            # the frame's values as the body gives them (a page's JPEG frame has no chunk) go into the output's
            own = {k: getattr(req, k) for k in ("prompt", "negative_prompt", "seed", "num_inference_steps",
                                                "guidance_scale")}
            return req, {**frame, **{k: v for k, v in own.items() if v not in (None, "")}}, None, fields.upscaler
        if req.seed is None:
            req.seed = secrets.randbits(32)
        model = studio.params_model
        if req.strength is None:
            steps = req.num_inference_steps or model.model_fields["num_inference_steps"].default
            req.strength = default_strength(steps, model.lcm_img2img)
        tile = min(model.model_fields["width"].default, model.model_fields["height"].default)
        req.tile_size = tile
        values = {"mode": "img2img", "prompt": req.prompt, "negative_prompt": req.negative_prompt or "",
                  "seed": req.seed, "num_inference_steps": req.num_inference_steps,
                  "guidance_scale": req.guidance_scale, "strength": req.strength, "width": tile, "height": tile,
                  "previews": False}
        registry = getattr(model, "registry", None)
        preset = fields.model if fields.model is not None else frame.get("model")
        if preset is not None and (fields.model is not None or (registry is not None and preset in registry.names)):
            values["model"] = preset  # checked against the allowlist by parse_params, never a path
        if fields.lora_scales is not None:
            values["lora_scales"] = fields.lora_scales
        if isinstance(values["guidance_scale"], int):
            values["guidance_scale"] = float(values["guidance_scale"])
        tile_params = parse_params(model, {k: v for k, v in values.items() if v is not None})
        return req, frame, tile_params, fields.upscaler

    def _frame(raw: bytes) -> dict[str, Any]:
        """The frame's own parameters (its PNG chunk), {} without one; a chunk that is not a JSON object is
        ignored (it is the client's own metadata, not a request)."""
        text = png_parameters(raw, s.max_ws_text_bytes)
        if text is None:
            return {}
        try:
            value = loads_checked(text.encode("utf-8"), max_bytes=s.max_ws_text_bytes, max_depth=s.json_max_depth,
                                  what="the image's parameters")
        except JsonRefused:
            return {}
        return value if isinstance(value, dict) else {}


def _run_upscale(studio: StudioState, loop: asyncio.AbstractEventLoop, slot: str, stop: threading.Event,
                 request: UpscaleRequest, frame: dict[str, Any], tile_params: Any, choice: str,
                 on_progress: Any) -> tuple[Any, dict[str, Any]]:
    """On a thread of its own: the recipe, each tile a worker job in ``slot`` (the ESRGAN model, for ``choice``
    esrgan*, on this thread); (image, public parameters). ``on_progress(event dict)`` after each tile. Jobs are
    submitted and cancelled on the event loop, where every worker kind takes them (Ray's needs the loop)."""
    s = studio.settings.studio
    wait = s.queue_wait_timeout_s + s.generation_timeout_s + 5

    def on_loop(fn: Any, *args: Any) -> Any:
        async def call() -> Any:
            return fn(*args)

        return asyncio.run_coroutine_threadsafe(call(), loop).result()

    def tile_fn(tile_image: Any, index: int) -> tuple[Any, dict[str, Any]]:
        if stop.is_set():
            raise Cancelled("the client went away")
        sink = _TileSink()
        try:
            on_loop(studio.worker.submit, slot, Job(params=tile_params, sink=sink, canvas=tile_image, scope=slot))
        except RuntimeError:
            raise TileFailed("not_ready", "the server is shutting down", None) from None
        try:
            outcome = sink.future.result(timeout=wait)
        except concurrent.futures.TimeoutError:
            on_loop(studio.worker.cancel, slot, "timeout")
            raise TileFailed("timeout", f"tile {index + 1} took too long: try again when the server is less "
                             "busy", None) from None
        if outcome[0] == "error":
            _, code, message, field = outcome
            raise TileFailed(code, f"tile {index + 1}: {message}", field)
        return outcome[1], outcome[2]

    def on_tile(event: Any) -> None:
        if on_progress is not None:
            on_progress({"type": "upscale", "tile": event.tile, "tiles": event.tiles})

    def on_esrgan_tile(tile: int, tiles: int) -> None:
        if on_progress is not None:
            on_progress({"type": "upscale", "stage": "esrgan", "tile": tile, "tiles": tiles})
        if stop.is_set() and tile < tiles:
            raise Cancelled("the client went away")

    upscaler = None
    if choice != "lcm":  # a copy of the loaded model that reports this request's progress (the same lock)
        upscaler = dataclasses.replace(studio.upscaler, on_tile=on_esrgan_tile)
    refine = choice != "esrgan"
    try:
        image, parameters = upscale(None, request, frame=frame, max_pixels=s.max_upscale_pixels,
                                    tile_fn=tile_fn if refine else None, callback=on_tile, upscaler=upscaler,
                                    refine=refine)
    except Cancelled:
        raise TileFailed("cancelled", "the upscale was cancelled", None) from None
    parameters.pop("previews", None)
    return image, public_parameters(parameters)


async def _watching(request: Request, stop: threading.Event, task: asyncio.Future) -> Any:
    """``task``'s result; meanwhile, a client that goes away sets ``stop`` (no tile after the running one). The body
    is read, so the next message from the server is ``http.disconnect``: the client left (or the answer went out)."""
    async def listen() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        stop.set()

    listener = asyncio.ensure_future(listen())
    try:
        await asyncio.wait({task}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        listener.cancel()
    return task.result()


def _event_count(request: UpscaleRequest, choice: str) -> int:
    """How many progress events the upscale of ``request`` (its tile size set) sends: one per tile, ESRGAN's and
    the LCM pass's."""
    width, height = request.image.size
    count = 0
    if choice != "lcm":
        from lcm_live.engine.esrgan import tile_count

        count += tile_count(width, height)
    if choice != "esrgan":
        tile, overlap = resolve_tiling(request.tile_size, request.tile_overlap, request.tile_size)
        count += len(plan_tiles(width * request.scale, height * request.scale, tile, overlap)[1])
    return count


def _error_line(code: str, message: str, field: str | None) -> str:
    return json.dumps({"type": "error", "code": code, "message": message, "field": field}) + "\n"
