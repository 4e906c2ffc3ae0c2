"""Injected faults: scripted failures for the next N matching ``/v2`` calls.

Kinds:

* ``status``: answer ``status`` (500, 502, 503, ...) with the error envelope.
* ``delay``: sleep ``delay_seconds`` (real time), then serve normally.
* ``reset``: close the connection without answering (TCP RST).
* ``malformed_json``: run the call, then answer 200 with a body that is not JSON.
* ``truncated_json``: run the call, then answer 200 with the real body cut in half
  (``Content-Length`` matches the cut body).
* ``rate_limit``: answer 429 "Rate Limit exceeded" with ``X-Ratelimit-Remaining: 0``.
* ``reset_quirk``: a modifier, not an answer: the next responses carry
  ``X-Ratelimit-Reset: 60`` (``reset_seconds``) instead of an epoch. Combine it with
  ``rate_limit`` for the real-world 429 quirk.

A call takes at most one answer fault (the oldest that matches) plus at most one
``reset_quirk``; each use consumes one of the fault's ``count``. Not locked:
:class:`emulator.state.EmulatorState` calls it under its lock.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from emulator.errors import BadRequestError

ANSWER_KINDS = ("status", "delay", "reset", "malformed_json", "truncated_json", "rate_limit")
FAULT_KINDS = (*ANSWER_KINDS, "reset_quirk")
MALFORMED_BODY = b"<html><body><h1>502 Bad Gateway</h1></body></html>\n"


@dataclass
class Fault:
    kind: str
    remaining: int
    path_prefix: str | None = None
    method: str | None = None
    status: int = 503
    delay_seconds: float = 0.0
    reset_seconds: int = 60  # reset_quirk: the number sent as X-Ratelimit-Reset

    def matches(self, method: str, path: str) -> bool:
        if self.method is not None and self.method != method:
            return False
        return self.path_prefix is None or path.startswith(self.path_prefix)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def truncate(body: bytes) -> bytes:
    return body[: len(body) // 2]


class FaultPlan:
    def __init__(self) -> None:
        self._faults: list[Fault] = []

    def add(
        self,
        kind: str,
        *,
        count: int = 1,
        path_prefix: str | None = None,
        method: str | None = None,
        status: int = 503,
        delay_seconds: float = 0.0,
        reset_seconds: int = 60,
    ) -> Fault:
        if kind not in FAULT_KINDS:
            raise BadRequestError(f"unknown fault kind {kind!r}; one of {', '.join(FAULT_KINDS)}")
        if count < 1:
            raise BadRequestError("count must be at least 1")
        if not 100 <= status <= 599:
            raise BadRequestError("status must be an HTTP status code")
        if delay_seconds < 0:
            raise BadRequestError("delay_seconds must not be negative")
        if not 0 <= reset_seconds < 1_000_000_000:  # 1e9 and above would read as an epoch
            raise BadRequestError("reset_seconds must be within 0..999999999")
        fault = Fault(
            kind,
            count,
            path_prefix,
            method.upper() if method else None,
            status,
            delay_seconds,
            reset_seconds,
        )
        self._faults.append(fault)
        return fault

    def take(self, method: str, path: str) -> tuple[Fault | None, int | None]:
        """The answer fault for this call (or None), and the seconds the reset quirk sends
        as ``X-Ratelimit-Reset`` (None: no quirk, the reset is an epoch)."""
        answer = self._consume(method, path, quirk=False)
        quirk = self._consume(method, path, quirk=True)
        return answer, None if quirk is None else quirk.reset_seconds

    def _consume(self, method: str, path: str, *, quirk: bool) -> Fault | None:
        for fault in self._faults:
            if (fault.kind == "reset_quirk") == quirk and fault.matches(method, path):
                fault.remaining -= 1
                if fault.remaining <= 0:
                    self._faults.remove(fault)
                return fault
        return None

    def pending(self) -> list[Fault]:
        return list(self._faults)

    def clear(self) -> None:
        self._faults.clear()
