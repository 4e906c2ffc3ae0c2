"""Subscriptions: which event, in which room, goes to which downstream target.

Validated here (:func:`subscription_errors`, :func:`name_errors`): the event and whether it
takes a room, the target kind and that ``target`` is JSON, names, backfill. Not validated here
(:mod:`tasks.subscribe` does, it knows the rules): regex filters, templates, a target's fields.
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
from storage.errors import ValidationError
from storage.models import SUBSCRIPTION_NAME_PATTERN, Connection, Subscription
from storage.vocabulary import (
    ROOM_LIST_EVENTS,
    ROOM_SCOPED_EVENTS,
    Event,
    SubscriptionState,
    TargetKind,
    is_one_of,
    one_of,
)

MAX_BACKFILL = 1000  # HipChat returns at most 1000 history items per request
MAX_ROOM_CHARS = 100  # HipChat's limit on a room name or id in a path
NAME_RULE = "use 1 to 255 of A-Z a-z 0-9 _ . : -"

_NAME = re.compile(SUBSCRIPTION_NAME_PATTERN)


def subscription_errors(
    event: str, room: str | None, target_kind: str, target: Any, backfill: object
) -> list[str]:
    """Every problem with what a subscription stores, as sentences; empty when valid.

    The one home of these rules: :func:`add_subscription` raises them, and
    :func:`tasks.subscribe.spec_errors` reports them with the rules only it knows (filters,
    templates, a target's fields)."""
    errors = []
    has_room = isinstance(room, str) and room.strip() != ""
    if not is_one_of(Event, event):
        errors.append(f"unknown event {event!r}; expected one of {', '.join(sorted(Event))}")
    elif event in ROOM_LIST_EVENTS and room is not None:
        errors.append(f"{event} watches the room list and takes no room")
    elif event in ROOM_SCOPED_EVENTS and not has_room:
        errors.append(f"{event} needs a room (name or id)")
    if has_room and len(str(room)) > MAX_ROOM_CHARS:
        errors.append(f"room must be 1..{MAX_ROOM_CHARS} characters")
    if not is_one_of(TargetKind, target_kind):
        errors.append(f"unknown target {target_kind!r}; expected one of {one_of(TargetKind)}")
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
    return errors


def name_errors(name: str | None) -> list[str]:
    """A subscription name: optional; when given, 1..255 of a safe set of characters."""
    if name is None or (isinstance(name, str) and _NAME.fullmatch(name)):
        return []
    return [f"bad subscription name {name!r}: {NAME_RULE}"]


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
    include_own: bool = False,
) -> Subscription:
    errors = subscription_errors(event, room, target_kind, target, backfill) + name_errors(name)
    if errors:
        raise ValidationError("bad subscription: " + "; ".join(errors), errors)
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
        include_own=bool(include_own),
    )
    duplicate = f"this connection already has a subscription named {name!r}"
    with translated(duplicate), s.begin_nested():
        s.add(subscription)
    return subscription


def update_subscription(
    s: Session,
    sub_id: int,
    *,
    filter: str | None,  # shadows the builtin: it is the column's name
    target_kind: str,
    target: dict[str, Any],
    name: str | None,
    include_own: bool = False,
) -> Subscription:
    """Change what a subscription does with its events, in place: its event, room, watermark
    and priming stay (they say where it has got to), so nothing is skipped or fired twice."""
    subscription = _require(s, sub_id)
    errors = subscription_errors(
        subscription.event, subscription.room, target_kind, target, subscription.backfill
    )
    errors += name_errors(name)
    if errors:
        raise ValidationError("bad subscription: " + "; ".join(errors), errors)
    subscription.filter, subscription.target_kind = filter, target_kind
    subscription.target, subscription.name = dict(target), name
    subscription.include_own = bool(include_own)
    duplicate = f"this connection already has a subscription named {name!r}"
    with translated(duplicate), s.begin_nested():
        s.flush()
    return subscription


def get_subscription(s: Session, sub_id: int) -> Subscription | None:
    return s.get(Subscription, sub_id)


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
    if not is_one_of(SubscriptionState, state):
        raise ValidationError(
            f"bad subscription state {state!r}: one of {one_of(SubscriptionState)}"
        )
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
