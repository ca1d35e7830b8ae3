"""Stopping a generation inside a UNet evaluation, not only between steps.

On a CPU one sd15 step at 512x512 takes seconds. When the studio supersedes a generation (a new keystroke, the
end of a stroke), waiting for the step to end delays the new picture by up to that long. The engine's
``should_stop`` check (engine/hooks.py: ``stop_check``) is therefore also read inside the UNet:
- torch UNet (not compiled): a forward pre-hook on each down, mid and up block, 7 checks per evaluation in
  SD1.5. A compiled UNet gets none: a hook inside its graph would break the graph, and on a GPU a step takes
  milliseconds anyway.
- OpenVINO UNet: the inference runs asynchronously and the check is polled every ``POLL_MS``. A stop cancels the
  infer request, which can run again afterwards.

A stop raises :class:`Cancelled` (the same as a stop between steps). Without a stop check nothing changes: no
polling, and the hooks return at once.
"""

from __future__ import annotations

import contextlib
from typing import Any

from lcm_live.engine.hooks import Cancelled, raise_if_stopped, stop_check_active, stop_reason

POLL_MS = 20


def install_block_checks(unet: Any) -> int:
    """Forward pre-hooks that raise Cancelled on a stop, on each block of a diffusers UNet; how many."""
    blocks = [*getattr(unet, "down_blocks", []), *([unet.mid_block] if getattr(unet, "mid_block", None) else []),
              *getattr(unet, "up_blocks", [])]
    for block in blocks:
        block.register_forward_pre_hook(raise_if_stopped)
    return len(blocks)


def infer_interruptible(request: Any, feed: dict[str, Any], poll_ms: int = POLL_MS) -> None:
    """``request.infer(feed)`` for an OpenVINO infer request, stopped (Cancelled) when the stop check says so."""
    if not stop_check_active():
        request.infer(feed)
        return
    raise_if_stopped()
    request.start_async(feed)
    while not request.wait_for(poll_ms):
        reason = stop_reason()
        if reason:
            request.cancel()
            with contextlib.suppress(Exception):  # a cancelled request reports itself cancelled on wait
                request.wait()
            raise Cancelled(reason)
