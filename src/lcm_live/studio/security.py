"""Who may talk to the studio: token, loopback, Host and Origin checks, and the body size limit.

- Without a token the server binds to loopback only (the CLI refuses anything else) and answers only requests
  whose ``Host`` is a loopback name: a DNS-rebinding page (evil.example resolving to 127.0.0.1) is refused.
- With a token, every route but ``/healthz`` and the static shell needs it (cookie or ``Authorization: Bearer``),
  compared in constant time.
- Browsers always send ``Origin`` on WebSocket handshakes and cross-site POSTs; it must be this server (or an
  explicitly allowed origin). ``Origin: null`` (sandboxed frames, file://) is always refused.
"""

from __future__ import annotations

import ipaddress
import json
import secrets
from urllib.parse import urlsplit

from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Message, Receive, Scope, Send

COOKIE_NAME = "lcm_live_token"
MIN_TOKEN_LENGTH = 32
# Tokens people paste from examples; refused even when long enough.
PLACEHOLDER_TOKENS = {"changeme", "change-me", "secret", "token", "password", "your-token-here", "xxx"}
# On every HTTP response: no MIME sniffing, no framing (clickjacking), no Referer (it could carry ?token=).
SECURITY_HEADERS = [(b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"),
                    (b"referrer-policy", b"no-referrer")]


def is_loopback_host(host: str) -> bool:
    """True for names that only ever reach this machine: ``localhost``, 127.0.0.0/8, ``::1``.

    ``*.localhost`` is not: browsers map it to loopback, but the resolver behind ``--host`` may not (a hosts file
    or a DNS search domain can point ``evil.localhost`` anywhere), and a bind there must not go without a token."""
    host = host.strip().strip("[]").lower().rstrip(".")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def token_problem(token: str | None) -> str | None:
    """Why ``token`` is unusable, or None when it is fine."""
    if token is None:
        return None
    if len(token) < MIN_TOKEN_LENGTH:
        return (f"the token is {len(token)} characters: use at least {MIN_TOKEN_LENGTH} "
                "(e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')")
    if token.lower() in PLACEHOLDER_TOKENS or len(set(token)) < 8:
        return "the token looks like a placeholder: generate one with python -c 'import secrets; print(secrets.token_urlsafe(32))'"
    return None


def token_matches(expected: str, given: str | None) -> bool:
    return given is not None and secrets.compare_digest(expected.encode(), given.encode())


def presented_token(conn: HTTPConnection) -> str | None:
    """The token from ``Authorization: Bearer``, else from the cookie."""
    auth = conn.headers.get("authorization")
    if auth:
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    return conn.cookies.get(COOKIE_NAME)


def is_authorized(conn: HTTPConnection, token: str | None) -> bool:
    return token is None or token_matches(token, presented_token(conn))


def _split_host(value: str, default_port: int | None) -> tuple[str, int | None] | None:
    """'Host:port' (or '[v6]:port') -> (lowercase host, port), None when malformed."""
    try:
        parts = urlsplit("//" + value)
        host, port = parts.hostname, parts.port
    except ValueError:
        return None
    if not host:
        return None
    return host.lower(), port if port is not None else default_port


def normalize_origin(origin: str) -> str | None:
    """'scheme://host:port' with the default port spelled out, None when malformed (including 'null')."""
    try:
        parts = urlsplit(origin.strip())
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in ("http", "https", "ws", "wss") or not parts.hostname or parts.path not in ("", "/"):
        return None
    if parts.query or parts.fragment or parts.username or parts.password:
        return None
    default = 443 if parts.scheme in ("https", "wss") else 80
    host = parts.hostname.lower()
    if ":" in host:  # IPv6 literal: keep it bracketed so host:port stays parseable
        host = f"[{host}]"
    return f"{parts.scheme}://{host}:{port if port is not None else default}"


def origin_allowed(origin: str | None, host_header: str | None, allowed_origins: list[str],
                   secure: bool = False) -> bool:
    """No Origin (a non-browser client) is allowed; otherwise it must be this server (same scheme, host and port
    as the request's ``Host``; ``secure``: the request came over TLS) or explicitly allowed."""
    if origin is None:
        return True
    normalized = normalize_origin(origin)
    if normalized is None:
        return False
    if normalized in {normalize_origin(o) for o in allowed_origins}:
        return True
    scheme, _, netloc = normalized.partition("://")
    if (scheme in ("https", "wss")) != secure:
        return False
    server = _split_host(host_header or "", 443 if secure else 80)
    return server is not None and _split_host(netloc, None) == server


def host_allowed(host_header: str | None, token: str | None, allowed_hosts: list[str]) -> bool:
    """Without a token only loopback names (and configured hosts) may be in ``Host``: DNS rebinding defence."""
    if token is not None:
        return True
    parsed = _split_host(host_header or "", None)
    if parsed is None:
        return False
    host = parsed[0]
    return is_loopback_host(host) or host in {h.lower() for h in allowed_hosts}


class BodyTooLarge(Exception):
    pass


class GuardMiddleware:
    """Pure ASGI: Host check (HTTP and WebSocket) and the request body limit (413), counted while streaming.

    ``Content-Length`` is checked first, but never trusted: the body is counted as it arrives.
    """

    def __init__(self, app: ASGIApp, *, max_body_bytes: int, token: str | None, allowed_hosts: list[str],
                 on_reject=None):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.token = token
        self.allowed_hosts = allowed_hosts
        self.on_reject = on_reject or (lambda reason: None)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if not host_allowed(headers.get("host"), self.token, self.allowed_hosts):
            self.on_reject("host")
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008, "reason": "host not allowed"})
            else:
                await _send_json(send, 400, "forbidden_host", "this Host is not allowed: open the server through "
                                 "localhost/127.0.0.1, or start it with a token or --allow-host")
            return
        if scope["type"] == "websocket":
            await self.app(scope, receive, send)
            return
        limit = self.max_body_bytes
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            self.on_reject("too_large")
            await _send_json(send, 413, "too_large", f"the request body is over {limit} bytes")
            return
        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge()
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS]}
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLarge:
            self.on_reject("too_large")
            if not started:
                await _send_json(send, 413, "too_large", f"the request body is over {limit} bytes")


async def _send_json(send: Send, status: int, code: str, message: str, extra_headers=()) -> None:
    body = json.dumps({"type": "error", "code": code, "message": message, "field": None}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               *SECURITY_HEADERS, *extra_headers]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
