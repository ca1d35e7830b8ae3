"""A generator replica's side of a job's stream (studio/ray_app.py's ``Generator``): the sink its worker calls,
whose calls become events on the request's queue, and the batch sizes that each request's "done" carries to the
ingress's metrics."""

from __future__ import annotations

import asyncio
import collections
import threading
from typing import Any

from lcm_live.engine.hooks import StepEvent
from lcm_live.studio.worker import Job


class BatchSizes:
    """The replica's ``lcm_live_batch_size``: observed there as in one process, and kept until the next request's
    "done" event carries them to the ingress, whose ``/metrics`` are the studio's (each observation goes once)."""

    KEPT = 1024  # observations waiting for a "done" to carry them (a replica that finishes nothing keeps no more)

    def __init__(self, histogram: Any):
        self._histogram = histogram
        self._unsent: collections.deque[int] = collections.deque(maxlen=self.KEPT)
        self._lock = threading.Lock()

    def observe(self, size: int) -> None:
        self._histogram.observe(size)
        with self._lock:
            self._unsent.append(int(size))

    def take(self) -> list[int]:
        with self._lock:
            sizes = list(self._unsent)
            self._unsent.clear()
        return sizes


class StreamSink:
    """A replica's JobSink: each call becomes an event on the request's queue (from the worker thread). Frames go
    as PIL images; ``generate`` encodes them off the worker thread, which goes on with the next step or job.
    ``steps``: the ingress observes steps (its ``step_observer`` is set): each step goes too, without latents."""

    def __init__(self, loop: asyncio.AbstractEventLoop, events: asyncio.Queue, steps: bool = False):
        self._loop = loop
        self._events = events
        self.steps = steps
        self._lock = threading.Lock()
        self._unsent_previews = 0

    def _put(self, event: tuple) -> None:
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)
        except RuntimeError:  # the replica's loop is closed: it is shutting down
            pass

    def wants_preview(self) -> bool:
        with self._lock:
            return self._unsent_previews == 0  # the previous preview has left: decode the next one

    def preview_sent(self) -> None:
        with self._lock:
            self._unsent_previews -= 1

    def on_frame(self, job: Job, image: Any, *, final: bool, step: int, total: int, generation_s: float,
                 parameters: dict[str, Any]) -> None:
        if not final:
            with self._lock:
                self._unsent_previews += 1
        self._put(("image", image, {"final": final, "step": step, "total": total, "generation_s": generation_s,
                                    "parameters": parameters}))

    def on_step(self, event: StepEvent) -> None:
        self._put(("step", event.step, event.total, event.timestep))

    def on_model(self, job: Job, name: str, state: str, progress: float | None, message: str,
                 **detail: Any) -> None:
        """(The loader or worker thread) the job's preset is loading, ready or failed on this replica; a progress
        message that finds the queue full is dropped (the next one says more), a final one is not."""
        event = ("model", name, state, progress, message, detail)
        if state != "loading":
            self._put(event)
            return

        def put_or_drop() -> None:
            if self._events.qsize() < self._events.maxsize // 2:
                self._events.put_nowait(event)

        try:
            self._loop.call_soon_threadsafe(put_or_drop)
        except RuntimeError:
            pass

    def on_error(self, job: Job, code: str, message: str, field: str | None) -> None:
        self._put(("error", code, message, field))

    def on_done(self, job: Job, outcome: str) -> None:
        self._put(("done", outcome))
