"""Errors the emulator answers with. Each carries the HTTP status of its error envelope.

::

    ApiError                    root: ``status`` + ``message`` become ``{"error": {...}}``
    ├── BadRequestError         400 (also a ValueError, for Python callers of the control API)
    ├── UnauthorizedError       401
    ├── ForbiddenError          403
    ├── NotFoundError           404 (also a LookupError)
    ├── MethodNotAllowedError   405
    └── TooManyRequestsError    429
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any


def reason_phrase(status: int) -> str:
    """The HTTP reason phrase HipChat put in the envelope's ``type`` ("Not Found", ...)."""
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def error_envelope(status: int, message: str) -> dict[str, Any]:
    return {"error": {"code": status, "message": message, "type": reason_phrase(status)}}


class ApiError(Exception):
    status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequestError(ApiError, ValueError):
    status = 400


class UnauthorizedError(ApiError):
    status = 401


class ForbiddenError(ApiError):
    status = 403


class NotFoundError(ApiError, LookupError):
    status = 404


class MethodNotAllowedError(ApiError):
    status = 405

    def __init__(self, message: str, allowed: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.allowed = allowed


class TooManyRequestsError(ApiError):
    status = 429
