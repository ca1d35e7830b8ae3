"""The studio's stream-batching policy: how many frames may share one engine call on this device, and which jobs
may share it (the engine's batch key of the request each job will run). The worker (studio/worker.py) applies it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lcm_live.config import StudioSettings
from lcm_live.engine.batching import batch_key

if TYPE_CHECKING:
    from lcm_live.studio.worker import Job


def resolve_max_batch_size(settings: StudioSettings, device: str) -> int:
    """``max_batch_size`` as set, else 1 on a CPU (a batch there costs its members' time: nothing to gain) and
    ``max_sessions`` (default 4) on CUDA or MPS."""
    if settings.max_batch_size is not None:
        return settings.max_batch_size
    if str(device).startswith(("cuda", "mps")):
        return settings.max_sessions or 4
    return 1


def job_batch_key(job: Job) -> Any:
    """The engine batch key of the request this job will run (None: never batched)."""
    # The canvas goes where the mode uses it; the reference and extra ControlNet images as the job has them.
    return batch_key(job.params.to_request(image=job.canvas, **job.images))

