"""The step hook: one callback per denoising step carries progress, preview latents and cancellation.

The engine calls ``callback(StepEvent)`` after every denoising step. To cancel, the callback raises
:class:`Cancelled`; the engine stops before the next UNet call and re-raises it to the caller. A ``should_stop``
check (``stop_check``) is also read inside each UNet evaluation, so a superseded generation stops mid-step.
The engine's own loop (engine/sampling.py) calls it with the step's clean estimate x0: no scheduler patching.
"""

from __future__ import annotations

import contextlib
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
