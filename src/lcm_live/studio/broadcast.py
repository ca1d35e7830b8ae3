"""Broadcast: one page's live frames at a URL that OBS, VLC, ffmpeg or TouchDesigner can open.

The pop-out window (web/js/popout.js) serves a projector or a browser capture; creative tools want a plain video
source. A page sends ``{"type": "broadcast", "on": true}``; from then on each final frame of that session goes to
``GET /broadcast/<key>.mjpeg`` (MJPEG: ``multipart/x-mixed-replace``, one JPEG a part) and ``GET
/broadcast/<key>.jpg`` (the newest frame). One session holds the broadcast at a time: a page that turns it on takes
it from the one before, which is told (``on: false`` with a reason) and stops.

The key is the URL's only credential, and it gives nothing but the frames: a tool that must not hold the studio's
token (OBS on another machine) can still show the output. It is ``StudioSettings.broadcast_key`` or a random one
at each start; a wrong key is a plain 404, as for a route that does not exist.

Attacks (docs/security.md): at most ``max_broadcast_viewers`` streams at once (503 past them); a viewer only ever
gets the newest frame (nothing queues for a slow one), and one that reads nothing is aborted by the connection
guard's write deadline; a stream with nothing new repeats its frame every HEARTBEAT_S, so a dead peer is found.
Closing the broadcast (off, or server shutdown: cli/serve.py) ends every stream; a holder that only disconnects
(an idle timeout, a reload) leaves the last frame up and the viewers connected until a page takes it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from typing import TYPE_CHECKING, Any

from fastapi import Depends, FastAPI, Response
from starlette.types import Receive, Scope, Send

from lcm_live.studio.http_errors import ApiError, error_response
from lcm_live.studio.params import echo
from lcm_live.studio.security import SECURITY_HEADERS

if TYPE_CHECKING:
    from lcm_live.studio.metrics import StudioMetrics
    from lcm_live.studio.session import Session

BOUNDARY = "lcmlive-frame"
HEARTBEAT_S = 5.0  # a stream with no new frame sends its frame again after this long
# A new viewer's first frame is sent as many times as it takes to fill this many bytes (at most 8): ffmpeg (OBS's
# Media Source, VLC) probes the stream's first 2 KB and more before it shows anything, and a small frame alone (a
# flat picture compresses to ~1.6 KB) left it waiting for the next frame, up to HEARTBEAT_S.
PROBE_BYTES = 8192
NO_STORE = {"Cache-Control": "no-store"}


def _not_found() -> ApiError:
    return ApiError(404, "not_found", "no such broadcast: copy the URL the studio page shows under Broadcast")


class Broadcast:
    """The broadcast state of one studio app: holder, newest frame, viewers. Lives on the event loop (no locks)."""

    def __init__(self, key: str | None, max_viewers: int, metrics: StudioMetrics):
        self.key = key or secrets.token_urlsafe(18)
        self.max_viewers = max_viewers
        self.metrics = metrics
        self.holder: Session | None = None
        self.frame: bytes | None = None  # the newest JPEG, None until a holder's first frame (and after "off")
        self.frame_id = 0
        self.viewers = 0
        self.closed = False
        self._epoch = 0  # bumped by "off": every stream of an older epoch ends
        self._changed = asyncio.Event()  # replaced at each change; the old one set wakes the streams

    # ---- paths -------------------------------------------------------------------------------------------
    @property
    def path(self) -> str:
        return f"/broadcast/{self.key}.mjpeg"

    @property
    def still_path(self) -> str:
        return f"/broadcast/{self.key}.jpg"

    def key_matches(self, given: str) -> bool:
        return secrets.compare_digest(self.key.encode(), given.encode())

    # ---- the holder --------------------------------------------------------------------------------------
    def on_message(self, session: Session, data: dict[str, Any]) -> None:
        """``{"type": "broadcast", "on": bool}`` from a session: take the broadcast or give it up."""
        on = data.get("on")
        extra = sorted(set(data) - {"type", "on"})
        if not isinstance(on, bool) or extra:  # what the client sent is quoted short (studio/params.py echo)
            field = echo(extra[0]) if extra else "on"
            what = f"unknown field {field!r}" if extra else f"\"on\" is {echo(repr(on))}"
            self.metrics.rejected.labels(reason="invalid_params").inc()
            return session.send_error("invalid_params", f"{what}: send {{\"type\": \"broadcast\", \"on\": true}} "
                                      "or false", field)
        if not on:
            if self.holder is session:
                self.stop()
            return session.send_control(self.state(session))
        if self.max_viewers == 0:
            return session.send_error("broadcast_off", "this server does not broadcast (max_broadcast_viewers is 0):"
                                      " start it with LCM_LIVE_STUDIO__MAX_BROADCAST_VIEWERS=4", "on")
        previous, self.holder = self.holder, session
        if previous is not None and previous is not session:
            previous.send_control({**self.state(previous), "reason": "another page took the broadcast"})
        session.send_control(self.state(session))
        if previous is not session:
            session.broadcast_current()  # what is on its screen now goes out at once

    def stop(self) -> None:
        """Off: no holder, no frame, every stream ends (a new viewer waits for the next holder's frames)."""
        self.holder, self.frame = None, None
        self._epoch += 1
        self._wake()

    def left(self, session: Session) -> None:
        """The session closed: it holds nothing now, but its last frame stays up for the viewers."""
        if self.holder is session:
            self.holder = None

    def publish(self, session: Session, jpeg: bytes) -> None:
        """A final frame of ``session`` (JPEG bytes): out to every viewer if it holds the broadcast."""
        if self.holder is not session or self.closed:
            return
        self.frame = jpeg
        self.frame_id += 1
        self.metrics.broadcast_frames.inc()
        self._wake()

    def state(self, session: Session) -> dict[str, Any]:
        """The ``broadcast`` message for ``session``: whether it holds the broadcast, the URLs, the viewers."""
        return {"type": "broadcast", "on": self.holder is session, "url": self.path, "still": self.still_path,
                "viewers": self.viewers, "max_viewers": self.max_viewers, "reason": None}

    def close(self) -> None:
        """Server shutdown: every stream ends now, so that the graceful shutdown does not wait for them."""
        self.closed = True
        self._wake()

    def _wake(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def _viewers_changed(self, change: int) -> None:
        self.viewers += change
        self.metrics.broadcast_viewers.set(self.viewers)
        if self.holder is not None:
            self.holder.send_control(self.state(self.holder))

    # ---- a viewer ----------------------------------------------------------------------------------------
    async def stream(self, send: Send) -> None:
        """Send frames as MJPEG parts until "off", shutdown, or a send fails (the caller counts the viewer)."""
        epoch, sent, first = self._epoch, -1, True
        while not self.closed and epoch == self._epoch:
            changed = self._changed
            if self.frame is not None and self.frame_id != sent:
                part = mjpeg_part(self.frame)
                copies = max(1, min(8, -(-PROBE_BYTES // len(part)))) if first else 1
                sent, first = self.frame_id, False
                await send({"type": "http.response.body", "body": part * copies, "more_body": True})
                continue
            try:
                await asyncio.wait_for(changed.wait(), timeout=HEARTBEAT_S)
            except asyncio.TimeoutError:
                sent = -1  # nothing new for a while: the same frame again (a dead peer fails the write)


def mjpeg_part(jpeg: bytes) -> bytes:
    head = f"--{BOUNDARY}\r\nContent-Type: image/jpeg\r\nContent-Length: {len(jpeg)}\r\n\r\n".encode()
    return head + jpeg + b"\r\n"


class MjpegResponse(Response):
    """An endless ``multipart/x-mixed-replace`` response for one viewer. Its own ``__call__`` rather than
    Starlette's StreamingResponse: the viewer count must drop however the stream ends (disconnect, off,
    shutdown, a failed write), and here one ``finally`` sees every way out."""

    def __init__(self, broadcast: Broadcast):
        super().__init__(media_type=f"multipart/x-mixed-replace; boundary={BOUNDARY}")
        self.broadcast = broadcast

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        b = self.broadcast
        if b.viewers >= b.max_viewers:  # checked here, with no await before the count goes up: a burst of
            b.metrics.rejected.labels(reason="broadcast_viewers").inc()  # requests cannot all slip past the cap
            refusal = error_response(503, "capacity", f"the broadcast has {b.viewers} viewer(s), the most this "
                                     "server allows (max_broadcast_viewers): close another, or raise the setting",
                                     headers={"Retry-After": "5"})
            await refusal(scope, receive, send)
            return
        start = {"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", self.media_type.encode()),
            (b"cache-control", b"no-store"), (b"x-accel-buffering", b"no"), *SECURITY_HEADERS]}
        b._viewers_changed(+1)
        try:
            await send(start)
            pump = asyncio.ensure_future(b.stream(send))
            watch = asyncio.ensure_future(_disconnected(receive))
            try:
                await asyncio.wait({pump, watch}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in (pump, watch):
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task
            if not (watch.done() and not watch.cancelled()):  # not a disconnect: end the response properly
                with contextlib.suppress(Exception):  # the end of the stream; the peer may be gone already
                    await send({"type": "http.response.body", "body": f"--{BOUNDARY}--\r\n".encode()})
        finally:
            b._viewers_changed(-1)


async def _disconnected(receive: Receive) -> bool:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return True


def add_broadcast_routes(app: FastAPI, broadcast: Broadcast) -> Any:
    """``GET /broadcast/{key}.mjpeg`` and ``/broadcast/{key}.jpg``, guarded by the key alone; returns the key
    check (the dependency every broadcast route carries: tests/studio/test_routes_inventory.py)."""

    def require_broadcast_key(key: str) -> None:
        if not broadcast.key_matches(key):
            raise _not_found()

    @app.get("/broadcast/{key}.mjpeg", dependencies=[Depends(require_broadcast_key)])
    async def broadcast_stream(key: str) -> Response:
        return MjpegResponse(broadcast)  # refuses past max_broadcast_viewers itself (503)

    @app.get("/broadcast/{key}.jpg", dependencies=[Depends(require_broadcast_key)])
    async def broadcast_still(key: str) -> Response:
        if broadcast.frame is None:
            raise ApiError(404, "no_frame", "nothing is broadcast now: turn on Broadcast in the studio page",
                           headers=NO_STORE)
        return Response(broadcast.frame, media_type="image/jpeg", headers=NO_STORE)

    return require_broadcast_key

