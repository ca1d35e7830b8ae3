"""The studio on Ray Serve: an ingress deployment (the studio's FastAPI app) and a generator deployment whose
replicas each hold one engine.

    lcm-live serve --ray --replicas 2                       # a local Ray cluster, started and stopped with it
    lcm-live serve --ray --ray-address auto --autoscale 1:4 --gpus-per-replica 1
    serve run lcm_live.studio.ray_app:app replicas=2        # Ray's own tools; docs/serve-config.yaml for deploy

- ``Studio`` (ingress): :func:`~lcm_live.studio.app.create_app` with a :class:`~lcm_live.studio.ray_worker.RayWorker`
  in place of the local worker: the same page, protocol, token, Origin and Host checks, limits and metrics.
- ``Generator``: a studio :class:`~lcm_live.studio.worker.Worker` (its engines, its own thread, its timeouts and
  error codes) in each replica; with model presets (``--model A --model B``, ``--models FILE``) each replica's
  worker switches between them as a local one does (studio/switching.py: loads on its loader thread, an LRU of
  ``--max-loaded-models``), and its ``model`` messages and what it holds travel back to the ingress; ``generate`` streams one job's events. Serve's request cancellation arrives as
  ``CancelledError`` in ``generate``, which sets the job's stop flag: the engine's step hook stops at its next step.
  ``check_health`` fails a replica whose worker thread died or failed too often: Serve replaces it.

Everything Ray is imported here and in ray_worker.py only: ``lcm-live`` without the ``ray`` extra never imports it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from ray import serve

from lcm_live.config import Settings
from lcm_live.engine.hooks import StepEvent
from lcm_live.errors import UserError
from lcm_live.studio.metrics import StudioMetrics
from lcm_live.studio.models import ModelRegistry
from lcm_live.studio.params import build_params_model, engine_info, parse_params
from lcm_live.studio.ray_sink import BatchSizes, StreamSink
from lcm_live.studio.ray_wire import check_images, frame_event, held_presets, replica_counts, replica_name
from lcm_live.studio.ray_worker import RayWorker
from lcm_live.studio.worker import Job, Worker

log = logging.getLogger("lcm_live.studio")

APP_NAME = "lcm-live"
GENERATOR = "Generator"
INGRESS = "Studio"
HTTP_HEADROOM = 32  # ingress requests beyond the sessions: /healthz, /readyz, /metrics, the page, REST
# Serve's router (in the ingress, which calls the generator) retries a request that finds every replica busy after
# 0.025, 0.05, 0.1 ... s, up to 0.5 s apart by default: a replica could sit idle up to half a second after its frame
# while requests waited (8 sessions on 1 replica made 1.2 frames/s of 0.5 s each; docs/benchmarks.md). At most
# 0.05 s apart, the wait stays a tenth of a frame at a few small probes a second per waiting request.
ROUTER_MAX_BACKOFF_S = 0.05


@dataclass
class RayOptions:
    """How the generator deployment scales (``serve --ray`` flags, or ``serve run`` / config ``args``)."""

    replicas: int = 1
    autoscale: tuple[int, int] | None = None  # (min, max) replicas: Serve's autoscaling on ongoing requests
    gpus_per_replica: float = 0.0
    cpus_per_replica: float = 1.0  # Ray's logical CPUs per replica (what it schedules by, not a thread limit)
    fake_engine: str | None = None  # tests and benchmarks: a FakeEngineConfig as JSON instead of a model
    # Tests: the engine factory itself (pickled to the replicas; ``factory(device=None, *, preset=None)``)
    engine_factory: Any = None

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise UserError(f"--replicas {self.replicas}: give at least 1")
        if self.gpus_per_replica < 0 or self.cpus_per_replica < 0:
            raise UserError("--gpus-per-replica / cpus_per_replica: give 0 or more")
        if self.autoscale is not None:
            low, high = self.autoscale
            # MIN >= 1: the studio admits a session only while a replica is ready, so it could not scale up from 0
            if not 1 <= low <= high:
                raise UserError(f"--autoscale {low}:{high}: give MIN:MAX with 1 <= MIN <= MAX, e.g. 1:4 (the studio "
                                "admits sessions only while a replica is ready: it cannot scale up from 0)")

    @property
    def max_replicas(self) -> int:
        return self.autoscale[1] if self.autoscale else self.replicas

    @property
    def requests_per_replica(self) -> int:
        """One request at a time on a CPU (one frame uses every core); a GPU replica batches a few sessions."""
        return 4 if self.gpus_per_replica > 0 else 1


def parse_autoscale(text: str) -> tuple[int, int]:
    try:
        low, high = (int(x) for x in text.split(":"))
    except ValueError:
        raise UserError(f"--autoscale {text!r}: give MIN:MAX replicas, e.g. 1:4") from None
    return low, high


def make_engine_factory(settings: Settings, fake_engine: str | None):
    """The engine a replica loads: the model of ``settings`` or of a preset (on the GPU Ray gave it), or a
    FakeEngine (a preset's: its ``model`` is the preset's)."""
    if fake_engine is None:
        from lcm_live.studio.app import default_engine_factory

        return default_engine_factory(settings)
    from lcm_live.studio.fake_engine import FakeEngine, FakeEngineConfig

    config = FakeEngineConfig.from_json(fake_engine)

    def factory(device: str | None = None, *, preset: Any = None) -> Any:
        model = {"model": preset.model} if preset is not None else {}
        return FakeEngine.from_settings(settings.engine, config=dataclasses.replace(config, **model))

    return factory


@serve.deployment(name=GENERATOR, max_ongoing_requests=1, health_check_period_s=2, health_check_timeout_s=30,
                  graceful_shutdown_timeout_s=5)
class Generator:
    """One engine per replica, loaded and warmed before Serve sends it anything."""

    def __init__(self, settings: Settings, fake_engine: str | None = None, engine_factory: Any = None):
        self.metrics = StudioMetrics()  # the replica's own; the ingress counts what clients see
        self.batch_sizes = self.metrics.batch_size = BatchSizes(self.metrics.batch_size)  # but batches, here
        self.models = ModelRegistry.from_settings(settings)  # the same presets as the ingress's
        self.replica = replica_name()
        self.worker = Worker(engine_factory or make_engine_factory(settings, fake_engine), settings.studio,
                             self.metrics, name="lcm-live-replica", models=self.models)
        self.worker.step_observer = _forward_step
        self.worker.start()
        while self.worker.state == "loading":  # Serve marks the replica ready when __init__ returns
            time.sleep(0.05)
        if self.worker.state != "ready":
            raise RuntimeError(f"the generator replica could not start: {self.worker.detail}")
        engine = self.worker.engine
        info = engine_info(engine)
        # As StudioState._ready: the ingress builds the same params model from what describe() returns.
        guidance = info.get("default_guidance_scale")
        guidance = guidance if guidance is not None else 8.0 if info.get("kind") == "lcm" else 1.0
        lcm_img2img = bool(engine.lcm_img2img)
        self.controlnets = len(info.get("controlnets") or []) or int(bool(info.get("controlnet")))
        self.params_model = build_params_model(self.worker.settings, float(guidance), lcm_img2img=lcm_img2img,
                                               controlnet=self.controlnets, ip_adapter=bool(info.get("ip_adapter")),
                                               models=self.models)
        self.description = {"info": json.loads(json.dumps(info, default=str)), "lcm_img2img": lcm_img2img,
                            "settings": self.worker.settings.model_dump(mode="json"),
                            "max_batch_size": self.worker.max_batch_size}
        self._hold = preset_tracker(self.worker.switcher.max_loaded)

    def describe(self) -> dict[str, Any]:
        """What the ingress builds its schema from, and (under "held") the presets this replica holds now."""
        return {**self.description, "held": held_presets(self.worker, self.replica)}

    def stats(self) -> dict[str, Any]:
        """Tests and operators: this replica's process, and how many generations stopped mid-step."""
        engine = self.worker.engine
        return {"pid": os.getpid(), "cancelled": self.metrics.cancelled._value.get(),
                "stopped_mid_step": getattr(engine, "stopped_mid_step", None)}

    def check_health(self) -> None:
        if not self.worker.alive or not self.worker.healthy:
            raise RuntimeError(f"generator worker: {self.worker.detail}, {self.worker.consecutive_failures} "
                               "consecutive failures")

    async def generate(self, payload: dict[str, Any]) -> AsyncIterator[tuple]:
        """One job's events, streamed; stopped at the engine's next step when Serve cancels the request."""
        loop = asyncio.get_running_loop()
        # Bounded by construction: at most one unsent preview (wants_preview), then a frame, an error and "done";
        # with steps asked for, one event per step (at most max_steps).
        events: asyncio.Queue = asyncio.Queue(maxsize=16 + self.worker.settings.max_steps)
        sink = StreamSink(loop, events, steps=bool(payload.get("steps")))
        preset = serve.get_multiplexed_model_id()  # the ingress tags each request with its preset (presets only)
        if preset and not self.models.implicit and preset in self.models.presets:
            await self._hold(preset)  # tells Serve's router that this replica holds it now
        try:
            params = parse_params(self.params_model, json.loads(payload["params"]))
            s = self.worker.settings
            images = check_images(payload.get("images"), controlnets=self.controlnets,
                                  max_pixels=s.max_image_pixels, max_side=s.max_image_side)
        except UserError as exc:
            yield ("error", "invalid_params", exc.message, exc.field)
            yield ("done", "error")
            return
        job = Job(params=params, sink=sink, canvas=payload.get("canvas"), mask=payload.get("mask"),
                  init_image=payload.get("init_image"), region_masks=list(payload.get("region_masks") or []),
                  images=images, input=int(payload.get("input", 0)),
                  scope=str(payload["scope"]) if payload.get("scope") is not None else None)
        slot = f"request-{job.id}"
        self.worker.submit(slot, job)
        yield ("started",)
        done = False
        try:
            while not done:
                event = await events.get()
                if event[0] == "image":  # PNG-encoded here, on a thread: the engine's thread goes on meanwhile
                    _, image, frame = event
                    event = await asyncio.to_thread(partial(frame_event, image, **frame))
                    if not frame["final"]:
                        sink.preview_sent()
                done = event[0] == "done"
                if done:  # the replica's batch sizes observed since the last "done" (the ingress's metrics), and
                    event = (*event, self.batch_sizes.take(), held_presets(self.worker, self.replica))  # what it holds now
                elif event[0] == "model":  # which replica: the ingress keeps each preset's readiness per replica
                    event = (*event, self.replica)
                yield event
        finally:
            if not done:  # CancelledError (Serve's cancellation) or the caller gone: stop at the next step
                self.worker.cancel(slot, "superseded")
                # The replica stays busy (max_ongoing_requests) until its engine has really stopped.
                await _drain_until_done(events, self.worker.settings.generation_timeout_s)

    def __del__(self) -> None:
        worker = getattr(self, "worker", None)
        if worker is not None:
            worker.stop(1.0)


def preset_tracker(max_loaded: int) -> Callable[[str], Awaitable[str]]:
    """Serve's model multiplexing on the replica's side: an LRU of preset names as long as the worker's switcher's
    (``max_loaded``), touched by each request in the order the switcher sees them, so the two agree on what this
    replica holds. Serve reports these names to every router, which then sends a request tagged with a preset
    (``multiplexed_model_id``) to a replica that holds it, when one can take it within
    ``RAY_SERVE_MULTIPLEXED_MODEL_ID_MATCHING_TIMEOUT_S`` (1 s); else by load, as before. The engines themselves
    stay the switcher's: what this LRU evicts is a name."""

    async def hold(preset: str) -> str:
        return preset

    return serve.multiplexed(max_num_models_per_replica=max_loaded)(hold)


def _forward_step(job: Job, event: StepEvent) -> None:
    """The replica worker's step observer: a step goes to the ingress when its step_observer asked for them."""
    if job.sink.steps:
        job.sink.on_step(event)


async def _drain_until_done(events: asyncio.Queue, timeout: float) -> None:
    async def drain() -> None:
        while (await events.get())[0] != "done":
            pass

    try:
        await asyncio.wait_for(drain(), timeout)
    except (asyncio.TimeoutError, asyncio.CancelledError):
        pass


@serve.deployment(name=INGRESS, ray_actor_options={"num_cpus": 0})
@serve.ingress()
class Studio:
    """The studio's FastAPI app, its jobs sent to the generator deployment."""

    def __init__(self, generator: Any, settings: Settings):
        self._generator = generator
        self._settings = settings
        self._app_name = serve.get_replica_context().app_name

    def __serve_build_asgi_app__(self) -> Any:
        from lcm_live.studio.app import create_app
        from lcm_live.studio.redact import RedactCredentials

        def no_local_engine(device: str | None = None) -> Any:
            raise RuntimeError("the Ray studio's engines live in the generator replicas")

        app = create_app(self._settings, no_local_engine)
        studio = app.state.studio
        # The app's own worker was built but never started: the Ray worker takes its place before the lifespan.
        studio.worker = RayWorker(self._generator, studio.settings.studio, studio.metrics, on_ready=studio._ready,
                                  count_replicas=partial(replica_counts, self._app_name, GENERATOR),
                                  models=studio.models)
        # Serve's access log and ours: no credentials (the token, the broadcast key in its URLs' path)
        flt = RedactCredentials(self._settings.studio.token, (studio.broadcast.key,))
        for name in ("ray.serve", "lcm_live", ""):
            for handler in logging.getLogger(name).handlers:
                handler.addFilter(flt)
        return app


def resolved_settings(settings: Settings, options: RayOptions) -> Settings:
    """The settings the deployments get: sessions sized for the replicas (the app's own default is per device)."""
    s = settings.studio
    if s.devices:
        raise UserError("--devices runs local workers; with --ray use --replicas N (and --gpus-per-replica G)")
    sessions = s.max_sessions or options.max_replicas * options.requests_per_replica
    return settings.model_copy(update={"studio": s.model_copy(update={"max_sessions": sessions})})


def build_application(settings: Settings, options: RayOptions) -> Any:
    """The Serve application: the generator deployment (scaled by ``options``) bound into the ingress."""
    settings = resolved_settings(settings, options)
    per_replica = options.requests_per_replica
    generator_options: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": options.cpus_per_replica, "num_gpus": options.gpus_per_replica},
        "max_ongoing_requests": per_replica,
        "request_router_config": {"max_backoff_s": ROUTER_MAX_BACKOFF_S},
    }
    if options.autoscale is not None:
        low, high = options.autoscale
        generator_options["autoscaling_config"] = {
            "min_replicas": low, "max_replicas": high, "initial_replicas": low,
            "target_ongoing_requests": per_replica, "upscale_delay_s": 3, "downscale_delay_s": 60}
    else:
        generator_options["num_replicas"] = options.replicas
    generator = Generator.options(**generator_options).bind(settings, options.fake_engine, options.engine_factory)
    sessions = settings.studio.max_sessions or 1
    return Studio.options(max_ongoing_requests=sessions + HTTP_HEADROOM).bind(generator, settings)


def app(args: dict[str, Any]) -> Any:
    """``serve run lcm_live.studio.ray_app:app replicas=2`` and ``serve deploy docs/serve-config.yaml``.

    ``args`` (strings on the command line): ``replicas``, ``autoscale`` (MIN:MAX), ``gpus_per_replica``,
    ``cpus_per_replica``, ``model`` or ``models`` (a models.toml of presets, read here), ``max_sessions``, ``fake_engine`` (JSON), and ``host``: the address Serve's
    proxy binds (its ``http_options.host``): anything but loopback needs ``LCM_LIVE_TOKEN``. The rest of the
    settings come from the environment (``LCM_LIVE_*``) of the process that builds the application."""
    from lcm_live.cli.serve import check_exposure
    from lcm_live.config import StudioSettings
    from lcm_live.studio.models import load_presets_file

    known = {"replicas", "autoscale", "gpus_per_replica", "cpus_per_replica", "model", "models", "max_sessions",
             "fake_engine", "host"}
    unknown = set(args) - known
    if unknown:
        raise UserError(f"unknown argument(s) {sorted(unknown)}: use {sorted(known)}")
    settings = Settings()
    token = os.environ.get("LCM_LIVE_TOKEN") or settings.studio.token
    host = str(args.get("host", "127.0.0.1"))
    check_exposure(host, token)
    studio = settings.studio.model_dump() | {"token": token, "host": host}
    if "max_sessions" in args:
        studio["max_sessions"] = int(args["max_sessions"])
    engine = settings.engine.model_copy(update={"model": str(args["model"])}) if "model" in args else settings.engine
    if "model" in args and "models" in args:
        raise UserError("model and models go apart: list every model in the models file, or give model only")
    presets = load_presets_file(str(args["models"])) if "models" in args else settings.models
    settings = Settings(engine=engine, studio=StudioSettings(**studio), models=presets)
    autoscale = args.get("autoscale")
    options = RayOptions(replicas=int(args.get("replicas", 1)),
                         autoscale=parse_autoscale(str(autoscale)) if autoscale else None,
                         gpus_per_replica=float(args.get("gpus_per_replica", 0)),
                         cpus_per_replica=float(args.get("cpus_per_replica", 1)),
                         fake_engine=str(args["fake_engine"]) if "fake_engine" in args else None)
    return build_application(settings, options)
