"""One worker's loaded engines: the preset each job names, loaded on demand, the least recently used evicted.

The worker (studio/worker.py) asks :meth:`ModelSwitcher.select` for the engine of the jobs it is about to run (they
share a preset: the batch key includes it). A preset already loaded costs a dictionary lookup (and a re-fuse when
the jobs' style scales differ from those it runs). One that is not loads on the worker's loader thread
(studio/loader.py) while the worker goes on serving its other sessions:

1. on the worker thread, :meth:`ModelSwitcher.make_room` evicts the least recently used engines no waiting job
   names, so that the new one fits in ``max_loaded``;
2. the loader builds the engine with the factory and warms it up (progress in bytes read, then stages);
3. on the worker thread again, :meth:`ModelSwitcher.install` holds it and evicts down to ``max_loaded``.

A failed load drops what was built (nothing stays half-loaded) and marks the preset failed; its jobs fail with
``model_unavailable`` and their sessions keep their last good params. Other presets stay as they were.
"""

from __future__ import annotations

import gc
import logging
import sys
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lcm_live.config import ModelPreset
from lcm_live.errors import UserError
from lcm_live.studio.models import ModelRegistry

log = logging.getLogger("lcm_live.studio")

WARMING_PROGRESS = 0.9  # the weights are in; the warm-up generation runs


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
    """The engines one worker holds, by preset, least recently used first. Only the worker's own thread calls
    ``select``, ``install`` and ``make_room`` (so an engine is never evicted while a generation uses it); the
    loads themselves run on the worker's loader thread (studio/loader.py)."""

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
        # engine -> its style sliders, made while loading (prepare_sliders); weak, so that a load cancelled after
        # its warm-up leaves nothing of its engine here
        self.prepared: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()

    def build(self, name: str) -> Any:
        """The engine of preset ``name`` from the factory (no preset argument for the implicit one)."""
        return self.factory() if self.registry.implicit else self.factory(preset=self.registry.presets[name])

    def warm_preset(self, engine: Any, name: str) -> None:
        self.warm(engine, self.registry.presets[name])
        self.prepare_sliders(engine, name)

    def prepare_sliders(self, engine: Any, name: str) -> None:
        """On the OpenVINO UNet, the graph that moves a preset's style scales (engine/openvino_lora.py) converted
        and compiled now, with the load (on the loader thread, or at the worker's start), rather than on the
        worker thread at a session's first slider move: minutes for sd15 the first time, seconds from the disk
        cache, and every session on the worker would wait. Costs that load time and a second compiled UNet."""
        preset = self.registry.presets[name]
        pipe = getattr(engine, "pipe", None)
        if not preset.styles or type(getattr(pipe, "unet", None)).__name__ != "OpenVINOUNet":
            return
        try:
            styles = _style_scales(engine, preset)
        except UserError:  # compiled or feature reuse: refused at the first move, with the flag to leave off
            return
        defaults = {s.name: s.scale for s in preset.styles}
        styles.set({k: v + 0.5 for k, v in defaults.items()})  # any moved scale routes to the branch graph
        try:
            self.warm(engine, preset)  # its conversion and compile at the warm-up size
        finally:
            styles.set(defaults)
            engine.prompts.clear()  # embeddings made with the moved text-encoder adapters
        self.prepared[engine] = styles

    def adopt(self, name: str, engine: Any, family: str | None) -> None:
        """The engine the worker loaded at start (the default preset)."""
        self._hold(name, engine)
        self.registry.mark_loaded(name, self.worker, family)

    def has(self, name: str) -> bool:
        return name in self.engines

    def select(self, name: str, scales: dict[str, float]) -> Any:
        """The engine of the loaded preset ``name`` with these style scales. Raises UserError (the scales)."""
        t0 = time.perf_counter()
        loaded = self.engines[name]
        switched = next(reversed(self.engines)) != name
        self.engines.move_to_end(name)
        if loaded.scales != scales:
            self.restyler(loaded, self.registry.presets[name], scales)
        if switched:
            self.last_switch_s = time.perf_counter() - t0
        return loaded.engine

    def make_room(self, wanted: set[str], loading: int = 1) -> None:
        """Before a load: evict the least recently used engines no waiting job names until the engines and the
        ``loading`` ones fit in ``max_loaded``. Engines other sessions still use stay: the load then runs beside
        them, over the bound until it is installed (docs/protocol.md, "Models and styles")."""
        while len(self.engines) + loading > self.max_loaded:
            old = next((n for n in self.engines if n not in wanted), None)
            if old is None:
                return
            self._evict(old, "least recently used, not in use")

    def install(self, name: str, engine: Any) -> None:
        """A loaded, warm engine: held as the most recently used; then the least recently used others are evicted
        until ``max_loaded`` hold (one a waiting job names too: the bound is kept; that job's model loads again)."""
        self._hold(name, engine)
        self.registry.mark_loaded(name, self.worker, getattr(getattr(engine, "info", None), "family", None))
        while len(self.engines) > self.max_loaded:
            self._evict(next(iter(self.engines)), f"least recently used of {self.max_loaded} loaded")

    def _hold(self, name: str, engine: Any) -> None:
        """Hold ``engine`` as preset ``name``'s, most recently used, at the preset's default style scales."""
        preset = self.registry.presets[name]
        self.engines[name] = LoadedEngine(engine, styles=self.prepared.pop(engine, None),
                                          scales={s.name: s.scale for s in preset.styles})

    def _evict(self, name: str, why: str) -> None:
        del self.engines[name]
        self.registry.mark_evicted(name, self.worker)
        log.info("studio: %s: %s evicted (%s)", self.worker, name, why)
        free_memory()


def free_memory() -> None:
    """Collect what an evicted (or failed) engine held; on CUDA, hand its cached blocks back too."""
    gc.collect()
    torch = sys.modules.get("torch")  # never imported here just for this
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
