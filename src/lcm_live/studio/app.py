"""The studio app factory: routes, auth, the WebSocket endpoint and the lifespan that owns the worker.

``create_app(settings, engine_factory)`` builds a FastAPI app with its own metrics registry, worker thread, decode
threads and session table (two apps in one process share nothing). The model is loaded and warmed on the worker
thread, started by the lifespan; ``/readyz`` answers 503 until that is done. The routes come in groups, one
function each: the page, health and metrics, the JSON API, REST generation (rest.py) and the WebSocket.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request, WebSocket, WebSocketException
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles

from lcm_live.config import Settings
from lcm_live.studio.broadcast import Broadcast, add_broadcast_routes
from lcm_live.studio.http_errors import ApiError, error_response, internal_error_response
from lcm_live.studio.images import decode_canvas
from lcm_live.studio.metrics import StudioMetrics
from lcm_live.studio.models import ModelRegistry, engine_settings_for
from lcm_live.studio.params import GenerationParams, build_params_model, engine_info
from lcm_live.studio.pool import WorkerPool
from lcm_live.studio.public import public_info
from lcm_live.studio.security import (
    COOKIE_NAME,
    GuardMiddleware,
    is_authorized,
    origin_allowed,
    token_matches,
)
from lcm_live.studio.session import Session
from lcm_live.studio.worker import Worker

log = logging.getLogger("lcm_live.studio")

WEB_DIR = Path(__file__).resolve().parent.parent / "web"
# Routes anyone may call; everything else depends on require_auth / require_ws_auth (tests check this).
PUBLIC_PATHS = {"/", "/healthz", "/static"}


class StudioState:
    """Everything one app owns. Mutated on the event loop, except what the worker sets when the model is ready."""

    def __init__(self, settings: Settings, engine_factory: Callable[..., Any],
                 on_ready: Callable[[Any], None] | None, on_fatal: Callable[[str], None] | None,
                 upscaler: Any = None):
        self.settings = settings
        # The operator's ESRGAN model (serve --upscaler; engine/esrgan.py), loaded here, at start, when not given
        # loaded: a file that is not one fails the start, not the first request.
        self.upscaler = upscaler if upscaler is not None else load_studio_upscaler(settings)
        self.metrics = StudioMetrics()
        self.models = ModelRegistry.from_settings(settings)  # the presets a request may name (studio/models.py)
        self.params_model: type[GenerationParams] = build_params_model(settings.studio, models=self.models)
        self.info: dict[str, Any] = {}
        self.sessions: dict[str, Session] = {}
        # One page's frames at /broadcast/<key>.mjpeg for OBS, VLC, ffmpeg (studio/broadcast.py)
        self.broadcast = Broadcast(settings.studio.broadcast_key, settings.studio.max_broadcast_viewers, self.metrics)
        self.rest_waiting = 0
        self.max_sessions = settings.studio.max_sessions or 1
        self._on_ready = on_ready
        devices = settings.studio.devices
        if devices:  # one worker per device (studio/pool.py); the factory takes the device
            self.worker: Worker | WorkerPool = WorkerPool(
                [partial(engine_factory, d) for d in devices], settings.studio, self.metrics, on_ready=self._ready,
                on_fatal=on_fatal, devices=devices, models=self.models)
        else:
            self.worker = Worker(engine_factory, settings.studio, self.metrics, on_ready=self._ready,
                                 on_fatal=on_fatal, models=self.models)
        # Canvas decoding on threads of its own, decode_threads at a time: a flood of costly images waits here
        # instead of taking every core from the worker (and from other sessions' frame encoding).
        self.decoder = ThreadPoolExecutor(max_workers=settings.studio.decode_threads, thread_name_prefix="decode")

    def _ready(self, engine: Any) -> None:
        """On the worker thread, once the model is loaded and warm."""
        raw_dict = engine_info(engine)
        guidance = raw_dict.get("default_guidance_scale")
        if guidance is None:
            guidance = 8.0 if raw_dict.get("kind") == "lcm" else 1.0
        # The worker's settings, resolved for this model and device when it loaded it (StudioSettings.for_model);
        # the page starts at the model family's step count (SDXS 1, SD-Turbo 1, LCM 4) unless the settings set one.
        settings = self.worker.settings
        family_steps = raw_dict.get("default_num_inference_steps")
        if "default_steps" not in self.settings.studio.model_fields_set and isinstance(family_steps, int) \
                and settings.min_steps <= family_steps <= settings.max_steps:
            settings = settings.model_copy(update={"default_steps": family_steps})
        self.params_model = build_params_model(settings, float(guidance),
                                               lcm_img2img=bool(engine.lcm_img2img),
                                               controlnet=len(raw_dict.get("controlnets") or [])
                                               or bool(raw_dict.get("controlnet")),
                                               ip_adapter=bool(raw_dict.get("ip_adapter")), models=self.models)
        self.info = public_info(raw_dict)
        if self.upscaler is not None:
            self.info["upscaler"] = self.upscaler.public()
        gpu = str(raw_dict.get("device", "cpu")).startswith("cuda")
        self.max_sessions = self.settings.studio.max_sessions or (4 if gpu else 1)
        if self._on_ready is not None:
            self._on_ready(engine)

    def schema(self) -> dict[str, Any]:
        return self.params_model.model_json_schema()

    async def decode_canvas(self, data: bytes, background: tuple[int, int, int] = (255, 255, 255)) -> Any:
        """Image bytes -> RGB PIL image within the settings' limits (UserError otherwise), on the decode threads;
        transparent pixels become ``background``."""
        s = self.settings.studio
        job = partial(decode_canvas, data, max_pixels=s.max_image_pixels, max_side=s.max_image_side,
                      max_jpeg_scans=s.max_jpeg_scans, background=background)
        return await asyncio.get_running_loop().run_in_executor(self.decoder, job)


def load_studio_upscaler(settings: Settings) -> Any:
    """``settings.studio.upscaler`` loaded on the engine's device (None when not set); UserError naming the flag
    and the fix for a file that is not an ESRGAN-family .safetensors, or without spandrel/torchvision."""
    if settings.studio.upscaler is None:
        return None
    from lcm_live.engine.devices import resolve_device
    from lcm_live.engine.esrgan import load_upscaler

    return load_upscaler(settings.studio.upscaler, device=str(resolve_device(settings.engine.device)))


def default_engine_factory(settings: Settings) -> Callable[..., Any]:
    """The engine of ``settings``; given a device (serve --devices), on that device; given a preset (serve --model
    A --model B, --models FILE: studio/models.py), that preset's model."""

    def factory(device: str | None = None, *, preset: Any = None) -> Any:
        from lcm_live.engine.pipeline import Engine  # heavy: imported on the worker thread only

        engine_settings = settings.engine if preset is None else engine_settings_for(preset, settings.engine)
        if device is not None:
            engine_settings = engine_settings.model_copy(update={"device": device})
        return Engine.from_settings(engine_settings)

    return factory


@dataclass
class Guards:
    """The FastAPI dependencies every route but PUBLIC_PATHS carries."""

    require_auth: Callable[[Request], None]
    require_ws_auth: Callable[[WebSocket], None]
    require_same_origin: Callable[[Request], None]


def make_guards(studio: StudioState) -> Guards:
    s = studio.settings.studio

    def require_auth(request: Request) -> None:
        if not is_authorized(request, s.token):
            studio.metrics.rejected.labels(reason="auth").inc()
            raise ApiError(401, "unauthorized", "a token is needed: open the URL that `lcm-live serve` printed "
                           "(it ends in ?token=...) or send 'Authorization: Bearer <token>'",
                           headers={"WWW-Authenticate": "Bearer"})

    def require_ws_auth(websocket: WebSocket) -> None:
        if not is_authorized(websocket, s.token):
            studio.metrics.rejected.labels(reason="auth").inc()
            raise WebSocketException(code=1008, reason="unauthorized")

    def require_same_origin(request: Request) -> None:
        """State-changing HTTP routes: refuse what a browser marks as sent from another site."""
        cross = request.headers.get("sec-fetch-site") == "cross-site"
        if cross or not origin_allowed(request.headers.get("origin"), request.headers.get("host"), s.allowed_origins,
                                       secure=request.url.scheme == "https"):
            studio.metrics.rejected.labels(reason="origin").inc()
            raise ApiError(403, "forbidden_origin", "requests from another site are refused (see --allow-origin)")

    return Guards(require_auth, require_ws_auth, require_same_origin)


def add_page_routes(app: FastAPI, studio: StudioState) -> None:
    """The page (``?token=`` trades the token for an httponly cookie, then redirects to a URL without it)."""
    s = studio.settings.studio

    @app.get("/")
    async def index(request: Request) -> Response:
        given = request.query_params.get("token")
        if given is not None and s.token is not None:
            if not token_matches(s.token, given):
                studio.metrics.rejected.labels(reason="auth").inc()
                return error_response(401, "unauthorized", "wrong token: use the URL that `lcm-live serve` printed")
            response = RedirectResponse("/", status_code=303)
            response.set_cookie(COOKIE_NAME, s.token, httponly=True, samesite="strict", path="/",
                                secure=request.url.scheme == "https")  # over https: never sent in the clear
            return response
        index_file = WEB_DIR / "index.html"
        if index_file.is_file():
            return FileResponse(index_file, headers={"Cache-Control": "no-cache"})
        return HTMLResponse("<!doctype html><title>lcm-live</title><p>The studio page is not installed.</p>")

    app.mount("/static", StaticFiles(directory=WEB_DIR, check_dir=False), name="static")


def add_health_routes(app: FastAPI, studio: StudioState, guards: Guards) -> None:
    """``/healthz`` (alive; public), ``/readyz`` (model loaded, warm, worker healthy), ``/metrics``."""

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", dependencies=[Depends(guards.require_auth)])
    async def readyz() -> JSONResponse:
        worker = studio.worker
        # A pool, or Ray's replicas (studio/ray_worker.py): how many are ready
        workers = {"ready": worker.workers_ready, "total": len(worker.workers)} if hasattr(worker, "workers_ready") \
            else None
        if worker.ready:
            return JSONResponse({"status": "ready", **({"workers": workers} if workers else {})})
        if worker.state == "ready" and not worker.alive:
            status, detail = "failed", "the worker thread died"
        elif worker.state == "ready":
            status, detail = "unhealthy", f"{worker.consecutive_failures} consecutive engine failures"
        else:
            status, detail = worker.state, worker.detail
        return JSONResponse({"status": status, "detail": detail, **({"workers": workers} if workers else {})},
                            status_code=503)

    @app.get("/metrics", dependencies=[Depends(guards.require_auth)])
    async def metrics() -> Response:
        studio.metrics.sessions_active.set(len(studio.sessions))
        studio.metrics.queue_depth.set(studio.worker.queue_depth())
        body, content_type = studio.metrics.render()
        return Response(body, media_type=content_type)


def add_api_routes(app: FastAPI, studio: StudioState, guards: Guards) -> None:
    """The parameter schema the page builds its controls from, and the model's public info."""

    @app.get("/api/schema", dependencies=[Depends(guards.require_auth)])
    async def api_schema() -> dict[str, Any]:
        return studio.schema()

    @app.get("/api/info", dependencies=[Depends(guards.require_auth)])
    async def api_info() -> JSONResponse:
        if not studio.info:
            return error_response(503, "not_ready", "the model is still loading", headers={"Retry-After": "5"})
        return JSONResponse(studio.info)


def add_ws_route(app: FastAPI, studio: StudioState, guards: Guards) -> None:
    """``/ws``: Origin checked before accept (HTTP 403), then readiness and capacity (1013), then the session."""
    s = studio.settings.studio

    @app.websocket("/ws", dependencies=[Depends(guards.require_ws_auth)])
    async def ws(websocket: WebSocket) -> None:
        if not origin_allowed(websocket.headers.get("origin"), websocket.headers.get("host"), s.allowed_origins,
                              secure=websocket.url.scheme == "wss"):
            studio.metrics.rejected.labels(reason="origin").inc()
            await websocket.close(code=1008, reason="origin not allowed")  # before accept: HTTP 403
            return
        await websocket.accept()
        session = Session(websocket, studio)
        if not studio.worker.ready:
            studio.metrics.rejected.labels(reason="not_ready").inc()
            await session.close(1013, "not ready", error=("not_ready", f"the model is not ready ({studio.worker.detail}):"
                                                          " try again in a few seconds"))
            return
        if len(studio.sessions) >= studio.max_sessions:
            studio.metrics.rejected.labels(reason="capacity").inc()
            await session.close(1013, "server full", error=("capacity", f"the server is full ({studio.max_sessions} "
                                                            "session(s)): try again later"))
            return
        studio.sessions[session.id] = session
        studio.metrics.sessions_active.set(len(studio.sessions))
        try:
            await session.run()
        finally:
            studio.sessions.pop(session.id, None)
            studio.metrics.sessions_active.set(len(studio.sessions))


def create_app(
    settings: Settings | None = None,
    engine_factory: Callable[[], Any] | None = None,
    *,
    on_ready: Callable[[Any], None] | None = None,
    on_fatal: Callable[[str], None] | None = None,
    upscaler: Any = None,
) -> FastAPI:
    """``upscaler``: an ESRGAN model already loaded (engine/esrgan.py); else settings.studio.upscaler's is loaded
    here."""
    settings = settings or Settings()
    studio = StudioState(settings, engine_factory or default_engine_factory(settings), on_ready, on_fatal,
                         upscaler=upscaler)
    s = settings.studio

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        studio.worker.start()
        try:
            yield
        finally:
            studio.broadcast.close()
            for session in list(studio.sessions.values()):
                await session.close(1001, "server shutdown")
            await asyncio.to_thread(studio.worker.stop, 10.0)
            studio.decoder.shutdown(wait=False, cancel_futures=True)
            log.info("studio: stopped")

    app = FastAPI(title="lcm-live studio", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.studio = studio
    app.add_middleware(GuardMiddleware, max_body_bytes=s.max_body_bytes, token=s.token, allowed_hosts=s.allowed_hosts,
                       on_reject=lambda reason: studio.metrics.rejected.labels(reason=reason).inc())

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, exc.field, exc.headers)

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        # A bug: the client gets the JSON shape and no detail; the log gets the traceback (Starlette re-raises).
        studio.metrics.errors.labels(type="internal").inc()
        return internal_error_response()

    guards = make_guards(studio)
    add_page_routes(app, studio)
    add_health_routes(app, studio, guards)
    add_api_routes(app, studio, guards)
    from lcm_live.studio.rest import add_rest_routes

    add_rest_routes(app, studio, [Depends(guards.require_auth), Depends(guards.require_same_origin)])
    from lcm_live.studio.upscale_route import add_upscale_routes

    add_upscale_routes(app, studio, [Depends(guards.require_auth), Depends(guards.require_same_origin)])
    from lcm_live.studio.models_route import add_models_route

    add_models_route(app, studio, [Depends(guards.require_auth)])
    require_broadcast_key = add_broadcast_routes(app, studio.broadcast)  # the key alone, no token: read-only
    app.state.auth_dependencies = (guards.require_auth, guards.require_ws_auth, require_broadcast_key)
    add_ws_route(app, studio, guards)
    return app
