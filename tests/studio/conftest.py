"""Studio test helpers: an app on a FakeEngine under TestClient, and WebSocket message readers."""

from __future__ import annotations

import contextlib
import json
import time
from typing import Any

import pytest
from fastapi.testclient import TestClient

from lcm_live.config import Settings, StudioSettings
from lcm_live.studio.app import create_app
from lcm_live.studio.fake_engine import FakeEngine

TOKEN = "t0k3n-for-tests-0123456789abcdefghijkl"


def studio_settings(**overrides: Any) -> Settings:
    overrides.setdefault("allowed_hosts", ["testserver"])  # TestClient's Host header
    # One frame per generation unless a test asks for previews (on a CPU they default on; whether a preview goes
    # out before an instant FakeEngine's final frame depends on timing)
    overrides.setdefault("default_previews", False)
    return Settings(studio=StudioSettings(**overrides))


def wait_until(predicate, timeout: float = 10.0, what: str = "condition") -> None:
    """Poll until ``predicate()`` holds (a deadline against hangs, not a speed assertion)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.005)
    raise AssertionError(f"timed out waiting for {what}")


@contextlib.contextmanager
def running_studio(engine: FakeEngine | None = None, *, wait_ready: bool = True, engine_factory=None,
                   headers: dict[str, str] | None = None, **overrides: Any):
    """Yield (client, engine, studio) with the lifespan running and (by default) the worker ready."""
    engine = engine if engine is not None else FakeEngine()
    app = create_app(studio_settings(**overrides), engine_factory or (lambda: engine))
    with TestClient(app, headers=headers) as client:
        studio = app.state.studio
        if wait_ready:
            wait_until(lambda: studio.worker.ready, what="the worker to be ready")
        yield client, engine, studio


def receive(ws) -> dict[str, Any] | bytes:
    """The next server message: a decoded JSON dict, bytes, or {"type": "close", "code": ...}."""
    message = ws.receive()
    if message["type"] == "websocket.close":
        return {"type": "close", "code": message.get("code"), "reason": message.get("reason", "")}
    if message.get("text") is not None:
        return json.loads(message["text"])
    return message["bytes"]


def next_of(ws, *types: str) -> dict[str, Any]:
    """Skip messages until a JSON message of one of ``types``; frames are returned as the info plus "_bytes"."""
    while True:
        msg = receive(ws)
        if isinstance(msg, bytes):
            raise AssertionError("a binary message without its frame info")
        if msg["type"] == "frame":
            data = receive(ws)
            assert isinstance(data, bytes), "a frame's info must be followed by one binary message"
            msg["_bytes"] = data
        if msg["type"] in types:
            return msg
        if msg["type"] == "error":
            raise AssertionError(f"error while waiting for {types}: {msg}")
        if msg["type"] == "close":
            raise AssertionError(f"closed while waiting for {types}: {msg}")


def next_final(ws) -> dict[str, Any]:
    while True:
        msg = next_of(ws, "frame", "error")
        if msg["type"] == "error" or msg["final"]:
            return msg


def params(**fields: Any) -> str:
    return json.dumps({"type": "params", **fields})


@pytest.fixture
def studio():
    with running_studio() as running:
        yield running


@pytest.fixture(scope="module")
def browser():
    """One headless Chromium per page-test module (tests/studio/chromium.py; those modules skip without it)."""
    from .chromium import chromium

    with chromium() as browser:
        yield browser
