"""Waiting on a condition, the one way tests synchronise: never a bare sleep."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(
    condition: Callable[[], T],
    timeout: float,
    what: str,
    *,
    step: float = 0.1,
    describe: Callable[[], str] | None = None,
) -> T:
    """Call ``condition`` until it returns something truthy; return that value.

    On timeout, fail with ``what`` and, if given, ``describe()`` (the state that matters)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            detail = f"\n{describe()}" if describe is not None else ""
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}{detail}")
        time.sleep(step)
