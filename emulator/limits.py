"""Fixed-window counters for the API rate limit and flood control (reference §5).

A window opens at a key's first hit and lasts ``window_seconds``; ``reset_at`` is its end in
epoch seconds. Every hit counts, refused ones included, as HipChat counted 4xx answers.
Not locked: :class:`emulator.state.EmulatorState` calls it under its lock.
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class WindowStats:
    limit: int
    remaining: int
    reset_at: float
    allowed: bool

    def headers(self, prefix: str, *, reset_seconds: int | None = None) -> dict[str, str]:
        """``{prefix}-Limit/-Remaining/-Reset``; with ``reset_seconds`` (the quirk, ``60`` as
        seen on real 429s) the reset is that number instead of the window's end as an epoch."""
        reset = str(reset_seconds) if reset_seconds is not None else str(math.ceil(self.reset_at))
        return {
            f"{prefix}-Limit": str(self.limit),
            f"{prefix}-Remaining": str(self.remaining),
            f"{prefix}-Reset": reset,
        }

    def exhausted(self) -> WindowStats:
        return WindowStats(self.limit, 0, self.reset_at, allowed=False)


class FixedWindow:
    def __init__(self, limit: int, window_seconds: float) -> None:
        if limit < 0 or window_seconds <= 0:
            raise ValueError("limit must be >= 0 and window_seconds > 0")
        self.limit = limit
        self.window_seconds = window_seconds
        self._windows: dict[Hashable, tuple[float, int]] = {}  # key -> (window start, hits)

    def hit(self, key: Hashable, now: float) -> WindowStats:
        start, hits = self._windows.get(key, (now, 0))
        if now >= start + self.window_seconds:
            start, hits = now, 0
        hits += 1
        self._windows[key] = (start, hits)
        return WindowStats(
            self.limit, max(0, self.limit - hits), start + self.window_seconds, hits <= self.limit
        )

    def clear(self) -> None:
        self._windows.clear()
