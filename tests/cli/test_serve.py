"""`lcm-live serve`: refuses exposure without a strong token; configures uvicorn explicitly (server start mocked)."""

from __future__ import annotations

import re

import pytest
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

from lcm_live.cli import main

GOOD_TOKEN = "Zk3-q9LmP0wXr7TnB2yVc8sDf4GhJ6aE1uIo5"


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.20", "studio.example.com"])
def test_non_loopback_host_without_token_refuses_to_start(fake_uvicorn, capsys, host):
    assert main(["serve", "--host", host, "--fake-engine", "{}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "LCM_LIVE_TOKEN" in err and "32" in err and "Traceback" not in err
    assert "ran" not in fake_uvicorn


@pytest.mark.parametrize("token", ["short", "changeme", "a" * 40])
def test_weak_tokens_are_refused(fake_uvicorn, capsys, token):
    assert main(["serve", "--host", "0.0.0.0", "--token", token, "--fake-engine", "{}"]) == 2
    assert "token" in capsys.readouterr().err
    assert "ran" not in fake_uvicorn


def test_token_from_the_environment_allows_exposure(fake_uvicorn, monkeypatch, capsys):
    monkeypatch.setenv("LCM_LIVE_TOKEN", GOOD_TOKEN)
    assert main(["serve", "--host", "0.0.0.0", "--port", "7999", "--fake-engine", "{}"]) == 0
    config = fake_uvicorn["config"]
    assert fake_uvicorn["ran"]
    assert (config.host, config.port) == ("0.0.0.0", 7999)
    assert config.app.state.studio.settings.studio.token == GOOD_TOKEN
    assert f"?token={GOOD_TOKEN}" in capsys.readouterr().err


def test_loopback_default_and_uvicorn_settings(fake_uvicorn, capsys):
    assert main(["serve", "--fake-engine", "{}"]) == 0
    config = fake_uvicorn["config"]
    assert (config.host, config.port) == ("127.0.0.1", 7860)
    # websockets-sansio and h11, each with the connection guard on top (studio/connections.py)
    assert issubclass(config.ws, WebSocketsSansIOProtocol) and issubclass(config.http, H11Protocol)
    assert config.ws.guard is config.http.guard
    assert config.ws_max_queue == 8
    assert config.ws_ping_interval == 20 and config.ws_ping_timeout == 20
    assert config.timeout_graceful_shutdown == 10 and config.timeout_keep_alive == 5
    assert config.h11_max_incomplete_event_size == 16 * 1024
    assert config.limit_concurrency is None  # it counted idle sockets and starved /healthz: the guard's caps instead
    assert config.proxy_headers is False
    err = capsys.readouterr().err
    assert "http://127.0.0.1:7860/" in err
    assert re.search(r"broadcast .*: http://127\.0\.0\.1:7860/broadcast/[A-Za-z0-9_-]{24}\.mjpeg", err)


def test_wildcard_origin_is_refused(fake_uvicorn, capsys):
    assert main(["serve", "--allow-origin", "*", "--fake-engine", "{}"]) == 2
    assert "allowed_origins" in capsys.readouterr().err


def test_engine_flags_reach_the_settings(fake_uvicorn):
    assert main(["serve", "--model", "builtin:shapes", "--device", "cpu", "--max-sessions", "2",
                 "--fake-engine", "{}"]) == 0
    settings = fake_uvicorn["config"].app.state.studio.settings
    assert settings.engine.model == "builtin:shapes" and settings.engine.device == "cpu"
    assert settings.studio.max_sessions == 2
    assert settings.engine.decoder == "auto"  # live: the tiny decoder where it fits the model


def test_generate_keeps_the_full_vae_by_default():
    import argparse

    from lcm_live.cli.common import add_engine_arguments

    parser = argparse.ArgumentParser()
    add_engine_arguments(parser)
    assert parser.parse_args([]).decoder == "vae"


def test_environment_settings_are_checked_too(fake_uvicorn, monkeypatch, capsys):
    monkeypatch.setenv("LCM_LIVE_STUDIO__HOST", "0.0.0.0")
    assert main(["serve", "--fake-engine", "{}"]) == 2
    assert "--host 0.0.0.0" in capsys.readouterr().err
    monkeypatch.setenv("LCM_LIVE_STUDIO__PORT", "7123")
    assert main(["serve", "--host", "127.0.0.1", "--fake-engine", "{}"]) == 0
    assert (fake_uvicorn["config"].host, fake_uvicorn["config"].port) == ("127.0.0.1", 7123)
