"""The shared per-connection budget of HipChat calls: at most C calls in ANY W seconds.

Every HipChat call by any worker first takes from this budget with one EVALSHA of
``budget_take.lua``, which decides on two Redis keys of the connection (one hash tag, one slot):

* ``Keys.budget_log``, a sorted set holding the Redis TIME (microseconds) of every call granted
  in the last W seconds. A call is granted only if fewer than C are logged in (now - W, now];
  when not, the exact wait is read off the log: the moment its oldest relevant entry leaves the
  window.
* ``Keys.budget_ceiling``, a hash {remaining, reset_at_us} from HipChat's own
  ``X-Ratelimit-Remaining`` / ``X-Ratelimit-Reset`` headers (:meth:`SlidingLogBudget.observe`) or a
  429 (:meth:`SlidingLogBudget.observe_429`): at most ``remaining`` more calls until the reset.

Why a sliding log and not a token bucket: a bucket of C tokens refilled at C/W per second lets
C calls through at once and C more while they age, nearly 2C in one window, which breaks the
promise. Putting the log in front of such a bucket closes the hole, and then the bucket never
decides anything: any call sequence with at most C calls in every W window also fits a full
bucket of C refilled at C/W (an interval of k*W + r seconds holds at most (k + 1) * C calls,
and the bucket allows C + (k + r/W) * C). So the log alone is exactly "bucket + log", with one
key and one rule fewer. Cost per call is O(log C): C is a few hundred at most.

Redis errors that mean "Redis cannot serve us now" become :class:`StorageUnavailable` in
:func:`tasks.redis_conn.redis_errors`, the one place the project translates redis-py errors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import redis

from storage.errors import BucketEmpty
from tasks.keys import Keys
from tasks.redis_conn import load_script, redis_errors


def _microseconds(seconds: float) -> int:
    return round(seconds * 1_000_000)


@dataclass(frozen=True)
class TakeResult:
    """``remaining``: calls still allowed now (after this take). ``retry_after``: 0 when
    allowed, else the exact seconds until the call would be allowed if nobody else takes."""

    allowed: bool
    remaining: float
    retry_after: float


class SlidingLogBudget:
    """At most ``capacity`` calls per connection in any ``window_seconds``, for all workers."""

    def __init__(
        self, redis: redis.Redis, keys: Keys, *, capacity: int = 100, window_seconds: float = 60.0
    ) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        if not window_seconds > 0 or math.isinf(window_seconds):
            raise ValueError("window_seconds must be a positive number")
        self.capacity = capacity
        self.window_seconds = window_seconds
        self._keys = keys
        self._window_us = max(1, _microseconds(window_seconds))
        # register_script sends nothing; the first call loads the script (EVALSHA, and on
        # NOSCRIPT, e.g. after a Redis restart, SCRIPT LOAD and EVALSHA again).
        self._take_script = redis.register_script(load_script("budget_take.lua"))
        self._ceiling_script = redis.register_script(load_script("budget_ceiling.lua"))
        self._redis = redis

    def take(self, connection_id: int, n: int = 1) -> TakeResult:
        """Take ``n`` calls if all of them fit now, else none. One round trip."""
        if not 1 <= n <= self.capacity:
            raise ValueError(f"n must be within 1..{self.capacity}, got {n}")
        return self._run(connection_id, n, take=True)

    def acquire(self, connection_id: int) -> None:
        """Take one call or raise :class:`BucketEmpty` with the exact wait."""
        result = self.take(connection_id)
        if not result.allowed:
            raise BucketEmpty(
                f"connection {connection_id} has used its HipChat call budget "
                f"({self.capacity} per {self.window_seconds:g}s or HipChat's own limit); "
                f"retry in {result.retry_after:.3f}s",
                retry_after=result.retry_after,
            )

    def peek(self, connection_id: int) -> TakeResult:
        """What :meth:`take` of one call would answer now, without taking it."""
        return self._run(connection_id, 1, take=False)

    def observe(self, connection_id: int, *, remaining: int | None, reset_at: float | None) -> None:
        """Shrink the budget to HipChat's ``remaining`` calls until ``reset_at`` (epoch
        seconds), from the X-Ratelimit-* headers. Missing headers change nothing."""
        if remaining is None or reset_at is None or not math.isfinite(reset_at):
            return
        self._set_ceiling(connection_id, max(0, remaining), reset_at, "headers")

    def observe_429(self, connection_id: int, *, reset_at: float) -> None:
        """HipChat refused a call: no call at all until ``reset_at`` (epoch seconds)."""
        if math.isfinite(reset_at):
            self._set_ceiling(connection_id, 0, reset_at, "429")

    def clear(self, connection_id: int) -> None:
        """Forget the connection's log and ceiling: the budget is full again."""
        with redis_errors("budget clear", f"connection {connection_id}"):
            self._redis.delete(
                self._keys.budget_log(connection_id), self._keys.budget_ceiling(connection_id)
            )

    def _run(self, connection_id: int, n: int, *, take: bool) -> TakeResult:
        keys = [self._keys.budget_log(connection_id), self._keys.budget_ceiling(connection_id)]
        args = [self.capacity, self._window_us, n, 1 if take else 0]
        with redis_errors("budget take" if take else "budget peek", f"connection {connection_id}"):
            allowed, remaining, wait_us = self._take_script(keys=keys, args=args)
        return TakeResult(
            allowed=int(allowed) == 1,
            remaining=float(remaining),
            retry_after=int(wait_us) / 1_000_000,
        )

    def _set_ceiling(self, connection_id: int, remaining: int, reset_at: float, why: str) -> None:
        keys = [self._keys.budget_ceiling(connection_id)]
        args: list[str | int] = [remaining, _microseconds(reset_at), why]
        with redis_errors("budget observe", f"connection {connection_id}"):
            self._ceiling_script(keys=keys, args=args)
