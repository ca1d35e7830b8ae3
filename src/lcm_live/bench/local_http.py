"""Loopback helpers for the benchmarks that start a studio (and for the tests that do the same): a free port, a GET
that returns any HTTP status instead of raising on it, and a stop for the server process."""

from __future__ import annotations

import signal
import socket
import subprocess
import urllib.error
import urllib.request


def free_port() -> int:
    """A TCP port nobody listens on at this moment (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """(status, body) of a GET; raises OSError only when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as res:
            return res.status, res.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def stop_process(proc: subprocess.Popen, timeout: float = 20.0) -> int:
    """SIGTERM (a graceful shutdown), then SIGKILL if it is still running after ``timeout``; its exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode
