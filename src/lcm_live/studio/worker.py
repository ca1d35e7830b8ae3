"""The one inference thread: loads and warms the model, then serves every session's newest job, round-robin.

Why one thread: a GPU (or the CPU's cores) runs one generation at a time best. The event loop never runs
inference; it only puts jobs in and takes frames out. A preset switched to later loads and warms up on the worker's
loader thread (studio/loader.py, studio/worker_models.py) while this one goes on serving; the engine is used here
only once installed, between generations.

Per slot (a WebSocket session, or one REST request) there is a size-1 mailbox: a new job replaces the waiting one,
and a job of the same slot that is already running is marked superseded, so the step hook raises ``Cancelled`` at
its next denoising step. Slots with a waiting job are served in the order they became waiting (round-robin: a
busy session cannot starve the others). Events go back to the slot's :class:`JobSink` from this thread; sinks hand
them to the event loop themselves.

Stream batching: when the worker takes the next slot's job it also takes the waiting jobs of other slots with the
same batch key (engine/batching.py: mode, size, steps, guidance, strength), up to ``max_batch_size`` (resolved
once the model is loaded: the setting, else 1 on a CPU and ``max_sessions`` on CUDA/MPS; studio/batching.py), and
runs them as one ``engine.generate_batch`` call. Each job keeps its own sink, seed, cancellation, deadline and
outcome: a job superseded mid-batch drops out at its next step (its frame is never sent), and a failed batch fails
only its own jobs. Clients cannot tell a batched frame from a single one.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any

from lcm_live.config import StudioSettings
from lcm_live.engine.hooks import Cancelled, StepEvent
from lcm_live.errors import UserError, broken_package_message
from lcm_live.studio.batching import job_batch_key, resolve_max_batch_size
from lcm_live.studio.failures import describe_failures, is_oom  # noqa: F401 (is_oom: re-exported)
from lcm_live.studio.jobs import Job, JobSink  # noqa: F401 (JobSink: re-exported)
from lcm_live.studio.loader import LoadTask, ModelLoader
from lcm_live.studio.metrics import StudioMetrics
from lcm_live.studio.models import ModelRegistry
from lcm_live.studio.params import device_type, engine_info, native_size
from lcm_live.studio.runs import Run, prepare_run
from lcm_live.studio.switching import ModelSwitcher
from lcm_live.studio.worker_models import ModelSlots

log = logging.getLogger("lcm_live.studio")

class Worker(ModelSlots):
    def __init__(
        self,
        engine_factory: Callable[[], Any],
        settings: StudioSettings,
        metrics: StudioMetrics,
        *,
        on_ready: Callable[[Any], None] | None = None,
        on_fatal: Callable[[str], None] | None = None,
        name: str = "lcm-live-worker",
        models: ModelRegistry | None = None,
    ):
        self.name = name
        self.settings = settings
        self.metrics = metrics
        self.engine: Any = None
        self.state = "loading"  # loading | ready | failed | stopping | stopped
        self.detail = "loading the model"
        self.consecutive_failures = 0
        self.last_generation_s: float | None = None  # the last engine call that made a frame (a pool paces by it)
        self.max_batch_size = 1  # resolved once the engine is loaded (resolve_max_batch_size)
        self.step_observer: Callable[[Job, StepEvent], None] | None = None  # tests and benchmarks
        self._engine_factory = engine_factory
        # The presets' engines this worker holds (studio/switching.py); one implicit preset: the factory's model
        self.models = models or ModelRegistry.implicit_default()
        self.switcher = ModelSwitcher(self.models, engine_factory, name)
        self._on_ready = on_ready
        self._on_fatal = on_fatal
        self._cond = threading.Condition()
        self._pending: dict[str, Job] = {}  # slot -> its newest waiting job
        self._order: deque[str] = deque()  # slots with a waiting job, in round-robin order
        self._running: dict[str, Job] = {}  # slot -> its job in the engine call now running
        # Jobs waiting for their preset to load on the loader thread (studio/loader.py), and finished loads
        self._parked: dict[str, tuple[str, Job]] = {}  # slot -> (preset, job)
        self._slot_models: OrderedDict[str, str] = OrderedDict()  # slot -> the preset of its last frame
        self._installs: deque[tuple[LoadTask, Any, str | None]] = deque()
        self.loader = ModelLoader(name, self.switcher.build, self.switcher.warm_preset, self._load_finished,
                                  on_failed=lambda preset, message: self.models.mark_failed(preset, name, message))
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    # ---- control (any thread) ----------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def healthy(self) -> bool:
        return self.consecutive_failures < self.settings.max_consecutive_failures

    @property
    def ready(self) -> bool:
        return self.state == "ready" and self.alive and self.healthy

    def queue_depth(self) -> int:
        with self._cond:
            return len(self._pending)

    def load(self) -> int:
        """Jobs waiting or running here (a pool places new work on the least loaded worker)."""
        with self._cond:
            return len(self._pending) + len(self._running) + len(self._parked)

    def has_model(self, name: str) -> bool:
        """Whether preset ``name`` is loaded or loading here (a pool places a job where its model is)."""
        return self.switcher.has(name) or self.loader.loading(name)

    def slot_state(self, slot: str) -> str | None:
        """"waiting", "running" or None: what ``slot`` has here now."""
        with self._cond:
            return "waiting" if slot in self._pending else "running" if slot in self._running else None

    def take_all(self) -> list[tuple[str, Job]]:
        """Every (slot, job) waiting or running here, forgotten (a pool moves a dead worker's jobs elsewhere)."""
        with self._cond:
            jobs = [*self._running.items(), *self._pending.items(),
                    *((slot, job) for slot, (_, job) in self._parked.items())]
            for slot in self._parked:
                self.loader.drop(slot)
            self._parked.clear()
            self._pending.clear()
            self._order.clear()
            self._running = {}
            self.metrics.queue_depth.set(0)
        return jobs

    def submit(self, slot: str, job: Job, *, supersede: bool = True) -> None:
        """Put ``job`` in ``slot``'s mailbox (replacing a waiting one) and supersede the slot's running job
        (``supersede=False``: let it finish; a pool runs a session's frames on several workers at once)."""
        with self._cond:
            if self.state in ("stopping", "stopped"):
                raise RuntimeError("the worker is stopping")
            old = self._pending.get(slot)
            if old is None:
                self._order.append(slot)
            if old is None and slot in self._parked:  # waiting for a load: a load of another preset is dropped
                preset, old = self._parked.pop(slot)
                self.loader.drop(slot, cancel_if_alone=preset != self.models.name_of(job.params.model))
            self._pending[slot] = job
            running = self._running.get(slot)
            if running is not None and supersede:
                running.cancel_reason = "superseded"
            self.metrics.queue_depth.set(len(self._pending))
            self._cond.notify()
        if old is not None:
            old.sink.on_done(old, "replaced")

    def cancel_older(self, slot: str, job_id: int) -> None:
        """Stop ``slot``'s jobs older than ``job_id`` (a newer frame of it was made: theirs would be dropped)."""
        with self._cond:
            for job in (self._pending.get(slot), self._running.get(slot)):
                if job is not None and job.id < job_id and job.cancel_reason is None:
                    job.cancel_reason = "superseded"

    def cancel(self, slot: str, reason: str = "closed") -> None:
        """Forget ``slot``'s waiting job and stop its running one at the next step (disconnect)."""
        with self._cond:
            old = self._pending.pop(slot, None)
            if old is not None:
                self._order.remove(slot)
            if self._parked.pop(slot, None) is not None:
                self.loader.drop(slot)
            self._slot_models.pop(slot, None)
            running = self._running.get(slot)
            if running is not None:
                running.cancel_reason = reason
            self.metrics.queue_depth.set(len(self._pending))

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            if self.state != "stopped":
                self.state = "stopping"
            dropped = [*self._pending.values(), *(job for _, job in self._parked.values())]
            self._parked.clear()
            self.loader.stop()
            self._pending.clear()
            self._order.clear()
            for running in self._running.values():
                running.cancel_reason = "shutdown"
            self.metrics.queue_depth.set(0)
            self._cond.notify_all()
        for job in dropped:
            job.sink.on_done(job, "cancelled")
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    # ---- the thread --------------------------------------------------------------------------------------
    def _run(self) -> None:
        if not self._load():
            return
        while True:
            with self._cond:
                while not self._order and not self._installs and self.state == "ready":
                    self._cond.wait()
                if self.state != "ready":
                    break
                installs = list(self._installs)
                self._installs.clear()
            for install in installs:  # a finished load: its engine held here, its jobs back in their mailboxes
                self._install(*install)
            with self._cond:
                if not self._order:
                    continue
                self._running = self._take()
                jobs = list(self._running.values())
                self.metrics.queue_depth.set(len(self._pending))
            try:
                self._execute(jobs)
            except Exception:  # a bug in a sink: keep serving the others
                log.exception("studio worker: unexpected error around job(s) %s", [j.id for j in jobs])
            # Not in a finally: a thread that dies here leaves its running jobs for a pool to move (studio/pool.py)
            with self._cond:
                self._running = {}
        self.state = "stopped"

    def _take(self) -> dict[str, Job]:
        """Under the lock: the next slot's job, and the waiting jobs of other slots with its batch key (in their
        round-robin order) up to max_batch_size."""
        slot = self._order.popleft()
        first = self._pending.pop(slot)
        taken = {slot: first}
        key = self._batch_key(first) if self.max_batch_size > 1 and first.cancel_reason is None else None
        for other in list(self._order) if key is not None else ():
            if len(taken) >= self.max_batch_size:
                break
            job = self._pending[other]
            if job.cancel_reason is None and self._batch_key(job) == key:
                self._order.remove(other)
                taken[other] = self._pending.pop(other)
        return taken

    def _batch_key(self, job: Job) -> Any:
        """Jobs share an engine call only on the same preset with the same style scales."""
        p = job.params
        return self.models.name_of(p.model), sorted(p.lora_scales.items()), job_batch_key(job)

    def _load(self) -> bool:
        s = self.settings
        try:
            self.engine = self.switcher.build(self.models.default)
            info = engine_info(self.engine)
            device = device_type(info)
            self.max_batch_size = resolve_max_batch_size(s, device)
            # The sizes and previews left to the model, resolved once: the app builds its schema from these.
            s = self.settings = s.for_model(*native_size(info), device=device)
            self.models.check_defaults(s)  # the presets' page defaults within these bounds
            width = s.warmup_width or s.default_width
            height = s.warmup_height or s.default_height
            t0 = time.perf_counter()
            if self.engine.compiled:  # minutes with no other sign of life: say so first
                log.info("studio: warming up at %dx%d: torch.compile compiles the UNet for batches of 1 to %d, "
                         "a minute or more (once per image size)", width, height, self.max_batch_size)
            self.engine.warmup(width, height, s.warmup_steps, max_batch_size=self.max_batch_size)
            log.info("studio: warmed up at %dx%d, %d step(s), in %.1f s; up to %d frame(s) per engine call",
                     width, height, s.warmup_steps, time.perf_counter() - t0, self.max_batch_size)
            self.switcher.max_loaded = s.max_loaded_models or (1 if device == "cpu" else 2)
            self.switcher.warm = lambda engine, preset: engine.warmup(
                preset.width or width, preset.height or height, s.warmup_steps, max_batch_size=self.max_batch_size)
            self.switcher.prepare_sliders(self.engine, self.models.default)
            self.switcher.adopt(self.models.default, self.engine, info.get("family"))
        except Exception as exc:
            known = exc.message if isinstance(exc, UserError) else broken_package_message(exc)
            message = known or f"{type(exc).__name__}: {exc}"
            log.error("studio: loading or warming up the model failed: %s", message, exc_info=known is None)
            self.models.mark_failed(self.models.default, self.name, message)
            with self._cond:
                self.state, self.detail = "failed", f"model load or warmup failed: {message}"
            if self._on_fatal is not None and s.exit_on_warmup_failure:
                self._on_fatal(self.detail)
            return False
        # The app's schema and info first, then "ready": a client that sees ready must see this model's schema.
        if self._on_ready is not None:
            self._on_ready(self.engine)
        with self._cond:
            if self.state == "loading":
                self.state, self.detail = "ready", "ready"
        return self.state == "ready"

    def _execute(self, jobs: list[Job]) -> None:
        """Run the jobs that are still wanted as one engine call, then settle each job's outcome."""
        s, m = self.settings, self.metrics
        now = time.monotonic()
        wanted: list[Job] = []
        for job in jobs:
            if job.cancel_reason is not None:
                job.sink.on_done(job, "cancelled")
            elif (waited := now - job.submitted) > s.queue_wait_timeout_s:
                m.errors.labels(type="timeout").inc()
                job.sink.on_error(job, "timeout", f"waited {waited:.1f} s for the worker (limit "
                                  f"{s.queue_wait_timeout_s:g} s): the server is busy, try again", None)
                job.sink.on_done(job, "error")
            else:
                wanted.append(job)
        if not wanted or not self._select_engine(wanted):
            return
        now = time.monotonic()  # after a model load: the generation deadline starts now
        runs: list[Run] = []
        for job in wanted:
            job.started = now
            runs.append(prepare_run(self, job, now))
        m.batch_size.observe(len(runs))
        outcomes: list[tuple[Run, Any, BaseException | None]] = []
        if len(runs) == 1:
            try:
                run = runs[0]  # alone: stopped inside a step too when superseded (engine/interrupt.py)
                outcomes.append((run, self.engine.generate(run.request, run.callback, should_stop=run.should_stop),
                                 None))
            except Exception as exc:
                outcomes.append((runs[0], None, exc))
        else:
            try:
                results = self.engine.generate_batch([r.request for r in runs], [r.callback for r in runs])
                outcomes = [(r, res if res.error is None else None, res.error)
                            for r, res in zip(runs, results, strict=True)]
            except Exception as exc:  # the batch call itself broke: each of its jobs gets the error
                outcomes = [(r, None, exc) for r in runs]
        self._settle(outcomes, time.monotonic() - now)

    def _settle(self, outcomes: list[tuple[Run, Any, BaseException | None]], generation_s: float) -> None:
        """Each job's frame or error. One engine call counts once towards max_consecutive_failures."""
        s, m = self.settings, self.metrics
        failed = [(r.job, e) for r, _, e in outcomes if e is not None and not isinstance(e, (Cancelled, UserError))]
        messages = describe_failures(failed)
        if any(result is not None for _, result, _ in outcomes):
            with self._cond:
                self.consecutive_failures = 0
                self.last_generation_s = generation_s
        for run, result, error in outcomes:
            job = run.job
            if error is None:
                m.generation_seconds.observe(generation_s)
                if job.cancel_reason is None:
                    total = run.seen["total"]
                    job.sink.on_frame(job, result.images[0], final=True, step=total, total=total,
                                      generation_s=generation_s, parameters=dict(result.parameters))
                    job.sink.on_done(job, "ok")
                    continue
                error = Cancelled(job.cancel_reason)  # superseded during the last step: the frame is already stale
            if isinstance(error, Cancelled) and job.timed_out:
                m.errors.labels(type="timeout").inc()
                self._fail(job, "timeout", f"the generation ran past {s.generation_timeout_s:g} s: use fewer steps "
                           "or a smaller size")
            elif isinstance(error, Cancelled):
                m.cancelled.inc()
                job.sink.on_done(job, "cancelled")
            elif isinstance(error, UserError):
                self._fail(job, "invalid_params", error.message, error.field)
            else:
                code, message = messages[id(error)]
                m.errors.labels(type=code).inc()
                self._fail(job, code, message)
        if failed and not any(result is not None for _, result, _ in outcomes):
            with self._cond:
                self.consecutive_failures += 1
                failures = self.consecutive_failures
            if failures >= s.max_consecutive_failures:
                log.error("studio: %d consecutive engine failures: /readyz now answers 503", failures)
                if s.exit_on_failures and self._on_fatal is not None:
                    self._on_fatal(f"{failures} consecutive engine failures")

    def _fail(self, job: Job, code: str, message: str, field: str | None = None) -> None:
        job.sink.on_error(job, code, message, field)
        job.sink.on_done(job, "error")
