"""The connection guard: deadlines and caps on TCP connections that uvicorn does not have.

uvicorn 0.55 (h11 + websockets-sansio, as `serve` pins them) already gives, and `serve` sets from StudioSettings:
a keep-alive timeout after a response (``timeout_keep_alive``), a cap on a request head's size
(``h11_max_incomplete_event_size``), WebSocket pings with a deadline (``ws_ping_interval``/``ws_ping_timeout``) and
a graceful-shutdown deadline (``timeout_graceful_shutdown``). What it lacks, and this module adds:

- **A deadline for a request head.** A fresh connection that sends nothing, or sends its headers a byte a second,
  is held forever: the keep-alive timer starts only after a first response, and every byte received cancels it.
- **A deadline for a request body.**
- **A connection cap that never starves the probes, and a fair share per client address.** ``limit_concurrency``
  counts idle connections too and, once they fill it, answers 503 to every route, /healthz and /readyz included
  (32-40 idle sockets took the studio down). It is left off; instead:
  past ``max_connections_per_client`` open connections from one address (an IPv6 /64 counts as one), that
  address's oldest connection waiting for a request is closed to make room, or, when all its share is busy
  (requests under way, WebSockets), the new connection is closed at once: an address competes only with itself;
  past ``max_connections`` in all, the oldest connection that has waited at least SHED_MIN_IDLE_S for a request
  is closed to make room; when none has, the new connection may only ask for PROBE_PATHS (anything else answers
  503); ``probe_reserve_connections`` more are accepted that way, and past those the oldest connection waiting
  for a request (however briefly) is closed, or, with every one busy, the new connection.
- **A deadline for a close.** asyncio's ``transport.close()`` waits until the send buffer drains: a peer that stops
  reading keeps the socket, its megabytes of frames and (for a WebSocket) its session forever. Seen with a client
  that sent a close frame and never read again, one that stopped answering pings (uvicorn's ping timeout closes
  the transport, and the close never finished: the only session slot was still held at 169 s), and at shutdown.
  A connection still open ``close_timeout_s`` after its close began is aborted (its unsent data dropped).
  uvicorn's own wait for the peer's close reply (``close_timeout``, 10 s, not configurable) gets the same value.
- **A deadline for writes.** A connection whose writes stay paused (the peer reads nothing) ``write_timeout_s``
  in a row is aborted.
- **A shutdown that survives a closing peer.** ``WebSocketsSansIOProtocol.shutdown()`` sends 1012 even when the
  peer's close frame already came in; websockets raises ``InvalidState``, which escapes ``Server.shutdown()``: the
  process exits 1 and the connections after that one never get their 1012. Here no shutdown() raises.

Mechanics: two protocol subclasses (``guard.http_protocol``, ``guard.ws_protocol``) that uvicorn takes as
``http=`` and ``ws=`` and that report to one ConnectionGuard, plus one sweep timer on the event loop (a fraction
of the shortest deadline, at most 1 s) that enforces the deadlines while any connection is open.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, ClassVar

import h11
from uvicorn.protocols.http.flow_control import service_unavailable
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.protocol import State

from lcm_live.studio.transport_ends import (  # noqa: F401 (set_tls_handshake_timeout: serve imports it from here)
    release_free_memory,
    reset,
    set_tls_handshake_timeout,
)

log = logging.getLogger("lcm_live.studio.connections")

# Paths a connection over the caps may still ask for: liveness, readiness and metrics are never starved.
PROBE_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
TRIM_AFTER_BYTES = 256 * 1024  # aborting a connection with this much unsent: release_free_memory at the next sweep
REPORT_EVERY_S = 10.0  # at most one log line per this many seconds about what the guard closed
# A connection is shed for a newer one only after waiting this long for a request: a younger one may have its
# request on the way (a client sends it right after connecting), and dropping that would fail a legitimate client.
SHED_MIN_IDLE_S = 1.0


@dataclass(frozen=True)
class ConnectionLimits:
    """The guard's deadlines (seconds) and caps; `from_settings` reads them from StudioSettings."""

    header_timeout_s: float = 5.0
    body_timeout_s: float = 30.0
    write_timeout_s: float = 30.0
    close_timeout_s: float = 3.0
    max_connections: int = 256
    max_per_client: int = 32
    probe_reserve: int = 16

    @classmethod
    def from_settings(cls, studio: Any) -> ConnectionLimits:
        return cls(header_timeout_s=studio.request_header_timeout_s, body_timeout_s=studio.request_body_timeout_s,
                   write_timeout_s=studio.write_timeout_s, close_timeout_s=studio.close_timeout_s,
                   max_connections=studio.max_connections, max_per_client=studio.max_connections_per_client,
                   probe_reserve=studio.probe_reserve_connections)


def client_key(transport: asyncio.BaseTransport) -> str:
    """Who a connection counts against: its IPv4 address, or its IPv6 /64 (one host holds a whole /64)."""
    peer = transport.get_extra_info("peername")
    host = peer[0] if isinstance(peer, tuple | list) and peer else str(peer)
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host  # a unix socket path, or nothing
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


@dataclass(eq=False)
class _Conn:
    transport: asyncio.BaseTransport
    protocol: Any
    client: str
    sock: Any = None  # the TCP socket, kept: a TLS transport closed twice lets go of its own
    websocket: bool = False
    probes_only: bool = False
    idle_since: float | None = None  # waiting for a request head since (None: a request or a WebSocket is on)
    busy_since: float | None = None  # the current request's head arrived at
    closing_since: float | None = None  # first seen closing at
    write_paused_since: float | None = None


class ConnectionGuard:
    """Open connections by transport and by client, the caps on admission, and the sweep that enforces deadlines.
    Lives on the event loop (no locks); one per server."""

    def __init__(self, limits: ConnectionLimits, clock=time.monotonic):
        self.limits = limits
        self.clock = clock
        self.conns: dict[asyncio.BaseTransport, _Conn] = {}
        self.by_client: dict[str, dict[asyncio.BaseTransport, _Conn]] = {}
        self.closed = Counter()  # why the guard closed or limited connections, since the start
        self._reported = Counter()
        self._last_report = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._trim_due = False
        shortest = min(limits.header_timeout_s, limits.body_timeout_s, limits.write_timeout_s, limits.close_timeout_s)
        self.sweep_every_s = min(1.0, max(0.05, shortest / 5))
        guard = self
        self.http_protocol: type[GuardedH11Protocol] = type(
            "StudioH11Protocol", (GuardedH11Protocol,), {"guard": guard})
        self.ws_protocol: type[GuardedWebSocketProtocol] = type(
            "StudioWebSocketProtocol", (GuardedWebSocketProtocol,), {"guard": guard})

    # -- bookkeeping, called by the protocols --

    def admit(self, protocol: Any, transport: asyncio.BaseTransport) -> _Conn | None:
        """A new connection: tracked and waiting for its first request, or probes only, or (None) closed."""
        lim = self.limits
        conn = _Conn(transport, protocol, client_key(transport), transport.get_extra_info("socket"),
                     idle_since=self.clock())
        mine = self.by_client.get(conn.client, {})
        if len(mine) >= lim.max_per_client and not self._shed(mine.values(), "client_cap", min_idle_s=0.0):
            self.closed["refused_client_cap"] += 1  # all its share busy: it competes only with itself
            transport.abort()
            self._schedule()
            return None
        if len(self.conns) >= lim.max_connections and not self._shed(self.conns.values(), "server_cap"):
            conn.probes_only = True
        if (len(self.conns) >= lim.max_connections + lim.probe_reserve
                and not self._shed(self.conns.values(), "reserve", min_idle_s=0.0)):
            self.closed["refused"] += 1
            transport.abort()
            self._schedule()
            return None
        if conn.probes_only:
            self.closed["probes_only"] += 1
        self.conns[transport] = conn
        self.by_client.setdefault(conn.client, {})[transport] = conn
        self._schedule()
        return conn

    def forget(self, transport: asyncio.BaseTransport) -> None:
        conn = self.conns.pop(transport, None)
        if conn is not None:
            mine = self.by_client.get(conn.client)
            if mine is not None:
                mine.pop(transport, None)
                if not mine:
                    del self.by_client[conn.client]

    def upgraded(self, protocol: Any, transport: asyncio.BaseTransport) -> None:
        """The connection became a WebSocket: no request deadlines now (pings and the close deadline apply)."""
        conn = self.conns.get(transport)
        if conn is not None:
            conn.protocol, conn.websocket, conn.idle_since, conn.busy_since = protocol, True, None, None

    def request_started(self, transport: asyncio.BaseTransport) -> None:
        conn = self.conns.get(transport)
        if conn is not None:
            conn.idle_since, conn.busy_since = None, self.clock()

    def request_done(self, transport: asyncio.BaseTransport) -> None:
        conn = self.conns.get(transport)
        if conn is not None:
            conn.idle_since, conn.busy_since = self.clock(), None

    def write_paused(self, transport: asyncio.BaseTransport, paused: bool) -> None:
        conn = self.conns.get(transport)
        if conn is not None:
            conn.write_paused_since = self.clock() if paused else None

    # -- enforcement --

    def _shed(self, candidates, reason: str, min_idle_s: float = SHED_MIN_IDLE_S) -> bool:
        """Close the connection among ``candidates`` that has waited longest (at least ``min_idle_s``) for a
        request; False if there is none."""
        latest = self.clock() - min_idle_s
        idle = [c for c in candidates
                if c.idle_since is not None and c.idle_since <= latest and not c.transport.is_closing()]
        if not idle:
            return False
        oldest = min(idle, key=lambda c: c.idle_since)
        self.closed[f"shed_{reason}"] += 1
        self.forget(oldest.transport)  # counted out now; abort() calls connection_lost on the next loop turn
        reset(oldest.transport, oldest.sock)
        return True

    def _schedule(self) -> None:
        if self._timer is None and (self.conns or self._trim_due or self.closed != self._reported):
            self._timer = asyncio.get_running_loop().call_later(self.sweep_every_s, self.sweep)

    def sweep(self) -> None:
        """Enforce every deadline once (the timer calls this; tests may too)."""
        self._timer = None
        try:
            if self._trim_due:  # an abort dropped a big buffer at the last sweep: its frames are freed by now
                self._trim_due = False
                release_free_memory()
            now = self.clock()
            for conn in list(self.conns.values()):
                try:
                    self._enforce(conn, now)
                except Exception:  # one odd transport must not stop the deadlines of all the others
                    log.exception("connection guard: dropping a connection it could not check")
                    self.forget(conn.transport)
                    reset(conn.transport, conn.sock)
            self._report(now)
        finally:
            self._schedule()

    def _enforce(self, conn: _Conn, now: float) -> None:
        lim, transport = self.limits, conn.transport
        if transport.is_closing():
            if conn.closing_since is None:
                conn.closing_since = now
            elif now - conn.closing_since >= lim.close_timeout_s:
                self._abort(conn, "close_timeout")
        elif conn.write_paused_since is not None and now - conn.write_paused_since >= lim.write_timeout_s:
            self._abort(conn, "write_timeout")
        elif conn.idle_since is not None and now - conn.idle_since >= lim.header_timeout_s:
            self.closed["header_timeout"] += 1
            conn.protocol.close_idle()
        elif (conn.busy_since is not None and now - conn.busy_since >= lim.body_timeout_s
              and conn.protocol.conn.their_state is h11.SEND_BODY):
            self._abort(conn, "body_timeout")

    def _abort(self, conn: _Conn, reason: str) -> None:
        self.closed[reason] += 1
        with contextlib.suppress(Exception):  # a TLS transport closed twice has no buffer to ask about
            self._trim_due |= conn.transport.get_write_buffer_size() >= TRIM_AFTER_BYTES
        self.forget(conn.transport)
        reset(conn.transport, conn.sock)

    def _report(self, now: float) -> None:
        if now - self._last_report < REPORT_EVERY_S or self.closed == self._reported:
            return
        news = self.closed - self._reported
        self._reported, self._last_report = Counter(self.closed), now
        log.warning("connection guard: %s (%d open)",
                    ", ".join(f"{k}={v}" for k, v in sorted(news.items())), len(self.conns))


def _probes_only(app):
    """The app for a connection over the caps: PROBE_PATHS as usual, anything else 503."""
    async def guarded(scope, receive, send) -> None:
        if scope.get("path") in PROBE_PATHS:
            await app(scope, receive, send)
        else:
            await service_unavailable(scope, receive, send)
    return guarded


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol reporting to its ConnectionGuard (``guard`` is set by the guard's subclass)."""

    guard: ClassVar[ConnectionGuard]

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        conn = self.guard.admit(self, transport)
        if conn is not None and conn.probes_only:
            self.app = _probes_only(self.app)
        self._probes_only = conn is not None and conn.probes_only

    def connection_lost(self, exc: Exception | None) -> None:
        self.guard.forget(self.transport)
        super().connection_lost(exc)

    def handle_events(self) -> None:
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not cycle and self.transport.get_protocol() is self:
            self.guard.request_started(self.transport)

    def handle_websocket_upgrade(self, event: h11.Request) -> None:
        if self._probes_only:
            for part in (h11.Response(status_code=503, headers=[(b"content-length", b"0"), (b"connection", b"close")]),
                         h11.EndOfMessage()):
                self.transport.write(self.conn.send(part))
            self.transport.close()
            return
        super().handle_websocket_upgrade(event)

    def on_response_complete(self) -> None:
        self.guard.request_done(self.transport)
        super().on_response_complete()  # may start a pipelined request at once (handle_events marks it)

    def pause_writing(self) -> None:
        self.guard.write_paused(self.transport, True)
        super().pause_writing()

    def resume_writing(self) -> None:
        self.guard.write_paused(self.transport, False)
        super().resume_writing()

    def close_idle(self) -> None:
        """The request-head deadline passed: close as uvicorn's keep-alive timeout does."""
        try:
            self.timeout_keep_alive_handler()
        except h11.LocalProtocolError:
            self.transport.close()

    def shutdown(self) -> None:
        try:
            super().shutdown()
        except Exception:  # h11 in a state that cannot say ConnectionClosed: close all the same
            self.transport.close()


class GuardedWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's websockets-sansio protocol reporting to its ConnectionGuard, with a shutdown that never raises."""

    guard: ClassVar[ConnectionGuard]

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.close_timeout = self.guard.limits.close_timeout_s  # uvicorn's wait for the peer's close reply

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if transport in self.guard.conns or self.guard.admit(self, transport) is not None:
            self.guard.upgraded(self, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.guard.forget(self.transport)
        super().connection_lost(exc)

    def pause_writing(self) -> None:
        self.guard.write_paused(self.transport, True)
        super().pause_writing()

    def resume_writing(self) -> None:
        self.guard.write_paused(self.transport, False)
        super().resume_writing()

    def shutdown(self) -> None:
        try:
            if self.handshake_complete and self.initial_response is None and self.conn.state is not State.OPEN:
                # The closing handshake began (the peer's close frame came in, or ours went out): no 1012 can be
                # sent now (websockets would raise InvalidState); close, and the guard's deadline does the rest.
                self.stop_keepalive()
                self.transport.close()
                return
            super().shutdown()
        except Exception as exc:  # never out of Server.shutdown(): the other connections still get their 1012
            log.warning("WebSocket shutdown: %s: %s", type(exc).__name__, exc)
            self.transport.close()
