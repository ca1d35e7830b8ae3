"""One WebSocket session: its own params, layers (canvas, mask, region masks: studio/layers.py) and frame counter
(nothing mutable is shared between sessions).

Input: the newest params / layers win; unchanged input (the same params and the same bytes of every layer they
use) makes no new frame. Output: at most one frame waits to be sent; a newer frame replaces it (counted as dropped), so
a slow client gets the newest frame when it is ready again and memory stays bounded. The worker thread calls the
``JobSink`` methods; they hop onto the event loop with ``call_soon_threadsafe`` and never block the worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from starlette.websockets import WebSocket, WebSocketState

from lcm_live.errors import UserError
from lcm_live.studio.frames import PendingFrame, frame_info
from lcm_live.studio.images import encode_frame
from lcm_live.studio.json_input import JsonRefused, loads_checked
from lcm_live.studio.layers import PICTURE_LAYERS, Layers, as_mask, job_inputs, parse_layer_message
from lcm_live.studio.params import GenerationParams, parse_params
from lcm_live.studio.similarity import SimilarityFilter
from lcm_live.studio.worker import Job

if TYPE_CHECKING:
    from lcm_live.studio.app import StudioState

log = logging.getLogger("lcm_live.studio")

CONTROL_BACKLOG = 64  # text messages waiting for a slow client; older ones are dropped past this
_FRAME = object()  # the place of the waiting frame in the outbox order


class Session:
    def __init__(self, websocket: WebSocket, studio: StudioState):
        self.id = secrets.token_hex(8)
        self.ws = websocket
        self.studio = studio
        self.loop = asyncio.get_running_loop()
        self.params: GenerationParams | None = None  # the last params that passed validation
        self._engine_accepted: GenerationParams | None = None  # the last params the engine ran without refusing
        self.layers = Layers()  # decoded canvas, mask and region masks
        self._last_final: tuple[int, Any] | None = None  # (number, image) of the last final frame made
        self.last_key: tuple[str, str | None] | None = None  # the input of the last generation asked for
        self.active_job: Job | None = None
        self.inputs = 0  # input messages received (params and canvases, good or not): statuses say how many
        self.frame_id = 0
        self.closed = False
        self._said: set[str] = set()  # notes and waiting reasons already said (each once)
        self._last_warning: str | None = None
        self._first_frame_job: int | None = None  # job whose first frame was already timed
        self._frame: PendingFrame | None = None  # at most one frame waits
        self._last_sent: tuple[Any, bytes] | None = None  # (image, bytes) of the last final frame sent
        self._sending = False
        self._outbox: deque[Any] = deque()  # text messages and the _FRAME marker, in the order they were posted
        self._wake = asyncio.Event()
        self._send_lock = asyncio.Lock()  # a frame's JSON and its binary go out back to back
        self._model_said = studio.models.default  # the preset whose readiness the client last heard
        threshold = studio.settings.studio.similarity_filter  # serve --similarity-filter (studio/similarity.py)
        self.similarity = SimilarityFilter(threshold) if threshold else None

    # ---- JobSink (worker thread) ------------------------------------------------------------------------
    def wants_preview(self) -> bool:
        return not self.closed and self._frame is None and not self._sending

    def on_frame(self, job: Job, image: Any, *, final: bool, step: int, total: int, generation_s: float,
                 parameters: dict[str, Any]) -> None:
        self._call(self._post_frame, PendingFrame(job, image, final, step, total, generation_s, parameters))

    def on_error(self, job: Job, code: str, message: str, field: str | None) -> None:
        self._call(self._post_error, job, code, message, field)

    def on_done(self, job: Job, outcome: str) -> None:
        self._call(self._job_done, job, outcome)

    def on_model(self, job: Job, name: str, state: str, progress: float | None, message: str,
                 **detail: Any) -> None:
        """A model preset this session's job needs is loading, ready or failed (studio/loader.py); ``detail``:
        while its weights are read, ``component``, ``bytes_read`` and ``bytes_total``."""
        self._call(self._say_model, name, state, progress, message, detail)

    def _say_model(self, name: str, state: str, progress: float | None, message: str,
                   detail: dict[str, Any] | None = None) -> None:
        if state == "ready":
            self._model_said = name
        self.send_control({"type": "model", "name": name, "state": state, "progress": progress,
                           "message": message, **(detail or {})})

    def _call(self, fn, *args) -> None:
        try:
            self.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed: the session is long gone
            pass

    # ---- event loop side ----------------------------------------------------------------------------------
    def send_control(self, message: dict[str, Any]) -> None:
        if self.closed:
            return
        if len(self._outbox) >= CONTROL_BACKLOG:  # a client that does not read: forget its oldest text message
            oldest = next((m for m in self._outbox if m is not _FRAME), None)
            if oldest is not None:
                self._outbox.remove(oldest)
        self._outbox.append(message)
        self._wake.set()

    def send_error(self, code: str, message: str, field: str | None = None) -> None:
        self.send_control({"type": "error", "code": code, "message": message, "field": field})

    def on_notice(self, job: Job, message: str) -> None:
        """Something the user should know about this job (a worker lost: it runs again elsewhere)."""
        self._call(self.send_control, {"type": "warning", "message": message})

    def _post_frame(self, frame: PendingFrame) -> None:
        if self.closed:
            return
        if self._last_final is not None and frame.job.id < self._last_final[0]:
            # With several workers (studio/pool.py) a frame of older input can finish after a newer one: the
            # client never gets a frame older than one it has.
            self.studio.metrics.frames_dropped.inc()
            return
        name = self.studio.models.name_of(frame.job.params.model)
        if name != self._model_said:  # a switch to a loaded preset: no load to report, but the client waits
            self._say_model(name, "ready", 1.0, f"{name} is ready")
        if frame.final:
            self._last_final = (frame.job.id, frame.image)
            self.studio.worker.cancel_older(self.id, frame.job.id)  # several workers: older frames are moot now
        if self._frame is not None:  # the client has not taken the previous frame yet: replace it
            self.studio.metrics.frames_dropped.inc()
            self._outbox.remove(_FRAME)
        self._frame = frame
        self._outbox.append(_FRAME)
        self._wake.set()

    def _post_error(self, job: Job, code: str, message: str, field: str | None) -> None:
        if code in ("invalid_params", "model_unavailable") and self.params is job.params:
            # The engine refused what validation let through (a negative prompt a full LCM cannot use, say):
            # these params never become the session's, the last ones the engine accepted stay.
            self.params = self._engine_accepted
            self.last_key = None
        if job is self.active_job:
            self.send_error(code, message, field)

    def _job_done(self, job: Job, outcome: str) -> None:
        if outcome == "ok":
            self._engine_accepted = job.params
        if job is not self.active_job:
            return
        if outcome == "error":
            self.last_key = None  # the same input again may retry
        if outcome != "replaced":
            self.active_job = None
            self._send_status("idle")

    def _send_status(self, state: str) -> None:
        """``inputs``: how many input messages the session had read when it said so. A client that sent more
        knows that an "idle" was said before its newest input arrived (docs/protocol.md)."""
        self.send_control({"type": "status", "state": state, "queue_depth": self.studio.worker.queue_depth(),
                           "inputs": self.inputs})

    def _idle_if_nothing_runs(self) -> None:
        """Input that starts nothing (unchanged, or waiting for a canvas) is answered too, when nothing runs."""
        if self.active_job is None:
            self._send_status("idle")

    async def run(self) -> None:
        """Serve the connection until it closes. The caller has accepted it and registered the session."""
        sender = asyncio.create_task(self._sender())
        s = self.studio.settings.studio
        try:
            # "workers": how many frames of this session may be in flight at once (studio/pool.py; with Ray,
            # the ready replicas: studio/ray_worker.py)
            ray_replicas = getattr(self.studio.worker, "workers_ready", None) if not s.devices else None
            self.send_control({"type": "hello", "session": self.id, "schema": self.studio.schema(),
                               "info": self.studio.info, "models": self.studio.models.public(),
                               "workers": ray_replicas or len(s.devices or [None]),
                               "broadcast": s.max_broadcast_viewers > 0})
            while True:
                try:
                    message = await asyncio.wait_for(self.ws.receive(), timeout=s.idle_timeout_s)
                except asyncio.TimeoutError:
                    await self.close(1000, "idle timeout")
                    break
                if message["type"] == "websocket.disconnect":
                    if message.get("code") == 1009:  # past the protocol's own cap: uvicorn closed it already
                        self.studio.metrics.rejected.labels(reason="too_large").inc()
                    break
                try:
                    await self._on_message(message.get("text"), message.get("bytes"))
                except Exception:  # a bug while handling one message fails that message only
                    log.error("session %s: a message could not be handled", self.id, exc_info=True)
                    self._reject("internal_error", "the server could not handle this message; the session goes "
                                 "on with its last good input", None)
        finally:
            self.closed = True
            self.studio.broadcast.left(self)
            self.studio.worker.cancel(self.id)
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await sender

    async def _on_message(self, text: str | None, data: bytes | None) -> None:
        """One input message. A message too large is refused alone (the session stays, as for any bad input);
        only one past the protocol's cap (twice this limit, serve.py) makes uvicorn close with 1009."""
        s = self.studio.settings.studio
        size = len(data) if data is not None else None
        if size is not None and size > s.max_ws_message_bytes:
            self.inputs += 1
            return self._reject("too_large", f"a binary message is {size} bytes: the limit is "
                                f"{s.max_ws_message_bytes}; send a smaller canvas (at most {s.max_image_side} px a "
                                "side, as WebP or JPEG)", "image")
        if text is not None:
            self._on_text(text)
        elif data is not None:
            await self._on_binary(data)

    def _on_text(self, text: str) -> None:
        s = self.studio.settings.studio
        try:
            data = loads_checked(text, max_bytes=s.max_ws_text_bytes, max_depth=s.json_max_depth,
                                 what="the text message")
        except JsonRefused as exc:
            self.inputs += 1
            return self._reject(exc.code, exc.message, None)
        if isinstance(data, dict) and data.get("type") == "broadcast":  # not an input: statuses do not count it
            return self.studio.broadcast.on_message(self, data)
        self.inputs += 1
        if not isinstance(data, dict) or data.get("type") != "params":
            return self._reject("invalid_params", "unknown message: send {\"type\": \"params\", ...} as text and "
                                "the canvas as binary", "type")
        body = {k: v for k, v in data.items() if k != "type"}
        try:
            self.params = parse_params(self.studio.params_model, body)
        except UserError as exc:
            return self._reject("invalid_params", exc.message, exc.field)
        self._maybe_submit()

    async def _on_binary(self, data: bytes) -> None:
        try:
            msg = parse_layer_message(data)
        except UserError as exc:
            self.inputs += 1
            return self._reject("invalid_params", exc.message, exc.field)
        if not msg.image:  # an envelope without an image: clear that layer
            self.inputs += 1
            self.layers.clear(msg.key)
            return self._maybe_submit()
        if self.layers.same(msg.key, msg.image):
            self.inputs += 1
            return self._idle_if_nothing_runs()
        field = {"canvas": "image", "mask": "mask", "reference": "ip_adapter_image"}.get(
            msg.layer, f"control_image.{msg.index}" if msg.layer == "control" else f"regions.{msg.index}.mask")
        try:
            if msg.layer in PICTURE_LAYERS:  # the canvas, the reference image, a ControlNet's image
                image = await self.studio.decode_canvas(msg.image)
            else:  # transparent = black: what was not painted is not selected
                image = as_mask(await self.studio.decode_canvas(msg.image, background=(0, 0, 0)), field)
        except UserError as exc:
            return self._reject("invalid_image", exc.message, field)
        finally:
            # Counted once decoded, not when it arrived: a status said while it decoded (another job's "idle")
            # then carries the count before it, and the page knows this input is still unread.
            self.inputs += 1
        if msg.layer == "canvas" and self.similarity is not None and self.similarity.skip(image):
            return self._idle_if_nothing_runs()  # barely changed since the last canvas processed: no new frame
        self.layers.put(msg.key, image, msg.image)
        self._maybe_submit()

    def _reject(self, code: str, message: str, field: str | None) -> None:
        self.studio.metrics.rejected.labels(reason=code).inc()
        self.send_error(code, message, field)

    def _maybe_submit(self) -> None:
        params = self.params
        if self.closed:
            return
        if params is None:  # a canvas before any params
            return self._idle_if_nothing_runs()
        inputs = job_inputs(params, self.layers, self._last_final)
        for note in [inputs] if isinstance(inputs, str) else inputs.notes:
            if note not in self._said:
                self._said.add(note)
                self.send_control({"type": "warning", "message": note})
        if isinstance(inputs, str):  # waiting for a layer
            return self._idle_if_nothing_runs()
        if inputs.key == self.last_key:
            return self._idle_if_nothing_runs()  # unchanged input: no new frame
        self.last_key = inputs.key
        job = Job(params=params, sink=self, scope=self.id, canvas=inputs.canvas, mask=inputs.mask,
                  init_image=inputs.init_image,
                  region_masks=inputs.region_masks, images=inputs.images, input=self.inputs)
        self.active_job = job
        try:
            self.studio.worker.submit(self.id, job)
        except RuntimeError:
            self.send_error("not_ready", "the server is shutting down", None)
            return
        self._send_status("busy")

    async def _sender(self) -> None:
        """The only task that writes to the socket while the session runs, in the order messages were posted."""
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                while self._outbox:
                    item = self._outbox.popleft()
                    if item is not _FRAME:
                        await self._send_text(item)
                    elif self._frame is not None:
                        frame, self._frame = self._frame, None
                        await self._send_frame(frame)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the client went away mid-send (or a bug): stop sending, the receive loop ends it
            self.closed = True
            log.debug("session %s: sending stopped: %r", self.id, exc)

    async def _send_frame(self, frame: PendingFrame) -> None:
        s = self.studio.settings.studio
        metrics = self.studio.metrics
        self._sending = True
        try:
            t0 = time.perf_counter()
            data = await asyncio.to_thread(encode_frame, frame.image, s.frame_format, s.frame_quality)
            encode_s = time.perf_counter() - t0
            if frame.final:  # to the broadcast first (studio/broadcast.py): a viewer is never behind the page
                self._last_sent = (frame.image, data)
                if self.studio.broadcast.holder is self:
                    await self._publish(frame.image, data)  # JPEG frames: their own bytes, at once
            warnings = frame.parameters.get("warnings") or []
            if frame.final and not warnings:
                self._last_warning = None
            for warning in warnings:
                if warning != self._last_warning:  # say it once, not on every frame of the same prompt
                    await self._send_text({"type": "warning", "message": str(warning)})
                self._last_warning = warning
            self.frame_id += 1
            info = frame_info(frame, self.frame_id, encode_s)
            async with self._send_lock:
                await self.ws.send_text(json.dumps(info))
                await self.ws.send_bytes(data)
            metrics.frames_sent.inc()
            if self._first_frame_job != frame.job.id:
                self._first_frame_job = frame.job.id
                metrics.first_frame_seconds.observe(time.monotonic() - frame.job.submitted)
        finally:
            self._sending = False

    def broadcast_current(self) -> None:
        """This session took the broadcast (studio/broadcast.py): its newest final frame goes out at once."""
        if self._last_sent is not None:
            asyncio.ensure_future(self._publish(*self._last_sent))

    async def _publish(self, image: Any, data: bytes) -> None:
        s = self.studio.settings.studio
        jpeg = data if s.frame_format == "jpeg" else await asyncio.to_thread(encode_frame, image, "jpeg",
                                                                               s.frame_quality)
        if self._last_sent is None or self._last_sent[1] is not data:
            return  # a newer frame went out (and to the broadcast) while this one waited or encoded
        self.studio.broadcast.publish(self, jpeg)

    async def _send_text(self, message: dict[str, Any]) -> None:
        async with self._send_lock:
            await self.ws.send_text(json.dumps(message))

    async def close(self, code: int, reason: str = "", error: tuple[str, str] | None = None) -> None:
        """Close from the server side, with a last error message first when given (best effort)."""
        self.closed = True
        if self.ws.application_state != WebSocketState.CONNECTED:
            return

        async def say_goodbye() -> None:
            async with self._send_lock:
                if error is not None:
                    code_name, message = error
                    await self.ws.send_text(json.dumps({"type": "error", "code": code_name, "message": message,
                                                        "field": None}))
                await self.ws.close(code, reason)

        try:
            await asyncio.wait_for(say_goodbye(), timeout=2.0)
        except Exception:  # the client is gone or too slow: nothing more to say
            log.debug("session %s: close %s not delivered", self.id, code)
