"""Credentials never reach a log: query strings (``?token=``), ``Authorization`` headers, the token cookie, and
the token itself wherever it appears (a URL, a header echoed in an error, a traceback), and so do other secrets the
server holds (the broadcast key, which is in its URLs' path: studio/broadcast.py).

uvicorn logs WebSocket handshakes on ``uvicorn.error`` (``"WebSocket /ws?token=..." 403``) and requests on
``uvicorn.access``; the studio logs on ``lcm_live``. A filter on a *logger* sees only records made on that very
logger, so :func:`install` puts :class:`RedactCredentials` on the *handlers* that every record ends in.
"""

from __future__ import annotations

import logging
import re

from lcm_live.studio.security import COOKIE_NAME

MASK = "***"
_PATTERNS = (
    re.compile(r"((?:^|[?&;\s\"'])(?:access_)?token=)[^&\s\"';]+", re.IGNORECASE),
    re.compile(r"(\bbearer\s+)[^\s\"',;]+", re.IGNORECASE),
    re.compile(rf"({re.escape(COOKIE_NAME)}=)[^;\s\"',]+"),
)


def redact(text: str, token: str | None = None, *others: str) -> str:
    """``text`` with every credential in it replaced by ***: the token, the ``others`` and the patterns above."""
    for secret in (token, *others):
        if secret:
            text = text.replace(secret, MASK)
    for pattern in _PATTERNS:
        text = pattern.sub(rf"\g<1>{MASK}", text)
    return text


class RedactCredentials(logging.Filter):
    """Rewrites a record's message (and its traceback text) with its credentials masked; drops nothing."""

    def __init__(self, token: str | None = None, others: tuple[str, ...] = ()):
        super().__init__()
        self.secrets = (token, *others)
        self._formatter = logging.Formatter()

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a record whose args do not fit its message: leave it to the handler to report
            return True
        if isinstance(record.args, tuple):  # formatters that unpack args (uvicorn's access log) keep their tuple
            record.msg = redact(str(record.msg), *self.secrets)
            record.args = tuple(redact(a, *self.secrets) if isinstance(a, str) else a for a in record.args)
        else:
            record.msg, record.args = redact(message, *self.secrets), None
        if record.exc_info and not record.exc_text:
            record.exc_text = self._formatter.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text, *self.secrets)
        return True


LOGGERS = ("", "uvicorn", "uvicorn.error", "uvicorn.access", "lcm_live")


def install(token: str | None, others: tuple[str, ...] = ()) -> RedactCredentials:
    """Put one filter on every handler of the loggers the server writes through (call once logging is set up);
    ``others``: more secrets to mask (the broadcast key)."""
    flt = RedactCredentials(token, others)
    for name in LOGGERS:
        for handler in logging.getLogger(name).handlers:
            if not any(isinstance(f, RedactCredentials) for f in handler.filters):
                handler.addFilter(flt)
    return flt
