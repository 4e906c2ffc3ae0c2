"""The call log: one record per ``/v2`` request, for assertions on what a client did.

Control-API (``/_emulator``) requests are not logged. Not locked:
:class:`emulator.state.EmulatorState` calls it under its lock.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

MAX_CALLS = 1_000_000  # oldest records drop off beyond this, so long benchmarks stay bounded


@dataclass(frozen=True, slots=True)
class CallRecord:
    """``token`` is the one the call presented (header or ``auth_token``), or None; ``path``
    is the raw path without the query string; ``query`` leaves out ``auth_token``; ``status``
    is 0 when the connection was closed without an answer (the ``reset`` fault);
    ``ratelimit_reset`` is the ``X-Ratelimit-Reset`` the answer carried, as sent (an epoch, or
    seconds under the ``reset_quirk`` fault; None without an answer)."""

    token: str | None
    method: str
    path: str
    query: dict[str, str]
    status: int
    time: float
    ratelimit_reset: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "token": self.token,
            "method": self.method,
            "path": self.path,
            "query": dict(self.query),
            "status": self.status,
            "time": self.time,
            "ratelimit_reset": self.ratelimit_reset,
        }


class CallLog:
    def __init__(self) -> None:
        self._records: deque[CallRecord] = deque(maxlen=MAX_CALLS)

    def append(self, record: CallRecord) -> None:
        self._records.append(record)

    def select(
        self,
        *,
        token: str | None = None,
        since: float | None = None,
        until: float | None = None,
        path_prefix: str | None = None,
        method: str | None = None,
    ) -> list[CallRecord]:
        """Records in arrival order; ``since`` and ``until`` are both inclusive."""
        wanted = method.upper() if method else None
        return [
            r
            for r in self._records
            if (token is None or r.token == token)
            and (since is None or r.time >= since)
            and (until is None or r.time <= until)
            and (path_prefix is None or r.path.startswith(path_prefix))
            and (wanted is None or r.method == wanted)
        ]

    def clear(self) -> None:
        self._records.clear()
