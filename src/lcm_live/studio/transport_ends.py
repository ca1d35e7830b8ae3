"""Ending a connection for good, below uvicorn: a TCP reset that makes the kernel drop what it holds for the peer,
memory handed back to the OS after a dropped peer's queued megabytes, and the TLS handshake's deadline.

The connection guard (connections.py) uses the first two when it aborts a connection; `serve` sets the third once.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import socket
import struct
from typing import Any

_malloc_trim: Any = None  # glibc's malloc_trim, found on first use (False: none)


def release_free_memory() -> None:
    """glibc's malloc_trim (elsewhere nothing): a dropped peer's queued megabytes go back to the OS, not only to
    glibc's heaps (its mmap threshold adapts upward, so such blocks stop being unmapped on free)."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            _malloc_trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


def reset(transport: asyncio.BaseTransport, sock: Any = None) -> None:
    """Abort with a TCP reset, so the kernel drops what it holds for the peer too (after a plain abort() it keeps
    the orphan, megabytes for a peer that reads nothing, through minutes of zero-window probes). A TLS transport
    closed twice lets go of its TLS layer (Python 3.11) and its abort() does nothing: then the socket is shut down,
    which fails the TCP transport underneath and ends the connection all the same."""
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    detached = getattr(transport, "_ssl_protocol", False) is None
    with contextlib.suppress(Exception):
        transport.abort()
    if detached and sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


def set_tls_handshake_timeout(seconds: float) -> None:
    """A TLS handshake that has not finished in ``seconds`` is dropped. asyncio allows 60 s by default, before any
    protocol (so the guard) sees the connection, and uvicorn has no knob for it; SSLProtocol reads this constant
    when each connection is accepted, so setting it here (once, in `serve`'s process) covers every handshake."""
    import asyncio.constants

    asyncio.constants.SSL_HANDSHAKE_TIMEOUT = float(seconds)
