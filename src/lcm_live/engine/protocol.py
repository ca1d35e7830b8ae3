"""The engine's contract: what the studio, the bench and a remote worker may call (:class:`EngineLike`), apart from
the machinery behind it. ``Engine`` (engine/pipeline.py) and the studio's ``FakeEngine`` both satisfy it, checked
by tests/engine/test_protocol.py; callers depend on this Protocol, never on ``hasattr`` probing.

What a generation may take is in engine/modes.py (``param_schema()``, ``mode_name()``, ``batch_key()``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, runtime_checkable

from lcm_live import __version__
from lcm_live.engine.hooks import StepCallback
from lcm_live.engine.request import GenerationRequest, GenerationResult


@dataclass
class EngineInfo:
    model: str
    kind: str  # "lcm" (full LCM, w-embedding) or "lcm-lora"
    arch: str  # "sd15" or "sdxl"
    device: str
    dtype: str
    native_width: int
    native_height: int
    default_guidance_scale: float
    decoder: str  # "vae" or "taesd"
    notice: str | None = None
    loras: list[dict[str, Any]] = field(default_factory=list)  # [{"source": ..., "scale": ...}]
    speedups: list[str] = field(default_factory=list)  # what engine/speedups.py applied (channels_last, ...)
    scheduler: str = "LCMScheduler"
    controlnet: str | None = None  # --controlnet, as given (several joined by " + "): generations may take a control_image
    controlnets: list[str] = field(default_factory=list)  # one per ControlNet, in load order (per-net params' order)
    ip_adapter: str | None = None  # --ip-adapter, as given: generations may take an ip_adapter_image
    # The model family (engine/families.py: sd-turbo, sdxl-turbo, sdxs, tcd, ...) and its default step count.
    family: str = "lcm"
    default_num_inference_steps: int = 4
    version: str = __version__

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@runtime_checkable
class EngineLike(Protocol):
    """A loaded model that generates. Bad requests raise ``UserError`` (with ``field``); a step callback that
    raises ``Cancelled`` stops its generation."""

    @property
    def info(self) -> EngineInfo:
        """What is loaded: model, kind, architecture, device, dtype, native size, decoder, ControlNet, ..."""
        ...

    @property
    def compiled(self) -> bool:
        """Whether the UNet is torch.compile'd (its first call at each shape takes minutes)."""
        ...

    @property
    def lcm_img2img(self) -> bool:
        """Whether image-to-image runs every step whatever the strength (LCM's own), else ``steps * strength``."""
        ...

    def generate(self, request: GenerationRequest, callback: StepCallback | None = None, *,
                 should_stop: Callable[[], str | None] | None = None) -> GenerationResult:
        """One request; ``callback`` gets a StepEvent per step, ``should_stop()`` is read inside each step."""
        ...

    def generate_batch(self, requests: list[GenerationRequest],
                       callbacks: list[StepCallback | None] | None = None) -> list[GenerationResult]:
        """Several requests, those with equal batch keys in one call; errors per member in ``result.error``."""
        ...

    def decode_preview(self, latents: Any, index: int = 0) -> Any:
        """A cheap PIL preview of a StepEvent's latents (safe to call from inside a step callback)."""
        ...

    def warmup(self, width: int | None = None, height: int | None = None, num_inference_steps: int = 4,
               max_batch_size: int = 1) -> Any:
        """Throw-away generations at this size, so the first real frame does not pay for first-call costs."""
        ...
