"""The transactional outbox: events written with the watermark, then relayed to delivery.

Life of an event::

    pending --mark_dispatched--> dispatched --mark_delivered--> delivered
                                     |  ^
                          mark_failed|  |relay re-enqueues when stuck
                                     v  |
                                  (retry at next_attempt_at) --mark_failed(dead=True)--> dead

A poll writes events with :func:`add_events` in the transaction that advances the
watermark, so both persist or neither does. Every event carries an idempotency key; a key
already stored is skipped, so a crashed and repeated poll cannot create a second event.

Every delivery attempt is appended to the event's ``attempt_log`` (the newest
:data:`MAX_ATTEMPT_LOG` entries): ``{"at", "outcome" or "error", "ms"}``, plus a
``{"at", "replayed": true}`` entry when a person re-queued it (:func:`replay`). Closed
events (delivered, dead) are deleted by :func:`purge_closed` after the retention time.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import and_, delete, func, or_, select, update
from sqlalchemy.orm import Session

from storage.db import chunks, dialect_insert
from storage.errors import ValidationError
from storage.models import OutboxEvent, utcnow
from storage.vocabulary import OPEN_OUTBOX_STATES, Event, OutboxState, is_one_of

MAX_TEXT_LENGTH = 2000  # of last_error and outcome
MAX_ATTEMPT_LOG = 20  # entries kept in attempt_log, the newest
CLOSED_OUTBOX_STATES = (OutboxState.DELIVERED, OutboxState.DEAD)


@dataclass(frozen=True, slots=True)
class NewEvent:
    connection_id: int
    subscription_id: int
    idempotency_key: str
    event: str
    payload: dict[str, Any] = field(hash=False)


def _row(event: NewEvent, now: datetime) -> dict[str, Any]:
    if not is_one_of(Event, event.event):
        raise ValidationError(f"unknown event {event.event!r}")
    if not 0 < len(event.idempotency_key) <= 255:
        raise ValidationError("an idempotency key must have 1 to 255 characters")
    return {
        "connection_id": event.connection_id,
        "subscription_id": event.subscription_id,
        "idempotency_key": event.idempotency_key,
        "event": event.event,
        "payload": event.payload,
        "state": "pending",
        "attempts": 0,
        "created_at": now,
    }


def add_events(
    s: Session, events: Sequence[NewEvent], *, at: datetime | None = None
) -> list[OutboxEvent]:
    """Insert each event once; keys already stored are skipped silently.

    Returns only the rows this call inserted, in the order of ``events``. Safe against
    concurrent writers of the same key: the database's unique index decides, and the loser
    inserts nothing (it waits for the winner's transaction on PostgreSQL).
    """
    now = at or utcnow()
    rows: dict[str, dict[str, Any]] = {}
    for event in events:
        rows.setdefault(event.idempotency_key, _row(event, now))
    inserted: list[int] = []
    insert = dialect_insert(s)
    for part in chunks(list(rows.values())):
        statement = (
            insert(OutboxEvent)
            .values(part)
            .on_conflict_do_nothing(index_elements=["idempotency_key"])
            .returning(OutboxEvent.id)
        )
        inserted.extend(s.scalars(statement))
    found = _by_ids(s, inserted)
    order = {key: i for i, key in enumerate(rows)}
    return sorted(found, key=lambda row: order[row.idempotency_key])


def get_event(s: Session, event_id: int) -> OutboxEvent | None:
    return s.get(OutboxEvent, event_id, populate_existing=True)


def mark_dispatched(s: Session, ids: Iterable[int], at: datetime) -> int:
    """Record that events were handed to the broker (again, for a relay); returns the count.

    Delivered and dead events are left alone.
    """
    count = 0
    for part in chunks(list(ids)):
        result = s.execute(
            update(OutboxEvent)
            .where(OutboxEvent.id.in_(part), OutboxEvent.state.in_(OPEN_OUTBOX_STATES))
            .values(state="dispatched", dispatched_at=at)  # a scheduled retry time stays
            .execution_options(synchronize_session=False)
        )
        count += int(getattr(result, "rowcount", 0))
    return count


def next_for_subscription(
    s: Session, subscription_id: int, now: datetime | None = None
) -> OutboxEvent | None:
    """The subscription's oldest open event (commit order), even if its retry is not due yet:
    a subscription's deliveries stay in order, so the caller waits for it.

    With ``now``, a pending head is marked dispatched at ``now``: a drain is handling it, so
    the relay has no reason to re-enqueue it before the relay's minimum age has passed.
    """
    query = (
        select(OutboxEvent)
        .where(
            OutboxEvent.subscription_id == subscription_id,
            OutboxEvent.state.in_(OPEN_OUTBOX_STATES),
        )
        .order_by(OutboxEvent.id)
        .limit(1)
        .execution_options(populate_existing=True)
    )
    event = s.scalars(query).one_or_none()
    if event is not None and now is not None and event.state == "pending":
        event.state, event.dispatched_at = "dispatched", now
        s.flush()
    return event


def mark_delivered(
    s: Session,
    event_id: int,
    at: datetime,
    outcome: str | None = None,
    *,
    duration_ms: float | None = None,
) -> bool:
    """Close an open event as delivered; False if it was already closed or does not exist.
    The attempt is appended to the attempt log (``attempts`` counts the failed ones only)."""
    text = outcome[:MAX_TEXT_LENGTH] if outcome else None
    return _close(
        s,
        event_id,
        {"outcome": text or "delivered"},
        at,
        duration_ms,
        state="delivered",
        delivered_at=at,
        next_attempt_at=None,
        outcome=text,
    )


def mark_failed(
    s: Session,
    event_id: int,
    error: str,
    next_attempt_at: datetime | None,
    dead: bool,
    *,
    attempts: int | None = None,
    at: datetime | None = None,
    duration_ms: float | None = None,
) -> bool:
    """Record a failed attempt: retry at ``next_attempt_at``, or give up if ``dead``.

    ``attempts`` sets the count (a caller that does not count every failure, a 429 say,
    keeps its own); without it the stored count goes up by one. The attempt (``error``,
    made ``at`` and lasting ``duration_ms``) is appended to the attempt log. False if
    already closed.
    """
    values: dict[str, Any] = {
        "last_error": error[:MAX_TEXT_LENGTH],
        "next_attempt_at": None if dead else next_attempt_at,
        "attempts": OutboxEvent.attempts + 1 if attempts is None else attempts,
    }
    if dead:
        values["state"] = "dead"
    entry = {"error": error[:MAX_TEXT_LENGTH]}
    return _close(s, event_id, entry, at or utcnow(), duration_ms, **values)


def delivered_since(s: Session, after_id: int = 0, limit: int = 100) -> list[OutboxEvent]:
    """Delivered events with an id above ``after_id``, oldest first (demos, tails)."""
    query = (
        select(OutboxEvent)
        .where(OutboxEvent.state == "delivered", OutboxEvent.id > after_id)
        .order_by(OutboxEvent.id)
        .limit(limit)
    )
    return list(s.scalars(query))


def undispatched(
    s: Session,
    older_than: datetime,
    limit: int = 100,
    *,
    dispatched_before: datetime | None = None,
) -> list[OutboxEvent]:
    """Events the relay should (re-)enqueue, oldest first.

    * pending events created before ``older_than`` (the poll died before dispatching);
    * dispatched events whose ``dispatched_at`` is before ``dispatched_before`` (default
      ``older_than``): the delivery task was lost;

    either way only if no retry is scheduled after ``dispatched_before``.

    On PostgreSQL the rows are locked with ``SKIP LOCKED``, so two relays split the work
    instead of sending the same event twice; the relay should call :func:`mark_dispatched`
    in the same transaction. SQLite ignores the clause; its writers are serialized anyway.
    """
    cutoff = dispatched_before or older_than
    waiting = and_(OutboxEvent.state == "pending", OutboxEvent.created_at < older_than)
    stuck = and_(OutboxEvent.state == "dispatched", OutboxEvent.dispatched_at < cutoff)
    # A retry scheduled by the delivery task is not lost until it is overdue.
    unscheduled = or_(OutboxEvent.next_attempt_at.is_(None), OutboxEvent.next_attempt_at < cutoff)
    query = (
        select(OutboxEvent)
        .where(or_(waiting, stuck), unscheduled)
        .order_by(OutboxEvent.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
        .execution_options(populate_existing=True)
    )
    return list(s.scalars(query))


def list_events(
    s: Session,
    *,
    connection_id: int | None = None,
    subscription_id: int | None = None,
    states: Sequence[str] = (),
    since: datetime | None = None,
    limit: int = 50,
) -> list[OutboxEvent]:
    """Recent events, newest first, filtered by any of the arguments given."""
    query = _filtered(select(OutboxEvent), connection_id, subscription_id, states, since).order_by(
        OutboxEvent.id.desc()
    )
    return list(s.scalars(query.limit(limit)))


def closed_events(
    s: Session,
    *,
    ids: Sequence[int] = (),
    subscription_id: int | None = None,
    states: Sequence[str] = (OutboxState.DEAD,),
    since: datetime | None = None,
) -> list[OutboxEvent]:
    """The events in ``states`` (dead by default) among ``ids`` (all when empty), oldest first."""
    query = _filtered(select(OutboxEvent), None, subscription_id, states, since)
    if ids:
        query = query.where(OutboxEvent.id.in_(list(ids)))
    return list(s.scalars(query.order_by(OutboxEvent.id)))


def replay(s: Session, events: Iterable[OutboxEvent], at: datetime) -> list[int]:
    """Re-queue closed events under their idempotency keys: pending again with a fresh count
    of attempts, no retry time, their attempt log kept (with a ``replayed`` entry). The relay
    hands pending events over to a drain (or the caller sends one). Returns the ids re-queued;
    an event already open again is left alone."""
    done = []
    for event in events:
        if event.state not in CLOSED_OUTBOX_STATES:
            continue
        event.state, event.attempts = OutboxState.PENDING.value, 0
        event.next_attempt_at = event.dispatched_at = event.delivered_at = None
        event.last_error = event.outcome = None
        event.attempt_log = _appended(event.attempt_log, {"at": at.isoformat(), "replayed": True})
        done.append(event.id)
    s.flush()
    return done


def counts_by_subscription(s: Session) -> dict[int, dict[str, int]]:
    """Per subscription, its number of events in each state (only states it has)."""
    query = select(OutboxEvent.subscription_id, OutboxEvent.state, func.count()).group_by(
        OutboxEvent.subscription_id, OutboxEvent.state
    )
    counts: dict[int, dict[str, int]] = {}
    for sub_id, state, count in s.execute(query):
        counts.setdefault(int(sub_id), {})[str(state)] = int(count)
    return counts


def counts_in_states(s: Session, states: Sequence[str]) -> list[tuple[int, int, str, int]]:
    """(connection id, subscription id, state, events) for every subscription with events in
    ``states``: one grouped query on the state index (the metrics scrape)."""
    query = (
        select(
            OutboxEvent.connection_id, OutboxEvent.subscription_id, OutboxEvent.state, func.count()
        )
        .where(OutboxEvent.state.in_(list(states)))
        .group_by(OutboxEvent.connection_id, OutboxEvent.subscription_id, OutboxEvent.state)
    )
    return [(int(c), int(sub), str(state), int(n)) for c, sub, state, n in s.execute(query)]


def count_events(
    s: Session,
    *,
    states: Sequence[str],
    since: datetime | None = None,
    subscription_id: int | None = None,
) -> int:
    """The number of events in ``states`` (of one subscription) created at or after ``since``."""
    query = select(func.count()).select_from(OutboxEvent)
    query = _filtered(query, None, subscription_id, states, since)
    return int(s.scalar(query) or 0)


def _filtered(
    query: Any,
    connection_id: int | None,
    subscription_id: int | None,
    states: Sequence[str],
    since: datetime | None,
) -> Any:
    if connection_id is not None:
        query = query.where(OutboxEvent.connection_id == connection_id)
    if subscription_id is not None:
        query = query.where(OutboxEvent.subscription_id == subscription_id)
    if states:
        query = query.where(OutboxEvent.state.in_(list(states)))
    if since is not None:
        query = query.where(OutboxEvent.created_at >= since)
    return query


def stats(s: Session) -> dict[str, int]:
    """The number of events in each state, every state present."""
    counts = {state.value: 0 for state in OutboxState}
    query = select(OutboxEvent.state, func.count()).group_by(OutboxEvent.state)
    for state, count in s.execute(query):
        counts[state] = int(count)
    return counts


def purge_closed(s: Session, older_than: datetime) -> int:
    """Delete delivered events older than ``older_than`` and dead ones created before it."""
    result = s.execute(
        delete(OutboxEvent)
        .where(
            or_(
                and_(OutboxEvent.state == "delivered", OutboxEvent.delivered_at < older_than),
                and_(OutboxEvent.state == "dead", OutboxEvent.created_at < older_than),
            )
        )
        .execution_options(synchronize_session=False)
    )
    return int(getattr(result, "rowcount", 0))


def _close(
    s: Session,
    event_id: int,
    entry: dict[str, Any],
    at: datetime,
    duration_ms: float | None,
    **values: Any,
) -> bool:
    """Update an open event with ``values`` and append one attempt to its log, in one
    statement guarded by the state (the log is read first; a drain holds its subscription's
    lock, so nobody else appends to this event meanwhile)."""
    log = s.scalar(select(OutboxEvent.attempt_log).where(OutboxEvent.id == event_id))
    attempt = {"at": at.isoformat(), **entry, "ms": _ms(duration_ms)}
    result = s.execute(
        update(OutboxEvent)
        .where(OutboxEvent.id == event_id, OutboxEvent.state.in_(OPEN_OUTBOX_STATES))
        .values(**values, attempt_log=_appended(log, attempt))
        .execution_options(synchronize_session="fetch")
    )
    return int(getattr(result, "rowcount", 0)) > 0


def _ms(duration_ms: float | None) -> int | None:
    return None if duration_ms is None else max(0, round(duration_ms))


def _appended(log: list[dict[str, Any]] | None, entry: dict[str, Any]) -> list[dict[str, Any]]:
    """A new list (never the stored one mutated: the ORM would not see the change)."""
    return [*(log or []), entry][-MAX_ATTEMPT_LOG:]


def _by_ids(s: Session, ids: list[int]) -> list[OutboxEvent]:
    found: list[OutboxEvent] = []
    for part in chunks(ids):
        found.extend(s.scalars(select(OutboxEvent).where(OutboxEvent.id.in_(part))))
    return found
