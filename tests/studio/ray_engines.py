"""Test-only engines for the Ray tests (tests/studio/test_ray_models.py): a FakeEngine with two ControlNets and an
IP-Adapter that paints what reached it, so a frame that crossed the ingress, the Ray wire and a replica shows it.

Pickled by value to the replicas (``ray.cloudpickle.register_pickle_by_value``): a replica need not import tests/.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from PIL import Image, ImageStat

from lcm_live.studio.fake_engine import FakeEngine, FakeEngineConfig

NETS = ["fake-depth", "fake-edges"]


def mean_colour(image: Any) -> tuple[int, int, int]:
    return tuple(round(v) for v in ImageStat.Stat(image.convert("RGB")).mean)  # type: ignore[return-value]


class ConditionedFakeEngine(FakeEngine):
    """Each frame's quarters: top left the reference image's mean colour, top right net 0's control image's, bottom
    left net 1's (black where none came), bottom right (ip_adapter_scale, scale of net 0, scale of net 1) x 100."""

    @property
    def info(self):
        return dataclasses.replace(super().info, controlnet=" + ".join(NETS), controlnets=list(NETS),
                                   ip_adapter="fake-ip-adapter")

    def _call(self, requests, on_step):
        seen = [(r.ip_adapter_image, r.ip_adapter_scale, r.control_image, r.controlnet_conditioning_scale)
                for r in requests]
        plain = [dataclasses.replace(r, control_image=None, ip_adapter_image=None) for r in requests]
        results = super()._call(plain, on_step)
        for result, (reference, ip_scale, control, scales) in zip(results, seen, strict=True):
            image = result.images[0]
            w, h = image.size
            controls = control if isinstance(control, list) else [control, None]
            scales = scales if isinstance(scales, list) else [scales, 0.0]
            quarters = [reference, *controls]
            for (x, y), picture in zip([(0, 0), (w // 2, 0), (0, h // 2)], quarters, strict=True):
                colour = mean_colour(picture) if picture is not None else (0, 0, 0)
                image.paste(colour, (x, y, x + w // 2, y + h // 2))
            ip = ip_scale if reference is not None else 0.0
            image.paste(tuple(round(v * 100) for v in (ip, *scales)), (w // 2, h // 2, w, h))
        return results


def conditioned_factory(device: str | None = None, *, preset: Any = None) -> ConditionedFakeEngine:
    """A preset's engine (its ``model`` reported as the preset's), loading in 0.3 s."""
    model = preset.model if preset is not None else "fake"
    return ConditionedFakeEngine.from_settings(config=FakeEngineConfig(
        model=model, controlnet=" + ".join(NETS), load_latency_s=0.3, step_latency_s=0.05))


def colour_at(image: Image.Image, x: float, y: float) -> tuple[int, int, int]:
    """The pixel at fractions (x, y) of the image."""
    w, h = image.size
    return image.convert("RGB").getpixel((int(x * w), int(y * h)))
