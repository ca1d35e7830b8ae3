"""A frame on its way to a session's client: what the worker made, and the JSON that goes before its bytes."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from lcm_live.studio.worker import Job


@dataclass
class PendingFrame:
    job: Job
    image: Any
    final: bool
    step: int
    total: int
    generation_s: float
    parameters: dict[str, Any]


def frame_info(frame: PendingFrame, frame_id: int, encode_s: float) -> dict[str, Any]:
    """The JSON that goes before a frame's bytes (docs/protocol.md: ``frame``)."""
    job = frame.job
    queue_s = (job.started or job.submitted) - job.submitted
    width, height = frame.image.size
    return {
        "type": "frame",
        "id": frame_id,
        "final": frame.final,
        "step": frame.step,
        "total": frame.total,
        "seed": frame.parameters.get("seed", job.params.seed),
        "width": width,
        "height": height,
        "timings": {
            "queue_ms": round(queue_s * 1000, 2),
            "generation_ms": round(frame.generation_s * 1000, 2),
            "encode_ms": round(encode_s * 1000, 2),
            "total_ms": round((time.monotonic() - job.submitted) * 1000, 2),
        },
        "input": job.input,
        "params": job.params.model_dump(),
    }
