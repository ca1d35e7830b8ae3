"""A job: one generation a session (or a REST request) asks the worker for, and the sink its results go to.

Every worker kind takes these: the in-process :class:`~lcm_live.studio.worker.Worker`, the pool's, and the Ray
worker (which ships the job's request to a replica and the events back).
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from lcm_live.studio.params import GenerationParams

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
    mask: Any = None  # PIL "L" mask layer (white = redraw), the canvas's size; fitted with it
    init_image: Any = None  # control mode with a mask: the picture to keep outside the mask (the last frame)
    region_masks: list[Any] = field(default_factory=list)  # PIL "L", one per params.regions item
    images: dict[str, Any] = field(default_factory=dict)  # reference, control_images (studio/layers.py JobInputs)
    input: int = 0  # the session's input count when it was made: frames say which input they show
    # Whose cached work it may reuse (GenerationRequest.cache_scope): its session's, its REST request's, its
    # upscale's. None: shared (tests that build jobs by hand).
    scope: str | None = None
    submitted: float = field(default_factory=time.monotonic)  # when the input was accepted
    id: int = field(default_factory=lambda: next(_job_ids))
    cancel_reason: str | None = None  # set from other threads: "superseded" | "closed" | "shutdown"
    timed_out: bool = False
    started: float | None = None
