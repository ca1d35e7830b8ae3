"""What crosses between the studio's ingress and a generator replica (studio/ray_app.py, studio/ray_worker.py).

A job goes as its params (JSON: each side builds its own params model and validates them again) and its layers (PIL
images, pickled by Ray) and ``steps`` (stream each step too); events come back as tuples: ``("started",)``,
``("step", step, total, timestep)`` (when asked), ``("frame", final, step, total, generation_s, parameters,
png_bytes)``, ``("error", code, message, field)`` and last ``("done", outcome, batch_sizes)``: the sizes of the
replica's engine calls since its previous "done" (its ``lcm_live_batch_size``, counted again in the ingress).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any

from lcm_live.studio.worker import Job


def encode_image(image: Any) -> bytes:
    """A PIL image -> PNG bytes (lossless, the fastest zlib level: the session re-encodes for the client)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def decode_image(data: bytes) -> Any:
    from PIL import Image

    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def job_payload(job: Job) -> dict[str, Any]:
    """What a generator replica needs to rebuild the job: the params as JSON (the params model is built per app,
    so the replica validates them again with its own), the layers as PIL images (pickled by Ray) and the input."""
    return {"params": job.params.model_dump_json(), "canvas": job.canvas, "mask": job.mask,
            "init_image": job.init_image, "region_masks": list(job.region_masks), "input": job.input}


@dataclass
class RemoteEngine:
    """What the app reads of an engine once it is ready (``info``, ``lcm_img2img``), as a replica described it."""

    info: dict[str, Any]
    lcm_img2img: bool = False


def replica_counts(app_name: str, deployment: str) -> tuple[int, int, str]:
    """(running, total, status message) of ``deployment``'s replicas in Serve application ``app_name``."""
    from ray import serve

    status = serve.status().applications.get(app_name)
    if status is None or deployment not in status.deployments:
        return 0, 0, f"no deployment {deployment!r} in application {app_name!r}"
    d = status.deployments[deployment]
    states = {str(k): v for k, v in d.replica_states.items()}
    return states.get("RUNNING", 0), sum(states.values()), d.message


def frame_event(image: Any, *, final: bool, step: int, total: int, generation_s: float,
                parameters: dict[str, Any]) -> tuple:
    """The ``frame`` event a replica streams (parameters made plain JSON: they cross processes)."""
    return ("frame", final, step, total, generation_s, json.loads(json.dumps(parameters, default=str)),
            encode_image(image))
