"""One job inside a worker's engine call (studio/worker.py): its diffusers request, made from the job's params
and layers, and its step callback (previews, cancellation, the deadline)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lcm_live.engine.hooks import Cancelled, StepEvent
from lcm_live.studio.images import prepare_canvas
from lcm_live.studio.jobs import Job

log = logging.getLogger("lcm_live.studio")


@dataclass
class Run:
    """One job inside an engine call: its request, its step callback, the last step total it saw, and its stop
    check (superseded, closed or past its deadline: why to stop now, else None)."""

    job: Job
    request: Any
    callback: Callable[[StepEvent], None]
    seen: dict[str, int]
    should_stop: Callable[[], str | None]


def prepare_run(worker: Any, job: Job, started: float) -> Run:
    """``job``'s request and its step callback (previews through ``worker.engine``, stop checks, the worker's
    ``step_observer``), its generation deadline counted from ``started``."""
    s = worker.settings
    deadline = started + s.generation_timeout_s
    p = job.params
    canvas = (prepare_canvas(job.canvas, p.mode, p.width, p.height,
                             preprocess=getattr(p, "control_preprocess", "none"))
              if job.canvas is not None else None)
    seen = {"total": p.num_inference_steps}

    def should_stop() -> str | None:
        if job.cancel_reason is not None:
            return job.cancel_reason
        if time.monotonic() > deadline:
            job.timed_out = True
            return "deadline"
        return None

    def callback(event: StepEvent) -> None:
        seen["total"] = event.total
        reason = should_stop()
        if reason is not None:
            raise Cancelled(reason)
        if worker.step_observer is not None:
            worker.step_observer(job, event)
        if p.previews and event.step < event.total and job.sink.wants_preview():
            try:
                preview = worker.engine.decode_preview(event.latents)
            except Exception:  # a preview is a nicety: never fail the frame for it
                log.warning("studio: preview decode failed at step %d", event.step, exc_info=True)
                return
            job.sink.on_frame(job, preview, final=False, step=event.step, total=event.total,
                              generation_s=time.monotonic() - started, parameters={})

    size = (p.width, p.height)
    fit = (lambda img: img if img is None or img.size == size else img.resize(size))  # noqa: E731
    request = p.to_request(image=canvas, mask=fit(job.mask), init_image=fit(job.init_image),
                           region_masks=[fit(m) for m in job.region_masks], **job.images)
    request.cache_scope = job.scope  # cached prompts and pictures of this client only
    return Run(job, request, callback, seen, should_stop)
