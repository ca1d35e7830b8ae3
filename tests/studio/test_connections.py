"""The connection guard's rules on fake transports and a fake clock (fast; the abuse suite runs them for real)."""

from __future__ import annotations

import asyncio

import h11
import pytest

from lcm_live.studio.connections import ConnectionGuard, ConnectionLimits, client_key


class FakeTransport:
    def __init__(self, host: str = "127.0.0.1", buffered: int = 0):
        self.peer = (host, 40000)
        self.closing = self.aborted = False
        self.buffered = buffered

    def get_extra_info(self, name, default=None):
        return self.peer if name == "peername" else default

    def is_closing(self) -> bool:
        return self.closing or self.aborted

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.aborted = True

    def get_write_buffer_size(self) -> int:
        return self.buffered


class FakeProtocol:
    def __init__(self, transport: FakeTransport):
        self.conn = h11.Connection(h11.SERVER)
        self.transport = transport
        self.closed_idle = False

    def close_idle(self) -> None:
        self.closed_idle = True
        self.transport.close()


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


LIMITS = ConnectionLimits(header_timeout_s=5, body_timeout_s=30, write_timeout_s=30, close_timeout_s=3,
                          max_connections=4, max_per_client=2, probe_reserve=2)


@pytest.fixture
def guarded():
    """(guard, clock, open(host) -> (conn or None, transport)) inside a running loop (the sweep timer needs one)."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    clock = Clock()
    guard = ConnectionGuard(LIMITS, clock=clock)

    def open_(host: str = "127.0.0.1", **kw):
        transport = FakeTransport(host, **kw)

        async def admit():
            return guard.admit(FakeProtocol(transport), transport)

        return loop.run_until_complete(admit()), transport

    async def sweep():
        guard.sweep()

    guard.sweep_now = lambda: loop.run_until_complete(sweep())
    yield guard, clock, open_
    loop.close()
    asyncio.set_event_loop(None)


def test_one_address_loses_its_own_oldest_idle_connection_then_is_refused(guarded):
    guard, clock, open_ = guarded
    (_, first), (_, second) = open_("10.0.0.1"), open_("10.0.0.1")
    clock.now += 0.1
    conn, third = open_("10.0.0.1")
    assert first.aborted and not second.aborted and conn is not None  # its own oldest went, however young
    guard.request_started(second)
    guard.request_started(third)
    conn, fourth = open_("10.0.0.1")  # all its share busy: the newcomer goes
    assert conn is None and fourth.aborted
    assert len(guard.by_client["10.0.0.1"]) == 2 and guard.closed["refused_client_cap"] == 1


def test_the_server_cap_sheds_idle_for_a_second_else_admits_probes_only_then_refuses(guarded):
    guard, clock, open_ = guarded
    olds = [open_(f"10.0.0.{i}")[1] for i in range(4)]
    conn, _ = open_("10.0.1.1")  # all four idle for less than a second: probes only
    assert conn.probes_only and not any(t.aborted for t in olds)
    clock.now += 1.5
    conn, _ = open_("10.0.1.2")
    assert not conn.probes_only and olds[0].aborted  # the oldest idle one made room
    for t in list(guard.conns):
        guard.request_started(t)
    conn, third = open_("10.0.1.3")
    assert conn.probes_only  # 5 open, all busy: the reserve
    conn, _ = open_("10.0.1.4")  # 6 open: at the hard cap the oldest idle goes, however young
    assert conn.probes_only and third.aborted
    for t in list(guard.conns):
        guard.request_started(t)
    conn, last = open_("10.0.1.5")
    assert conn is None and last.aborted  # past max_connections + probe_reserve, nothing to shed


def test_the_sweep_enforces_each_deadline(guarded):
    guard, clock, open_ = guarded
    (idle, _), (_, wt) = open_("10.0.0.1"), open_("10.0.0.2", buffered=1 << 20)
    (_, ct), (body, bt) = open_("10.0.0.3"), open_("10.0.0.4")
    guard.request_started(wt)
    guard.write_paused(wt, True)
    guard.request_started(bt)
    body.protocol.conn.receive_data(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n")
    body.protocol.conn.next_event()
    guard.request_started(ct)
    ct.close()
    clock.now += 4
    guard.sweep_now()  # the close seen
    guard.sweep_now()
    assert not ct.aborted and not idle.protocol.closed_idle
    clock.now += 4  # 8 s: header deadline (5) passed; the close deadline (3) too
    guard.sweep_now()
    assert idle.protocol.closed_idle and ct.aborted and not wt.aborted and not bt.aborted
    clock.now += 30
    guard.sweep_now()
    assert wt.aborted and bt.aborted  # writes stalled 30 s; a body still coming after 30 s
    assert {k: guard.closed[k] for k in ("close_timeout", "write_timeout", "body_timeout", "header_timeout")} == \
        {"close_timeout": 1, "write_timeout": 1, "body_timeout": 1, "header_timeout": 1}
    assert guard._trim_due  # the writer had a megabyte queued


def test_client_key_groups_an_ipv6_host_by_its_64():
    def key(host):
        return client_key(FakeTransport(host))

    assert key("192.168.1.7") == "192.168.1.7"
    assert key("2001:db8:1:2::1") == key("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    assert key("2001:db8:1:3::1") != key("2001:db8:1:2::1")
    assert key("::ffff:10.0.0.1") == "10.0.0.1"
    assert key("fe80::1%eth0") == "fe80::/64"
