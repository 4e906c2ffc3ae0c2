"""Transport-neutral request and response values, and a tiny path router.

The HTTP handler in :mod:`emulator.server` turns a socket request into a :class:`Request`,
the API and control modules turn that into a :class:`Response`; nothing else touches sockets.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from emulator.errors import MethodNotAllowedError, NotFoundError, error_envelope

if TYPE_CHECKING:
    from emulator.model import Token, User
    from emulator.state import EmulatorState


@dataclass(frozen=True)
class Request:
    method: str
    raw_path: str  # as sent, percent-encoded, no query string
    segments: tuple[str, ...]  # split on "/" first, then percent-decoded (so %2F stays inside)
    query: dict[str, str]  # first value of each parameter
    body: bytes = b""
    content_type: str = ""
    authorization: str | None = None
    base: str = ""  # "http://" + Host header

    @property
    def token(self) -> str | None:
        """The token from ``Authorization: Bearer`` or, failing that, ``auth_token``."""
        if self.authorization:
            scheme, _, value = self.authorization.partition(" ")
            if scheme.lower() == "bearer" and value.strip():
                return value.strip()
        return self.query.get("auth_token") or None


@dataclass
class Response:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = "application/json"


def json_response(status: int, payload: Any, headers: dict[str, str] | None = None) -> Response:
    body = json.dumps(payload, ensure_ascii=False).encode("utf-8")
    return Response(status, body, dict(headers or {}))


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return json_response(status, error_envelope(status, message), headers)


def empty_response(status: int = 204) -> Response:
    return Response(status)


@dataclass
class Ctx:
    """What a ``/v2`` handler gets: the request, path parameters, the caller and the time.
    Handlers put extra headers (flood control) in ``headers``; they survive errors too."""

    state: EmulatorState
    req: Request
    params: dict[str, str]
    now: float
    token: Token | None = None
    user: User | None = None
    headers: dict[str, str] = field(default_factory=dict)


H = TypeVar("H")


@dataclass(frozen=True)
class Route(Generic[H]):
    method: str
    pattern: tuple[str, ...]
    handler: H
    scopes: tuple[str, ...] = ()  # any one of these; () = no token needed

    @classmethod
    def of(cls, method: str, path: str, handler: H, scopes: tuple[str, ...] = ()) -> Route[H]:
        return cls(method, tuple(path.strip("/").split("/")), handler, scopes)

    def bind(self, segments: Sequence[str]) -> dict[str, str] | None:
        if len(segments) != len(self.pattern):
            return None
        params: dict[str, str] = {}
        for want, got in zip(self.pattern, segments, strict=True):
            if want.startswith("{"):
                if not got:
                    return None
                params[want[1:-1]] = got
            elif want != got:
                return None
        return params


def match(
    routes: Sequence[Route[H]], method: str, segments: Sequence[str]
) -> tuple[Route[H], dict[str, str]]:
    """The first route whose path and method fit. A path that fits only with another
    method raises 405; no fit at all raises 404. Literal routes must come before
    parameterised ones that overlap them (``history/latest`` before ``history/{id}``)."""
    allowed: list[str] = []
    for route in routes:
        params = route.bind(segments)
        if params is None:
            continue
        if route.method == method:
            return route, params
        allowed.append(route.method)
    if allowed:
        raise MethodNotAllowedError(f"Method {method} not allowed", tuple(dict.fromkeys(allowed)))
    raise NotFoundError("Resource not found")


Handler = Callable[[Ctx], Response]
