"""Several inference workers behind the interface of one (``serve --devices cuda:0,cuda:1``, or ``cpu,cpu``).

Each worker is a :class:`~lcm_live.studio.worker.Worker`: its own thread, its own engine on its own device, its own
stream batching. The app and the sessions call the pool exactly as they call a single worker.

Placement: a session's new input goes to the least loaded worker that is not already busy with that session, so
one session has up to R frames in flight at once on R workers (its fps grows with workers while each frame's
latency stays one worker's); the session itself drops a frame older than one it already sent (studio/session.py).
A session has at most one *waiting* job in the whole pool: a newer input replaces it where it waits. When every
worker is busy with the session, the input waits behind the worker whose frame for it started first.

Pacing: a session's jobs start at least T/2R apart (T: the workers' last generation time, R: the ready workers),
so its frames come spread out. Without it, inputs sent together (R at once, as a client filling R slots does)
start together, finish within a millisecond of each other, and all but the newest of them are dropped, frame
after frame: a client refilling its slots on each frame stays in step, and one session's rate fell back towards one
worker's (docs/benchmarks.md). An input that came too soon is held here until its start: one per worker free of
the session (inputs sent together each get their worker, one after the other); past those, it is the session's
one waiting job, which a newer input replaces.

Faults: a watchdog notices a worker whose thread died (or that reports failures past the limit) and moves its
jobs, the newest per session, to the others; the session is told (``on_notice``) and loses nothing it typed or
drew. ``ready`` holds while any worker is ready; ``workers_ready`` says how many.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from lcm_live.config import StudioSettings
from lcm_live.studio.metrics import StudioMetrics
from lcm_live.studio.models import ModelRegistry
from lcm_live.studio.worker import Job, Worker

log = logging.getLogger("lcm_live.studio")

WATCH_INTERVAL_S = 0.2
STARTS_KEPT = 256  # sessions whose last start is remembered (pacing); older entries than PACE_MEMORY_S go first
PACE_MEMORY_S = 60.0
# Of T/R: the spacing enforced. A full T/R passes each late start on to every later one (a session's jobs would
# keep exactly T/R apart, so any delay of one delays all: 3.49x at 4 workers, at load 6); half of it keeps frames
# apart by far more than the jitter that orders them, and lets a late one be late alone.
PACE_FRACTION = 0.5


def _sub(slot: str, index: int) -> str:
    return f"{slot}@{index}"


def _first_load_alone(factories: list[Callable[..., Any]]) -> list[Callable[..., Any]]:
    """The factories, the first engine load among them made alone, the others after it, together.

    diffusers imports its pipeline classes lazily, and two threads importing the same one for the first time can
    fail (``ImportError: cannot import name 'LatentConsistencyModelPipeline' from 'diffusers'``, seen with
    ``--devices cpu,cpu --model builtin:shapes``); once one load has run, the imports are done."""
    lock, done = threading.Lock(), threading.Event()

    def alone_first(factory: Callable[..., Any]) -> Callable[..., Any]:
        def load(*args: Any, **kwargs: Any) -> Any:
            if not done.is_set():
                with lock:
                    if not done.is_set():
                        try:
                            return factory(*args, **kwargs)
                        finally:
                            done.set()
            return factory(*args, **kwargs)

        return load

    return [alone_first(factory) for factory in factories]


class WorkerPool:
    def __init__(self, engine_factories: list[Callable[[], Any]], settings: StudioSettings, metrics: StudioMetrics,
                 *, on_ready: Callable[[Any], None] | None = None, on_fatal: Callable[[str], None] | None = None,
                 devices: list[str] | None = None, models: ModelRegistry | None = None):
        if not engine_factories:
            raise ValueError("a worker pool needs at least one engine factory")
        self.metrics = metrics
        self.devices = devices or [f"worker {i}" for i in range(len(engine_factories))]
        self._on_ready = on_ready
        self._announced = False
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self.workers = [Worker(factory, settings, metrics, on_ready=self._worker_ready, on_fatal=on_fatal,
                               name=f"lcm-live-worker-{i}", models=models)
                        for i, factory in enumerate(_first_load_alone(engine_factories))]
        self._lost: set[int] = set()  # workers whose jobs were moved away (dead threads)
        self._starts: dict[str, tuple[float, Job]] = {}  # slot -> (when it went to a worker, monotonic; its job)
        self._held: dict[str, list[Job]] = {}  # slot -> its inputs held for their paced starts, oldest first
        self._timers: dict[str, threading.Timer] = {}
        self._waits: dict[str, int] = {}  # slot -> the worker where its waiting job waits behind its own frame
        self._watchdog = threading.Thread(target=self._watch, name="lcm-live-pool-watchdog", daemon=True)

    # ---- what the app reads ------------------------------------------------------------------------------------
    @property
    def settings(self) -> StudioSettings:
        """The first worker's settings (all load the same model: the same resolved sizes)."""
        return self.workers[0].settings

    @property
    def max_batch_size(self) -> int:
        return self.workers[0].max_batch_size

    @property
    def engine(self) -> Any:
        return self.workers[0].engine

    @property
    def step_observer(self) -> Any:
        return self.workers[0].step_observer

    @step_observer.setter
    def step_observer(self, observer: Any) -> None:
        for worker in self.workers:
            worker.step_observer = observer

    @property
    def workers_ready(self) -> int:
        return sum(1 for w in self.workers if w.ready)

    @property
    def ready(self) -> bool:
        return self.workers_ready > 0

    @property
    def alive(self) -> bool:
        return any(w.alive for w in self.workers)

    @property
    def healthy(self) -> bool:
        return any(w.healthy for w in self.workers)

    @property
    def consecutive_failures(self) -> int:
        return min(w.consecutive_failures for w in self.workers)

    @property
    def state(self) -> str:
        states = [w.state for w in self.workers]
        if self.ready or "ready" in states:
            return "ready"
        return "loading" if "loading" in states else states[0]

    @property
    def detail(self) -> str:
        return f"{self.workers_ready} of {len(self.workers)} workers ready: " + "; ".join(
            f"{d}: {w.detail if w.alive or w.state != 'ready' else 'its thread died'}"
            for d, w in zip(self.devices, self.workers, strict=True))

    def queue_depth(self) -> int:
        with self._lock:
            held = sum(len(jobs) for jobs in self._held.values())
        return held + sum(w.queue_depth() for w in self.workers)

    # ---- control ---------------------------------------------------------------------------------------------
    def start(self) -> None:
        for worker in self.workers:
            worker.start()
        self._watchdog.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        with self._lock:
            held = [job for jobs in self._held.values() for job in jobs]
            self._held = {}
            for timer in self._timers.values():
                timer.cancel()
            self._timers.clear()
        for job in held:
            job.sink.on_done(job, "cancelled")
        threads = [threading.Thread(target=w.stop, args=(timeout,)) for w in self.workers]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout + 1)

    def submit(self, slot: str, job: Job) -> None:
        replaced = None
        with self._lock:
            held = self._held.get(slot)
            if held:  # inputs of the session wait for their paced starts: this one after them
                if job.id < held[-1].id:  # a job moved off a lost worker: older than the input held
                    replaced = job
                elif len(held) < self._free(slot):  # a worker free of the session for it too
                    held.append(job)
                else:  # the newest held input is the session's waiting job: the newer one replaces it
                    replaced, held[-1] = held[-1], job
            else:
                target, where = self._place(slot, self.workers[0].models.name_of(job.params.model))
                # paced unless it replaces the session's waiting job (which had not started: it takes its place)
                delay = self._pace_delay(slot) if where != "waiting" else 0.0
                if delay > 0:
                    self._held[slot] = [job]
                    self._schedule(slot, delay)
                else:
                    self._start(slot, target, where, job)
        if replaced is not None:
            replaced.sink.on_done(replaced, "replaced")

    def _place(self, slot: str, model: str | None = None) -> tuple[int, str]:
        """Under the lock: the worker for the session's next job, and what the session has there ("waiting": its
        waiting job, "free": nothing, "busy": a running job); among free ones, a worker that holds the job's
        ``model`` preset first (a switch there costs no load)."""
        usable = self._usable()
        states = {i: self.workers[i].slot_state(_sub(slot, i)) for i in usable}
        # The session's waiting job is the one put behind its own frame; a job handed to a free worker waits
        # there only until that worker's thread takes it (or behind other sessions' jobs): it is in flight.
        waiting = [i for i in usable if states[i] == "waiting" and self._waits.get(slot) == i]
        free = [i for i in usable if states[i] is None]
        if waiting:  # the session's one waiting job: the newer input replaces it where it waits
            return waiting[0], "waiting"
        if free:
            return min(free, key=lambda i: (not self.workers[i].has_model(model), self.workers[i].load(), i)), "free"
        # busy with this session everywhere: wait behind the least loaded
        return min(usable, key=lambda i: (self.workers[i].load(), i)), "busy"

    def _free(self, slot: str) -> int:
        """Under the lock: usable workers with nothing of the session, waiting or running."""
        return sum(1 for i in self._usable() if self.workers[i].slot_state(_sub(slot, i)) is None)

    def _schedule(self, slot: str, delay: float) -> None:
        """Under the lock: release the session's oldest held input in ``delay`` seconds."""
        timer = self._timers[slot] = threading.Timer(delay, self._release, (slot,))
        timer.daemon = True
        timer.start()

    def _usable(self) -> list[int]:
        usable = [i for i, w in enumerate(self.workers) if w.ready and i not in self._lost]
        if not usable:
            if all(w.state in ("stopping", "stopped") for w in self.workers):
                raise RuntimeError("the workers are stopping")
            usable = [i for i, w in enumerate(self.workers) if w.alive] or [0]
        return usable

    def _pace_delay(self, slot: str) -> float:
        """Under the lock: seconds until the session's next job may start, T/2R after its previous one."""
        handed = self._starts.get(slot)
        # it started then, or later when it waited behind the session's frame on its worker
        last = None if handed is None else max(handed[0], handed[1].started or 0.0)
        times = [w.last_generation_s for w in self.workers if w.ready and w.last_generation_s is not None]
        ready = sum(1 for w in self.workers if w.ready)
        if last is None or not times or ready < 2:
            return 0.0
        return max(0.0, last + PACE_FRACTION * min(times) / ready - time.monotonic())

    def _start(self, slot: str, target: int, where: str, job: Job) -> None:
        """Under the lock: hand the job to a worker (``where``: what the session has there, from _place) and
        remember when (pacing), and where it waits if it is the session's waiting job."""
        now = time.monotonic()
        if len(self._starts) > STARTS_KEPT:  # REST requests' slots are never cancelled: forget old ones
            self._starts = {k: v for k, v in self._starts.items() if now - v[0] < PACE_MEMORY_S}
            self._waits = {k: v for k, v in self._waits.items() if k in self._starts}
        self._starts[slot] = (now, job)
        if where == "free":
            self._waits.pop(slot, None)
        else:  # behind the session's own frame there, or replacing its waiting job
            self._waits[slot] = target
        self.workers[target].submit(_sub(slot, target), job, supersede=False)

    def _release(self, slot: str) -> None:
        """A held input's start has come (timer thread)."""
        with self._lock:
            self._timers.pop(slot, None)
            held = self._held.get(slot)
            if not held or self._stopping.is_set():
                return
            job = held.pop(0)
            if not held:
                del self._held[slot]
            try:
                self._start(slot, *self._place(slot, self.workers[0].models.name_of(job.params.model)), job)
                if held:  # the next one, T/2R after this one
                    self._schedule(slot, self._pace_delay(slot))
                return
            except RuntimeError:  # the workers are stopping
                pass
        job.sink.on_done(job, "cancelled")

    def cancel_older(self, slot: str, job_id: int) -> None:
        """A frame of ``job_id`` was made: the session's older jobs, on any worker, would only be dropped."""
        for i, worker in enumerate(self.workers):
            worker.cancel_older(_sub(slot, i), job_id)

    def cancel(self, slot: str, reason: str = "closed") -> None:
        with self._lock:
            self._held.pop(slot, None)
            self._starts.pop(slot, None)
            self._waits.pop(slot, None)
            timer = self._timers.pop(slot, None)
            if timer is not None:
                timer.cancel()
        for i, worker in enumerate(self.workers):
            worker.cancel(_sub(slot, i), reason)

    # ---- inside ------------------------------------------------------------------------------------------------
    def _worker_ready(self, engine: Any) -> None:
        with self._lock:
            first, self._announced = not self._announced, True
        if first and self._on_ready is not None:  # the app builds its schema once, from the first model loaded
            self._on_ready(engine)

    def _watch(self) -> None:
        while not self._stopping.wait(WATCH_INTERVAL_S):
            for i, worker in enumerate(self.workers):
                if i not in self._lost and worker.state == "ready" and not worker.alive:
                    self._fail_over(i)

    def _fail_over(self, index: int) -> None:
        """Move a dead worker's jobs (the newest per session) to the live workers."""
        with self._lock:
            self._lost.add(index)
        moved: dict[str, Job] = {}
        for sub, job in self.workers[index].take_all():
            slot = sub.rsplit("@", 1)[0]
            if job.cancel_reason is None and (slot not in moved or job.id > moved[slot].id):
                moved[slot] = job
        log.error("studio: %s (%s) stopped; %d session(s) moved to the other workers", self.workers[index].name,
                  self.devices[index], len(moved))
        self.metrics.errors.labels(type="worker_lost").inc()
        for slot, job in moved.items():
            notice = getattr(job.sink, "on_notice", None)
            if notice is not None:
                notice(job, "a worker stopped: your newest input runs again on another one")
            try:
                self.submit(slot, job)
            except RuntimeError:
                job.sink.on_done(job, "cancelled")
