"""FakeEngine: the engine's interface without a model, for studio tests, the page's tests and the soak bench.

The engine's contract, :class:`lcm_live.engine.protocol.EngineLike` (``info``, ``compiled``, ``lcm_img2img``,
``generate``, ``generate_batch``, ``decode_preview``, ``warmup``; tests/engine/test_protocol.py checks it), plus
``from_settings``, with a configurable latency per step, scripted or random failures (including
``torch.OutOfMemoryError``, constructible without CUDA) and a frame size. Frames are a flat colour that is a pure
function of (prompt, seed, width, height) — tests can tell frames apart — or seeded noise (incompressible, to
make big frames). With ``ip_adapter`` set (an IP-Adapter's name, as ``--ip-adapter``), a request's reference image
(``ip_adapter_image``) is checked as the engine checks it (the registry's own check: no IP-Adapter configured is the
engine's error), blended into the frame by ``ip_adapter_scale`` and recorded in ``reference_images``.

``generate_batch`` batches as the real engine does: requests grouped by the engine's ``batch_key``, one call per
group that sleeps once per step for the whole group (what one batched UNet call buys), draws one scripted outcome
for the whole group (a failed call fails all its members), and fans each step out through the engine's own
``StepFanout`` (per-member cancellation). ``batch_sizes`` records the size of every call, ``generate`` included.
"""

from __future__ import annotations

import hashlib
import json
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from lcm_live.engine import modes
from lcm_live.engine.batching import StepFanout, batch_key, failed_result, group_indices
from lcm_live.engine.hooks import Cancelled, StepCallback, StepEvent, stop_check, stop_reason
from lcm_live.engine.protocol import EngineInfo
from lcm_live.engine.request import GenerationRequest, GenerationResult
from lcm_live.errors import UserError

PROMPT_TOKEN_WINDOW = 77  # like CLIP: longer prompts get a warning (counted in words here)


@dataclass
class FakeEngineConfig:
    step_latency_s: float = 0.0  # time.sleep per denoising step (blocks the calling thread, like a real UNet)
    model: str = "fake"  # the model's source as the engine reports it (a path, for the public-name tests)
    load_latency_s: float = 0.0  # time.sleep in from_settings
    kind: str = "lcm"
    device: str = "cpu"
    dtype: str = "float32"
    notice: str | None = None
    native_size: int = 512  # the model's native width and height (the studio's default size follows it)
    controlnet: str | None = None  # a ControlNet's name: control mode, whose frames show the control image
    ip_adapter: str | None = None  # an IP-Adapter's name: generations may take an ip_adapter_image
    lcm_img2img: bool = False  # img2img as LCM's own (every step runs), as Engine.lcm_img2img reports it
    # Scripted outcome of successive generate() calls: "ok", "oom", "error", "user" (a UserError). Then all ok.
    failures: list[str] = field(default_factory=list)
    error_rate: float = 0.0  # random engine errors (soak)
    oom_rate: float = 0.0  # random OOMs (soak)
    spike_rate: float = 0.0  # random latency spikes: one step takes 10x
    warmup_failure: bool = False
    noise: bool = False  # incompressible frames
    fault_seed: int = 0
    record_calls: bool = True  # keep every request in ``calls`` (tests); off for soaks (canvases add up)

    @classmethod
    def from_json(cls, text: str) -> FakeEngineConfig:
        data = json.loads(text) if text.strip() else {}
        return cls(**data)


def make_oom_error(message: str = "fake CUDA out of memory") -> BaseException:
    """``torch.OutOfMemoryError`` (torch >= 2.5); builds without any GPU."""
    import torch

    return torch.OutOfMemoryError(message)


class FakeEngine:
    def __init__(self, config: FakeEngineConfig | None = None, **overrides: Any):
        cfg = config or FakeEngineConfig()
        for key, value in overrides.items():
            setattr(cfg, key, value)
        self.config = cfg
        self.calls: list[GenerationRequest] = []  # every generate() request, in order (not warmup)
        self.generate_count = 0  # engine calls (a batch is one)
        self.batch_sizes: list[int] = []  # requests per engine call, in order (not warmup)
        self.steps_run = 0  # denoising steps completed, over all calls
        self.previews_decoded = 0
        self.reference_images: list[tuple[Any, float]] = []  # (ip_adapter_image, ip_adapter_scale) per request
        self.warmups = 0
        self.warmup_max_batch_size: int | None = None
        self.warmup_size: tuple[int, int] | None = None
        self.stopped_mid_step = 0  # generations stopped inside a step by their should_stop check
        self.compiled = False  # EngineLike.compiled (tests set it, as a torch.compile'd UNet would)
        self._lock = threading.Lock()
        self._script = list(cfg.failures)
        self._rng = random.Random(cfg.fault_seed)
        if cfg.oom_rate or "oom" in cfg.failures:
            import torch  # noqa: F401  (as in a real server, torch is loaded before the first OOM is built)

    @classmethod
    def from_settings(cls, settings: Any = None, **kwargs: Any) -> FakeEngine:
        engine = cls(**kwargs)
        if engine.config.load_latency_s:
            time.sleep(engine.config.load_latency_s)
        return engine

    @property
    def info(self) -> EngineInfo:
        return EngineInfo(
            model=self.config.model, kind=self.config.kind, arch="sd15", device=self.config.device,
            dtype=self.config.dtype, native_width=self.config.native_size, native_height=self.config.native_size,
            default_guidance_scale=8.0 if self.config.kind == "lcm" else 1.0, decoder="fake",
            notice=self.config.notice, loras=[], controlnet=self.config.controlnet, ip_adapter=self.config.ip_adapter,
        )

    @property
    def lcm_img2img(self) -> bool:
        return self.config.lcm_img2img

    def _next_outcome(self) -> str:
        with self._lock:
            if self._script:
                return self._script.pop(0)
            roll = self._rng.random()
        if roll < self.config.oom_rate:
            return "oom"
        if roll < self.config.oom_rate + self.config.error_rate:
            return "error"
        return "ok"

    def generate(self, request: GenerationRequest, callback: StepCallback | None = None, *,
                 should_stop: Callable[[], str | None] | None = None) -> GenerationResult:
        def on_step(step: int, total: int, timestep: int, latents: Any) -> None:
            if callback is not None:
                callback(StepEvent(step=step, total=total, timestep=timestep, latents=latents))

        with stop_check(should_stop):  # read during each step's sleep, as the Engine reads it inside the UNet
            return self._call([request], on_step)[0]

    def generate_batch(self, requests: list[GenerationRequest],
                       callbacks: list[StepCallback | None] | None = None) -> list[GenerationResult]:
        """One result per request, errors in ``result.error`` (as ``Engine.generate_batch``)."""
        requests = list(requests)
        callbacks = list(callbacks) if callbacks is not None else [None] * len(requests)
        if len(callbacks) != len(requests):
            raise UserError(f"generate_batch: {len(callbacks)} callbacks for {len(requests)} requests",
                            field="callbacks")
        results: list[GenerationResult | None] = [None] * len(requests)
        for group in group_indices([batch_key(r) for r in requests]):
            fanout = StepFanout([callbacks[i] for i in group], split=False)
            try:
                outs = self._call([requests[i] for i in group], fanout)
            except Exception as exc:  # Cancelled (every member out) or the call's failure: all members get it
                for k, i in enumerate(group):
                    results[i] = failed_result(requests[i], fanout.stopped.get(k, exc))
                continue
            for k, i in enumerate(group):
                stopped = fanout.stopped.get(k)
                results[i] = outs[k] if stopped is None else failed_result(requests[i], stopped, outs[k].parameters)
        return results  # type: ignore[return-value]

    def _call(self, requests: list[GenerationRequest], on_step: Any) -> list[GenerationResult]:
        """One engine call for requests sharing a batch key: one outcome, one sleep per step for all of them."""
        t0 = time.perf_counter()
        self.generate_count += 1
        self.batch_sizes.append(len(requests))
        if self.config.record_calls:
            self.calls.extend(requests)
        outcome = self._next_outcome()
        if outcome == "oom":
            raise make_oom_error()
        if outcome == "error":
            raise RuntimeError("fake engine failure")
        if outcome == "user":
            raise UserError("fake engine refused the request", field="prompt")
        first = requests[0]
        if first.control_image is not None and not self.config.controlnet:
            raise UserError("control_image needs a ControlNet: start with --controlnet", field="control_image")
        for request in requests:  # the engine's own check: no IP-Adapter loaded, not an image, a scale out of range
            if request.ip_adapter_image is not None:
                modes.BY_NAME["ip_adapter_image"].check(request, modes.ModelCaps(ip_adapter=self.config.ip_adapter))
                if self.config.record_calls:
                    self.reference_images.append((request.ip_adapter_image, float(request.ip_adapter_scale)))
        steps = first.num_inference_steps
        if first.image is not None:
            steps = max(1, int(steps * first.strength))
        seeds = [r.seed if r.seed is not None else random.randrange(2**32) for r in requests]
        for step in range(1, steps + 1):
            latency = self.config.step_latency_s
            if self.config.spike_rate and self._rng.random() < self.config.spike_rate:
                latency *= 10
            if latency:
                self._step_sleep(latency)
            self.steps_run += 1
            on_step(step, steps, 999 - step * (1000 // (steps + 1)), step)
        return [self._result(r, seed, time.perf_counter() - t0) for r, seed in zip(requests, seeds, strict=True)]

    def _step_sleep(self, seconds: float) -> None:
        """A step's time, stopped (Cancelled) as soon as the generation's stop check says so."""
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            reason = stop_reason()
            if reason:
                self.stopped_mid_step += 1
                raise Cancelled(reason)
            time.sleep(min(left, 0.01))

    def _result(self, request: GenerationRequest, seed: int, elapsed: float) -> GenerationResult:
        width, height = request.width or 512, request.height or 512
        image = self._image(request.prompt, seed, width, height)
        if request.control_image is not None:  # the layout shows through, as a ControlNet's lines would
            control = request.control_image.convert("RGB").resize((width, height))
            image = Image.blend(image, control, 0.5 * min(1.0, request.controlnet_conditioning_scale))
        if request.ip_adapter_image is not None:  # the reference shows through, by its scale (0 to 2)
            reference = request.ip_adapter_image.convert("RGB").resize((width, height))
            image = Image.blend(image, reference, 0.25 * float(request.ip_adapter_scale))
        for region in request.regions:  # each region's own flat colour where its mask is white
            area = region.mask_image.convert("L").resize((width, height)).point(lambda v: 255 if v >= 128 else 0)
            image.paste(self._image(region.prompt, seed, width, height), (0, 0), area)
        if request.mask_image is not None and request.image is not None:
            # as the engine composites: outside the mask the init image's pixels exactly (no feather band here)
            mask = request.mask_image.convert("L").resize((width, height)).point(lambda v: 255 if v >= 128 else 0)
            image = Image.composite(image, request.image.convert("RGB").resize((width, height)), mask)
        warnings = []
        if len(request.prompt.split()) > PROMPT_TOKEN_WINDOW:
            warnings.append(f"the prompt is longer than {PROMPT_TOKEN_WINDOW} tokens: the rest was cut")
        parameters = {
            "prompt": request.prompt,
            "negative_prompt": request.negative_prompt,
            "num_inference_steps": request.num_inference_steps,
            "guidance_scale": request.guidance_scale if request.guidance_scale is not None else self.info.default_guidance_scale,
            "seed": seed,
            "width": width,
            "height": height,
            "model": self.config.model,
            "device": self.config.device,
            "dtype": self.config.dtype,
        }
        if request.image is not None:
            parameters["strength"] = request.strength
        if request.mask_image is not None:
            parameters.update(mode="inpaint", mask_feather=request.mask_feather)
        if request.regions:
            parameters["regions"] = [{"prompt": r.prompt} for r in request.regions]
        for name in ("prompt_blend", "seed_blend"):
            blend = getattr(request, name)
            if blend is not None:
                parameters[name] = dict(vars(blend))
        if request.control_image is not None:
            parameters.update(mode="control", controlnet=self.config.controlnet,
                              controlnet_conditioning_scale=request.controlnet_conditioning_scale)
        if request.ip_adapter_image is not None:
            parameters.update(ip_adapter=self.config.ip_adapter, ip_adapter_scale=float(request.ip_adapter_scale))
        if warnings:
            parameters["warnings"] = warnings
        return GenerationResult(images=[image], parameters=parameters, timings={"total": elapsed})

    def _image(self, prompt: str, seed: int, width: int, height: int) -> Image.Image:
        digest = hashlib.blake2b(f"{prompt}\0{seed}".encode(), digest_size=8).digest()
        if self.config.noise:
            rng = random.Random(digest)
            return Image.frombytes("RGB", (width, height), rng.randbytes(width * height * 3))
        return Image.new("RGB", (width, height), tuple(digest[:3]))

    def decode_preview(self, latents: Any, index: int = 0) -> Image.Image:
        self.previews_decoded += 1
        level = int(latents) * 30 % 256 if isinstance(latents, int) else 128
        return Image.new("RGB", (64, 64), (level, level, level))

    def warmup(self, width: int | None = None, height: int | None = None, num_inference_steps: int = 4,
               max_batch_size: int = 1) -> None:
        width, height = width or self.config.native_size, height or self.config.native_size
        self.warmups += 1
        self.warmup_size = (width, height)
        self.warmup_max_batch_size = max_batch_size
        if self.config.warmup_failure:
            raise RuntimeError("fake warmup failure")
        # Not recorded in ``calls`` and never consumes a scripted failure: tests count user generations only.
        for _ in range(num_inference_steps):
            if self.config.step_latency_s:
                time.sleep(self.config.step_latency_s)
        self._image("warmup", 0, width, height)
