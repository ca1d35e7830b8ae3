"""`lcm-live serve`: the studio (page + WebSocket) on uvicorn, loopback by default.

A non-loopback ``--host`` needs a token of at least 32 characters (``--token`` or ``LCM_LIVE_TOKEN``); without
one the command refuses to start and says how to make one. uvicorn is configured explicitly (websockets backend,
message size cap, ping, graceful shutdown) rather than trusting its defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
import threading
import warnings

from lcm_live.cli.common import add_engine_arguments, engine_settings_from_args
from lcm_live.config import DEFAULT_MODEL
from lcm_live.errors import UserError

MAKE_TOKEN = "python -c 'import secrets; print(secrets.token_urlsafe(32))'"


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve", help="the live studio: a page with a drawing canvas, frames streamed over a WebSocket",
        description="Serve the studio: open the printed URL in a browser.", conflict_handler="resolve")
    add_engine_arguments(parser, decoder="auto")  # live: the tiny decoder where it fits
    m = parser.add_argument_group("models the page may pick (studio/models.py; GET /api/models)")
    # replaces the shared single --model: serve takes several, each a preset named by its id
    m.add_argument("--model", action="append", default=None, metavar="ID_OR_PATH",
                   help=f"hub id, diffusers folder, single .safetensors file, or builtin:shapes (default: "
                        f"{DEFAULT_MODEL}); repeatable: each is a preset the page may switch to, named by its id (a "
                        "path by its last part); the first is the default")
    m.add_argument("--models", default=None, metavar="TOML",
                   help="named presets instead of --model: [models.NAME] tables with model, lcm_lora, styles (LoRAs "
                        "with scale, min, max), controlnet, scheduler, width, height, num_inference_steps "
                        "(README: models.toml)")
    m.add_argument("--max-loaded-models", type=int, default=None, metavar="N",
                   help="engines each worker keeps loaded, the least recently used evicted past it (default: 1 on "
                        "a CPU, 2 on CUDA)")
    u = parser.add_argument_group("keep and upscale (POST /api/upscale)")
    u.add_argument("--upscaler", default=None, metavar="PATH.safetensors",
                   help="an ESRGAN-family super-resolution model (safetensors only; needs lcm-live[upscale]), "
                        "loaded at start: the page's Keep and upscale then offers it (\"upscaler\": \"esrgan\" or "
                        "\"esrgan+lcm\"); requests never name a file")
    g = parser.add_argument_group("server")
    g.add_argument("--host", default=None,
                   help="address to bind (default: 127.0.0.1, this machine only; anything else needs a token)")
    g.add_argument("--port", type=int, default=None, help="port (default: 7860)")
    g.add_argument("--token", default=None,
                   help="access token (>= 32 characters), also read from LCM_LIVE_TOKEN; required off loopback")
    g.add_argument("--allow-origin", action="append", default=[], metavar="URL",
                   help="extra browser origin allowed to connect, e.g. https://studio.example:443; repeatable")
    g.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="extra Host name accepted without a token (loopback names always are); repeatable")
    g.add_argument("--ssl-certfile", default=None, metavar="PEM",
                   help="serve over https with this certificate (with --ssl-keyfile): browsers give pages on other "
                        "machines (a phone on the LAN) the camera only over https")
    g.add_argument("--ssl-keyfile", default=None, metavar="PEM", help="the certificate's private key")
    g.add_argument("--devices", default=None, metavar="LIST",
                   help="one inference worker per device, each with its own engine, e.g. cuda:0,cuda:1 (a session's "
                        "frames then run on several at once); default: one worker on --device")
    g.add_argument("--max-sessions", type=int, default=None,
                   help="concurrent WebSocket sessions (default: 1 on CPU, 4 on GPU)")
    g.add_argument("--frame-format", choices=["jpeg", "webp"], default=None, help="live frame encoding (default: jpeg)")
    g.add_argument("--similarity-filter", type=float, default=None, metavar="T",
                   help="camera/screen input: skip a canvas whose cosine similarity to the last processed one "
                        "passes T (e.g. 0.98), with a probability rising to 1 for an identical one (default: off)")
    g.add_argument("--exit-on-failures", action="store_true",
                   help="exit non-zero after 3 consecutive engine failures (for a supervisor to restart)")
    r = parser.add_argument_group("ray serve (the `ray` extra: pip install 'lcm-live[ray]'; docs/scaling.md)")
    r.add_argument("--ray", action="store_true",
                   help="serve on Ray Serve: an ingress (this studio) and generator replicas, one engine each")
    r.add_argument("--ray-address", default=None, metavar="auto|ADDRESS",
                   help="the Ray cluster to join (auto: the one `ray start` made here); default: start a local one")
    r.add_argument("--replicas", type=int, default=None, metavar="N", help="generator replicas (default: 1)")
    r.add_argument("--autoscale", default=None, metavar="MIN:MAX",
                   help="Serve's autoscaling on ongoing requests between MIN and MAX replicas, instead of --replicas")
    r.add_argument("--gpus-per-replica", type=float, default=None, metavar="G",
                   help="GPUs Ray reserves for each replica (default: 0, CPU replicas)")
    r.add_argument("--cpus-per-replica", type=float, default=None, metavar="C",
                   help="CPUs Ray reserves for each replica; a replica's torch runs that many threads (Ray sets "
                        "OMP_NUM_THREADS). Default: 1 (on a CPU, more replicas of one thread each beat fewer of "
                        "several: docs/benchmarks.md)")
    # Tests and benchmarks: a FakeEngine (JSON of FakeEngineConfig) instead of a model. Hidden on purpose.
    g.add_argument("--fake-engine", default=os.environ.get("LCM_LIVE_FAKE_ENGINE"), help=argparse.SUPPRESS)
    parser.set_defaults(run=run)


def check_exposure(host: str, token: str | None) -> None:
    """Refuse a token that is too weak, and a non-loopback bind without a token (one line naming the fix)."""
    from lcm_live.studio.security import MIN_TOKEN_LENGTH, is_loopback_host, token_problem

    problem = token_problem(token)
    if problem:
        raise UserError(f"--token / LCM_LIVE_TOKEN: {problem}")
    if token is None and not is_loopback_host(host):
        raise UserError(
            f"--host {host} would expose the studio beyond this machine without a token: set LCM_LIVE_TOKEN (or "
            f"--token) to at least {MIN_TOKEN_LENGTH} random characters, e.g. "
            f"export LCM_LIVE_TOKEN=$({MAKE_TOKEN}), or keep --host 127.0.0.1"
        )


def check_tls_files(certfile: str | None, keyfile: str | None) -> None:
    """Both PEM files readable, or neither given (one line naming the fix)."""
    if (certfile is None) != (keyfile is None):
        raise UserError("--ssl-certfile and --ssl-keyfile go together: give the certificate and its private key")
    for flag, path in (("--ssl-certfile", certfile), ("--ssl-keyfile", keyfile)):
        if path is not None and not os.access(path, os.R_OK):
            raise UserError(f"{flag} {path}: no readable file there; make a self-signed pair with: openssl req -x509 "
                            "-newkey rsa:2048 -nodes -days 365 -keyout key.pem -out cert.pem -subj /CN=lcm-live "
                            "-addext subjectAltName=IP:<this machine's address>")


def build_settings(args: argparse.Namespace):
    """Studio settings: the environment (LCM_LIVE_STUDIO__*, LCM_LIVE_TOKEN) first, then the flags given."""
    from pydantic import ValidationError

    from lcm_live.config import Settings, StudioSettings

    flags = {"host": args.host, "port": args.port, "token": args.token, "allowed_origins": args.allow_origin or None,
             "allowed_hosts": args.allow_host or None, "max_sessions": args.max_sessions,
             "devices": [d.strip() for d in args.devices.split(",") if d.strip()] if args.devices else None,
             "frame_format": args.frame_format, "exit_on_failures": args.exit_on_failures or None,
             "ssl_certfile": args.ssl_certfile, "ssl_keyfile": args.ssl_keyfile,
             "max_loaded_models": getattr(args, "max_loaded_models", None),
             "similarity_filter": getattr(args, "similarity_filter", None),
             "upscaler": getattr(args, "upscaler", None)}
    try:
        values = Settings().studio.model_dump()
        values["token"] = os.environ.get("LCM_LIVE_TOKEN") or values["token"]
        values.update({k: v for k, v in flags.items() if v is not None})
        values["token"] = values["token"] or None
        studio = StudioSettings(**values)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        raise UserError(f"{'.'.join(map(str, err['loc'])) or 'settings'}: {err['msg']}") from None
    presets = model_presets(args)
    engine = engine_settings_from_args(args, model=presets[0].model if presets else _model_ids(args)[0])
    return Settings(engine=engine, studio=studio, models=presets)


def _model_ids(args: argparse.Namespace) -> list[str]:
    """``--model`` as given (a list with serve's repeatable flag; a string from the shared parser)."""
    ids = getattr(args, "model", None) or [DEFAULT_MODEL]
    return [ids] if isinstance(ids, str) else list(ids)


def model_presets(args: argparse.Namespace) -> list:
    """The presets of --models FILE or of several --model; none for one --model (today's single model)."""
    from lcm_live.studio.models import load_presets_file, presets_from_ids

    models_file = getattr(args, "models", None)
    ids = getattr(args, "model", None)
    if models_file is not None and ids:
        raise UserError("--models FILE and --model go apart: list every model in the file, or give --model only")
    if models_file is not None:
        return load_presets_file(models_file)
    ids = _model_ids(args)
    return presets_from_ids(ids) if len(ids) > 1 else []


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    check_tls_files(args.ssl_certfile, args.ssl_keyfile)
    settings = build_settings(args)
    token = settings.studio.token
    check_exposure(settings.studio.host, token)
    check_tls_files(settings.studio.ssl_certfile, settings.studio.ssl_keyfile)  # from the environment too
    if args.ray or args.ray_address or args.replicas or args.autoscale or args.gpus_per_replica is not None \
            or args.cpus_per_replica is not None:
        return run_ray(args, settings)

    import uvicorn
    from PIL import Image

    from lcm_live.studio.app import create_app, default_engine_factory
    from lcm_live.studio.connections import ConnectionGuard, ConnectionLimits, set_tls_handshake_timeout
    from lcm_live.studio.redact import install as redact_install

    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(message)s")
    # Pillow's own bomb guard, lowered to what the studio accepts (the canvas decoder checks first anyway).
    Image.MAX_IMAGE_PIXELS = settings.studio.max_image_pixels
    if args.fake_engine is not None:
        from lcm_live.studio.fake_engine import FakeEngine, FakeEngineConfig

        fake_config = FakeEngineConfig.from_json(args.fake_engine)
        def factory(device: str | None = None, *, preset=None) -> FakeEngine:
            config = fake_config if device is None else dataclasses.replace(fake_config, device=device.split(":")[0])
            if preset is not None:  # each preset a fake of its own: frames and info name its model
                config = dataclasses.replace(config, model=preset.model)
            return FakeEngine.from_settings(settings.engine, config=config)
    else:
        factory = default_engine_factory(settings)

    fatal: list[str] = []
    server_box: list = []

    def on_ready(engine) -> None:
        info = app.state.studio.info
        _say(f"ready: {info['model']} ({info['kind']}) on {info['device']}, {info['dtype']}")
        if info.get("notice"):
            bar = "!" * 78
            _say(f"\n{bar}\n  NOTICE: {info['notice']}\n{bar}\n")

    def on_fatal(reason: str) -> None:
        fatal.append(reason)
        _say(f"error: {reason}")
        if server_box:
            server_box[0].should_exit = True

    app = create_app(settings, factory, on_ready=on_ready, on_fatal=on_fatal)  # loads --upscaler (or refuses it)
    s = settings.studio
    # The connection guard (studio/connections.py) adds what uvicorn lacks: request-head, body, write and close
    # deadlines, per-address and total connection caps that never starve /healthz and /readyz, and a shutdown no
    # closing peer can crash. It replaces limit_concurrency, which counts idle connections and then answers 503
    # to every route (a few dozen idle sockets took /healthz down).
    guard = ConnectionGuard(ConnectionLimits.from_settings(s))
    app.state.studio.metrics.watch_connections(guard.closed)  # /metrics: lcm_live_connections_closed_total{reason}
    if s.ssl_certfile:  # asyncio's default: 60 s for a TLS handshake, before any protocol sees the connection
        set_tls_handshake_timeout(s.request_header_timeout_s)
    uv_config = uvicorn.Config(
        app,
        host=s.host,
        port=s.port,
        http=guard.http_protocol,  # uvicorn's h11 protocol, reporting to the guard
        ws=guard.ws_protocol,  # uvicorn's websockets-sansio protocol (pinned: it enforces ws_max_size), guarded
        # Twice the app's limit: a message up to that reaches the session, which refuses it alone (too_large) and
        # keeps the connection; only one past it is cut by the protocol (1009, counted by the session).
        ws_max_size=2 * s.max_ws_message_bytes,
        ws_max_queue=8,
        ws_ping_interval=s.ws_ping_interval_s,
        ws_ping_timeout=s.ws_ping_timeout_s,
        ws_per_message_deflate=False,  # frames are JPEG/WebP already; no decompression bombs either
        timeout_keep_alive=s.keep_alive_timeout_s,
        h11_max_incomplete_event_size=s.max_header_bytes,
        timeout_graceful_shutdown=s.graceful_shutdown_timeout_s,
        limit_concurrency=None,  # the guard's caps instead (see above)
        proxy_headers=False,
        server_header=False,
        log_level="info",
        lifespan="on",
        ssl_certfile=s.ssl_certfile,
        ssl_keyfile=s.ssl_keyfile,
    )
    # Pinned on purpose (the brief and R6): uvicorn 0.54 calls this backend deprecated; it still enforces
    # ws_max_size and ws_max_queue, so only its warning is silenced.
    warnings.filterwarnings("ignore", message="The `websockets` implementation is deprecated")
    class StudioServer(uvicorn.Server):
        async def shutdown(self, sockets=None) -> None:
            app.state.studio.broadcast.close()  # its endless streams end now, not at the graceful deadline
            await super().shutdown(sockets)

    server = StudioServer(uv_config)
    server_box.append(server)
    # every handler uvicorn.Config set up: ?token=, Bearer, the cookie, the token itself, the broadcast key
    redact_install(token, (app.state.studio.broadcast.key,))

    shown = "127.0.0.1" if s.host in ("0.0.0.0", "::", "") else s.host
    shown = f"[{shown}]" if ":" in shown else shown
    scheme = "https" if s.ssl_certfile else "http"
    url = f"{scheme}://{shown}:{s.port}/" + (f"?token={token}" if token else "")
    _say(f"lcm-live studio: open {url}")
    if s.max_broadcast_viewers:
        broadcast = app.state.studio.broadcast
        _say(f"  broadcast (MJPEG for OBS, VLC, ffmpeg; frames once a page turns Broadcast on): "
             f"{scheme}://{shown}:{s.port}{broadcast.path}")
    if s.host in ("0.0.0.0", "::"):
        _say("  listening on all interfaces: from another machine use this machine's address instead of 127.0.0.1")
    _say(f"  loading {settings.engine.model} (readyz answers 503 until the model is warm)")
    if app.state.studio.upscaler is not None:
        u = app.state.studio.upscaler
        _say(f"  upscaler: {u.name} ({u.architecture}, {u.scale}x) for Keep and upscale")
    if settings.models:
        _say(f"  models the page may pick: {', '.join(p.name for p in settings.models)} (the first loaded now, "
             f"the others on demand)")
    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then re-raises the signal to the handler that was there
    # before it: make that a no-op so a clean shutdown exits 0 (supervisors read -15 as a crash).
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda signum, frame: None)
    server.run()
    return 3 if fatal else 0


def run_ray(args: argparse.Namespace, settings) -> int:
    """``--ray``: the same studio on Ray Serve (studio/ray_launch.py); the ray extra is optional."""
    if not args.ray:
        raise UserError("--ray-address, --replicas, --autoscale, --gpus-per-replica and --cpus-per-replica go "
                        "with --ray")
    if settings.studio.upscaler is not None:
        raise UserError("--upscaler works without --ray only (the ESRGAN model would run in the ingress): drop "
                        "one of them")
    if args.replicas is not None and args.autoscale is not None:
        raise UserError("--replicas N and --autoscale MIN:MAX exclude each other: give one")
    try:
        import ray.serve  # noqa: F401
    except ImportError:
        raise UserError("--ray needs Ray Serve, an optional extra: pip install 'lcm-live[ray]'") from None
    from lcm_live.studio.ray_app import RayOptions, parse_autoscale
    from lcm_live.studio.ray_launch import serve_with_ray

    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(message)s")
    autoscale = parse_autoscale(args.autoscale) if args.autoscale else None
    cpus = args.cpus_per_replica
    if cpus is None:  # a FakeEngine (tests, benchmarks) only sleeps: its replicas reserve no CPU
        cpus = 0.0 if args.fake_engine is not None else 1.0
    options = RayOptions(replicas=args.replicas or 1, autoscale=autoscale,
                         gpus_per_replica=args.gpus_per_replica or 0.0, fake_engine=args.fake_engine,
                         cpus_per_replica=cpus)
    return serve_with_ray(settings, options, address=args.ray_address, say=_say)
