"""The model families lcm-live runs, declared once: each family's sampler, its defaults (steps, guidance, eta) and
what guidance means for it; how a model's family is told from its folder (UNet config, scheduler config) or a
preset (its name, its UNet's ``_name_or_path``, a distillation LoRA's name); and ``--scheduler`` to override.

Detection, in order (engine/loading.py calls :func:`detect_family` before any weight loads):

1. ``--scheduler lcm|tcd|euler-a|euler-trailing``: that sampler, with the detected family's defaults when it uses
   the same sampler, else the sampler's generic family;
2. a UNet with a w-embedding (``time_cond_proj_dim``): a full LCM;
3. a preset: the model's name, its UNet's ``_name_or_path`` or a ``--lora`` naming a known release (sd-turbo,
   sdxl-turbo, sdxs, SDXL-Lightning, Hyper-SD, TCD, SSD-1B, Segmind-Vega, BK-SDM);
4. the scheduler config the model ships: ``LCMScheduler`` -> LCM-LoRA; ``TCDScheduler`` -> TCD; trailing
   timestep spacing (how the distilled releases ship) -> Euler ancestral or Euler on trailing timesteps; a plain
   SD scheduler (PNDM, DDIM, Euler, DPM-Solver, ...) or none at all (single files, UNet-only folders) -> the model
   becomes an LCM through an LCM-LoRA, as before;
5. anything else (an unknown scheduler class, v-prediction): a UserError naming ``--scheduler``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lcm_live.engine.sources import looks_like_path
from lcm_live.errors import UserError

SCHEDULERS = ("lcm", "tcd", "euler-a", "euler-trailing")
# The diffusers class each sampler mirrors (engine/samplers.py runs its step on the engine's own loop).
SCHEDULER_CLASSES = {"lcm": "LCMScheduler", "tcd": "TCDScheduler", "euler-a": "EulerAncestralDiscreteScheduler",
                     "euler-trailing": "EulerDiscreteScheduler"}
# Schedulers of plain (undistilled) SD models: with their usual leading/linspace spacing they mark a model that an
# LCM-LoRA turns into an LCM.
PLAIN_SCHEDULERS = frozenset({
    "PNDMScheduler", "DDIMScheduler", "DDPMScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
    "LMSDiscreteScheduler", "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler", "DPMSolverSDEScheduler",
    "UniPCMultistepScheduler", "HeunDiscreteScheduler", "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler",
    "DEISMultistepScheduler"})
# Trailing-spaced DDIM/DDPM (Hyper-SD's N-step LoRAs, one-step releases): the same probability-flow ODE step as
# Euler on trailing timesteps (DDIM with eta 0 is Euler in sigma space), so they run as euler-trailing.
TRAILING_AS_EULER = frozenset({"DDIMScheduler", "DDPMScheduler", "EulerDiscreteScheduler"})


@dataclass(frozen=True)
class ModelFamily:
    """One family: its sampler, defaults and guidance semantics (the README's table is this registry)."""

    name: str
    scheduler: str  # one of SCHEDULERS
    num_inference_steps: int  # the default
    guidance_scale: float  # the default
    steps: tuple[int, int]  # the range it is distilled for (more or fewer run, with a warning)
    guidance: str  # "w-embedding": a UNet input, one pass, no negative prompt; "cfg": CFG only when > 1
    eta: float | None = None  # TCD's gamma (diffusers' ``eta``): 0 deterministic, 1 one-step-like re-noising
    lcm_lora: str | None = None  # "auto": the architecture's LCM-LoRA; a hub id: this family's own
    scheduler_config: dict[str, Any] = field(default_factory=dict)  # overrides for the scheduler's config
    native_size: int | None = None  # the side it was trained at, where the UNet config says otherwise
    label: str = ""  # what the README and messages call it

    @property
    def kind(self) -> str:
        """LoadedModel.kind: "lcm" (w-embedding guidance) or "lcm-lora" (CFG when guidance > 1), the guidance
        semantics every consumer (validation, the page's negative-prompt box) reads."""
        return "lcm" if self.guidance == "w-embedding" else "lcm-lora"


def _f(name: str, scheduler: str, steps: int, scale: float, span: tuple[int, int], label: str, **kw: Any):
    return ModelFamily(name, scheduler, steps, scale, span, kw.pop("guidance", "cfg"), label=label, **kw)


FAMILIES: dict[str, ModelFamily] = {f.name: f for f in (
    _f("lcm", "lcm", 4, 8.0, (1, 8), "full LCM (LCM_Dreamshaper_v7, lcm-sdxl)", guidance="w-embedding"),
    _f("lcm-lora", "lcm", 4, 1.0, (1, 8), "SD1.5 / SDXL + LCM-LoRA", lcm_lora="auto"),
    _f("bk-sdm", "lcm", 4, 1.0, (1, 8), "BK-SDM tiny / small + SD1.5's LCM-LoRA", lcm_lora="auto"),
    _f("ssd-1b", "lcm", 4, 1.0, (1, 8), "Segmind SSD-1B + its LCM-LoRA",
       lcm_lora="latent-consistency/lcm-lora-ssd-1b"),
    _f("segmind-vega", "lcm", 4, 1.0, (1, 8), "Segmind Vega + its LCM-LoRA (Segmind-VegaRT)",
       lcm_lora="segmind/Segmind-VegaRT"),
    _f("sd-turbo", "euler-trailing", 1, 0.0, (1, 4), "SD-Turbo"),
    _f("sdxl-turbo", "euler-a", 1, 0.0, (1, 4), "SDXL-Turbo", native_size=512),
    _f("sdxs", "euler-trailing", 1, 0.0, (1, 1), "SDXS-512"),
    _f("sdxl-lightning", "euler-trailing", 4, 0.0, (1, 8), "SDXL-Lightning (2/4/8-step UNet or LoRA)"),
    _f("hyper-sd", "tcd", 1, 0.0, (1, 8), "Hyper-SD (1-step unified LoRA)", eta=1.0),
    _f("tcd", "tcd", 4, 0.0, (1, 8), "TCD-LoRA (TCD-SD15, TCD-SDXL)", eta=0.3),
    # The generic families --scheduler picks when the model's own family samples otherwise.
    _f("euler-a", "euler-a", 4, 0.0, (1, 8), "any model, Euler ancestral on trailing timesteps"),
    _f("euler-trailing", "euler-trailing", 4, 0.0, (1, 8), "any model, Euler on trailing timesteps"),
)}
GENERIC = {"tcd": "tcd", "euler-a": "euler-a", "euler-trailing": "euler-trailing"}

# Presets: a known release's name (hub id, folder or file name, the UNet's _name_or_path, a --lora source),
# normalised to lower case with "_" as "-". First match wins.
PRESETS: tuple[tuple[str, str], ...] = (
    (r"sd-?xl-turbo", "sdxl-turbo"),
    (r"sd-turbo|sd2\.1-turbo", "sd-turbo"),
    (r"sdxs", "sdxs"),
    (r"lightning", "sdxl-lightning"),
    (r"hyper-sd", "hyper-sd"),
    (r"(^|[/-])tcd([/-]|$)", "tcd"),
    (r"ssd-1b", "ssd-1b"),
    (r"segmind-vega", "segmind-vega"),
    (r"bk-sdm", "bk-sdm"),
)
_STEPS_IN_NAME = re.compile(r"(\d+)-?steps?")


def family_named(name: str) -> ModelFamily:
    if name not in FAMILIES:
        raise ValueError(f"family {name!r}: expected one of {', '.join(FAMILIES)}")
    return FAMILIES[name]


def default_family(kind: str) -> ModelFamily:
    """The family of a LoadedModel made without one (tests, tools): its kind's LCM family."""
    return FAMILIES["lcm" if kind == "lcm" else "lcm-lora"]


def check_scheduler(value: str) -> str:
    if value != "auto" and value not in SCHEDULERS:
        raise UserError(f"--scheduler {value!r}: use auto (detect from the model) or one of {', '.join(SCHEDULERS)}",
                        field="scheduler")
    return value


def preset(names: list[str], arch: str) -> ModelFamily | None:
    """The family a known release's name says (see PRESETS), with steps read from names like ``..._4step...``
    (SDXL-Lightning, Hyper-SD); None when no name matches."""
    for text in names:
        if looks_like_path(text):  # a folder or file: its own name, not the folders above it
            text = Path(text).name
        norm = text.lower().replace("_", "-")
        for pattern, name in PRESETS:
            if re.search(pattern, norm):
                return _with_steps(FAMILIES[name], norm, arch)
    return None


def _with_steps(fam: ModelFamily, norm: str, arch: str) -> ModelFamily:
    from dataclasses import replace

    if fam.name == "sd-turbo" and arch == "sdxl":
        fam = FAMILIES["sdxl-turbo"]
    match = _STEPS_IN_NAME.search(norm)
    if fam.name not in ("sdxl-lightning", "hyper-sd") or match is None:
        return fam
    steps = int(match.group(1))
    if fam.name == "hyper-sd" and steps > 1:  # the N-step LoRAs: DDIM trailing in their docs (= Euler trailing)
        return replace(fam, scheduler="euler-trailing", num_inference_steps=steps, eta=None,
                       label=f"Hyper-SD ({steps}-step LoRA)")
    config = {"prediction_type": "sample"} if fam.name == "sdxl-lightning" and steps == 1 else {}
    return replace(fam, num_inference_steps=steps, scheduler_config=config)  # Lightning's 1-step UNet predicts x0


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def detect_family(name: str, *, arch: str, full_lcm: bool, scheduler_config: dict[str, Any] | None,
                  unet_config: dict[str, Any] | None = None, loras: tuple[str, ...] = (),
                  scheduler: str = "auto") -> ModelFamily:
    """The family of the model ``name`` (see the module doc for the order). ``scheduler_config``: the folder's
    ``scheduler/scheduler_config.json`` (None where there is none); ``loras``: the ``--lora`` sources."""
    check_scheduler(scheduler)
    found = _detect(name, arch=arch, full_lcm=full_lcm, scheduler_config=scheduler_config, unet_config=unet_config,
                    loras=loras, forced=scheduler != "auto")
    if scheduler == "auto":
        if found is None:
            config = scheduler_config or {}
            what = f"its scheduler is {config.get('_class_name')}"
            if config.get("prediction_type", "epsilon") != "epsilon":
                what += f" with prediction_type {config['prediction_type']}"
            raise UserError(
                f"--model {name}: cannot tell how to sample this model ({what}, and its name matches no known "
                f"release); pass --scheduler {'|'.join(SCHEDULERS)} (lcm for LCMs and LCM-LoRA models, tcd for TCD "
                "and Hyper-SD LoRAs, euler-a for SDXL-Turbo, euler-trailing for SD-Turbo, SDXS and SDXL-Lightning)",
                field="scheduler")
        return found
    if found is not None and found.scheduler == scheduler:
        return found
    if scheduler == "lcm":
        return FAMILIES["lcm" if full_lcm else "lcm-lora"]
    if full_lcm:
        raise UserError(f"--scheduler {scheduler}: {name} is a full LCM (its UNet takes guidance as a w-embedding, "
                        "time_cond_proj_dim), which only the LCM sampler feeds; use --scheduler lcm or auto",
                        field="scheduler")
    return FAMILIES[GENERIC[scheduler]]


def _detect(name: str, *, arch: str, full_lcm: bool, scheduler_config: dict[str, Any] | None,
            unet_config: dict[str, Any] | None, loras: tuple[str, ...], forced: bool) -> ModelFamily | None:
    if full_lcm:
        return FAMILIES["lcm"]
    names = [name, str((unet_config or {}).get("_name_or_path") or ""), *loras]
    found = preset([n for n in names if n], arch)
    if found is not None:
        return found
    if scheduler_config is None:  # a single file or a UNet-only folder: a plain model, as before
        return FAMILIES["lcm-lora"]
    cls = scheduler_config.get("_class_name")
    trailing = scheduler_config.get("timestep_spacing") == "trailing"
    if cls == "LCMScheduler":
        return FAMILIES["lcm-lora"]
    if cls == "TCDScheduler":
        return FAMILIES["tcd"]
    if scheduler_config.get("prediction_type", "epsilon") != "epsilon" and not forced:
        return None  # v-prediction: no LCM-LoRA fits, and the distilled families here predict epsilon
    if trailing and cls == "EulerAncestralDiscreteScheduler":
        return FAMILIES["sdxl-turbo" if arch == "sdxl" else "euler-a"]
    if trailing and cls in TRAILING_AS_EULER:
        context = (unet_config or {}).get("cross_attention_dim")
        if cls == "EulerDiscreteScheduler" and arch == "sdxl":
            return FAMILIES["sdxl-lightning"]
        if cls == "EulerDiscreteScheduler" and context == 1024:  # SD 2.1's text encoder: SD-Turbo
            return FAMILIES["sd-turbo"]
        return FAMILIES["euler-trailing"]
    if cls in PLAIN_SCHEDULERS and not trailing:
        return FAMILIES["lcm-lora"]
    return None


def read_family(name: str, folder: Path | None, *, arch: str, full_lcm: bool, loras: tuple[str, ...] = (),
                scheduler: str = "auto", unet_dir: Path | None = None) -> ModelFamily:
    """:func:`detect_family` on a diffusers folder (``folder``: model_index.json, scheduler/, unet/), a UNet-only
    folder (``unet_dir``) or neither (a single file)."""
    scheduler_config = unet_config = None
    if folder is not None:
        scheduler_config = read_json(folder / "scheduler" / "scheduler_config.json")
        unet_config = read_json(folder / "unet" / "config.json")
    if unet_dir is not None:
        unet_config = read_json(unet_dir / "config.json")
    return detect_family(name, arch=arch, full_lcm=full_lcm, scheduler_config=scheduler_config,
                         unet_config=unet_config, loras=loras, scheduler=scheduler)


def make_scheduler(fam: ModelFamily, current: Any) -> Any:
    """The diffusers scheduler ``fam`` samples with, made from ``current``'s config (the model's own training
    betas and offsets), as diffusers' docs swap them: ``TCDScheduler.from_config(pipe.scheduler.config)``,
    ``EulerDiscreteScheduler.from_config(..., timestep_spacing="trailing")``. An LCM keeps an LCMScheduler it has."""
    import diffusers

    cls = getattr(diffusers, SCHEDULER_CLASSES[fam.scheduler])
    extra = dict(fam.scheduler_config)
    if fam.scheduler in ("euler-a", "euler-trailing"):
        extra["timestep_spacing"] = "trailing"
    if isinstance(current, cls) and all(current.config.get(k) == v for k, v in extra.items()):
        return current
    return cls.from_config(current.config, **extra)


def step_note(fam: ModelFamily, steps: int) -> str | None:
    """A warning when ``steps`` is outside the range the family is distilled for (it still runs)."""
    lo, hi = fam.steps
    if lo <= steps <= hi:
        return None
    span = f"{lo}" if lo == hi else f"{lo} to {hi}"
    return (f"num_inference_steps={steps}: {fam.label} is distilled for {span} step{'s' if hi > 1 else ''} "
            f"(default {fam.num_inference_steps}); other counts run but give worse images")
