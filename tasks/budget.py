"""The shared per-connection budget of HipChat calls: at most C calls in ANY W seconds.

Every HipChat call by any worker first takes from this budget. The budget is a **sliding
log**: the stamps of the newest C calls granted (or reserved), newest first. A call may go at
time s only if the C-th newest stamp is at least W old at s, so no window of W seconds ever
holds more than C calls. (A token bucket of C refilled at C/W would let nearly 2C through in
one window; the log does not, and costs O(1) per call: two list lookups and a push.)

What the budget adds on top of that rule:

* **A safety margin** (``margin_seconds``): the log is kept on W + margin. HipChat stamps a
  call when it *arrives*, a little after we granted it, and not always the same little; the
  margin absorbs that skew so that HipChat never sees more than C in its W.
* **Reservations** (:meth:`SlidingLogBudget.reserve`): a caller that may wait (an action task,
  a delivery) gets the first moment its calls fit, written into the log, and comes back then
  holding the reservation: one wait, no retry storm, first come first served (a later caller
  queues behind every reservation). A reservation is honoured from its moment until
  ``margin / 2`` after it (so that a late caller cannot squeeze two calls closer than W),
  and for the calls it reserved, no more; a caller that comes back early gets the same
  reservation with what is left of its wait, and one later than the tolerance, or wanting
  more calls than it reserved, gives its slot back (its stamps stood for no call and leave
  the log) and queues again.
* **HipChat's own word** (:meth:`observe`, :meth:`observe_429`): ``X-Ratelimit-Remaining`` /
  ``-Reset`` and 429s lower the budget until HipChat's reset, whatever our own count says.
* **A lost log refuses a window**: the state hash carries an ``epoch``; when Redis comes back
  without it (restarted without persistence, flushed), up to C calls may have gone out in the
  last W, so the budget refuses calls for one window. :meth:`initialise` writes a fresh state
  for a connection that has never called, so a new connection starts at once.

Two backends run the same rules: Redis (``budget_take.lua``, ``budget_ceiling.lua``, one
EVALSHA per call, keys under the connection's hash tag) for workers on any number of hosts,
and SQLite (:mod:`tasks.budget_sqlite`) for the embedded mode, shared by every process using
the same data directory. ``tests/test_budget.py`` runs one table of behaviour against both.

Redis errors that mean "Redis cannot serve us now" become :class:`StorageUnavailable` in
:func:`tasks.redis_conn.redis_errors`, the one place the project translates redis-py errors.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from string import Template
from typing import Any, Protocol

from redis.exceptions import NoScriptError

from storage.errors import BucketEmpty
from tasks import metrics
from tasks.hipchat_types import RateLimitInfo
from tasks.keys import Keys
from tasks.redis_conn import UNAVAILABLE, RedisClient, load_script, redis_errors, unavailable

# No reservation further ahead than this: a task waiting longer is re-sent without one (the
# broker's visibility timeout must exceed the longest countdown, see docs/reliability.md).
RESERVATION_HORIZON_SECONDS = 900.0
# Callers within the same microsecond get consecutive stamps; one stamped this little ahead of
# now still calls now (the margin absorbs it, as it absorbs arrival skew).
GRACE_SECONDS = 0.001


def microseconds(seconds: float) -> int:
    return round(seconds * 1_000_000)


class Status(IntEnum):
    REFUSED = 0
    GRANTED = 1
    RESERVED = 2


@dataclass(frozen=True, slots=True)
class Grant:
    """What the budget answered. ``wait``: 0 when granted; for a reservation, the seconds
    until it is due; when refused, the seconds until the calls would fit if nobody else
    takes first. ``reservation``: what to hold and hand back when a reservation is due."""

    status: Status
    wait: float = 0.0
    reservation: str | None = None

    @property
    def granted(self) -> bool:
        return self.status is Status.GRANTED


class BudgetEmpty(BucketEmpty):
    """The budget has no call now. ``reservation`` is set when calls were reserved for this
    caller ``retry_after`` seconds from now: come back then, holding it."""

    def __init__(self, message: str, retry_after: float, reservation: str | None = None) -> None:
        super().__init__(message, retry_after)
        self.reservation = reservation


# The take of one budget: (connection id, n, mode, held reservation) -> (status, wait_us,
# stamp, epoch), see budget_take.lua.
Take = Callable[[int, int, str, str], tuple[int, int, int, int]]


class LogBackend(Protocol):
    """Where the log and the state live; each call is one atomic step."""

    def prepare(self, limits: Limits) -> Take:
        """The take for a budget of these limits (Redis loads a script with them written in)."""

    def set_ceiling(self, connection_id: int, remaining: int, reset_us: int, why: str) -> None:
        """The ceiling script, see ``budget_ceiling.lua``."""

    def initialise(self, connection_id: int) -> None:
        """A fresh state, unless one exists."""

    def clear(self, connection_id: int) -> None:
        """Forget the log and the state."""

    def recent(self, connection_id: int) -> tuple[list[int], int, int, int]:
        """``(stamps newest first, HipChat's remaining or -1, its reset in us, now in us)``."""


@dataclass(frozen=True, slots=True)
class Limits:
    """A budget's constants, as budget_take.lua names them (times in microseconds)."""

    capacity: int
    window: int
    horizon: int
    tolerance: int
    grace: int


class SlidingLogBudget:
    """At most ``capacity`` calls per connection in any ``window_seconds``, for all workers."""

    def __init__(
        self,
        backend: LogBackend,
        *,
        capacity: int = 100,
        window_seconds: float = 60.0,
        margin_seconds: float = 1.0,
    ) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        if not window_seconds > 0 or math.isinf(window_seconds):
            raise ValueError("window_seconds must be a positive number")
        if not margin_seconds >= 0 or math.isinf(margin_seconds):
            raise ValueError("margin_seconds must be a number >= 0")
        self.capacity = capacity
        self.window_seconds = window_seconds
        self.margin_seconds = margin_seconds
        self.backend = backend
        self.limits = Limits(
            capacity=capacity,
            window=max(1, microseconds(window_seconds + margin_seconds)),
            horizon=microseconds(RESERVATION_HORIZON_SECONDS),
            tolerance=microseconds(margin_seconds / 2),
            grace=microseconds(GRACE_SECONDS),
        )
        self._take = backend.prepare(self.limits)
        # HipChat's reset last recorded per connection through this budget (see Gate).
        self.recorded: dict[int, float] = {}

    def take(self, connection_id: int, n: int = 1) -> Grant:
        """Take ``n`` calls if all of them fit now, else none."""
        return self._run(connection_id, n, "take")

    def reserve(self, connection_id: int, n: int = 1, *, held: str | None = None) -> Grant:
        """Take ``n`` calls now, or reserve the first moment they fit. ``held``: a reservation
        this caller got earlier; when it is due it is granted without taking again."""
        return self._run(connection_id, n, "reserve", held)

    def peek(self, connection_id: int, n: int = 1) -> Grant:
        """What :meth:`take` would answer now, without taking anything."""
        return self._run(connection_id, n, "peek")

    def acquire(self, connection_id: int, n: int = 1, *, reserve: bool = False) -> None:
        """Take ``n`` calls, or raise :class:`BudgetEmpty` with the exact wait (and, with
        ``reserve``, the reservation made for this caller)."""
        grant = self.reserve(connection_id, n) if reserve else self.take(connection_id, n)
        if not grant.granted:
            raise self.empty(connection_id, grant)

    def empty(self, connection_id: int, grant: Grant) -> BudgetEmpty:
        """The error that tells a caller to come back after ``grant.wait``."""
        what = "reserved" if grant.reservation else "retry"
        metrics.budget_wait()
        return BudgetEmpty(
            f"connection {connection_id} has used its HipChat call budget "
            f"({self.capacity} per {self.window_seconds:g}s or HipChat's own limit); "
            f"{what} in {grant.wait:.3f}s",
            retry_after=grant.wait,
            reservation=grant.reservation,
        )

    def observe(self, connection_id: int, *, remaining: int | None, reset_at: float | None) -> None:
        """Lower the budget to HipChat's ``remaining`` calls until ``reset_at`` (epoch
        seconds), from the X-Ratelimit-* headers. Missing headers change nothing."""
        if remaining is None or reset_at is None or not math.isfinite(reset_at):
            return
        self.backend.set_ceiling(
            connection_id, max(0, remaining), microseconds(reset_at), "headers"
        )

    def observe_429(self, connection_id: int, *, reset_at: float) -> None:
        """HipChat refused a call: no call at all until ``reset_at`` (epoch seconds)."""
        if math.isfinite(reset_at):
            self.backend.set_ceiling(connection_id, 0, microseconds(reset_at), "429")

    def initialise(self, connection_id: int) -> None:
        """Start the budget of a connection that has never called: it may call at once.
        (Without this, a first call finds no state and must assume a lost log.)"""
        self.backend.initialise(connection_id)

    def clear(self, connection_id: int) -> None:
        """Forget the connection's log and state (when the connection is removed)."""
        self.backend.clear(connection_id)

    def usage(self, connection_id: int) -> Usage:
        """Calls granted in the current window, and what HipChat last said (for status)."""
        stamps, remaining, reset_us, now_us = self.backend.recent(connection_id)
        used = sum(1 for s in stamps if now_us - self.limits.window < s <= now_us)
        reserved = sum(1 for s in stamps if s > now_us)
        active = remaining >= 0 and reset_us > now_us
        return Usage(
            used=used,
            reserved=reserved,
            capacity=self.capacity,
            hipchat_remaining=remaining if active else None,
            hipchat_reset_at=reset_us / 1_000_000 if active else None,
        )

    def _run(self, connection_id: int, n: int, mode: str, held: str | None = None) -> Grant:
        if not 1 <= n <= self.capacity:
            raise ValueError(f"n must be within 1..{self.capacity}, got {n}")
        status, wait_us, stamp, epoch = self._take(connection_id, n, mode, held or "")
        if status == Status.RESERVED:
            return Grant(Status.RESERVED, wait_us / 1_000_000, f"{epoch}:{stamp}:{n}")
        if status == Status.GRANTED:
            return Grant(Status.GRANTED)
        return Grant(Status.REFUSED, wait_us / 1_000_000)


class Gate:
    """One operation's way through the budget: its prepaid calls first (a take or a
    reservation of several calls made up front), then one take per call. Hooked into
    :class:`tasks.client.HipChatClient` as ``before_request``, ``on_rate_limit`` and
    ``on_refused``.

    HipChat's ``X-Ratelimit-*`` headers come with every answer, but they change what the
    budget knows only now and then: a new HipChat window (a new reset), or a remaining that
    gets low (another client of the token may spend it faster than we count). Only those are
    recorded, so a call costs one budget round trip, not two. A 429 is always recorded.
    """

    def __init__(self, budget: SlidingLogBudget, connection_id: int, prepaid: int = 0) -> None:
        self.budget = budget
        self.connection_id = connection_id
        self.prepaid = prepaid

    def before_call(self) -> None:
        if self.prepaid > 0:
            self.prepaid -= 1
            return
        self.budget.acquire(self.connection_id)

    def observe(self, info: RateLimitInfo) -> None:
        if info.remaining is None or info.reset_at is None:
            return
        low = info.remaining < max(1, self.budget.capacity // 4)
        last = self.budget.recorded.get(self.connection_id)
        # A reset given in seconds moves with the clock: a second's drift is the same window.
        if low or last is None or abs(last - info.reset_at) > 1.0:
            self.budget.observe(
                self.connection_id, remaining=info.remaining, reset_at=info.reset_at
            )
            self.budget.recorded[self.connection_id] = info.reset_at

    def refused(self, reset_at: float) -> None:
        self.budget.observe_429(self.connection_id, reset_at=reset_at)


@dataclass(frozen=True, slots=True)
class Usage:
    used: int
    reserved: int
    capacity: int
    hipchat_remaining: int | None
    hipchat_reset_at: float | None


class RedisLog:
    """The log and state in Redis: one EVALSHA per take, keys under the connection's tag."""

    def __init__(self, client: RedisClient, keys: Keys) -> None:
        self._redis = client
        self._keys = keys
        self._ceiling = load_script("budget_ceiling.lua")
        self._ceiling_sha = _sha(self._ceiling)

    def prepare(self, limits: Limits) -> Take:
        script = Template(load_script("budget_take.lua")).substitute(
            capacity=limits.capacity,
            window=limits.window,
            horizon=limits.horizon,
            tolerance=limits.tolerance,
            grace=limits.grace,
        )
        sha = _sha(script)
        log_key, state_key = self._keys.budget_log, self._keys.budget_state

        def take(connection_id: int, n: int, mode: str, held: str) -> tuple[int, int, int, int]:
            keys = (log_key(connection_id), state_key(connection_id))
            try:
                answer = self._eval(sha, script, keys, (n, mode, held))
            except UNAVAILABLE as exc:  # the hot path skips the context manager
                raise unavailable(exc, f"budget {mode}", f"connection {connection_id}") from exc
            if isinstance(answer, int):
                return (Status.GRANTED, 0, 0, 0) if answer == 0 else (Status.REFUSED, answer, 0, 0)
            wait_us, stamp, epoch = answer
            return Status.RESERVED, int(wait_us), int(stamp), int(epoch)

        return take

    def set_ceiling(self, connection_id: int, remaining: int, reset_us: int, why: str) -> None:
        keys = (self._keys.budget_state(connection_id),)
        with redis_errors("budget observe", f"connection {connection_id}"):
            self._eval(self._ceiling_sha, self._ceiling, keys, (remaining, reset_us, why))

    def initialise(self, connection_id: int) -> None:
        key = self._keys.budget_state(connection_id)
        with redis_errors("budget initialise", f"connection {connection_id}"):
            self._redis.hsetnx(key, "epoch", _redis_now_us(self._redis))

    def clear(self, connection_id: int) -> None:
        keys = (self._keys.budget_log(connection_id), self._keys.budget_state(connection_id))
        with redis_errors("budget clear", f"connection {connection_id}"):
            self._redis.delete(*keys)

    def recent(self, connection_id: int) -> tuple[list[int], int, int, int]:
        with redis_errors("budget usage", f"connection {connection_id}"):
            pipe = self._redis.pipeline(transaction=False)
            pipe.lrange(self._keys.budget_log(connection_id), 0, -1)
            pipe.hmget(self._keys.budget_state(connection_id), "remaining", "reset")
            stamps, (remaining, reset) = pipe.execute()
            # Not in the pipeline: a cluster client refuses keyless commands there (and asks
            # any node, whose clock is as good for counting usage).
            now_us = _redis_now_us(self._redis)
        return (
            [int(s) for s in stamps],
            int(remaining) if remaining is not None else -1,
            int(reset or 0),
            now_us,
        )

    def _eval(
        self, sha: str, script: str, keys: tuple[str, ...], argv: tuple[str | int, ...]
    ) -> Any:
        # EVALSHA straight from the client: Script objects add a round of argument handling
        # per call. On NOSCRIPT (a restarted Redis) the script is sent once with EVAL.
        try:
            return self._redis.evalsha(sha, len(keys), *keys, *argv)
        except NoScriptError:
            return self._redis.eval(script, len(keys), *keys, *argv)


def _sha(script: str) -> str:
    return hashlib.sha1(script.encode("utf-8"), usedforsecurity=False).hexdigest()


def _redis_now_us(client: RedisClient) -> int:
    seconds, micros = client.time()
    return int(seconds) * 1_000_000 + int(micros)
