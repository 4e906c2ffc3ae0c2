"""Delivering a subscription's outbox events to its target, in order, each once in effect.

Deliveries of one subscription are drained **in commit order** by one worker at a time (a
Redis lock per subscription), so a retried send never overtakes a later one: when an event
must wait (flood control, a webhook down), the drain stops there and is retried after the
wait, leaving the later events pending behind it.

An event is marked delivered after its target succeeded. A crash in between redelivers it
(at-least-once); the stable ``Idempotency-Key`` lets a receiver drop the repeat, and a HipChat
action looks for its own earlier post first (:class:`tasks.actions.Actions`).

A drain that finds another one running does not spin: it leaves a *drain request*
(``Keys.drain_request``) and tries the lock once more. The holder, after releasing the lock,
takes the request and drains again. Either the second try gets the lock, or someone holds it
who will see the request after its release: events committed while a drain was finishing are
never left for the relay.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from storage import outbox
from storage import subscriptions as subs
from storage.errors import BucketEmpty, InvalidInput, NeedsAttention, RateLimited, RetryLater
from storage.vocabulary import SubscriptionState
from tasks import metrics
from tasks.runtime import Runtime
from tasks.subscriptions_api import SubView
from tasks.targets import deliver
from tasks.webhook import stop_if_gone

log = logging.getLogger(__name__)

# A drain hands over to a fresh task (retry_after=0) after this many events or this long, so
# that one busy subscription does not hold a worker slot for ever (the drain lock itself is
# renewed while the drain runs: see tasks.lease).
MAX_EVENTS_PER_DRAIN = 500
MAX_DRAIN_SECONDS = 60.0


@dataclass(frozen=True, slots=True)
class DrainResult:
    delivered: int = 0
    dead: int = 0
    retry_after: float | None = None  # set when the drain stopped early: drain again then
    busy: bool = False  # another worker holds this subscription's drain (and was told)
    reservation: str | None = None  # the call budget reserved for the next attempt
    reason: str | None = None  # why the drain stopped early, for the task's retry (Flower)


def backoff_seconds(
    attempt: int, base: float, cap: float, rng: random.Random | None = None
) -> float:
    """Exponential backoff with equal jitter: half fixed, half random, capped."""
    delay = min(cap, base * 2.0 ** max(0, attempt - 1))
    jitter: float = (rng or random).uniform(0, delay / 2)
    return delay / 2 + jitter


def drain(
    rt: Runtime,
    subscription_id: int,
    now: datetime | None = None,
    *,
    reservation: str | None = None,
) -> DrainResult:
    """Deliver the subscription's open events in order, as far as they go now.
    ``reservation``: the call budget an earlier drain reserved for the head event."""
    for attempt in range(2):
        with rt.leases.drain(subscription_id) as held:
            if held:
                result = _drain_locked(rt, subscription_id, now, reservation)
        if held:
            if rt.leases.take_drain_request(subscription_id) and result.retry_after is None:
                return DrainResult(result.delivered, result.dead, 0.0)  # asked meanwhile
            return result
        if attempt == 0:
            rt.leases.request_drain(subscription_id)
    return DrainResult(busy=True)


def _drain_locked(
    rt: Runtime, subscription_id: int, now: datetime | None, reservation: str | None
) -> DrainResult:
    delivered = dead = 0
    with rt.db.session() as s:
        row = subs.get_subscription(s, subscription_id)
        if row is None or row.state == SubscriptionState.ERROR:  # error: a person must act
            return DrainResult()
        sub = SubView.of(row)
    deadline = time.monotonic() + MAX_DRAIN_SECONDS
    for _ in range(MAX_EVENTS_PER_DRAIN):
        if time.monotonic() > deadline:
            break
        moment = now or datetime.now(UTC)
        with rt.db.session() as s:
            event = outbox.next_for_subscription(s, subscription_id, moment)
            if event is None:
                return DrainResult(delivered, dead)
            if event.next_attempt_at is not None and event.next_attempt_at > moment:
                backoff = (event.next_attempt_at - moment).total_seconds()
                why = f"event {event.id} waits {backoff:.1f}s for its next attempt"
                return DrainResult(delivered, dead, backoff, reason=why)
            event_id, payload, attempts = event.id, dict(event.payload), event.attempts
        held, reservation = reservation, None  # the head event's, used or not
        started = time.monotonic()
        try:
            outcome = deliver(rt, sub, payload, reservation=held)
        except RetryLater as exc:
            took = _ms_since(started)
            wait = _failed(rt, event_id, attempts + 1, exc, moment, took)
            metrics.delivery_finished(sub.target_kind, took / 1000, exc, dead=wait is None)
            if wait is None:
                dead += 1
                continue
            why = f"event {event_id}: {type(exc).__name__}: {exc}"
            held = getattr(exc, "reservation", None)
            return DrainResult(delivered, dead, wait, reservation=held, reason=why)
        except (InvalidInput, NeedsAttention) as exc:
            took = _ms_since(started)
            metrics.delivery_finished(sub.target_kind, took / 1000, exc, dead=True)
            _dead(rt, event_id, attempts + 1, f"{type(exc).__name__}: {exc}", moment, took)
            dead += 1
            if stop_if_gone(rt, sub, exc):
                return DrainResult(delivered, dead)
            continue
        took = _ms_since(started)
        metrics.delivery_finished(sub.target_kind, took / 1000)
        with rt.db.session() as s:
            outbox.mark_delivered(s, event_id, moment, outcome, duration_ms=took)
        log.info("delivered event=%s sub=%s %s: %s", event_id, sub.id, sub.event, outcome)
        delivered += 1
    # Out of events or time for this drain, not out of work: the caller drains again now.
    return DrainResult(delivered, dead, 0.0)


def _failed(
    rt: Runtime, event_id: int, attempts: int, exc: RetryLater, now: datetime, ms: float
) -> float | None:
    """Record a failed attempt; the wait before the next one, or None if it is now dead.

    A 429 or a spent budget is not a failure of the target: HipChat or our budget stated
    the exact wait, so it is honoured as is and does not count against the attempts.
    """
    if isinstance(exc, RateLimited | BucketEmpty):
        attempts -= 1
        wait = exc.retry_after
    elif attempts >= rt.settings.webhook_max_attempts:
        _dead(rt, event_id, attempts, f"{type(exc).__name__}: {exc}", now, ms)
        return None
    else:
        wait = max(
            exc.retry_after,
            backoff_seconds(
                attempts,
                rt.settings.webhook_backoff_base_seconds,
                rt.settings.webhook_backoff_max_seconds,
            ),
        )
    with rt.db.session() as s:
        outbox.mark_failed(
            s,
            event_id,
            f"{type(exc).__name__}: {exc}",
            now + timedelta(seconds=wait),
            dead=False,
            attempts=attempts,
            at=now,
            duration_ms=ms,
        )
    log.warning("event=%s attempt %d failed (%s); next in %.1fs", event_id, attempts, exc, wait)
    return wait


def _dead(rt: Runtime, event_id: int, attempts: int, error: str, now: datetime, ms: float) -> None:
    with rt.db.session() as s:
        outbox.mark_failed(
            s, event_id, error, None, dead=True, attempts=attempts, at=now, duration_ms=ms
        )
    log.error("event=%s dead after %d attempt(s): %s", event_id, attempts, error)


def _ms_since(started: float) -> float:
    return (time.monotonic() - started) * 1000
