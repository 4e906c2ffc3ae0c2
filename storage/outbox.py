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


def mark_delivered(s: Session, event_id: int, at: datetime, outcome: str | None = None) -> bool:
    """Close an open event as delivered; False if it was already closed or does not exist."""
    return _close(
        s,
        event_id,
        state="delivered",
        delivered_at=at,
        next_attempt_at=None,
        outcome=outcome[:MAX_TEXT_LENGTH] if outcome else None,
    )


def mark_failed(
    s: Session,
    event_id: int,
    error: str,
    next_attempt_at: datetime | None,
    dead: bool,
    *,
    attempts: int | None = None,
) -> bool:
    """Record a failed attempt: retry at ``next_attempt_at``, or give up if ``dead``.

    ``attempts`` sets the count (a caller that does not count every failure, a 429 say,
    keeps its own); without it the stored count goes up by one. False if already closed.
    """
    values: dict[str, Any] = {
        "last_error": error[:MAX_TEXT_LENGTH],
        "next_attempt_at": None if dead else next_attempt_at,
        "attempts": OutboxEvent.attempts + 1 if attempts is None else attempts,
    }
    if dead:
        values["state"] = "dead"
    return _close(s, event_id, **values)


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


def _close(s: Session, event_id: int, **values: Any) -> bool:
    result = s.execute(
        update(OutboxEvent)
        .where(OutboxEvent.id == event_id, OutboxEvent.state.in_(OPEN_OUTBOX_STATES))
        .values(**values)
        .execution_options(synchronize_session="fetch")
    )
    return int(getattr(result, "rowcount", 0)) > 0


def _by_ids(s: Session, ids: list[int]) -> list[OutboxEvent]:
    found: list[OutboxEvent] = []
    for part in chunks(ids):
        found.extend(s.scalars(select(OutboxEvent).where(OutboxEvent.id.in_(part))))
    return found
