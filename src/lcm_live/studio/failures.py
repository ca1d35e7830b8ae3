"""Engine failures as the studio reports them: out of memory (device memory freed) or an engine error, each logged
once with the jobs it hit, and a code and one-line message for each job's client."""

from __future__ import annotations

import gc
import logging
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lcm_live.studio.worker import Job

log = logging.getLogger("lcm_live.studio")


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


def describe_failures(failed: list[tuple[Job, BaseException]]) -> dict[int, tuple[str, str]]:
    """Log each distinct engine failure once (with the jobs it hit); its code and message, by id(exception)."""
    by_error: dict[int, tuple[BaseException, list[Job]]] = {}
    for job, exc in failed:
        by_error.setdefault(id(exc), (exc, []))[1].append(job)
    out: dict[int, tuple[str, str]] = {}
    for key, (exc, jobs) in by_error.items():
        p = jobs[0].params
        ids = ", ".join(str(j.id) for j in jobs)
        if is_oom(exc):
            out[key] = ("oom", "out of memory for this frame: try a smaller width/height or fewer steps")
            log.warning("studio: out of memory on job(s) %s (%dx%d, %d steps, %d in the batch%s)", ids, p.width,
                        p.height, p.num_inference_steps, len(jobs),
                        "; a lower max_batch_size may help" if len(jobs) > 1 else "")
            free_device_memory()
        else:
            out[key] = ("engine_error",
                        f"the engine failed on this frame ({type(exc).__name__}); see the server log")
            log.error("studio: engine error on job(s) %s", ids, exc_info=exc)
    return out
