"""One worker's loaded engines: the preset each job names, loaded on demand, the least recently used evicted.

The worker (studio/worker.py) asks :meth:`ModelSwitcher.select` for the engine of the jobs it is about to run (they
share a preset: the batch key includes it). A preset already loaded costs a dictionary lookup (and a re-fuse when
the jobs' style scales differ from those it runs); one that is not is loaded here, on the worker thread:

1. evict the least recently used engines until there is room (``max_loaded``), and free them;
2. tell the jobs' sinks ``loading`` (progress 0), build the engine with the factory, say ``loading`` (0.9, warming
   up), warm it up at the preset's size, say ``ready`` (1.0);
3. on any failure: drop what was built (nothing stays half-loaded), mark the preset failed and raise
   :class:`ModelLoadFailed`; the jobs fail with ``model_unavailable`` and their sessions keep their last good
   params. Other presets stay as they were.

Loading blocks this worker's other jobs meanwhile (with ``--devices`` the other workers go on serving); the time a
job waits through a load does not count towards its queue-wait limit (``loading_s``: the worker subtracts it).
"""

from __future__ import annotations

import gc
import logging
import sys
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lcm_live.config import ModelPreset
from lcm_live.errors import UserError
from lcm_live.studio.models import ModelRegistry

log = logging.getLogger("lcm_live.studio")

WARMING_PROGRESS = 0.9  # the weights are in; the warm-up generation runs


class ModelLoadFailed(Exception):
    def __init__(self, name: str, message: str):
        super().__init__(message)
        self.name, self.message = name, message


@dataclass
class LoadedEngine:
    engine: Any
    styles: Any = None  # loras.StyleScales or openvino_lora.OpenVINOStyles, made on the first scale change
    scales: dict[str, float] = field(default_factory=dict)  # the style scales in the weights now


def restyle(loaded: LoadedEngine, preset: ModelPreset, wanted: dict[str, float]) -> None:
    """Put ``wanted`` style scales into the engine's weights: re-fused on diffusers' own UNet (engine/loras.py
    ``StyleScales``), a runtime input on the OpenVINO UNet (engine/openvino_lora.py ``OpenVINOStyles``)."""
    engine = loaded.engine
    pipe = getattr(engine, "pipe", None)
    if pipe is None:  # a stand-in engine (FakeEngine): no weights; frames carry the scales in their params
        loaded.scales = dict(wanted)
        return
    if loaded.styles is None:
        loaded.styles = _style_scales(engine, preset)
    if loaded.styles.set(wanted):
        engine.prompts.clear()  # a style may change the text encoder: cached prompt embeddings are stale
        for entry, style in zip(engine.info.loras[-len(preset.styles):], preset.styles, strict=True):
            entry["scale"] = wanted[style.name]  # images' parameters say the scales they were made with
    loaded.scales = dict(wanted)


def _style_scales(engine: Any, preset: ModelPreset) -> Any:
    """What moves this engine's style scales; a UserError naming the flag to leave off where nothing can."""
    from diffusers import ModelMixin

    pipe = engine.pipe
    styles = [(s.name, s.lora, s.scale) for s in preset.styles]
    speedups = ", ".join(engine.info.speedups) or "none"
    if engine.compiled or getattr(pipe.unet, "feature_reuse", None) is not None or (
            not isinstance(pipe.unet, ModelMixin) and type(pipe.unet).__name__ != "OpenVINOUNet"):
        raise UserError("lora_scales: a style's scale moves in diffusers' own UNet or the OpenVINO one, and this "
                        f"server's UNet is compiled or wrapped with the default scales in it (speed-ups: {speedups});"
                        " serve without --compile and --feature-reuse to move style scales", field="lora_scales")
    if type(pipe.unet).__name__ == "OpenVINOUNet":
        from lcm_live.engine.openvino_lora import OpenVINOStyles

        return OpenVINOStyles(pipe, styles, cache_dir=engine.settings.cache_dir, model_name=preset.name)
    from lcm_live.engine.loras import StyleScales

    return StyleScales(pipe, styles, cache_dir=engine.settings.cache_dir, model_name=preset.name)


class ModelSwitcher:
    def __init__(self, registry: ModelRegistry, factory: Callable[..., Any], worker: str,
                 restyler: Callable[[LoadedEngine, ModelPreset, dict[str, float]], None] = restyle):
        self.registry = registry
        self.factory = factory
        self.worker = worker
        self.restyler = restyler
        self.max_loaded = 1  # resolved by the worker once it knows the device
        self.engines: OrderedDict[str, LoadedEngine] = OrderedDict()  # least recently used first
        self.warm: Callable[[Any, ModelPreset], None] = lambda engine, preset: None  # the worker's warm-up
        self.last_switch_s: float | None = None  # the last select() that changed the engine (bench)
        self.loading_s = 0.0  # seconds spent loading presets so far: jobs waiting meanwhile are not timed out for it

    def build(self, name: str) -> Any:
        """The engine of preset ``name`` from the factory (no preset argument for the implicit one)."""
        return self.factory() if self.registry.implicit else self.factory(preset=self.registry.presets[name])

    def adopt(self, name: str, engine: Any, family: str | None) -> None:
        """The engine the worker loaded at start (the default preset)."""
        preset = self.registry.presets[name]
        self.engines[name] = LoadedEngine(engine, scales={s.name: s.scale for s in preset.styles})
        self.registry.mark_loaded(name, self.worker, family)

    def has(self, name: str) -> bool:
        return name in self.engines

    def select(self, name: str, scales: dict[str, float], sinks: list[tuple[Any, Any]]) -> Any:
        """The engine for preset ``name`` with these style scales (loaded if need be); ``sinks``: (job, sink) pairs
        told the load's progress. Raises ModelLoadFailed (the load) or UserError (the scales)."""
        t0 = time.perf_counter()
        loaded = self.engines.get(name)
        switched = loaded is None or next(reversed(self.engines)) != name
        if loaded is None:
            loaded = self._load(name, sinks)
        self.engines.move_to_end(name)
        if loaded.scales != scales:
            self.restyler(loaded, self.registry.presets[name], scales)
        if switched:
            self.last_switch_s = time.perf_counter() - t0
        return loaded.engine

    def _load(self, name: str, sinks: list[tuple[Any, Any]]) -> LoadedEngine:
        preset = self.registry.presets[name]
        while len(self.engines) >= self.max_loaded:  # 1. room first: memory stays bounded while it loads
            old, _ = self.engines.popitem(last=False)
            self.registry.mark_evicted(old, self.worker)
            log.info("studio: %s: %s evicted (least recently used of %d loaded)", self.worker, old, self.max_loaded)
            free_memory()
        self.registry.mark_loading(name, self.worker)
        _tell(sinks, name, "loading", 0.0, f"loading {name}")
        t0 = time.perf_counter()
        engine = None
        try:  # 2.
            engine = self.build(name)
            _tell(sinks, name, "loading", WARMING_PROGRESS, f"warming up {name}")
            self.warm(engine, preset)
        except Exception as exc:  # 3.
            self.loading_s += time.perf_counter() - t0
            message = exc.message if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"
            log.error("studio: %s: loading %s failed: %s", self.worker, name, message,
                      exc_info=not isinstance(exc, UserError))
            engine = None
            free_memory()
            public = self.registry.mark_failed(name, self.worker, message)
            _tell(sinks, name, "error", None, public)
            raise ModelLoadFailed(name, public) from None
        self.loading_s += time.perf_counter() - t0
        family = getattr(engine.info, "family", None)
        self.registry.mark_loaded(name, self.worker, family)
        log.info("studio: %s: %s loaded and warm in %.1f s", self.worker, name, time.perf_counter() - t0)
        _tell(sinks, name, "ready", 1.0, f"{name} is ready")
        loaded = LoadedEngine(engine, scales={s.name: s.scale for s in preset.styles})
        self.engines[name] = loaded
        return loaded


def _tell(sinks: list[tuple[Any, Any]], name: str, state: str, progress: float | None, message: str) -> None:
    for job, sink in sinks:
        on_model = getattr(sink, "on_model", None)  # optional in the JobSink protocol (REST and Ray sinks lack it)
        if on_model is not None:
            on_model(job, name, state, progress, message)


def free_memory() -> None:
    """Collect what an evicted (or failed) engine held; on CUDA, hand its cached blocks back too."""
    gc.collect()
    torch = sys.modules.get("torch")  # never imported here just for this
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
