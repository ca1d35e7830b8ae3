"""Stream batching: several requests (several studio sessions' frames) in ONE denoising loop.

On a GPU one UNet call on a batch of B latents costs far less than B calls of one, so the studio hands the engine
the waiting frames of several sessions at once (``Engine.generate_batch``). Requests can share a call when
everything the loop takes as one value for the whole batch is equal: the mode (engine/modes.py: init image,
control image, mask, number of regions), the size, the number of steps, the guidance scale (and so whether
classifier-free guidance runs), the img2img strength, the ControlNet's scale and the output type. What may differ
per request, and stays per request:

* the prompt, negative prompt, prompt blend and region prompts: each from the prompt-embedding cache, the cached
  tensors concatenated as the UNet's rows (engine/denoiser.py);
* the seed and seed blend: one ``torch.Generator`` per request (member i's noise from ``generator[i]``, as
  diffusers draws it), so each image equals the one its request gives alone with the same seed (up to float
  rounding in the batched kernels);
* the init image, control image, mask and region masks: one per request;
* the step callback: each member gets its own StepEvent with its own x0 slice (shape (1, C, h, w)); a member
  whose callback raises (Cancelled: superseded, disconnected, past its deadline) drops out of the batch while the
  others run on; the loop stops early only when every member has dropped out.

A request with ``num_images_per_prompt > 1`` is never batched with others (``batch_key`` gives None): it runs in a
call of its own, as ``Engine.generate`` would run it.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

from lcm_live.engine import modes
from lcm_live.engine.hooks import Cancelled, StepCallback, StepEvent
from lcm_live.engine.masks import PreparedMask
from lcm_live.engine.request import GenerationRequest, GenerationResult
from lcm_live.errors import UserError


def batch_key(request: GenerationRequest) -> Hashable | None:
    """What must be equal for two requests to share one call, from the request as given (before the engine
    resolves defaults); None when the request is never batched (``num_images_per_prompt > 1``). Read from the
    conditionings' registry (engine/modes.py).

    Equal keys always mean one call (the engine's own grouping, on the resolved values, is at least as wide:
    ``width=None`` and the native width end up in one call too). The studio groups its waiting jobs by it.
    """
    return modes.batch_key(request)


@dataclass
class Prepared:
    """A validated request with every value resolved by the engine (``Engine._prepare``)."""

    request: GenerationRequest
    guidance_scale: float
    do_cfg: bool
    width: int
    height: int
    seed: int
    negative: str | None  # the negative prompt actually used (None without CFG)
    init_image: Any = None  # the init image, RGB at width x height
    control_image: Any = None  # the control image, RGB at width x height
    mask: PreparedMask | None = None
    mask_box: tuple[int, int, int, int] | None = None  # the latent window the mask's redraw runs in (masks.py)
    region_weights: Any = None  # (1 + R, 1, h, w) float32, the base prompt first (engine/masks.py); None: no regions
    notes: list[str] = field(default_factory=list)  # what the engine changed and says (a mask fitted, ...)

    @property
    def img2img(self) -> bool:
        return self.request.image is not None

    @property
    def mode(self) -> str:
        return modes.mode_name(self.request)

    @property
    def key(self) -> Hashable | None:
        """The resolved batch key: requests with equal keys run as one call; None: a call of its own."""
        r = self.request
        if r.num_images_per_prompt != 1 or r.regions:  # region windows differ per request: a call of its own
            return None
        return (self.mode, self.width, self.height, r.num_inference_steps, self.guidance_scale, self.do_cfg,
                r.strength if self.img2img else None,
                modes.call_key(r), self.mask_box,
                r.output_type)


def group_indices(keys: Sequence[Hashable | None]) -> list[list[int]]:
    """Indices grouped by equal key, groups in order of their first member; a None key is a group of its own."""
    groups: dict[Any, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(("alone", i) if key is None else ("key", key), []).append(i)
    return list(groups.values())


class StepFanout:
    """One batched call's step hook, fanned out to its members' callbacks.

    Called with the whole batch's x0 after each step; member k gets ``latents[k:k+1]`` (``split=False``: the
    value as it is, for engines without tensors). A member whose callback raises is out: its exception is kept in
    ``stopped`` and its callback is not called again. When every member is out, :class:`Cancelled` stops the call.
    """

    def __init__(self, callbacks: Sequence[StepCallback | None], *, split: bool = True):
        self.callbacks = list(callbacks)
        self.split = split and len(self.callbacks) > 1
        self.stopped: dict[int, Exception] = {}

    def __call__(self, step: int, total: int, timestep: int, latents: Any) -> None:
        for k, callback in enumerate(self.callbacks):
            if k in self.stopped or callback is None:
                continue
            member = latents[k : k + 1] if self.split and latents is not None else latents
            try:
                callback(StepEvent(step=step, total=total, timestep=timestep, latents=member))
            except Exception as exc:  # Cancelled above all; anything else fails that member only
                self.stopped[k] = exc
        if len(self.stopped) == len(self.callbacks):
            raise Cancelled("every request of the batch was cancelled")


def failed_result(request: GenerationRequest, error: BaseException,
                  parameters: dict[str, Any] | None = None) -> GenerationResult:
    """A member that produced no image: ``error`` says why (UserError, Cancelled, or the engine's exception)."""
    if parameters is None:
        parameters = {"prompt": request.prompt, "seed": request.seed}
    return GenerationResult(images=[], parameters=parameters, timings={}, error=error)


def run_batch(engine: Any, requests: Sequence[GenerationRequest],
              callbacks: Sequence[StepCallback | None] | None = None) -> list[GenerationResult]:
    """``Engine.generate_batch``: one result per request, in order. Requests are grouped by their resolved key,
    each group runs as one call. Errors never escape: a request that fails validation, a member that is
    cancelled, or every member of a group whose call failed gets a result with ``error`` set and no images."""
    requests = list(requests)
    callbacks = list(callbacks) if callbacks is not None else [None] * len(requests)
    if len(callbacks) != len(requests):
        raise UserError(f"generate_batch: {len(callbacks)} callbacks for {len(requests)} requests; pass one per "
                        "request (None where a request wants none), or none at all", field="callbacks")
    results: list[GenerationResult | None] = [None] * len(requests)
    prepared: dict[int, Prepared] = {}
    for i, request in enumerate(requests):
        try:
            prepared[i] = engine._prepare(request)
        except UserError as exc:
            results[i] = failed_result(request, exc)
    order = list(prepared)
    for group in group_indices([prepared[i].key for i in order]):
        indices = [order[g] for g in group]
        _run_group(engine, [prepared[i] for i in indices], [callbacks[i] for i in indices], indices, results)
    return results  # type: ignore[return-value]  (every slot is filled above)


def _run_group(engine: Any, preps: list[Prepared], callbacks: list[StepCallback | None], indices: list[int],
               results: list[GenerationResult | None]) -> None:
    fanout = StepFanout(callbacks)
    try:
        images, warnings, timings = engine._call(preps, fanout)
    except Exception as exc:  # Cancelled when every member dropped out; else the call failed for all of them
        for k, (i, prep) in enumerate(zip(indices, preps, strict=True)):
            error = fanout.stopped.get(k, exc)
            results[i] = failed_result(prep.request, error, engine._parameters(prep, []))
        return
    per_member = len(preps) > 1
    for k, (i, prep) in enumerate(zip(indices, preps, strict=True)):
        parameters = engine._parameters(prep, warnings[k])
        if k in fanout.stopped:
            results[i] = failed_result(prep.request, fanout.stopped[k], parameters)
        else:
            mine = [images[k]] if per_member else list(images)
            results[i] = GenerationResult(images=mine, parameters=parameters, timings=dict(timings))


StepHook = Callable[[int, int, int, Any], None]  # (step, total, timestep, batch x0): what Engine._call takes
