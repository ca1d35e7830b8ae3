"""The step hook: one callback per denoising step carries progress, preview latents and cancellation.

The engine calls ``callback(StepEvent)`` after every denoising step. To cancel, the callback raises
:class:`Cancelled`; the engine stops before the next UNet call and re-raises it to the caller.
:class:`DenoisedRecorder` gives the step's x0 for pipelines whose step callback does not carry it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


class Cancelled(Exception):
    """Raised by a step callback (or the engine) to stop a generation between two denoising steps."""


@dataclass
class StepEvent:
    step: int  # 1-based index of the step that just finished
    total: int  # number of denoising steps that will actually run (img2img: about steps * strength)
    timestep: int  # the scheduler timestep of that step, in [0, 1000)
    latents: Any  # torch.Tensor (B, C, H/f, W/f): the step's denoised prediction x0, scaled latents
    # (multiply by 1/vae.config.scaling_factor before a VAE decode; TAESD takes them as they are).


StepCallback = Callable[[StepEvent], None]


class DenoisedRecorder:
    """Keeps the x0 prediction of the scheduler's last step, for pipelines whose step callback does not expose
    ``denoised`` (StableDiffusion*Pipeline drop the second output of ``LCMScheduler.step``)."""

    def __init__(self, scheduler: Any):
        self.scheduler = scheduler
        self.last = None

    def __enter__(self) -> DenoisedRecorder:
        original = type(self.scheduler).step.__get__(self.scheduler)

        # wraps() keeps step's signature visible: pipelines inspect it to decide whether to pass `generator`
        # (without it, the re-noising between steps would draw from the global RNG and seeds would not hold).
        @functools.wraps(original)
        def step(*args, **kwargs):
            out = original(*args, **kwargs)
            denoised = out[1] if isinstance(out, tuple) and len(out) > 1 else getattr(out, "denoised", None)
            self.last = denoised
            return out

        self.scheduler.step = step  # instance attribute, removed on exit; the class is untouched
        return self

    def __exit__(self, *exc) -> None:
        self.scheduler.__dict__.pop("step", None)
