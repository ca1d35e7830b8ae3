"""What crosses between the studio's ingress and a generator replica (studio/ray_app.py, studio/ray_worker.py).

A job goes as its params (JSON: each side builds its own params model and validates them again) and its layers (PIL
images, pickled by Ray; the reference image and the extra ControlNets' images under ``images``, checked again in
the replica against the same size limits: :func:`check_images`) and ``steps`` (stream each step too); events come
back as tuples: ``("started",)``, ``("step", step, total, timestep)`` (when asked), ``("model", name, state,
progress, message, detail, replica)`` (the job's preset loading on its replica: studio/loader.py), ``("frame",
final, step, total, generation_s, parameters, png_bytes)``, ``("error", code, message, field)`` and last ``("done",
outcome, batch_sizes, held)``: the sizes of the replica's engine calls since its previous "done" (its
``lcm_live_batch_size``, counted again in the ingress) and what it holds now (:func:`held_presets`).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any

from lcm_live.errors import UserError
from lcm_live.studio.worker import Job

IMAGE_KEYS = ("reference", "control_images")  # Job.images as studio/layers.py's job_inputs makes them


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
            "init_image": job.init_image, "region_masks": list(job.region_masks), "input": job.input,
            "images": dict(job.images), "scope": job.scope}


def check_images(images: Any, *, controlnets: int, max_pixels: int, max_side: int) -> dict[str, Any]:
    """A payload's ``images`` as Job.images, or a UserError naming the field: only the reference image and at most
    ``controlnets`` - 1 extra control images (None: that net sits out), each a picture within the studio's size
    limits (the ingress decoded them within these; a replica takes nothing bigger from any caller)."""
    from PIL import Image

    images = dict(images or {})
    unknown = sorted(set(images) - set(IMAGE_KEYS))
    if unknown:
        raise UserError(f"images: unknown key {unknown[0]!r}: a job carries {' and '.join(IMAGE_KEYS)}", field="images")
    controls = images.get("control_images")
    if controls is not None and (not isinstance(controls, list) or len(controls) > max(0, controlnets - 1)):
        n = len(controls) if isinstance(controls, list) else type(controls).__name__
        raise UserError(f"control_images: {n} image(s) for a server with {controlnets} ControlNet(s): give at most "
                        f"{max(0, controlnets - 1)} (net 0's image is the canvas)", field="control_images")
    named = [("ip_adapter_image", images.get("reference"))]
    named += [(f"control_images[{k}]", image) for k, image in enumerate(controls or [])]
    for name, image in named:
        if image is None:
            continue
        if not isinstance(image, Image.Image):
            raise UserError(f"{name}: a {type(image).__name__}, not a picture", field=name)
        width, height = image.size
        if width * height > max_pixels or max(width, height) > max_side:
            raise UserError(f"{name}: {width}x{height} is over this server's limits ({max_pixels} pixels, "
                            f"{max_side} a side): send a smaller picture", field=name)
    return images


def replica_name() -> str:
    """This generator replica's id (Serve's; the process id outside Serve): the ingress keeps readiness by it."""
    import os

    try:
        from ray import serve

        return str(serve.get_replica_context().replica_id.unique_id)
    except Exception:  # outside a replica (tests)
        return f"pid-{os.getpid()}"


def held_presets(worker: Any, replica: str) -> dict[str, Any]:
    """What a replica's worker holds, for the ingress's ``GET /api/models``: {"replica": its id, "loaded": {preset:
    family}}."""
    loaded = {name: getattr(getattr(e.engine, "info", None), "family", None)
              for name, e in list(worker.switcher.engines.items())}
    return {"replica": replica, "loaded": loaded}


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
