"""A worker's model loads, off its inference thread: one loader thread per worker, one load at a time.

The worker (studio/worker.py) hands a job whose preset is not loaded to :meth:`ModelLoader.request` and goes on
serving its other sessions on the engines it holds. Here:

1. a request for a preset already loading (or queued) joins that load: its job is told the progress so far;
   otherwise a load is queued (one runs at a time: two loads at once would hold three models);
2. the loader thread builds the engine with the factory while counting the safetensors bytes it reads
   (engine/load_progress.py), then warms it up; every waiting job's sink is told ``loading`` messages (stages and
   bytes, at most :data:`MAX_MESSAGES_PER_S` a second; the first, each stage's start and the last read always);
3. a load whose waiters all went elsewhere (the session asked for another preset, or closed) is cancelled at its
   next progress point and whatever it built dropped;
4. the outcome (a :class:`~lcm_live.studio.switching.LoadedEngine`, or the public error, or cancelled) goes back
   to the worker through ``on_finished``: the worker installs the engine on its own thread (where evicting is safe:
   no generation runs there meanwhile) and puts the waiting jobs back in their mailboxes.

A failed load fails only its waiters' switch; nothing half-loaded stays (the engine built is dropped and memory
collected).
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lcm_live.errors import UserError
from lcm_live.studio.jobs import Job

log = logging.getLogger("lcm_live.studio")

MAX_MESSAGES_PER_S = 10
READ_START, READ_END = 0.02, 0.85  # the bytes read map to this span of the bar; warming up follows at 0.9


class LoadCancelled(Exception):
    """Every job waiting for this load went elsewhere."""


@dataclass(eq=False)
class LoadTask:
    name: str
    waiters: dict[str, Job] = field(default_factory=dict)  # slot -> the job waiting for this preset
    cancelled: bool = False
    progress: float = 0.0
    message: str = ""
    detail: dict[str, Any] = field(default_factory=dict)  # component, bytes_read, bytes_total while reading
    told_at: float = 0.0  # monotonic time of the last message sent


class ModelLoader:
    """``build(name)``: the engine of a preset (the switcher's factory call); ``warm(engine, name)``: its warm-up;
    ``on_finished(task, engine, error)``: called on the loader thread once a load ends (engine None: failed with
    ``error`` or cancelled with error None)."""

    def __init__(self, worker: str, build: Callable[[str], Any], warm: Callable[[Any, str], None],
                 on_finished: Callable[[LoadTask, Any, str | None], None], *,
                 on_failed: Callable[[str, str], str] = lambda name, message: message):
        self.worker = worker
        self.build, self.warm, self.on_finished, self.on_failed = build, warm, on_finished, on_failed
        self._cond = threading.Condition()
        self._queue: deque[LoadTask] = deque()  # the first is loading now
        self._stopping = False
        self._thread: threading.Thread | None = None

    # ---- the worker's side (any thread) ---------------------------------------------------------------------
    def loading(self, name: str) -> bool:
        with self._cond:
            return any(t.name == name and not t.cancelled for t in self._queue)

    def request(self, name: str, slot: str, job: Job) -> bool:
        """``job`` (of ``slot``) waits for preset ``name``: joins its load in flight, else queues one. True: a new
        load was queued."""
        with self._cond:
            if self._stopping:
                raise RuntimeError("the worker is stopping")
            task = next((t for t in self._queue if t.name == name and not t.cancelled), None)
            new = task is None
            if new:
                task = LoadTask(name, message=f"loading {name}")
                self._queue.append(task)
                if self._thread is None or not self._thread.is_alive():
                    self._thread = threading.Thread(target=self._run, name=f"{self.worker}-loader", daemon=True)
                    self._thread.start()
                self._cond.notify()
            task.waiters[slot] = job
            progress, message, detail = task.progress, task.message, dict(task.detail)
        tell([job], name, "loading", progress, message, detail)
        return new

    def drop(self, slot: str, *, cancel_if_alone: bool = True) -> None:
        """``slot`` no longer waits; a load nobody waits for any more is cancelled (``cancel_if_alone``)."""
        with self._cond:
            for task in list(self._queue):
                if task.waiters.pop(slot, None) is not None and not task.waiters and cancel_if_alone:
                    task.cancelled = True
                    if task is not self._queue[0]:  # not started: just forget it
                        self._queue.remove(task)

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            for task in self._queue:
                task.cancelled = True
            self._cond.notify_all()

    # ---- the loader thread ------------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if not self._queue:
                    return
                task = self._queue[0]
            engine, error = self._load(task)
            with self._cond:
                self._queue.popleft()
            try:
                self.on_finished(task, engine, error)
            except Exception:  # a bug there must not end this thread
                log.exception("studio: %s: finishing the load of %s failed", self.worker, task.name)

    def _load(self, task: LoadTask) -> tuple[Any, str | None]:
        """(engine, None), (None, public error) or (None, None) when cancelled."""
        from lcm_live.engine import load_progress
        from lcm_live.studio.switching import WARMING_PROGRESS, free_memory

        name = task.name
        t0 = time.perf_counter()
        engine = None

        def on_bytes(component: str, done: int, total: int) -> None:
            if task.cancelled:
                raise LoadCancelled(name)
            share = done / total if total else 1.0
            self._say(task, READ_START + (READ_END - READ_START) * share,
                      f"reading {name}: {component} ({done / 1e6:.1f} of {total / 1e6:.1f} MB)",
                      {"component": component, "bytes_read": done, "bytes_total": total},
                      stage=done >= total)  # the last read always said: the bar reaches the read's end

        try:
            with load_progress.listening(on_bytes):
                engine = self.build(name)
            if task.cancelled:
                raise LoadCancelled(name)
            self._say(task, WARMING_PROGRESS, f"warming up {name}", {}, stage=True)
            self.warm(engine, name)
            if task.cancelled:
                raise LoadCancelled(name)
        except Exception as exc:
            engine = None
            free_memory()  # nothing half-loaded stays
            if task.cancelled:  # (a read cancelled inside diffusers may come back as its own error)
                log.info("studio: %s: loading %s cancelled: no session waits for it", self.worker, name)
                return None, None
            message = exc.message if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"
            log.error("studio: %s: loading %s failed: %s", self.worker, name, message,
                      exc_info=not isinstance(exc, UserError))
            traceback.clear_frames(exc.__traceback__)  # a kept log record must not keep the half-built engine
            free_memory()
            return None, self.on_failed(name, message)
        log.info("studio: %s: %s loaded and warm in %.1f s", self.worker, name, time.perf_counter() - t0)
        return engine, None

    def _say(self, task: LoadTask, progress: float, message: str, detail: dict[str, Any], *,
             stage: bool = False) -> None:
        """A ``loading`` message to the task's waiters: each stage's start always, else at most
        MAX_MESSAGES_PER_S a second (the bar rises in steps of that pace)."""
        now = time.monotonic()
        with self._cond:
            task.progress, task.message, task.detail = progress, message, detail
            if not stage and now - task.told_at < 1 / MAX_MESSAGES_PER_S:
                return
            task.told_at = now
            jobs = list(task.waiters.values())
        tell(jobs, task.name, "loading", progress, message, detail)


def tell(jobs: list[Job], name: str, state: str, progress: float | None, message: str,
          detail: dict[str, Any] | None = None) -> None:
    for job in jobs:
        on_model = getattr(job.sink, "on_model", None)  # optional in the JobSink protocol (REST and Ray sinks lack it)
        if on_model is not None:
            on_model(job, name, state, progress, message, **(detail or {}))
