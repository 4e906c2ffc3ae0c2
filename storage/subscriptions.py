"""Subscriptions: which event, in which room, goes to which downstream target.

Validated here: the event and target kinds, the shape of ``target``, names, backfill.
Not validated here (the caller does, it knows the rules): regex filters, templates, handlers.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from storage.connections import MAX_REASON_LENGTH
from storage.db import translated
from storage.models import (
    EVENTS,
    ROOM_EVENTS,
    SUBSCRIPTION_NAME_PATTERN,
    SUBSCRIPTION_STATES,
    TARGET_KINDS,
    Connection,
    Subscription,
)
from tasks.errors import ValidationError

MAX_BACKFILL = 1000  # HipChat returns at most 1000 history items per request


def _validate(event: str, room: str | None, target_kind: str, target: Any, backfill: int) -> None:
    errors = []
    if event not in EVENTS:
        errors.append(f"unknown event {event!r}: one of {', '.join(EVENTS)}")
    elif event in ROOM_EVENTS and not (room and room.strip()):
        errors.append(f"event {event!r} needs a room")
    if target_kind not in TARGET_KINDS:
        errors.append(f"unknown target kind {target_kind!r}: one of {', '.join(TARGET_KINDS)}")
    if not isinstance(target, dict):
        errors.append("target must be a JSON object")
    else:
        try:
            json.dumps(target)
        except (TypeError, ValueError):
            errors.append("target must hold only JSON values")
    if isinstance(backfill, bool) or not isinstance(backfill, int):
        errors.append("backfill must be a whole number")
    elif not 0 <= backfill <= MAX_BACKFILL:
        errors.append(f"backfill must be within 0..{MAX_BACKFILL}")
    if errors:
        raise ValidationError("bad subscription: " + "; ".join(errors), errors)


def add_subscription(
    s: Session,
    connection_id: int,
    event: str,
    *,
    room: str | None = None,
    filter: str | None = None,  # shadows the builtin: it is the column's name
    target_kind: str,
    target: dict[str, Any],
    backfill: int = 0,
    name: str | None = None,
) -> Subscription:
    _validate(event, room, target_kind, target, backfill)
    if name is not None and not re.fullmatch(SUBSCRIPTION_NAME_PATTERN, name):
        raise ValidationError(
            f"bad subscription name {name!r}: use 1 to 255 of A-Z a-z 0-9 _ . : -"
        )
    if s.get(Connection, connection_id) is None:
        raise ValidationError(f"no connection with id {connection_id}")
    subscription = Subscription(
        connection_id=connection_id,
        event=event,
        room=room.strip() if room else None,
        filter=filter,
        target_kind=target_kind,
        target=dict(target),
        backfill=backfill,
        state="active",
        name=name,
    )
    duplicate = f"this connection already has a subscription named {name!r}"
    with translated(duplicate), s.begin_nested():
        s.add(subscription)
    return subscription


def get_subscription(s: Session, sub_id: int) -> Subscription | None:
    return s.get(Subscription, sub_id)


def find_subscription(s: Session, connection_id: int, name: str) -> Subscription | None:
    query = select(Subscription).where(
        Subscription.connection_id == connection_id, Subscription.name == name
    )
    return s.scalars(query).one_or_none()


def list_subscriptions(s: Session, connection_id: int | None = None) -> list[Subscription]:
    query = select(Subscription).order_by(Subscription.id)
    if connection_id is not None:
        query = query.where(Subscription.connection_id == connection_id)
    return list(s.scalars(query))


def active_subscriptions(s: Session, connection_id: int) -> list[Subscription]:
    query = select(Subscription).where(
        Subscription.connection_id == connection_id, Subscription.state == "active"
    )
    return list(s.scalars(query.order_by(Subscription.id)))


def remove_subscription(s: Session, sub_id: int) -> bool:
    """Remove a subscription and its outbox events; False if it did not exist."""
    subscription = s.get(Subscription, sub_id)
    if subscription is None:
        return False
    s.delete(subscription)
    s.flush()
    return True


def set_subscription_state(
    s: Session, sub_id: int, state: str, reason: str | None = None
) -> Subscription:
    if state not in SUBSCRIPTION_STATES:
        raise ValidationError(f"bad subscription state {state!r}: one of {SUBSCRIPTION_STATES}")
    subscription = _require(s, sub_id)
    subscription.state = state
    subscription.state_reason = reason[:MAX_REASON_LENGTH] if reason else None
    s.flush()
    return subscription


def mark_primed(s: Session, ids: Iterable[int], at: datetime) -> int:
    """Record the first poll of these subscriptions; already primed ones keep their time."""
    wanted = list(ids)
    if not wanted:
        return 0
    result = s.execute(
        update(Subscription)
        .where(Subscription.id.in_(wanted), Subscription.primed_at.is_(None))
        .values(primed_at=at)
        .execution_options(synchronize_session="fetch")
    )
    return int(getattr(result, "rowcount", 0))


def set_room_id(
    s: Session, sub_id: int, room_id: int | None, room_name: str | None = None
) -> Subscription:
    """Record the room HipChat resolved the subscription's room to, with HipChat's name."""
    subscription = _require(s, sub_id)
    subscription.room_id = room_id
    subscription.room_name = room_name
    s.flush()
    return subscription


def _require(s: Session, sub_id: int) -> Subscription:
    subscription = s.get(Subscription, sub_id)
    if subscription is None:
        raise ValidationError(f"no subscription with id {sub_id}")
    return subscription
