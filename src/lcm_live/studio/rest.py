"""``POST /api/generate``: one full-quality image as PNG with its parameters, through the same worker as the sessions.

Each request is its own worker slot (served round-robin with the sessions). At most ``rest_queue_size`` requests
wait or run at a time; more get 429 with ``Retry-After`` rather than an ever-longer wait.
"""

from __future__ import annotations

import asyncio
import secrets
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request, Response

from lcm_live.errors import UserError
from lcm_live.studio.http_errors import ApiError
from lcm_live.studio.images import encode_png_with_parameters
from lcm_live.studio.layers import as_mask
from lcm_live.studio.params import CANVAS_MODES, CONTROL_MODE, modes_of, parse_params
from lcm_live.studio.public import public_parameters
from lcm_live.studio.request_body import b64_bytes, decode_picture, read_json_object
from lcm_live.studio.worker import Job

if TYPE_CHECKING:
    from lcm_live.studio.app import StudioState

_STATUS = {"invalid_params": 422, "invalid_image": 422, "timeout": 504, "oom": 500, "engine_error": 500,
           "cancelled": 503}


class RestSink:
    """Resolves an asyncio future from the worker thread: ("frame", image, parameters) or ("error", code, message, field)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.future: asyncio.Future = loop.create_future()

    def _resolve(self, value: tuple) -> None:
        def set_result() -> None:
            if not self.future.done():
                self.future.set_result(value)

        try:
            self.loop.call_soon_threadsafe(set_result)
        except RuntimeError:
            pass

    def wants_preview(self) -> bool:
        return False

    def on_frame(self, job: Job, image: Any, *, final: bool, step: int, total: int, generation_s: float,
                 parameters: dict[str, Any]) -> None:
        if final:
            self._resolve(("frame", image, parameters))

    def on_error(self, job: Job, code: str, message: str, field: str | None) -> None:
        self._resolve(("error", code, message, field))

    def on_done(self, job: Job, outcome: str) -> None:
        if outcome in ("cancelled", "replaced"):
            self._resolve(("error", "cancelled", "the generation was cancelled (server shutting down)", None))


def add_rest_routes(app: FastAPI, studio: StudioState, dependencies: list) -> None:
    s = studio.settings.studio

    @app.post("/api/generate", dependencies=dependencies)
    async def api_generate(request: Request) -> Response:
        if not studio.worker.ready:
            raise ApiError(503, "not_ready", f"the model is not ready ({studio.worker.detail})",
                           headers={"Retry-After": "5"})
        # Capacity first, before the body is even read: a refused request costs nothing, and at most
        # rest_queue_size requests read, parse, decode or wait at a time (crafted bodies cannot pile up CPU work).
        if studio.rest_waiting >= s.rest_queue_size:
            studio.metrics.rejected.labels(reason="capacity").inc()
            raise ApiError(429, "capacity", f"{studio.rest_waiting} generations are already waiting: retry shortly",
                           headers={"Retry-After": "2"})
        studio.rest_waiting += 1
        try:
            return await _generate(request)
        finally:
            studio.rest_waiting -= 1

    async def _generate(request: Request) -> Response:
        data = await read_json_object(request, studio, "the params (GET /api/schema)")
        image_b64, mask_b64 = data.pop("image", None), data.pop("mask", None)
        reference_b64, controls_b64 = data.pop("ip_adapter_image", None), data.pop("control_images", None)
        regions = data.get("regions")
        region_b64 = [r.pop("mask", None) if isinstance(r, dict) else None
                      for r in (regions if isinstance(regions, list) else [])]
        try:
            params = parse_params(studio.params_model, data)
        except UserError as exc:
            studio.metrics.rejected.labels(reason="invalid_params").inc()
            raise ApiError(422, "invalid_params", exc.message, exc.field) from None
        if params.mode in CANVAS_MODES and (not isinstance(image_b64, str) or not image_b64):
            raise ApiError(422, "invalid_params", f"{params.mode} needs \"image\": a base64 PNG, JPEG or WebP",
                           "image")
        if params.mode not in CANVAS_MODES and image_b64 is not None:
            modes = " or ".join(f'\"{m}\"' for m in CANVAS_MODES if m in modes_of(studio.params_model))
            raise ApiError(422, "invalid_params", f"\"image\" is only used with \"mode\": {modes}: set the mode "
                           "or drop the image", "image")
        if mask_b64 is not None and params.mode != "img2img":
            raise ApiError(422, "invalid_params", "\"mask\" says which part of \"image\" to redraw: use it with "
                           "\"mode\": \"img2img\"", "mask")
        for k, b64 in enumerate(region_b64):
            if not isinstance(b64, str) or not b64:
                raise ApiError(422, "invalid_params", f"regions[{k}] needs \"mask\": a base64 PNG, white where its "
                               "prompt applies", f"regions.{k}.mask")
        sink = RestSink(asyncio.get_running_loop())
        slot = f"rest-{secrets.token_hex(6)}"
        canvas = await _decode_image(image_b64, studio) if params.mode in CANVAS_MODES else None
        mask = await _decode_mask(mask_b64, studio, "mask") if mask_b64 is not None else None
        notes = []
        if mask is not None and mask.size != canvas.size:
            notes.append(f"the mask was {mask.size[0]}x{mask.size[1]}; fitted to the image's "
                         f"{canvas.size[0]}x{canvas.size[1]}")
            mask = mask.resize(canvas.size)
        region_masks = [await _decode_mask(b64, studio, f"regions.{k}.mask") for k, b64 in enumerate(region_b64)]
        images = await _conditioning_images(params, reference_b64, controls_b64, studio)
        try:
            studio.worker.submit(slot, Job(params=params, sink=sink, canvas=canvas, mask=mask, scope=slot,
                                           region_masks=region_masks, images=images))
        except RuntimeError:
            raise ApiError(503, "not_ready", "the server is shutting down") from None
        try:
            outcome = await asyncio.wait_for(
                asyncio.shield(sink.future), timeout=s.queue_wait_timeout_s + s.generation_timeout_s + 5)
        except asyncio.TimeoutError:
            studio.worker.cancel(slot, "timeout")
            raise ApiError(504, "timeout", "the generation took too long: try fewer steps or a smaller size") from None
        finally:
            if not sink.future.done():  # the client went away: stop the run at its next step
                studio.worker.cancel(slot)
        if outcome[0] == "error":
            _, code, message, field = outcome
            raise ApiError(_STATUS.get(code, 500), code, message, field)
        _, image, parameters = outcome
        metadata = public_parameters({**params.model_dump(exclude={"previews"}), **parameters})
        if notes:
            metadata["warnings"] = [*notes, *(metadata.get("warnings") or [])]
        if params.mode != "img2img":
            metadata.pop("strength", None)
        if params.mode != "control":
            metadata.pop("controlnet_conditioning_scale", None)
            metadata.pop("control_preprocess", None)
        if mask is None:
            metadata.pop("mask_feather", None)
        if not studio.models.implicit:  # the preset asked for (the engine's "model" is its source's public name)
            metadata["preset"] = params.model
        for name in ("regions", "prompt_blend", "seed_blend", "lora_scales"):
            if not metadata.get(name):
                metadata.pop(name, None)
        png = await asyncio.to_thread(encode_png_with_parameters, image, metadata)
        seed = metadata.get("seed", params.seed)
        return Response(png, media_type="image/png",
                        headers={"Content-Disposition": f'inline; filename="lcm-live-{seed}.png"'})


async def _conditioning_images(params: Any, reference_b64: Any, controls_b64: Any,
                               studio: StudioState) -> dict[str, Any]:
    """The IP-Adapter's reference image and ControlNets 1..N-1's images (the WebSocket's layers i and n+k),
    inline as base64: ``ip_adapter_image`` and ``control_images`` (a list, null where a net sits out)."""
    images: dict[str, Any] = {}
    if reference_b64 is not None:
        if "ip_adapter_scale" not in type(params).model_fields:
            raise ApiError(422, "invalid_params", "\"ip_adapter_image\": this server loads no IP-Adapter (serve "
                           "--ip-adapter ID_OR_PATH): drop the field", "ip_adapter_image")
        images["reference"] = await _decode_image(reference_b64, studio, "ip_adapter_image")
    if controls_b64 is not None:
        nets = getattr(type(params), "controlnets", 0)
        if nets < 2 or params.mode != CONTROL_MODE:
            raise ApiError(422, "invalid_params", "\"control_images\" are ControlNets 2.. 's images: with several "
                           f"ControlNets loaded (this server: {nets}) and \"mode\": \"{CONTROL_MODE}\"",
                           "control_images")
        if not isinstance(controls_b64, list) or len(controls_b64) != nets - 1:
            raise ApiError(422, "invalid_params", f"\"control_images\" must be a list of {nets - 1} base64 images "
                           "(null where a net sits out), one per ControlNet after the first", "control_images")
        images["control_images"] = [None if b64 is None else
                                    await _decode_image(b64, studio, f"control_images.{k}")
                                    for k, b64 in enumerate(controls_b64)]
    return images


async def _decode_image(image_b64: Any, studio: StudioState, field: str = "image") -> Any:
    return await decode_picture(await b64_bytes(image_b64, field), studio, field)


async def _decode_mask(mask_b64: Any, studio: StudioState, field: str) -> Any:
    """A base64 mask (white = selected; transparent = black) as greyscale; an all-black one is refused."""
    picture = await decode_picture(await b64_bytes(mask_b64, field), studio, field, background=(0, 0, 0))
    try:
        return as_mask(picture, field)
    except UserError as exc:
        studio.metrics.rejected.labels(reason="invalid_image").inc()
        raise ApiError(422, "invalid_image", exc.message, field) from None
