"""Auth (token, cookie), Origin and Host checks, CORS, and the settings that guard them (R1-R4)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError
from starlette.websockets import WebSocketDisconnect

from lcm_live.config import StudioSettings
from lcm_live.studio.security import (
    COOKIE_NAME,
    host_allowed,
    is_loopback_host,
    normalize_origin,
    origin_allowed,
    token_problem,
)

from .conftest import TOKEN, receive, running_studio

pytestmark = pytest.mark.timeout(60)
BEARER = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def secured():
    with running_studio(token=TOKEN) as running:
        yield running


@pytest.mark.parametrize("path", ["/readyz", "/metrics", "/api/schema", "/api/info"])
def test_routes_need_the_token(secured, path):
    client, _, _ = secured
    assert client.get(path).status_code == 401
    assert client.get(path, headers={"Authorization": "Bearer wrong-token-0123456789abcdefghijklmnop"}).status_code == 401
    assert client.get(path, headers={"Authorization": f"Basic {TOKEN}"}).status_code == 401
    assert client.get(path, headers=BEARER).status_code == 200


def test_public_routes_without_token(secured):
    client, _, _ = secured
    assert client.get("/healthz").status_code == 200
    assert client.get("/").status_code == 200
    assert client.post("/api/generate", json={}).status_code == 401


def test_token_url_sets_a_strict_httponly_cookie_and_redirects(secured):
    client, _, _ = secured
    r = client.get(f"/?token={TOKEN}", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/"
    cookie = r.headers["set-cookie"].lower()
    assert f"{COOKIE_NAME}=" in cookie and "httponly" in cookie and "samesite=strict" in cookie
    assert client.get("/readyz").status_code == 200  # the cookie jar now carries it
    assert client.get("/?token=wrong").status_code == 401


def test_websocket_needs_the_token(secured):
    client, _, state = secured
    with pytest.raises(WebSocketDisconnect) as info, client.websocket_connect("/ws"):
        pass
    assert info.value.code == 1008
    with client.websocket_connect("/ws", headers=BEARER) as ws:
        assert receive(ws)["type"] == "hello"
    client.cookies.set(COOKIE_NAME, TOKEN)
    with client.websocket_connect("/ws") as ws:
        assert receive(ws)["type"] == "hello"
    assert state.metrics.rejected.labels(reason="auth")._value.get() >= 1


def test_info_never_contains_the_token(secured):
    client, _, _ = secured
    assert TOKEN not in client.get("/api/info", headers=BEARER).text
    assert TOKEN not in client.get("/api/schema", headers=BEARER).text
    assert TOKEN not in client.get("/metrics", headers=BEARER).text


@pytest.mark.parametrize("origin", ["http://evil.example", "null", "http://testserver.evil.example", "file://",
                                    "http://testserver:81", "https://testserver", "not a url"])
def test_websocket_origin_must_match_the_host(studio, origin):
    client, _, state = studio
    with pytest.raises(WebSocketDisconnect), client.websocket_connect("/ws", headers={"origin": origin}):
        pass
    assert state.metrics.rejected.labels(reason="origin")._value.get() == 1


def test_same_origin_and_allowed_origins_are_accepted():
    with running_studio(allowed_origins=["http://studio.lan:7860"]) as (client, _, _):
        for origin in ("http://testserver", "http://testserver:80", "http://studio.lan:7860"):
            with client.websocket_connect("/ws", headers={"origin": origin}) as ws:
                assert receive(ws)["type"] == "hello"


def test_cross_site_post_is_refused(studio):
    client, engine, _ = studio
    assert client.post("/api/generate", json={}, headers={"origin": "http://evil.example"}).status_code == 403
    assert client.post("/api/generate", json={}, headers={"sec-fetch-site": "cross-site"}).status_code == 403
    assert client.post("/api/generate", json={}, headers={"origin": "http://testserver"}).status_code == 200
    assert len(engine.calls) == 1


def test_dns_rebinding_host_is_refused_without_a_token(studio):
    client, _, _ = studio
    evil = {"host": "evil.example:7860", "origin": "http://evil.example:7860"}
    assert client.get("/healthz", headers={"host": "evil.example"}).status_code == 400
    assert client.get("/api/schema", headers=evil).status_code == 400
    with pytest.raises(WebSocketDisconnect), client.websocket_connect("/ws", headers=evil):
        pass


def test_no_cors_headers_for_other_origins(studio):
    client, _, _ = studio
    r = client.get("/api/schema", headers={"origin": "http://evil.example"})
    assert "access-control-allow-origin" not in r.headers
    r = client.options("/api/generate", headers={"origin": "http://evil.example",
                                                 "access-control-request-method": "POST"})
    assert "access-control-allow-origin" not in r.headers


def test_security_headers(studio):
    client, _, _ = studio
    r = client.get("/healthz")
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["referrer-policy"] == "no-referrer"


@pytest.mark.parametrize("origins", [["*"], ["null"]])
def test_wildcard_origins_are_a_configuration_error(origins):
    with pytest.raises(ValidationError):
        StudioSettings(allowed_origins=origins)


@pytest.mark.parametrize(("host", "loopback"), [("127.0.0.1", True), ("127.1.2.3", True), ("::1", True),
                                                ("[::1]", True), ("localhost", True), ("LOCALHOST", True),
                                                ("0.0.0.0", False), ("::", False), ("192.168.1.20", False),
                                                ("example.com", False), ("localhost.evil.com", False)])
def test_loopback_detection(host, loopback):
    assert is_loopback_host(host) is loopback


def test_token_rules():
    assert token_problem(None) is None
    assert token_problem("short") is not None
    assert token_problem("a" * 40) is not None  # placeholder-like
    assert token_problem("changeme") is not None
    assert token_problem(TOKEN) is None


def test_origin_helpers():
    assert normalize_origin("http://Example.com") == "http://example.com:80"
    assert normalize_origin("null") is None and normalize_origin("http://a/path") is None
    assert origin_allowed(None, "127.0.0.1:7860", [])  # non-browser client
    assert origin_allowed("http://127.0.0.1:7860", "127.0.0.1:7860", [])
    assert not origin_allowed("http://localhost:7860", "127.0.0.1:7860", [])
    assert origin_allowed("http://[::1]:7860", "[::1]:7860", [])
    assert host_allowed("localhost:7860", None, []) and host_allowed("[::1]:7860", None, [])
    assert not host_allowed("evil.example", None, []) and host_allowed("evil.example", TOKEN, [])
    assert not host_allowed("", None, [])
