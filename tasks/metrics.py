"""What the workers count for Prometheus: polls, HipChat calls, deliveries, detection lag.

The hooks below are called from the hot path (every poll, every HipChat call), so each costs
a few microseconds (one mmap write per value in multiprocess mode, ``docs/benchmarks.md``) and
none ever raises: a metric that cannot be written is dropped, and the poll goes on.

The metrics are created on first use, in the mode ``prometheus_client`` is in then:
**multiprocess** when ``PROMETHEUS_MULTIPROC_DIR`` is set, which
:mod:`worker.metrics_process` arranges for ``worker`` (and its prefork children), ``beat`` and
``run`` before they make any metric; otherwise an in-process registry (the tests, the Python
API), which nothing serves.

Every label has a bounded set of values: an outcome, a status class, a target kind. Never a
connection, room, message, user or token: per-connection figures are read from the stores
when Prometheus scrapes (:mod:`worker.metrics_store`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from types import TracebackType
from typing import Any, Generic, Protocol, TypeVar

from sqlalchemy import event
from sqlalchemy.orm import Session

from storage.errors import BucketEmpty, RateLimited
from storage.vocabulary import TargetKind

log = logging.getLogger(__name__)

PREFIX = "hipchat_poller_"
POLL_OUTCOMES = ("ok", "partial", "failed", "waiting", "skipped")
DELIVERY_OUTCOMES = ("delivered", "retry", "waiting", "dead")
# HipChat's answers counted by their own code; any other by class (2xx, 3xx, 4xx, 5xx).
CALL_CODES = frozenset({200, 201, 202, 204, 400, 401, 403, 404, 405, 409, 429})
TRANSPORT_ERRORS = frozenset(
    {
        "Timeout",
        "ConnectTimeout",
        "ReadTimeout",
        "ConnectionError",
        "ProxyError",
        "SSLError",
        "ChunkedEncodingError",
        "ContentDecodingError",
    }
)

POLL_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
LAG_BUCKETS = (1.0, 2.0, 5.0, 10.0, 15.0, 30.0, 45.0, 60.0, 90.0, 120.0, 300.0, 600.0, 3600.0)
CALL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
DELIVERY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class _Child(Protocol):
    def inc(self, amount: float = 1) -> None: ...


class _Observer(Protocol):
    def observe(self, amount: float) -> None: ...


def _counter(name: str, text: str, labels: Sequence[str] = ()) -> Any:
    from prometheus_client import Counter

    return Counter(PREFIX + name, text, labels)


def _histogram(name: str, text: str, buckets: Sequence[float], labels: Sequence[str] = ()) -> Any:
    from prometheus_client import Histogram

    return Histogram(PREFIX + name, text, labels, buckets=buckets)


class PollMetrics:
    """Polls (the workers). The label children the hot path uses are bound once: a
    ``labels()`` lookup per call would cost as much as the write."""

    def __init__(self) -> None:
        from prometheus_client import Gauge

        polls = _counter("polls", "Polls of a connection, by outcome", ["outcome"])
        self.polls: dict[str, _Child] = {o: polls.labels(o) for o in POLL_OUTCOMES}
        self.duration: _Observer = _histogram(
            "poll_duration_seconds",
            "Time of one poll attempt of a connection (skipped polls not included)",
            POLL_BUCKETS,
        )
        self.in_progress: Any = Gauge(
            PREFIX + "polls_in_progress",
            "Polls running now, in live processes",
            multiprocess_mode="livesum",
        )
        self.detection_lag: _Observer = _histogram(
            "detection_lag_seconds",
            "From a history item's date on HipChat to its event committed to the outbox",
            LAG_BUCKETS,
        )


class CallMetrics:
    """HipChat calls (the workers, and any process that calls HipChat)."""

    def __init__(self) -> None:
        self._calls = _counter("hipchat_calls", "HipChat API calls made, by status", ["status"])
        self.calls: dict[int | str, _Child] = {}
        self.duration: _Observer = _histogram(
            "hipchat_call_duration_seconds",
            "Time of one HipChat API call, answered or not",
            CALL_BUCKETS,
        )
        limited = _counter("rate_limited", "HipChat 429 answers, by kind", ["kind"])
        self.rate_limited = {
            False: limited.labels("rate_limit"),
            True: limited.labels("flood_control"),
        }
        self.budget_waits: _Child = _counter(
            "budget_waits", "Calls that found their connection's budget spent and had to wait"
        )

    def call(self, outcome: int | str) -> _Child:
        child = self.calls.get(outcome)
        if child is None:
            child = self.calls[outcome] = self._calls.labels(status_label(outcome))
        return child


class DeliveryMetrics:
    """Deliveries and the relay (the workers)."""

    def __init__(self) -> None:
        deliveries = _counter(
            "deliveries", "Delivery attempts, by outcome and target", ["outcome", "target_kind"]
        )
        self.deliveries: dict[tuple[str, str], _Child] = {
            (o, k): deliveries.labels(o, k) for o in DELIVERY_OUTCOMES for k in TargetKind
        }
        duration = _histogram(
            "delivery_duration_seconds",
            "Time of one delivery attempt, by target",
            DELIVERY_BUCKETS,
            ["target_kind"],
        )
        self.duration: dict[str, _Observer] = {k: duration.labels(k) for k in TargetKind}
        self.relayed: _Child = _counter(
            "relayed_events", "Events the relay handed over again (their drain was lost)"
        )


class BeatMetrics:
    def __init__(self) -> None:
        self.polls_sent: _Child = _counter("beat_polls_sent", "Polls beat sent to the workers")


T = TypeVar("T")


class _Family(Generic[T]):
    """One family of metrics, made on first use: a process exports only what it records
    (beat no delivery counters, a worker no beat counter)."""

    def __init__(self, make: Callable[[], T]) -> None:
        self._make = make
        self._made: T | None = None
        self._lock = threading.Lock()

    def __call__(self) -> T:
        made = self._made
        if made is None:
            with self._lock:
                if self._made is None:
                    self._made = self._make()
                made = self._made
        return made


polls = _Family(PollMetrics)
calls = _Family(CallMetrics)
deliveries = _Family(DeliveryMetrics)
beat = _Family(BeatMetrics)


def status_label(outcome: int | str) -> str:
    """``200``, ``429``... for the codes HipChat uses, else the class (``5xx``); an exception
    name is ``transport_error`` (no answer: timeout, refused, reset) or ``error``."""
    if isinstance(outcome, str):
        return "transport_error" if outcome in TRANSPORT_ERRORS else "error"
    if outcome in CALL_CODES:
        return str(outcome)
    return f"{outcome // 100}xx"


def _dropped(what: str) -> None:
    log.debug("metric %s not recorded", what, exc_info=True)


# -- polls ------------------------------------------------------------------------------------
class PollOutcome(Protocol):
    skipped: str | None
    failing: dict[int, str]
    waiting: list[int]
    problems: list[str]
    done: list[str]


def poll_outcome(result: PollOutcome, exc: BaseException | None) -> str:
    """``skipped`` (the connection is not active or has nothing to poll), ``ok``, ``partial``
    (some rooms failed or wait, a room is gone), ``failed`` (the poll read nothing: storage
    down, a refused token, its time limit), ``waiting`` (the budget or a 429 stopped it)."""
    if exc is not None:
        return "waiting" if isinstance(exc, BucketEmpty | RateLimited) else "failed"
    if result.skipped:
        return "skipped"
    if result.failing or result.waiting or result.problems:
        return "partial" if result.done else "failed"
    return "ok"


class PollTimer:
    """``with PollTimer(result): poll_connection(...)``: counts the poll by its outcome, its
    time, and the polls in progress. Exceptions pass through."""

    __slots__ = ("_result", "_started")

    def __init__(self, result: PollOutcome) -> None:
        self._result = result
        self._started = 0.0

    def __enter__(self) -> PollTimer:
        self._started = time.perf_counter()
        try:
            polls().in_progress.inc()
        except Exception:  # noqa: BLE001 (a metric never fails a poll)
            _dropped("polls_in_progress")
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            m = polls()
            m.in_progress.dec()
            outcome = poll_outcome(self._result, exc)
            m.polls[outcome].inc()
            if outcome != "skipped":
                m.duration.observe(time.perf_counter() - self._started)
        except Exception:  # noqa: BLE001
            _dropped("polls")


def detection_lag_on_commit(s: Session, rows: Sequence[Any]) -> None:
    """When ``s`` commits, observe the lag of each history item among ``rows`` (the outbox
    events a poll inserted): now minus the item's date. Nothing is observed if it rolls back.
    Events without an item date (participants, rooms) have no lag to measure."""
    try:
        dates = [d for d in (_item_date(row.payload) for row in rows) if d is not None]
        if not dates:
            return

        def committed(session: Session) -> None:
            try:
                now = time.time()
                lag = polls().detection_lag
                for date in dates:
                    lag.observe(max(0.0, now - date))
            except Exception:  # noqa: BLE001
                _dropped("detection_lag")

        event.listen(s, "after_commit", committed, once=True)
    except Exception:  # noqa: BLE001
        _dropped("detection_lag")


def _item_date(payload: Any) -> float | None:
    try:
        text = payload["item"]["message"]["date"]
        return datetime.fromisoformat(text).timestamp() if isinstance(text, str) else None
    except (KeyError, TypeError, ValueError):
        return None


# -- HipChat calls ----------------------------------------------------------------------------
def http_call(peer: str, outcome: int | str, seconds: float) -> None:
    """One request through :func:`tasks.client_http.send`: HipChat calls are counted by
    status (webhook deliveries are counted as deliveries)."""
    if peer != "hipchat":
        return
    try:
        m = calls()
        m.call(outcome).inc()
        m.duration.observe(seconds)
    except Exception:  # noqa: BLE001
        _dropped("hipchat_calls")


def rate_limited(flood_control: bool) -> None:
    _inc(lambda: calls().rate_limited[flood_control], "rate_limited")


def budget_wait() -> None:
    _inc(lambda: calls().budget_waits, "budget_waits")


def _inc(child: Callable[[], _Child], what: str, amount: int = 1) -> None:
    if amount:
        try:
            child().inc(amount)
        except Exception:  # noqa: BLE001 (a metric never fails its caller)
            _dropped(what)


# -- deliveries, relay, beat ------------------------------------------------------------------
def delivery_finished(
    target_kind: str, seconds: float, exc: BaseException | None = None, *, dead: bool = False
) -> None:
    """One delivery attempt: ``delivered``; ``dead``; ``waiting`` (a 429, flood control or a
    spent budget: not a failure); ``retry`` (failed, tried again after a backoff)."""
    if exc is None:
        outcome = "delivered"
    elif dead:
        outcome = "dead"
    else:
        outcome = "waiting" if isinstance(exc, BucketEmpty | RateLimited) else "retry"
    try:
        m = deliveries()
        m.deliveries[(outcome, target_kind)].inc()
        m.duration[target_kind].observe(seconds)
    except Exception:  # noqa: BLE001 (an unknown target kind too: it has no series)
        _dropped("deliveries")


def relayed(count: int) -> None:
    _inc(lambda: deliveries().relayed, "relayed_events", count)


def polls_sent(count: int) -> None:
    _inc(lambda: beat().polls_sent, "beat_polls_sent", count)
