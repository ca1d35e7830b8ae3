"""The protocol's JSON error shape over HTTP: ``{"type": "error", "code", "message", "field"}``, for every status.

Whatever goes wrong while answering a request, the client gets this shape (never Starlette's plain-text 500):
``ApiError`` for the refusals the routes decide, ``internal_error_response`` for a bug, which says nothing of it.
"""

from __future__ import annotations

from fastapi.responses import JSONResponse


class ApiError(Exception):
    """An HTTP error in the protocol's JSON shape."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.field, self.headers = status, code, message, field, headers


def error_response(status: int, code: str, message: str, field: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"type": "error", "code": code, "message": message, "field": field}, status_code=status,
                        headers=headers)


def internal_error_response() -> JSONResponse:
    return error_response(500, "internal_error", "the server failed on this request (it keeps serving others): "
                          "try again, and report it if it repeats")
