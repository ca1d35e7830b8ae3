"""The step hook: one callback per denoising step carries progress, preview latents and cancellation.

The engine calls ``callback(StepEvent)`` after every denoising step. To cancel, the callback raises
:class:`Cancelled`; the engine stops before the next UNet call and re-raises it to the caller. A ``should_stop``
check (``stop_check``) is also read inside each UNet evaluation, so a superseded generation stops mid-step.
:class:`DenoisedRecorder` gives the step's x0 for pipelines whose step callback does not carry it.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from contextvars import ContextVar
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


# The running generation's stop check (Engine.generate's ``should_stop``): a reason to stop, or None to go on.
# Read inside a UNet evaluation (engine/interrupt.py), so that a superseded generation stops mid-step instead of
# at the end of a step that takes seconds on a CPU.
_STOP_CHECK: ContextVar[Callable[[], str | None] | None] = ContextVar("lcm_live_stop_check", default=None)


@contextlib.contextmanager
def stop_check(should_stop: Callable[[], str | None] | None) -> Iterator[None]:
    """Make ``should_stop`` the stop check of what runs inside (None: nothing stops mid-step)."""
    token = _STOP_CHECK.set(should_stop)
    try:
        yield
    finally:
        _STOP_CHECK.reset(token)


def stop_reason() -> str | None:
    """Why the running generation should stop now, or None (also when no stop check is set)."""
    should_stop = _STOP_CHECK.get()
    return should_stop() if should_stop is not None else None


def stop_check_active() -> bool:
    return _STOP_CHECK.get() is not None


def raise_if_stopped(*_: Any) -> None:
    """Raise :class:`Cancelled` when the stop check says so (usable as a forward pre-hook)."""
    reason = stop_reason()
    if reason:
        raise Cancelled(reason)


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
