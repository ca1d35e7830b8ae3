"""Model presets: the allowlist of models a client may pick by name, and what the server knows of each.

``serve --model A --model B`` makes one preset per id, named by the id (a path by its last part:
studio/public.py); ``serve --models models.toml`` reads named presets::

    [models.dreamshaper]                  # the first preset is the default
    model = "SimianLuo/LCM_Dreamshaper_v7"
    width = 512                           # the page's default size and steps for it (optional)
    num_inference_steps = 4

    [models.sd15-styles]
    model = "/srv/models/sd15"
    lcm_lora = "latent-consistency/lcm-lora-sdv1-5"
    [[models.sd15-styles.styles]]
    name = "papercut"
    lora = "/srv/loras/papercut.safetensors"
    scale = 0.8                           # the default; requests move it within min..max
    min = 0.0
    max = 1.5

Requests name a preset in ``model`` and never a path: the server loads only what its operator listed. A request's
``lora_scales`` ({style: scale}) is checked against its preset's styles here (:meth:`ModelRegistry.resolve_scales`).
The registry also keeps each preset's readiness, which the workers report (GET /api/models).
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from lcm_live.config import EngineSettings, LoraSpec, ModelPreset, Settings
from lcm_live.errors import UserError
from lcm_live.studio.public import public_model_name


def presets_from_ids(ids: list[str]) -> list[ModelPreset]:
    """``--model A --model B``: one preset per id, named by the id (a path by its last part)."""
    presets = []
    for source in ids:
        name = public_model_name(source)
        if name in (p.name for p in presets):
            raise UserError(f"--model {source}: a second model named {name!r}; list each model once (two folders "
                            "of the same name need a models.toml that names them)", field="models")
        try:
            presets.append(ModelPreset(name=name, model=source))
        except ValidationError:
            raise UserError(f"--model {source}: {name!r} cannot name a preset (letters, digits, . _ - : + / only); "
                            "name it in a models.toml", field="models") from None
    return presets


def load_presets_file(path: str | Path) -> list[ModelPreset]:
    """The presets of a models.toml, in file order; one UserError naming the preset and the key otherwise."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: the same parser as the tomli package
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ModuleNotFoundError:
            raise UserError("--models: reading TOML needs Python 3.11+ or `pip install tomli`",
                            field="models") from None
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise UserError(f"--models {path}: cannot read it ({exc.strerror or exc})", field="models") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"--models {path}: not valid TOML ({exc})", field="models") from None
    unknown = sorted(set(data) - {"models"})
    if unknown:
        raise UserError(f"--models {path}: unknown top-level key {unknown[0]!r}: presets go in [models.NAME] tables",
                        field="models")
    tables = data.get("models")
    if not isinstance(tables, dict) or not tables:
        raise UserError(f"--models {path}: no presets; add a [models.NAME] table with model = \"...\"",
                        field="models")
    presets = []
    for name, table in tables.items():
        if not isinstance(table, dict):
            raise UserError(f"--models {path}: models.{name} must be a table ([models.{name}])", field="models")
        try:
            presets.append(ModelPreset(name=name, **{k: v for k, v in table.items() if k != "name"}))
        except ValidationError as exc:
            err = exc.errors(include_url=False)[0]
            key = ".".join(str(x) for x in err.get("loc", ()))
            if key == "name":
                raise UserError(f"--models {path}: preset name {name!r}: use letters, digits and . _ - : + / "
                                "(100 characters at most)", field="models") from None
            msg = err.get("msg", "invalid").removeprefix("Value error, ")
            where = f"preset {name!r}, key {key!r}" if key else f"preset {name!r}"
            raise UserError(f"--models {path}: {where}: {msg}", field="models") from None
    return presets


def engine_settings_for(preset: ModelPreset, base: EngineSettings) -> EngineSettings:
    """The server's engine settings with what ``preset`` changes: its model, LCM-LoRA, ControlNet and sampler,
    and its styles stacked after the server's ``--lora``s at their default scales (fused at load)."""
    update: dict[str, Any] = {"model": preset.model,
                              "loras": [*base.loras, *(LoraSpec(source=s.lora, scale=s.scale) for s in preset.styles)]}
    for key in ("lcm_lora", "controlnet", "scheduler"):
        if getattr(preset, key) is not None:
            update[key] = getattr(preset, key)
    return base.model_copy(update=update)


@dataclass
class _Readiness:
    loaded_on: set[str] = field(default_factory=set)  # the workers holding it now
    loading_on: set[str] = field(default_factory=set)
    ready: bool = False  # loaded and warmed up once without error (and not failed since)
    error: str | None = None  # the last load's error
    family: str | None = None  # from the engine, once loaded


class ModelRegistry:
    """The presets of one server, in order (the first is the default), and their readiness across workers.

    ``implicit``: made from ``settings.engine`` alone (a single ``--model``): the server behaves as it always did,
    its one engine built by the factory without a preset."""

    def __init__(self, presets: list[ModelPreset], *, implicit: bool = False):
        if not presets:
            raise ValueError("a model registry needs at least one preset")
        self.presets = {p.name: p for p in presets}
        self.default = presets[0].name
        self.implicit = implicit
        self._lock = threading.Lock()
        self._state = {p.name: _Readiness() for p in presets}

    @classmethod
    def from_settings(cls, settings: Settings) -> ModelRegistry:
        if settings.models:
            return cls(list(settings.models))
        return cls([ModelPreset(name=_implicit_name(settings.engine.model), model=settings.engine.model)],
                   implicit=True)

    @classmethod
    def implicit_default(cls) -> ModelRegistry:
        """One implicit preset for a worker made without a registry (tests, tools): whatever the factory loads."""
        return cls([ModelPreset(name="model", model="model")], implicit=True)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.presets)

    def name_of(self, requested: str | None) -> str:
        """A params' ``model`` (None: the default) as a preset name; the implicit preset's whatever it says (a
        Ray replica's params name the ingress's model)."""
        return self.default if self.implicit or not requested else requested

    # ---- requests -----------------------------------------------------------------------------------------
    def resolve_scales(self, name: str, scales: dict[str, float]) -> dict[str, float]:
        """Every style of ``name`` with its scale: the request's where given (within the style's bounds), else
        the preset's default. Raises UserError (field ``lora_scales.STYLE``) for a style the preset lacks or a
        scale out of bounds: nothing is clamped."""
        styles = {s.name: s for s in self.presets[name].styles}
        for style, scale in scales.items():
            if style not in styles:
                have = ", ".join(styles) or "none"
                raise UserError(f"lora_scales: {style[:60]!r} is not a style of the model {name!r} (its styles: "
                                f"{have}; GET /api/models lists them)", field="lora_scales")
            s = styles[style]
            if not s.min <= scale <= s.max:
                raise UserError(f"lora_scales.{style}={scale}: use {s.min:g}..{s.max:g} (the preset's bounds)",
                                field=f"lora_scales.{style}")
        return {s.name: float(scales.get(s.name, s.scale)) for s in styles.values()}

    def check_defaults(self, settings: Any) -> None:
        """Each preset's page defaults within the server's bounds (``settings``: the StudioSettings resolved for
        the loaded model): a default the params would refuse is a start-up error naming the preset and the fix."""
        for name, preset in self.presets.items():
            for key in ("width", "height"):
                value = getattr(preset, key)
                if value is not None and not (settings.min_size <= value <= settings.max_size
                                              and value % settings.size_multiple == 0):
                    raise UserError(f"preset {name!r}: {key} = {value} is not a size this server accepts (multiples "
                                    f"of {settings.size_multiple} in {settings.min_size}..{settings.max_size}); "
                                    "change it, or widen LCM_LIVE_STUDIO__MIN_SIZE / __MAX_SIZE", field="models")
            steps = preset.num_inference_steps
            if steps is not None and not settings.min_steps <= steps <= settings.max_steps:
                raise UserError(f"preset {name!r}: num_inference_steps = {steps}: use {settings.min_steps}.."
                                f"{settings.max_steps}", field="models")

    # ---- readiness (workers, any thread) ------------------------------------------------------------------
    def mark_loading(self, name: str, worker: str) -> None:
        with self._lock:
            self._state[name].loading_on.add(worker)

    def mark_loaded(self, name: str, worker: str, family: str | None) -> None:
        with self._lock:
            state = self._state[name]
            state.loading_on.discard(worker)
            state.loaded_on.add(worker)
            state.ready, state.error, state.family = True, None, family or state.family

    def mark_failed(self, name: str, worker: str, message: str) -> str:
        """Returns the message as clients may read it: the preset's sources by their public names."""
        preset = self.presets[name]
        for source in (preset.model, preset.lcm_lora, preset.controlnet, *(s.lora for s in preset.styles)):
            if source and public_model_name(source) != source:
                message = message.replace(source, public_model_name(source))
        with self._lock:
            state = self._state[name]
            state.loading_on.discard(worker)
            state.loaded_on.discard(worker)
            state.ready, state.error = False, message
        return message

    def mark_cancelled(self, name: str, worker: str) -> None:
        """A load nobody waited for any more was stopped: the preset is as it was before it."""
        with self._lock:
            self._state[name].loading_on.discard(worker)

    def mark_evicted(self, name: str, worker: str) -> None:
        with self._lock:
            self._state[name].loaded_on.discard(worker)

    def loaded_on(self, name: str) -> set[str]:
        with self._lock:
            return set(self._state[name].loaded_on)

    def public(self) -> list[dict[str, Any]]:
        """GET /api/models: each preset by name, never a path (studio/public.py)."""
        out = []
        with self._lock:
            for name, preset in self.presets.items():
                state = self._state[name]
                status = ("loaded" if state.loaded_on else "loading" if state.loading_on
                          else "error" if state.error else "unloaded")
                out.append({
                    "name": name, "family": state.family, "ready": state.ready, "loaded": bool(state.loaded_on),
                    "default": name == self.default, "state": status, "error": state.error,
                    "width": preset.width, "height": preset.height,
                    "num_inference_steps": preset.num_inference_steps,
                    "styles": [{"name": s.name, "scale": s.scale, "min": s.min, "max": s.max}
                               for s in preset.styles],
                })
        return out


def _implicit_name(source: str) -> str:
    """A preset name for the one ``--model``: its public name, with characters a name may not hold as "-"."""
    name = re.sub(r"[^\w.:+/-]", "-", str(public_model_name(source) or ""))[:100].lstrip("-_.:+/")
    return name or "model"
