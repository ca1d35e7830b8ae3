"""No credential reaches a log (issue: ``WebSocket /ws?token=...`` was logged unredacted)."""

from __future__ import annotations

import io
import logging

import pytest

from lcm_live.studio.redact import RedactCredentials, install, redact

TOKEN = "s3cr3t-token-for-tests-0123456789abcdef"


@pytest.mark.parametrize("text", [
    f'127.0.0.1:5555 - "WebSocket /ws?token={TOKEN}" 403',
    f'"GET /?a=1&token={TOKEN}&b=2 HTTP/1.1" 303',
    f"Authorization: Bearer {TOKEN}",
    f"cookie: lcm_live_token={TOKEN}; other=1",
    f"something quoted the token itself: {TOKEN}.",
])
def test_every_form_of_the_credential_is_masked(text):
    out = redact(text, TOKEN)
    assert TOKEN not in out and "***" in out


def test_redaction_without_knowing_the_token():
    assert redact("/ws?token=abc&x=1") == "/ws?token=***&x=1"
    assert redact("authorization: bearer abc.def") == "authorization: bearer ***"
    assert redact("lcm_live_token=abc") == "lcm_live_token=***"
    assert redact("a prompt about tokens=3") == "a prompt about tokens=3"  # only the parameter named token


def test_installed_filter_masks_uvicorn_records_args_and_tracebacks():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger("uvicorn.error")
    old_handlers, old_propagate, old_level = logger.handlers[:], logger.propagate, logger.level
    logger.handlers, logger.propagate = [handler], False
    logger.setLevel(logging.INFO)
    try:
        install(TOKEN, ("broadcast-key-0123456789abcdef",))
        assert any(isinstance(f, RedactCredentials) for f in handler.filters)
        # as uvicorn's access log writes a request line: the broadcast key is in the path
        logger.info('%s - "%s %s HTTP/%s" %d', "127.0.0.1:5555", "GET", "/broadcast/broadcast-key-0123456789abcdef.jpg",
                    "1.1", 200)
        # as uvicorn's websockets protocol logs a handshake: the path with its query string in the args
        logger.info('%s - "WebSocket %s" %s', "127.0.0.1:5555", f"/ws?token={TOKEN}", 403)
        try:
            raise ValueError(f"bad header Authorization: Bearer {TOKEN}")
        except ValueError:
            logger.exception("while reading %s", f"/?token={TOKEN}")
    finally:
        logger.handlers, logger.propagate = old_handlers, old_propagate
        logger.setLevel(old_level)
    text = stream.getvalue()
    assert "WebSocket /ws?token=***" in text and "Traceback" in text
    assert TOKEN not in text
    assert "GET /broadcast/***.jpg" in text and "broadcast-key-0123456789abcdef" not in text
