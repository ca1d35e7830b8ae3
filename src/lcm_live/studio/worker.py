"""The one inference thread: loads and warms the model, then serves every session's newest job, round-robin.

Why one thread: a GPU (or the CPU's cores) runs one generation at a time best, and torch/OpenVINO state stays on
the thread that made it. The event loop never runs inference; it only puts jobs in and takes frames out.

Per slot (a WebSocket session, or one REST request) there is a size-1 mailbox: a new job replaces the waiting one,
and a job of the same slot that is already running is marked superseded, so the step hook raises ``Cancelled`` at
its next denoising step. Slots with a waiting job are served in the order they became waiting (round-robin: a
busy session cannot starve the others). Events go back to the slot's :class:`JobSink` from this thread; sinks hand
them to the event loop themselves.
"""

from __future__ import annotations

import gc
import itertools
import logging
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from lcm_live.config import StudioSettings
from lcm_live.engine.hooks import Cancelled, StepEvent
from lcm_live.errors import UserError
from lcm_live.studio.images import fit_canvas
from lcm_live.studio.metrics import StudioMetrics
from lcm_live.studio.params import GenerationParams

log = logging.getLogger("lcm_live.studio")

_job_ids = itertools.count(1)


class JobSink(Protocol):
    """Where a job's results go. Called on the worker thread; implementations must not block."""

    def wants_preview(self) -> bool: ...  # False while the previous frame is still unsent: skip decoding one

    def on_frame(self, job: Job, image: Any, *, final: bool, step: int, total: int, generation_s: float,
                 parameters: dict[str, Any]) -> None: ...

    def on_error(self, job: Job, code: str, message: str, field: str | None) -> None: ...

    def on_done(self, job: Job, outcome: str) -> None: ...  # "ok" | "cancelled" | "error" | "replaced"


@dataclass(eq=False)
class Job:
    params: GenerationParams
    sink: JobSink
    canvas: Any = None  # PIL RGB image for img2img, any size (fitted to width x height on the worker)
    submitted: float = field(default_factory=time.monotonic)  # when the input was accepted
    id: int = field(default_factory=lambda: next(_job_ids))
    cancel_reason: str | None = None  # set from other threads: "superseded" | "closed" | "shutdown"
    timed_out: bool = False
    started: float | None = None


def is_oom(exc: BaseException) -> bool:
    """torch.OutOfMemoryError (CUDA), or the RuntimeError older torch and other backends raise."""
    if type(exc).__name__ == "OutOfMemoryError":
        return True
    return isinstance(exc, (RuntimeError, MemoryError)) and (
        isinstance(exc, MemoryError) or "out of memory" in str(exc).lower()
    )


def free_device_memory() -> None:
    """After an OOM: drop the failed run's tensors and give cached CUDA blocks back."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


class Worker:
    def __init__(
        self,
        engine_factory: Callable[[], Any],
        settings: StudioSettings,
        metrics: StudioMetrics,
        *,
        on_ready: Callable[[Any], None] | None = None,
        on_fatal: Callable[[str], None] | None = None,
    ):
        self.settings = settings
        self.metrics = metrics
        self.engine: Any = None
        self.state = "loading"  # loading | ready | failed | stopping | stopped
        self.detail = "loading the model"
        self.consecutive_failures = 0
        self.step_observer: Callable[[Job, StepEvent], None] | None = None  # tests and benchmarks
        self._engine_factory = engine_factory
        self._on_ready = on_ready
        self._on_fatal = on_fatal
        self._cond = threading.Condition()
        self._pending: dict[str, Job] = {}  # slot -> its newest waiting job
        self._order: deque[str] = deque()  # slots with a waiting job, in round-robin order
        self._running: Job | None = None
        self._running_slot: str | None = None
        self._thread = threading.Thread(target=self._run, name="lcm-live-worker", daemon=True)

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

    def submit(self, slot: str, job: Job) -> None:
        """Put ``job`` in ``slot``'s mailbox (replacing a waiting one) and supersede the slot's running job."""
        with self._cond:
            if self.state in ("stopping", "stopped"):
                raise RuntimeError("the worker is stopping")
            old = self._pending.get(slot)
            self._pending[slot] = job
            if old is None:
                self._order.append(slot)
            if self._running_slot == slot and self._running is not None:
                self._running.cancel_reason = "superseded"
            self.metrics.queue_depth.set(len(self._pending))
            self._cond.notify()
        if old is not None:
            old.sink.on_done(old, "replaced")

    def cancel(self, slot: str, reason: str = "closed") -> None:
        """Forget ``slot``'s waiting job and stop its running one at the next step (disconnect)."""
        with self._cond:
            old = self._pending.pop(slot, None)
            if old is not None:
                self._order.remove(slot)
            if self._running_slot == slot and self._running is not None:
                self._running.cancel_reason = reason
            self.metrics.queue_depth.set(len(self._pending))

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            if self.state != "stopped":
                self.state = "stopping"
            dropped = list(self._pending.values())
            self._pending.clear()
            self._order.clear()
            if self._running is not None:
                self._running.cancel_reason = "shutdown"
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
                while not self._order and self.state == "ready":
                    self._cond.wait()
                if self.state != "ready":
                    break
                slot = self._order.popleft()
                job = self._pending.pop(slot)
                self._running, self._running_slot = job, slot
                self.metrics.queue_depth.set(len(self._pending))
            try:
                self._execute(job)
            except Exception:  # a bug in a sink: keep serving the others
                log.exception("studio worker: unexpected error around job %s", job.id)
            finally:
                with self._cond:
                    self._running, self._running_slot = None, None
        self.state = "stopped"

    def _load(self) -> bool:
        s = self.settings
        try:
            self.engine = self._engine_factory()
            width = s.warmup_width or s.default_width
            height = s.warmup_height or s.default_height
            t0 = time.perf_counter()
            self.engine.warmup(width, height, s.warmup_steps)
            log.info("studio: warmed up at %dx%d, %d step(s), in %.1f s", width, height, s.warmup_steps,
                     time.perf_counter() - t0)
        except Exception as exc:
            message = exc.message if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"
            log.error("studio: loading or warming up the model failed: %s", message,
                      exc_info=not isinstance(exc, UserError))
            with self._cond:
                self.state, self.detail = "failed", f"model load or warmup failed: {message}"
            if self._on_fatal is not None and s.exit_on_warmup_failure:
                self._on_fatal(self.detail)
            return False
        with self._cond:
            if self.state == "loading":
                self.state, self.detail = "ready", "ready"
        if self._on_ready is not None:
            self._on_ready(self.engine)
        return self.state == "ready"

    def _execute(self, job: Job) -> None:
        s, m = self.settings, self.metrics
        now = time.monotonic()
        if job.cancel_reason is not None:
            job.sink.on_done(job, "cancelled")
            return
        if now - job.submitted > s.queue_wait_timeout_s:
            m.errors.labels(type="timeout").inc()
            job.sink.on_error(job, "timeout", f"waited {now - job.submitted:.1f} s for the worker (limit "
                              f"{s.queue_wait_timeout_s:g} s): the server is busy, try again", None)
            job.sink.on_done(job, "error")
            return
        job.started = now
        deadline = now + s.generation_timeout_s
        p = job.params
        canvas = fit_canvas(job.canvas, p.width, p.height) if (p.mode == "img2img" and job.canvas is not None) else None
        request = p.to_request(image=canvas)
        seen = {"total": p.num_inference_steps}

        def callback(event: StepEvent) -> None:
            seen["total"] = event.total
            if job.cancel_reason is not None:
                raise Cancelled(job.cancel_reason)
            if time.monotonic() > deadline:
                job.timed_out = True
                raise Cancelled("deadline")
            if self.step_observer is not None:
                self.step_observer(job, event)
            if p.previews and event.step < event.total and job.sink.wants_preview():
                try:
                    preview = self.engine.decode_preview(event.latents)
                except Exception:  # a preview is a nicety: never fail the frame for it
                    log.warning("studio: preview decode failed at step %d", event.step, exc_info=True)
                    return
                job.sink.on_frame(job, preview, final=False, step=event.step, total=event.total,
                                  generation_s=time.monotonic() - now, parameters={})

        try:
            result = self.engine.generate(request, callback)
        except Cancelled:
            if job.timed_out:
                m.errors.labels(type="timeout").inc()
                job.sink.on_error(job, "timeout", f"the generation ran past {s.generation_timeout_s:g} s: use fewer "
                                  "steps or a smaller size", None)
                job.sink.on_done(job, "error")
            else:
                m.cancelled.inc()
                job.sink.on_done(job, "cancelled")
            return
        except UserError as exc:
            job.sink.on_error(job, "invalid_params", exc.message, exc.field)
            job.sink.on_done(job, "error")
            return
        except Exception as exc:
            self._failed(job, exc)
            return
        generation_s = time.monotonic() - now
        with self._cond:
            self.consecutive_failures = 0
        m.generation_seconds.observe(generation_s)
        if job.cancel_reason is not None:  # superseded during the last step: the frame is already stale
            m.cancelled.inc()
            job.sink.on_done(job, "cancelled")
            return
        job.sink.on_frame(job, result.images[0], final=True, step=seen["total"], total=seen["total"],
                          generation_s=generation_s, parameters=dict(result.parameters))
        job.sink.on_done(job, "ok")

    def _failed(self, job: Job, exc: BaseException) -> None:
        if is_oom(exc):
            code, message = "oom", ("out of memory for this frame: try a smaller width/height or fewer steps")
            log.warning("studio: out of memory on job %s (%dx%d, %d steps)", job.id, job.params.width,
                        job.params.height, job.params.num_inference_steps)
            free_device_memory()
        else:
            code, message = "engine_error", f"the engine failed on this frame ({type(exc).__name__}); see the server log"
            log.error("studio: engine error on job %s", job.id, exc_info=exc)
        self.metrics.errors.labels(type=code).inc()
        with self._cond:
            self.consecutive_failures += 1
            failures = self.consecutive_failures
        job.sink.on_error(job, code, message, None)
        job.sink.on_done(job, "error")
        if failures >= self.settings.max_consecutive_failures:
            log.error("studio: %d consecutive engine failures: /readyz now answers 503", failures)
            if self.settings.exit_on_failures and self._on_fatal is not None:
                self._on_fatal(f"{failures} consecutive engine failures")
