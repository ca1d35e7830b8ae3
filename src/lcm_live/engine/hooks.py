"""The step hook: one callback per denoising step carries progress, preview latents and cancellation.

The engine calls ``callback(StepEvent)`` after every denoising step. To cancel, the callback raises
:class:`Cancelled`; the engine stops before the next UNet call and re-raises it to the caller.
"""

from __future__ import annotations

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
