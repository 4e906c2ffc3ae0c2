"""Helpers for tests that need the emulator: a context manager and a controllable clock."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from emulator.server import EmulatorServer


@contextmanager
def running_emulator(*args: Any, **kwargs: Any) -> Iterator[EmulatorServer]:
    """A started :class:`EmulatorServer`, stopped on exit; same arguments as the server."""
    server = EmulatorServer(*args, **kwargs)
    server.start()
    try:
        yield server
    finally:
        server.stop()


class ManualClock:
    """A clock for ``EmulatorServer(clock=...)`` that moves only when told to."""

    def __init__(self, start: float = 1_500_000_000.0) -> None:
        self._now = start
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> float:
        with self._lock:
            self._now += seconds
            return self._now

    def set(self, now: float) -> None:
        with self._lock:
            self._now = now
