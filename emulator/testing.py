"""Helpers for tests that need the emulator: a context manager and a controllable clock."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from emulator.server import EmulatorServer


@contextmanager
def running_emulator(
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    admin_token: str = "admin-token",  # noqa: S107 - a fixture value, not a secret
    seed: bool = True,
    rate_limit: int = 100,
    rate_window_seconds: float = 300.0,
    flood_limit: int = 30,
    flood_window_seconds: float = 60.0,
    case_insensitive_rooms: bool = False,
    clock: Callable[[], float] | None = None,
) -> Iterator[EmulatorServer]:
    """A started :class:`EmulatorServer`, stopped on exit; same arguments as the server."""
    server = EmulatorServer(
        host,
        port,
        admin_token=admin_token,
        seed=seed,
        rate_limit=rate_limit,
        rate_window_seconds=rate_window_seconds,
        flood_limit=flood_limit,
        flood_window_seconds=flood_window_seconds,
        case_insensitive_rooms=case_insensitive_rooms,
        clock=clock,
    )
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
