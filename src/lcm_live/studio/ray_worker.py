"""The studio's worker interface over Ray Serve: jobs go to the generator deployment (studio/ray_app.py), frames
come back on a streaming handle.

:class:`RayWorker` stands where a :class:`~lcm_live.studio.worker.Worker` or a
:class:`~lcm_live.studio.pool.WorkerPool` stands in the app (``submit``, ``cancel``, ``ready``, ``queue_depth``, ...),
on the ingress replica's event loop. Each job is one streaming request to the generator; its events (studio/
ray_wire.py) are the job sink's own calls, made in the replica, and go to the session's sink here.

The per-session rules of the local pool hold across processes:
- up to one frame in flight per ready replica per session (each generator replica runs one request at a time,
  ``max_ongoing_requests=1`` on a CPU, so Serve's router places them on different replicas); past that the session
  has one waiting job that a newer input replaces (the session drops frames older than one it sent);
- with one replica, the newest input wins: the running request is cancelled through Serve
  (``DeploymentResponseGenerator.cancel()``), which raises ``CancelledError`` in the replica, whose stop flag
  the engine's step hook reads; with several, a session's final frame cancels its older requests the same way
  (``cancel_older``: their frames would only be dropped);
- a replica lost mid-generation (killed, its node gone): the session is told (``on_notice``) and its newest input
  runs again on another replica; Serve starts a replacement. ``workers_ready`` (for ``/readyz``) is read from
  ``serve.status()`` every second.

Model presets: each replica's worker loads and evicts them (studio/switching.py); its ``model`` events go to the
session's sink (``on_model``: the same messages as one process) and, with what each "done" says the replica holds,
into the app's :class:`~lcm_live.studio.models.ModelRegistry` by replica (``GET /api/models``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lcm_live.config import StudioSettings
from lcm_live.engine.hooks import StepEvent
from lcm_live.studio.metrics import StudioMetrics
from lcm_live.studio.ray_models import ReplicaModels
from lcm_live.studio.ray_wire import decode_image, job_payload
from lcm_live.studio.worker import Job

log = logging.getLogger("lcm_live.studio")

WATCH_INTERVAL_S = 1.0
DESCRIBE_EVERY = 5  # watch ticks between two reads of what the replicas loaded (an update may change the model)
RETRY_LIMIT = 8  # tries of one job after its replica was lost, ~0.5 s apart (Serve replaces replicas in seconds)
RETRY_DELAY_S = 0.5
ENGINE_FAILURES = ("oom", "engine_error")  # what counts towards max_consecutive_failures, as in the Worker


@dataclass(eq=False)
class _Flight:
    slot: str
    job: Job
    response: Any = None  # the DeploymentResponseGenerator of the try in progress
    cancel_reason: str | None = None
    started: bool = False
    settled: bool = False
    told: bool = False  # the session was told its replica was lost


@dataclass
class _Slot:
    flights: list[_Flight] = field(default_factory=list)
    waiting: Job | None = None


class RayWorker(ReplicaModels):
    def __init__(self, handle: Any, settings: StudioSettings, metrics: StudioMetrics, *,
                 on_ready: Callable[[Any], None] | None = None, on_fatal: Callable[[str], None] | None = None,
                 count_replicas: Callable[[], tuple[int, int, str]] | None = None, models: Any = None):
        """``handle``: the generator deployment's handle; ``count_replicas()``: (running, total, status message)
        of its replicas (blocking; run on a thread); ``models``: the app's ModelRegistry, whose readiness the
        replicas' events keep (by replica id)."""
        self.settings = settings
        self.metrics = metrics
        self._state = "loading"  # loading | ready | stopping | stopped
        self.detail = "waiting for a generator replica"
        self.consecutive_failures = 0
        self.max_batch_size = 1  # the replicas' own (each batches what it runs)
        # Tests and benchmarks: called here for each step a replica runs (a StepEvent without latents); while it is
        # set, requests ask their replica to stream their steps.
        self.step_observer: Callable[[Job, Any], None] | None = None
        self.workers: list[str] = []  # the generator's replicas, as the controller counts them
        self.workers_ready = 0
        self._handle = handle
        self._on_ready = on_ready
        self._on_fatal = on_fatal
        self._count_replicas = count_replicas
        self._models = models
        self._slots: dict[str, _Slot] = {}
        self._described: dict[str, Any] | None = None
        self._tasks: set[asyncio.Task] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    # ---- what the app reads ------------------------------------------------------------------------------------
    @property
    def state(self) -> str:
        """As a Worker's; "loading" again while no replica is ready (Serve is starting or replacing them)."""
        return "loading" if self._state == "ready" and self.workers_ready == 0 else self._state

    @property
    def alive(self) -> bool:
        return self._state != "stopped"

    @property
    def healthy(self) -> bool:
        return self.consecutive_failures < self.settings.max_consecutive_failures

    @property
    def ready(self) -> bool:
        return self._state == "ready" and self.workers_ready > 0 and self.healthy

    def queue_depth(self) -> int:
        """Jobs not yet started by a replica: in Serve's router or waiting behind the session's own frames."""
        return sum(sum(1 for f in s.flights if not f.started) + (s.waiting is not None) for s in self._slots.values())

    # ---- control -----------------------------------------------------------------------------------------------
    def start(self) -> None:
        """On the event loop (the app's lifespan): ask a replica what it loaded, then watch the replica count."""
        self._loop = asyncio.get_running_loop()
        self._spawn(self._connect())
        self._spawn(self._watch())

    def stop(self, timeout: float = 10.0) -> None:
        """From any thread (the lifespan calls it on one): cancel every request in flight."""
        if self._state != "stopped":
            self._state = "stopping"
        loop = self._loop
        if loop is None or loop.is_closed():
            self._state = "stopped"
            return
        try:
            loop.call_soon_threadsafe(self._stop_all)
        except RuntimeError:
            self._state = "stopped"

    def _stop_all(self) -> None:
        for slot in list(self._slots):
            self.cancel(slot, "shutdown")
        for task in list(self._tasks):
            task.cancel()
        self._state = "stopped"

    def submit(self, slot: str, job: Job) -> None:
        if self._state in ("stopping", "stopped"):
            raise RuntimeError("the worker is stopping")
        s = self._slots.setdefault(slot, _Slot())
        live = [f for f in s.flights if f.cancel_reason is None]
        cap = max(1, self.workers_ready)
        if len(live) >= cap and cap > 1:  # a frame of this session on every replica: wait behind them
            old, s.waiting = s.waiting, job
            if old is not None:
                old.sink.on_done(old, "replaced")
            return
        if len(live) >= cap:  # one replica: the newest input wins, the running one stops at its next step
            for flight in live:
                self._cancel_flight(flight, "superseded")
        old, s.waiting = s.waiting, None
        if old is not None:
            old.sink.on_done(old, "replaced")
        self._launch(slot, job)

    def cancel_older(self, slot: str, job_id: int) -> None:
        """A frame of ``job_id`` was made: the session's older jobs would only be dropped; Serve cancels them."""
        s = self._slots.get(slot)
        for flight in s.flights if s is not None else ():
            if flight.job.id < job_id:
                self._cancel_flight(flight, "superseded")

    def cancel(self, slot: str, reason: str = "closed") -> None:
        s = self._slots.get(slot)
        if s is None:
            return
        s.waiting = None
        for flight in s.flights:
            self._cancel_flight(flight, reason)

    # ---- inside ------------------------------------------------------------------------------------------------
    def _spawn(self, coro: Any) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _launch(self, slot: str, job: Job) -> None:
        flight = _Flight(slot, job)
        self._slots.setdefault(slot, _Slot()).flights.append(flight)
        self._spawn(self._run(flight))

    def _cancel_flight(self, flight: _Flight, reason: str) -> None:
        if flight.cancel_reason is None:
            flight.cancel_reason = reason
        if flight.response is not None:
            flight.response.cancel()  # Serve: CancelledError in the replica, whose engine stops at its next step

    async def _watch(self) -> None:
        """Every second: how many replicas run (``/readyz``), and jobs that waited past the queue limit; every
        few seconds, what the replicas loaded."""
        tick = 0
        while self._state in ("loading", "ready"):
            tick += 1
            if self._state == "ready" and tick % DESCRIBE_EVERY == 0:
                await self._redescribe()
            if self._count_replicas is not None:
                try:
                    running, total, message = await asyncio.to_thread(self._count_replicas)
                    self.workers_ready, self.workers = running, [f"replica {i}" for i in range(total)]
                    if self._state == "ready":
                        self.detail = f"{running} of {total} generator replicas ready" + (
                            f": {message}" if message and running < total else "")
                    elif message:
                        self.detail = f"waiting for a generator replica: {message}"
                except Exception as exc:
                    log.warning("studio: could not read the generator's replicas: %r", exc)
            self._time_out_waiting()
            await asyncio.sleep(WATCH_INTERVAL_S)

    def _time_out_waiting(self) -> None:
        limit = self.settings.queue_wait_timeout_s
        now = time.monotonic()
        for s in list(self._slots.values()):
            for flight in list(s.flights):
                waited = now - flight.job.submitted
                if not flight.started and not flight.settled and flight.cancel_reason is None and waited > limit:
                    self.metrics.errors.labels(type="timeout").inc()
                    self._fail(flight, "timeout", f"waited {waited:.1f} s for a generator replica (limit {limit:g} "
                               "s): the server is busy, try again")
                    self._cancel_flight(flight, "timeout")

    def _request_options(self, job: Job) -> dict[str, Any]:
        """A streaming request; with model presets, tagged with the job's preset (Serve's model multiplexing): the
        router sends it to a replica that holds that preset when one can take it (Generator.generate)."""
        if self._models is None or self._models.implicit:
            return {"stream": True}
        return {"stream": True, "multiplexed_model_id": self._models.name_of(job.params.model)}

    async def _run(self, flight: _Flight) -> None:
        """One job: its streaming request, and again on another replica if the one running it is lost."""
        from ray.exceptions import RayActorError
        from ray.serve.exceptions import (
            DeploymentUnavailableError,
            ReplicaUnavailableError,
            RequestCancelledError,
        )

        lost = (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError)
        job = flight.job
        payload = job_payload(job)
        payload["steps"] = self.step_observer is not None
        tries = 0
        try:
            while not flight.settled:
                if flight.cancel_reason is not None:
                    self._settle(flight, "cancelled")
                    break
                flight.response = self._handle.options(**self._request_options(job)).generate.remote(payload)
                try:
                    async for event in flight.response:
                        await self._on_event(flight, event)
                    if not flight.settled:
                        self._fail(flight, "engine_error", "the generator ended without a frame; see the server log")
                except RequestCancelledError:
                    self._settle(flight, "cancelled")
                except lost as exc:
                    tries += 1
                    if flight.cancel_reason is not None or not self._is_newest(flight):
                        self._settle(flight, "cancelled")  # a newer input of this session is on its way anyway
                    elif tries > RETRY_LIMIT:
                        self.metrics.errors.labels(type="engine_error").inc()
                        self._fail(flight, "engine_error", "no generator replica could take this frame; try again")
                    else:
                        self._replica_lost(flight, exc)
                        await asyncio.sleep(RETRY_DELAY_S)
                except Exception as exc:  # a bug in the replica outside the engine call (RayTaskError), or here
                    log.error("studio: generator request failed: %r", exc)
                    self.metrics.errors.labels(type="engine_error").inc()
                    self._fail(flight, "engine_error", "the generator failed on this frame; see the server log")
        except asyncio.CancelledError:  # shutdown
            if flight.response is not None:
                flight.response.cancel()
            self._settle(flight, "cancelled")
            raise
        finally:
            self._finished(flight)

    def _replica_lost(self, flight: _Flight, exc: BaseException) -> None:
        job = flight.job
        log.error("studio: a generator replica was lost running job %d (%s); it runs again", job.id,
                  type(exc).__name__)
        self.metrics.errors.labels(type="worker_lost").inc()
        flight.started = False
        job.started = None
        if not flight.told:
            flight.told = True
            notice = getattr(job.sink, "on_notice", None)  # optional in the JobSink protocol
            if notice is not None:
                notice(job, "a worker stopped: your newest input runs again on another one")

    def _is_newest(self, flight: _Flight) -> bool:
        s = self._slots.get(flight.slot)
        if s is None:
            return False
        return s.waiting is None and all(f.job.id <= flight.job.id for f in s.flights if f.cancel_reason is None)

    async def _on_event(self, flight: _Flight, event: tuple) -> None:
        job, kind = flight.job, event[0]
        if flight.settled:
            return
        if kind == "started":
            flight.started = True
            job.started = time.monotonic()
        elif kind == "frame":
            _, final, step, total, generation_s, parameters, data = event
            if flight.cancel_reason is not None or (not final and not job.sink.wants_preview()):
                return  # superseded (its frame is stale), or a preview the client has no room for
            image = await asyncio.to_thread(decode_image, data)
            if final:
                self.metrics.generation_seconds.observe(generation_s)
            if flight.cancel_reason is None and not flight.settled:
                job.sink.on_frame(job, image, final=final, step=step, total=total, generation_s=generation_s,
                                  parameters=parameters)
        elif kind == "model":
            self._model_event(job, event)
        elif kind == "step":
            observer = self.step_observer
            if observer is not None and flight.cancel_reason is None:
                observer(job, StepEvent(step=event[1], total=event[2], timestep=event[3], latents=None))
        elif kind == "error":
            _, code, message, error_field = event
            if code != "invalid_params":
                self.metrics.errors.labels(type=code).inc()
            if code in ENGINE_FAILURES:
                self._count_failure()
            job.sink.on_error(job, code, message, error_field)
        elif kind == "done":
            for size in event[2] if len(event) > 2 else ():  # the replica's engine calls since its last "done"
                self.metrics.batch_size.observe(size)
            self._held(event[3] if len(event) > 3 else None)
            self._settle(flight, "cancelled" if flight.cancel_reason is not None and event[1] == "ok" else event[1])

    def _count_failure(self) -> None:
        self.consecutive_failures += 1
        if self.consecutive_failures >= self.settings.max_consecutive_failures:
            log.error("studio: %d consecutive engine failures: /readyz now answers 503", self.consecutive_failures)
            if self.settings.exit_on_failures and self._on_fatal is not None:
                self._on_fatal(f"{self.consecutive_failures} consecutive engine failures")

    def _fail(self, flight: _Flight, code: str, message: str) -> None:
        if flight.settled:
            return
        flight.job.sink.on_error(flight.job, code, message, None)
        self._settle(flight, "error")

    def _settle(self, flight: _Flight, outcome: str) -> None:
        if flight.settled:
            return
        flight.settled = True
        if outcome == "ok":
            self.consecutive_failures = 0
        elif outcome == "cancelled":
            self.metrics.cancelled.inc()
        flight.job.sink.on_done(flight.job, outcome)

    def _finished(self, flight: _Flight) -> None:
        """The flight is over: free its place, and start the session's waiting job if it has one."""
        s = self._slots.get(flight.slot)
        if s is None:
            return
        if flight in s.flights:
            s.flights.remove(flight)
        if s.waiting is not None and self._state == "ready":
            job, s.waiting = s.waiting, None
            self._launch(flight.slot, job)
        elif not s.flights and s.waiting is None:
            del self._slots[flight.slot]
