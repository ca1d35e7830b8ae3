"""``lcm-live serve --ray``: connect to (or start) a Ray cluster, start Serve's HTTP proxy on --host/--port, deploy
the studio (studio/ray_app.py), and take it down again on Ctrl-C or SIGTERM.

A cluster started here (no ``--ray-address``) lives and dies with this command. With ``--ray-address`` the cluster
and Serve stay up afterwards; only the studio's application is deleted.
"""

from __future__ import annotations

import json
import signal
import ssl
import threading
import time
import urllib.request
from collections.abc import Callable
from typing import Any

from lcm_live.config import Settings
from lcm_live.studio.ray_app import APP_NAME, RayOptions, build_application

INSTALL_HINT = "pip install 'lcm-live[ray]'"


def serve_with_ray(settings: Settings, options: RayOptions, *, address: str | None,
                   say: Callable[[str], None]) -> int:
    import ray
    from ray import serve

    s = settings.studio
    # 1. The cluster: the given one, or a local one of this machine's cores without the dashboard.
    local = address is None
    ray.init(address=address, include_dashboard=False if local else None, logging_level="WARNING",
             log_to_driver=True)
    try:
        # 2. Serve's HTTP proxy where the single-process server would listen (on a cluster: every node's proxy).
        http = {"host": s.host, "port": s.port, "keep_alive_timeout_s": s.keep_alive_timeout_s}
        if s.ssl_certfile:
            http.update(ssl_certfile=s.ssl_certfile, ssl_keyfile=s.ssl_keyfile)
        serve.start(http_options=http)
        shown = "127.0.0.1" if s.host in ("0.0.0.0", "::", "") else s.host
        shown = f"[{shown}]" if ":" in shown else shown
        scheme = "https" if s.ssl_certfile else "http"
        base = f"{scheme}://{shown}:{s.port}"
        where = "a local Ray cluster" if local else f"the Ray cluster at {address}"
        model = "a FakeEngine" if options.fake_engine is not None else settings.engine.model
        say(f"lcm-live studio on Ray Serve ({where}): {_scale(options)}; loading {model}")
        # 3. The application; serve.run returns once every generator replica has loaded and warmed its engine.
        t0 = time.monotonic()
        try:
            serve.run(build_application(settings, options), name=APP_NAME, route_prefix="/")
        except RuntimeError as exc:  # a replica that cannot load its model: Serve gave up on the deployment
            say(f"error: the studio could not start on Ray Serve: {exc} (the replicas' log above says why)")
            return 3
        _wait_ready(base, s.token)
        say(f"ready in {time.monotonic() - t0:.0f} s: open {base}/" + (f"?token={s.token}" if s.token else ""))
        if s.host in ("0.0.0.0", "::"):
            say("  listening on all interfaces: from another machine use this machine's address instead of 127.0.0.1")
        # 4. Until Ctrl-C / SIGTERM.
        stop = threading.Event()
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, lambda signum, frame: stop.set())
        while not stop.wait(1.0):
            pass
        say("lcm-live studio: stopping")
    finally:
        try:
            serve.delete(APP_NAME)
            if local:
                serve.shutdown()
        finally:
            ray.shutdown()
    return 0


def _scale(options: RayOptions) -> str:
    replicas = (f"{options.autoscale[0]} to {options.autoscale[1]} generator replicas (autoscaled)"
                if options.autoscale else f"{options.replicas} generator replica(s)")
    gpus = f", {options.gpus_per_replica:g} GPU each" if options.gpus_per_replica else ", on CPU"
    return replicas + gpus + f", {options.cpus_per_replica:g} CPU(s) each (torch threads)"


def _wait_ready(base: str, token: str | None, timeout: float = 60.0) -> None:
    """Until /readyz says every replica is ready (the ingress hears of them within a second or two of serve.run;
    an autoscaled deployment may start with fewer)."""
    headers: dict[str, Any] = {"Authorization": f"Bearer {token}"} if token else {}
    # Our own proxy on loopback: a self-signed certificate is expected there
    context = ssl._create_unverified_context() if base.startswith("https") else None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            request = urllib.request.Request(base + "/readyz", headers=headers)
            with urllib.request.urlopen(request, timeout=5, context=context) as response:
                workers = json.loads(response.read()).get("workers") or {}
                if workers.get("ready") == workers.get("total"):
                    return
        except (OSError, ValueError):
            pass
        time.sleep(0.5)
