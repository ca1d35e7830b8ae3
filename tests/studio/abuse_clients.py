"""Raw-socket clients for the connection-abuse suite: idle and slow-header sockets, a hand-made WebSocket that can
stop reading or answering pings, or send its close frame and never read again, from any 127.0.0.x address; and
what the server process itself holds (psutil), measured rather than guessed from the client side."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import socket
import statistics
import struct
import time
from pathlib import Path

import psutil

from lcm_live.bench.local_http import http_get


def tcp(port: int, source: str = "127.0.0.1", rcvbuf: int | None = None) -> socket.socket:
    """A connected socket from ``source`` (any 127.0.0.x is this machine: one "client address" each)."""
    sock = socket.socket()
    if rcvbuf is not None:  # before connect: a small window the server fills at once
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    return sock


def closed_by_server(sock: socket.socket) -> bool:
    """Whether the server closed (or reset) this socket; never blocks."""
    sock.setblocking(False)
    try:
        while chunk := sock.recv(65536):
            del chunk  # a response or frames: drain and look again
        return True
    except BlockingIOError:
        return False
    except OSError:
        return True
    finally:
        sock.setblocking(True)


def close_all(socks) -> None:
    for sock in socks:
        with contextlib.suppress(OSError):
            sock.close()


def server_connections(pid: int, port: int) -> list:
    """The server process's TCP connections on its listening port (ESTABLISHED or closing), from the kernel."""
    return [c for c in psutil.Process(pid).net_connections(kind="tcp")
            if c.laddr and c.laddr.port == port and c.raddr]


def held_from(pid: int, port: int, source: str) -> int:
    return sum(1 for c in server_connections(pid, port) if c.raddr.ip == source)


def kernel_send_queue(port: int, client_port: int) -> int:
    """Bytes the server's socket to ``client_port`` has queued in the kernel, unsent or unacknowledged (Linux)."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if (int(fields[1].rsplit(":", 1)[1], 16), int(fields[2].rsplit(":", 1)[1], 16)) == (port, client_port):
            return int(fields[4].split(":")[0], 16)
    return 0


def rss_mb(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


def probe(base: str, n: int = 10, path: str = "/healthz") -> dict:
    """``n`` GETs on fresh connections from 127.0.0.1: every status, and the latencies in ms."""
    statuses, times = [], []
    for _ in range(n):
        t0 = time.perf_counter()
        try:
            status = http_get(base + path, timeout=5)[0]
        except OSError as exc:
            status = type(exc).__name__
        times.append((time.perf_counter() - t0) * 1000)
        statuses.append(status)
    return {"statuses": statuses, "p50_ms": round(statistics.median(times), 1), "max_ms": round(max(times), 1)}


# -- a hand-made WebSocket client (it never answers pings and reads only when told to) --

def _frame(opcode: int, payload: bytes) -> bytes:
    mask = os.urandom(4)
    n = len(payload)
    head = bytes([0x80 | opcode])
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 65536:
        head += bytes([0x80 | 126]) + struct.pack("!H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", n)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


class RawWebSocket:
    """A WebSocket over a raw socket with a small receive buffer: after the handshake it reads nothing unless
    asked, so it answers no ping and the server's frames pile up in the server's buffers."""

    def __init__(self, port: int, source: str = "127.0.0.1", rcvbuf: int = 4096):
        self.sock = tcp(port, source, rcvbuf)
        self.local_port = self.sock.getsockname()[1]
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n")
                          .encode())
        self.sock.settimeout(10)
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(1)
            assert chunk, "closed during the handshake"
            head += chunk
        self.status = int(head.split(b" ", 2)[1])

    def stall(self, port: int, message: dict, most: int = 60) -> int:
        """Send ``message`` (params for big frames, the seed varied) every 0.1 s, reading nothing, until the
        server's kernel send queue to us stops growing: the next frames wait in the server process itself.
        Returns the bytes queued in the kernel."""
        queued, flat = 0, 0
        for seed in range(most):
            self.send_json({**message, "seed": 1000 + seed})
            time.sleep(0.1)
            now = kernel_send_queue(port, self.local_port)
            flat = flat + 1 if 0 < now <= queued else 0
            queued = max(queued, now)
            if flat >= 5:
                return queued
        raise AssertionError(f"the server's send queue kept growing ({queued} bytes)")

    def send_json(self, message: dict) -> None:
        self.sock.sendall(_frame(0x1, json.dumps(message).encode()))

    def send_close(self, code: int = 1000) -> None:
        self.sock.sendall(_frame(0x8, struct.pack("!H", code)))

    def close(self) -> None:
        close_all([self.sock])
