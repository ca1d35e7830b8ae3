"""The generation parameters the studio accepts, over the WebSocket and REST alike.

One pydantic model, built from the settings' bounds (so the schema the page reads and the checks the server runs
can never disagree): strict types, unknown fields forbidden, every bound a real ``ge``/``le``/``multiple_of``.
Nothing is clamped: a value out of bounds is an error that names the field and the allowed range.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, ClassVar, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from lcm_live.config import StudioSettings
from lcm_live.engine.modes import ModelCaps, param_schema
from lcm_live.engine.request import GenerationRequest, PromptBlend, Region, SeedBlend
from lcm_live.engine.validation import MAX_SEED
from lcm_live.errors import UserError
from lcm_live.studio.conditioning_params import check_steps, conditioning_fields, request_kwargs
from lcm_live.studio.images import CONTROL_PREPROCESS
from lcm_live.studio.models import ModelRegistry

ECHO_CHARS = 60  # error messages quote at most this much of a client's value or field name
MODES = ("txt2img", "img2img")
CONTROL_MODE = "control"  # with a ControlNet loaded: the canvas guides a text-to-image run
CANVAS_MODES = ("img2img", CONTROL_MODE)  # the modes that use the canvas
MAX_STYLES = 16  # lora_scales entries a request may carry


class GenerationParams(BaseModel):
    """Base class; the real fields come from :func:`build_params_model` (bounds from settings)."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)
    lcm_img2img: ClassVar[bool] = False  # set by build_params_model
    registry: ClassVar[ModelRegistry | None] = None  # the presets ``model`` names (set by build_params_model)
    controlnets: ClassVar[int] = 0  # the engine's ControlNets (set by build_params_model)

    def to_request(self, image: Any = None, *, mask: Any = None, init_image: Any = None,
                   region_masks: list[Any] | None = None, reference: Any = None,
                   control_images: list[Any] | None = None) -> GenerationRequest:
        """The engine request (diffusers' names); ``image`` is the decoded canvas: the init image in img2img, the
        control image in control mode (as the worker prepared it: fitted, then made into lines as
        ``control_preprocess`` says). ``mask``: the mask layer (inpainting: over the canvas in img2img, over
        ``init_image``, the session's last frame, in control mode); ``region_masks``: one per ``regions`` item;
        ``reference``, ``control_images``: the IP-Adapter's and nets 1.. 's layers (studio/conditioning_params.py)."""
        data = self.model_dump()
        img2img = data["mode"] == "img2img"
        control = data["mode"] == CONTROL_MODE
        init = image if img2img else init_image if control else None
        regions = data.get("regions") or []
        masks = list(region_masks or [])
        if len(masks) != len(regions):
            raise UserError(f"regions: {len(regions)} prompts but {len(masks)} masks: send one mask per region",
                            field="regions")
        blend, seeds = data.get("prompt_blend"), data.get("seed_blend")
        return GenerationRequest(
            prompt=data["prompt"],
            negative_prompt=data["negative_prompt"] or None,
            num_inference_steps=data["num_inference_steps"],
            guidance_scale=data["guidance_scale"],
            seed=data["seed"],
            width=data["width"],
            height=data["height"],
            image=init,
            strength=data["strength"],
            **request_kwargs(data, image if control else None, controlnets=self.controlnets, reference=reference,
                             control_images=control_images),
            mask_image=mask if init is not None else None,
            mask_feather=data.get("mask_feather", 8),
            regions=[Region(r["prompt"], m) for r, m in zip(regions, masks, strict=True)],
            prompt_blend=PromptBlend(blend["prompt"], blend["weight"]) if blend else None,
            seed_blend=SeedBlend(seeds["seed"], seeds["weight"]) if seeds else None,
        )


def build_params_model(settings: StudioSettings, default_guidance_scale: float = 8.0, *,
                       lcm_img2img: bool = False, native_size: tuple[int, int] = (512, 512),
                       device: str = "cpu", controlnet: bool | int = False, ip_adapter: bool = False,
                       models: ModelRegistry | None = None) -> type[GenerationParams]:
    """A GenerationParams subclass with the bounds and defaults of ``settings``.

    ``default_guidance_scale`` is the model's (full LCM 8.0, LCM-LoRA 1.0) unless the settings fix one.
    ``lcm_img2img``: the engine's img2img is LCM's own pipeline, which runs every step whatever the strength
    (``Engine.lcm_img2img``); otherwise img2img runs ``steps * strength`` steps, which must be at least one.
    ``native_size``, ``device``: the model's (width, height) and the engine's device type, for the sizes the
    settings leave to the model (``StudioSettings.for_model``). ``controlnet``: the engine has a ControlNet, so
    "control" mode and its two fields are offered. ``models``: the presets a request may name in ``model`` (the
    first is the default; None: ``model`` is free text for tests, None meaning the server's one model).
    """
    settings = settings.for_model(*native_size, device=device)
    # The conditionings' params come from the engine's registry (engine/modes.py): their descriptions, defaults and
    # bounds; the studio narrows a few to its settings (strength, the ControlNet's scale). Images are binary layers.
    reg = {p["name"]: p for p in param_schema(ModelCaps(controlnet="studio" if controlnet else None,
                                                         ip_adapter="studio" if ip_adapter else None,
                                                         lcm_img2img=lcm_img2img))}
    guidance = settings.default_guidance_scale if settings.default_guidance_scale is not None else default_guidance_scale
    size = dict(ge=settings.min_size, le=settings.max_size, multiple_of=settings.size_multiple)
    fields: dict[str, Any] = {
        "mode": (Literal[(*MODES, CONTROL_MODE)] if controlnet else Literal[MODES],  # type: ignore[valid-type]
                 Field("txt2img", description="img2img: the canvas is the init image" + (
                     "; control: the canvas guides the layout (ControlNet)" if controlnet else ""))),
        "prompt": (str, Field("", max_length=settings.max_prompt_chars)),
        "negative_prompt": (str, Field("", max_length=settings.max_prompt_chars)),
        "num_inference_steps": (int, Field(settings.default_steps, ge=settings.min_steps, le=settings.max_steps)),
        "guidance_scale": (float, Field(guidance, ge=0.0, le=settings.max_guidance_scale)),
        "seed": (int, Field(0, ge=0, le=MAX_SEED)),
        "width": (int, Field(settings.default_width, **size)),
        "height": (int, Field(settings.default_height, **size)),
        "strength": (float, Field(settings.default_strength, ge=settings.min_strength, le=reg["strength"]["maximum"],
                                  description=reg["strength"]["description"])),
        "previews": (bool, Field(settings.default_previews, description="send each step's preview before the final "
                                 "frame (default on for a CPU, where a frame takes seconds)")),
        "mask_feather": (int, Field(reg["mask_feather"]["default"], ge=reg["mask_feather"]["minimum"],
                                    le=reg["mask_feather"]["maximum"], description=reg["mask_feather"]["description"])),
        "regions": (list[_region_model(settings.max_prompt_chars)], Field(  # type: ignore[misc]
            default_factory=list, max_length=reg["regions"]["maximum"],
            description=reg["regions"]["description"] + " (the masks: binary layers r0..r7)")),
        "prompt_blend": (_prompt_blend_model(settings.max_prompt_chars) | None, Field(  # type: ignore[operator]
            reg["prompt_blend"]["default"], description=reg["prompt_blend"]["description"])),
        "seed_blend": (SeedBlendParams | None, Field(reg["seed_blend"]["default"],
                                                     description=reg["seed_blend"]["description"])),
    }
    nets = int(controlnet)  # True: one; a count with several (their per-net fields: studio/conditioning_params.py)
    fields.update(conditioning_fields(reg, settings, controlnets=nets, ip_adapter=ip_adapter))
    if controlnet:
        fields["control_preprocess"] = (Literal[CONTROL_PREPROCESS], Field(  # type: ignore[valid-type]
            "invert", description="control only: the canvas as the white lines on black that line ControlNets take: "
            "invert (a drawing), edges (a photo, the camera), none (as it is)"))
    names = models.names if models is not None else None
    fields["model"] = ((Literal[names], Field(names[0], description="the model preset (GET /api/models)"))  # type: ignore[valid-type]
                       if names else (str | None, Field(None, description="the model preset (GET /api/models)")))
    fields["lora_scales"] = (dict[str, float], Field(
        default_factory=dict, max_length=MAX_STYLES, description="{style: scale} for the model preset's style "
        "LoRAs, each within its bounds (GET /api/models); unnamed styles keep the preset's scale"))
    model = create_model("GenerationParams", __base__=GenerationParams, **fields)
    model.lcm_img2img = lcm_img2img
    model.registry = models
    model.controlnets = nets
    return model


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


class SeedBlendParams(_Strict):
    seed: int = Field(ge=0, le=MAX_SEED)
    weight: float = Field(0.5, ge=0.0, le=1.0)


@functools.cache
def _region_model(max_chars: int) -> type[BaseModel]:
    return create_model("RegionParams", __base__=_Strict, prompt=(str, Field(min_length=1, max_length=max_chars)))


@functools.cache
def _prompt_blend_model(max_chars: int) -> type[BaseModel]:
    return create_model("PromptBlendParams", __base__=_Strict, prompt=(str, Field(max_length=max_chars)),
                        weight=(float, Field(0.5, ge=0.0, le=1.0)))


def modes_of(model: type[GenerationParams]) -> tuple[str, ...]:
    """The modes a params model accepts ("control" only with a ControlNet)."""
    return get_args(model.model_fields["mode"].annotation)


def engine_info(engine: Any) -> dict[str, Any]:
    """``engine.info`` (a dataclass, a dict or a plain object: the Engine's or a stand-in's) as a dict."""
    raw = engine.info
    if dataclasses.is_dataclass(raw):
        return dataclasses.asdict(raw)
    return dict(raw) if isinstance(raw, dict) else dict(vars(raw))


def native_size(info: dict[str, Any]) -> tuple[int, int]:
    """The model's native (width, height) from the engine's info; SD1.5's 512 where it does not say."""
    return int(info.get("native_width") or 512), int(info.get("native_height") or 512)


def device_type(info: dict[str, Any]) -> str:
    """"cpu", "cuda" or "mps" from the engine's info ("cuda:0" -> "cuda")."""
    return str(info.get("device") or "cpu").split(":", 1)[0]


@functools.cache
def default_params_model() -> type[GenerationParams]:
    """The model with the default settings' bounds (for tests and docs)."""
    return build_params_model(StudioSettings())


def validation_error_to_user_error(exc: ValidationError) -> UserError:
    """The first problem as one line naming the field, the value and what is allowed."""
    err = exc.errors(include_url=False)[0]
    field = ".".join(str(x) for x in err.get("loc", ())) or None
    # What the client sent is quoted, never in full: a 2 MB field name must not come back twice (or at all).
    field = echo(field) if field is not None else None
    shown = echo(repr(err.get("input")))
    if err.get("type") == "extra_forbidden":
        return UserError(f"unknown field {field!r}: remove it (see /api/schema for the fields)", field=field)
    return UserError(f"{field}={shown}: {echo(str(err.get('msg', 'invalid')), 200)}", field=field)


def echo(text: str, limit: int = ECHO_CHARS) -> str:
    """``text`` as an error message may quote it: at most ``limit`` characters."""
    return text if len(text) <= limit else text[:limit - 3] + "..."


def parse_params(model: type[GenerationParams], data: Any) -> GenerationParams:
    """Validate a decoded JSON object; raises UserError (with ``field``) on the first problem."""
    if not isinstance(data, dict):
        raise UserError("params must be a JSON object", field=None)
    registry = model.registry
    if registry is not None and "model" in data and data["model"] not in registry.names:
        raise UserError(f"model={echo(repr(data['model']))}: not a model of this server; name one of "
                        f"{', '.join(registry.names)} (GET /api/models)", field="model")
    try:
        params = model.model_validate(data)
    except ValidationError as exc:
        raise validation_error_to_user_error(exc) from None
    if registry is not None and params.lora_scales:
        for style, scale in params.lora_scales.items():
            if not math.isfinite(scale):
                raise UserError(f"lora_scales.{echo(style)}={scale}: give a finite number", field="lora_scales")
        registry.resolve_scales(registry.name_of(params.model), dict(params.lora_scales))
    if registry is not None and not registry.implicit:  # the preset's size and steps where the request gives none
        preset = registry.presets[registry.name_of(params.model)]
        update = {k: v for k, v in (("width", preset.width), ("height", preset.height),
                                    ("num_inference_steps", preset.num_inference_steps))
                  if v is not None and k not in params.model_fields_set}
        if update:
            params = model.model_validate({**params.model_dump(exclude_unset=True), **update})
    bad_steps = check_steps(params.model_dump(include={"control_guidance_start", "control_guidance_end"}))
    if bad_steps is not None:
        raise UserError(bad_steps[1], field=bad_steps[0])
    for k, region in enumerate(params.regions):
        if not region.prompt.strip():
            raise UserError(f"regions[{k}].prompt is blank: give each region the prompt to draw there, or remove it",
                            field=f"regions.{k}.prompt")
    # SD's img2img runs about steps * strength denoising steps: fewer than one would run nothing.
    if (params.mode == "img2img" and not model.lcm_img2img
            and params.num_inference_steps * params.strength < 1):
        raise UserError(
            f"strength={params.strength} with num_inference_steps={params.num_inference_steps} runs no step in "
            f"img2img: raise strength to at least {1 / params.num_inference_steps:.2f} or add steps",
            field="strength",
        )
    return params
