"""Every route outside an explicit allowlist depends on the auth check (catches a route added later without it)."""

from __future__ import annotations

from fastapi.routing import APIRoute, APIWebSocketRoute
from starlette.routing import Mount

from lcm_live.studio.app import PUBLIC_PATHS, create_app
from lcm_live.studio.fake_engine import FakeEngine

from .conftest import TOKEN, studio_settings


def _calls(dependant) -> set:
    found = {dependant.call}
    for sub in dependant.dependencies:
        found |= _calls(sub)
    return found


def test_every_route_but_the_allowlist_requires_auth():
    app = create_app(studio_settings(token=TOKEN), FakeEngine)
    require_auth, require_ws_auth, require_broadcast_key = app.state.auth_dependencies
    checked = []
    for route in app.routes:
        if isinstance(route, Mount):
            assert route.path in PUBLIC_PATHS, f"mount {route.path} is not in the public allowlist"
            continue
        assert isinstance(route, (APIRoute, APIWebSocketRoute)), f"unexpected route type {route!r}"
        if route.path in PUBLIC_PATHS:
            continue
        if route.path.startswith("/broadcast/"):  # the broadcast's own key instead of the token (read-only)
            assert require_broadcast_key in _calls(route.dependant), f"{route.path} does not check its key"
            checked.append(route.path)
            continue
        wanted = require_ws_auth if isinstance(route, APIWebSocketRoute) else require_auth
        assert wanted in _calls(route.dependant), f"{route.path} does not require auth"
        checked.append(route.path)
    assert {"/readyz", "/metrics", "/api/schema", "/api/info", "/api/generate", "/ws", "/broadcast/{key}.mjpeg",
            "/broadcast/{key}.jpg"} <= set(checked)
    assert {"/", "/healthz", "/static"} == PUBLIC_PATHS


def test_no_openapi_or_docs_routes():
    app = create_app(studio_settings(), FakeEngine)
    paths = {getattr(r, "path", None) for r in app.routes}
    assert not paths & {"/docs", "/redoc", "/openapi.json"}
