"""One exception tree for the whole project, grouped by what the caller must do.

::

    HipChatPollerError                 root: catch this to catch everything of ours
    ├── RetryLater                     try the same thing again after ``retry_after`` seconds
    │   ├── RateLimited                HipChat said 429 (API rate limit or flood control)
    │   ├── BucketEmpty                our own per-connection token bucket is empty
    │   ├── ServerError                HipChat answered 5xx
    │   ├── TransportError             timeout, connection refused/reset, TLS failure
    │   ├── MalformedResponse          a 2xx whose body is not the JSON we expect
    │   └── StorageUnavailable         Redis or the database could not be reached
    ├── NeedsAttention                 stop and tell a person; retrying will not help
    │   ├── AuthFailed                 401: the token is bad, expired or revoked
    │   ├── Forbidden                  403: the token lacks a scope
    │   └── NotFound                   404: unknown room, user or message
    └── InvalidInput                   reject the input; the caller must change it
        ├── BadRequest                 HipChat answered 400 (message too long, ...)
        └── ValidationError            we refused it before calling anyone (bad regex,
                                       bad colour, bad template, bad recipes file)

It lives in ``storage``, the lowest layer, so that every layer (storage, tasks, worker) raises
and catches the same classes while imports still flow one way: worker -> tasks -> storage.

Third-party errors are translated into this tree in exactly one place each, with
``raise ... from``: requests in :mod:`tasks.client_http`, redis in :mod:`tasks.redis_conn`,
SQLAlchemy in :mod:`storage.db`.

No message built here ever contains a token: callers pass what they know (status,
room, path without query string) and the text is composed from that.
"""

from __future__ import annotations

from typing import Any

DEFAULT_RETRY_AFTER_SECONDS = 5.0


def _rebuild(cls: type[HipChatPollerError], message: str, state: dict[str, Any]) -> Any:
    error = cls.__new__(cls)
    Exception.__init__(error, message)
    error.__dict__.update(state)
    return error


class HipChatPollerError(Exception):
    """Root of every error this project raises on purpose.

    Errors cross process boundaries (Celery pickles a task's exception into its retry and its
    result), so each one pickles with its attributes: ``__reduce__`` rebuilds it from the
    message and then restores ``__dict__``.
    """

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), str(self), self.__dict__))


class RetryLater(HipChatPollerError):
    """The operation may succeed if tried again after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: float = DEFAULT_RETRY_AFTER_SECONDS) -> None:
        super().__init__(message)
        self.retry_after = max(0.0, float(retry_after))


class RateLimited(RetryLater):
    """HipChat answered 429. ``flood_control`` tells a per-room send limit from the API limit."""

    def __init__(
        self,
        message: str,
        retry_after: float = DEFAULT_RETRY_AFTER_SECONDS,
        *,
        flood_control: bool = False,
    ) -> None:
        super().__init__(message, retry_after)
        self.flood_control = flood_control


class BucketEmpty(RetryLater):
    """The connection's shared token bucket has no token; ``retry_after`` is exact."""


class ServerError(RetryLater):
    """HipChat answered with a 5xx status."""

    def __init__(self, message: str, status: int = 500, retry_after: float = 5.0) -> None:
        super().__init__(message, retry_after)
        self.status = status


class TransportError(RetryLater):
    """The request did not complete: timeout, refused or reset connection."""


class MalformedResponse(RetryLater):
    """HipChat answered 2xx with a body we cannot use (bad JSON, missing keys)."""


class StorageUnavailable(RetryLater):
    """Redis or the SQL database could not be reached."""


class NeedsAttention(HipChatPollerError):
    """A person must act (fix the token, the scope, the room name) before this can work."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class AuthFailed(NeedsAttention):
    """HipChat answered 401: the token is invalid, expired or revoked."""


class Forbidden(NeedsAttention):
    """HipChat answered 403: the token lacks a scope this call needs."""


class NotFound(NeedsAttention):
    """HipChat answered 404: the room, user or message does not exist."""


class InvalidInput(HipChatPollerError):
    """The input is wrong; sending it again unchanged will fail again."""


class BadRequest(InvalidInput):
    """HipChat answered 400 (or 405): it refused the request as sent."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class ValidationError(InvalidInput):
    """We refused the input ourselves, before any call. ``errors`` lists every problem."""

    def __init__(self, message: str, errors: list[str] | None = None) -> None:
        super().__init__(message)
        self.errors = list(errors) if errors else [message]
