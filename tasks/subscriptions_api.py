"""Creating subscriptions from validated specs, and the plain view the poller works with."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from storage import connections as conns
from storage import subscriptions as subs
from storage.errors import NeedsAttention, NotFound, RetryLater, ValidationError
from storage.vocabulary import ROOM_LIST_EVENTS
from tasks.runtime import Runtime
from tasks.subscribe import SubscriptionSpec, name_errors, spec_errors

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SubView:
    """A subscription detached from its database session."""

    id: int
    connection_id: int
    name: str | None
    event: str
    room: str | None
    room_id: int | None
    room_name: str | None
    filter: str | None
    target_kind: str
    target: dict[str, Any]
    backfill: int
    primed_at: datetime | None
    include_own: bool = False

    @classmethod
    def of(cls, row: Any) -> SubView:
        return cls(
            id=row.id,
            connection_id=row.connection_id,
            name=row.name,
            event=row.event,
            room=row.room,
            room_id=row.room_id,
            room_name=row.room_name,
            filter=row.filter,
            target_kind=row.target_kind,
            target=dict(row.target or {}),
            backfill=row.backfill or 0,
            primed_at=row.primed_at,
            include_own=bool(row.include_own),
        )

    @property
    def primed(self) -> bool:
        return self.primed_at is not None

    def summary(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "event": self.event}


def stored_target(rt: Runtime, kind: str, target: dict[str, Any]) -> dict[str, Any]:
    """The target as stored: a webhook secret is encrypted like a token."""
    stored = dict(target)
    secret = stored.pop("secret", None)
    if kind == "webhook" and secret:
        stored["secret_encrypted"] = rt.cipher.encrypt(str(secret))
    return stored


RoomIds = dict[str, tuple[int, str] | None]


def lookup_rooms(
    rt: Runtime, connection_id: int, base_url: str, token: str, rooms: Sequence[str]
) -> tuple[RoomIds, list[str]]:
    """Ask HipChat for rooms as a person named them, at subscription time: ``(found,
    unknown)``. ``found`` maps each room to its id and HipChat's name, or to None when
    HipChat cannot answer now (the first poll resolves it); ``unknown`` lists the rooms
    HipChat does not know, refused now while the person can still fix them. Every call
    takes from the connection's budget."""
    found: RoomIds = {}
    unknown: list[str] = []
    with rt.client(connection_id, base_url, token) as client:
        for room in rooms:
            try:
                got = client.find_room(room)
            except NotFound:
                unknown.append(room)
            except (RetryLater, NeedsAttention) as exc:
                log.warning(
                    "connection %s: rooms not resolved now (%s); the first poll resolves them",
                    connection_id,
                    exc,
                )
                found.update({r: None for r in rooms if r not in found and r not in unknown})
                break
            else:
                found[room] = (got.id, got.name)
    return found, unknown


def resolve_room(rt: Runtime, connection_id: int, room: str) -> tuple[int | None, str]:
    """The room's id and canonical name, asked of HipChat; (None, room) if it can't answer now.

    An unknown room is refused here, when the user can still fix it.
    """
    with rt.db.session() as s:
        row = conns.get_connection(s, connection_id)
        if row is None:
            raise ValidationError(f"no connection {connection_id}")
        base_url, token = row.base_url, conns.decrypt_token(row, rt.cipher)
    found, unknown = lookup_rooms(rt, connection_id, base_url, token, [room])
    if unknown:
        raise ValidationError(f"room {room!r} not found on this connection")
    return found.get(room) or (None, room)


def create_subscriptions(rt: Runtime, specs: list[SubscriptionSpec]) -> list[SubView]:
    """Validate every spec, resolve each distinct room once, then store them all in one
    transaction; any problem (all of them listed) stores nothing."""
    _refuse(_all_errors(specs))
    ids: dict[str, int] = {}
    with rt.db.session() as s:
        for spec in specs:
            conn_row = conns.get_connection(s, spec.connection)
            if conn_row is not None:
                ids[spec.connection] = conn_row.id
    _refuse(
        _unique(
            f"no connection named {spec.connection!r}"
            for spec in specs
            if spec.connection not in ids
        )
    )
    resolved: dict[tuple[int, str], tuple[int | None, str]] = {}
    errors: list[str] = []
    for spec in specs:
        watched = [spec.room] if spec.room and spec.event not in ROOM_LIST_EVENTS else []
        for room in watched + _target_rooms(spec):  # --to-room is looked up like --room
            key = (ids[spec.connection], room)
            if key not in resolved:
                try:
                    resolved[key] = resolve_room(rt, *key)
                except ValidationError as exc:
                    resolved[key] = (None, room)
                    errors.extend(exc.errors)
    _refuse(_unique(errors))
    views = []
    with rt.db.session() as s:
        for spec in specs:
            conn_id = ids[spec.connection]
            room_id, canonical = resolved.get((conn_id, spec.room or ""), (None, spec.room))
            row = subs.add_subscription(
                s,
                conn_id,
                spec.event,
                room=spec.room,  # as typed: recipes compare it; the id is authoritative
                filter=spec.filter,
                target_kind=spec.target_kind,
                target=stored_target(rt, spec.target_kind, spec.target),
                backfill=spec.backfill,
                name=spec.name,
                include_own=spec.include_own,
            )
            if room_id is not None:
                subs.set_room_id(s, row.id, room_id, canonical)
            s.flush()
            views.append(SubView.of(row))
    return views


def update_subscription(rt: Runtime, sub_id: int, spec: SubscriptionSpec) -> SubView:
    """Give subscription ``sub_id`` the filter, name and target of ``spec`` (its connection,
    event and room must be the stored ones), validated by the rules of a new subscription;
    the watermark and priming stay. A webhook target without a new ``secret`` keeps the
    stored one (``secret_encrypted``); any problem stores nothing."""
    _refuse(_all_errors([spec]))
    with rt.db.session() as s:
        conn_id = conns.require_connection(s, spec.connection).id
    errors: list[str] = []
    for room in _target_rooms(spec):
        try:
            resolve_room(rt, conn_id, room)
        except ValidationError as exc:
            errors.extend(exc.errors)
    _refuse(errors)
    with rt.db.session() as s:
        row = subs.update_subscription(
            s,
            sub_id,
            filter=spec.filter,
            target_kind=spec.target_kind,
            target=stored_target(rt, spec.target_kind, spec.target),
            name=spec.name,
            include_own=spec.include_own,
        )
        return SubView.of(row)


def _target_rooms(spec: SubscriptionSpec) -> list[str]:
    """The room an action target posts to, when it names one."""
    room = spec.target.get("room") if spec.target_kind == "action" else None
    return [str(room)] if isinstance(room, str | int) and not isinstance(room, bool) else []


def _all_errors(specs: list[SubscriptionSpec]) -> list[str]:
    errors = [e for spec in specs for e in spec_errors(spec) + name_errors(spec.name)]
    seen: set[tuple[str, str]] = set()
    for spec in specs:
        if spec.name is not None and (spec.connection, spec.name) in seen:
            errors.append(f"the name {spec.name!r} is given twice")
        seen.add((spec.connection, spec.name or ""))
    return _unique(errors)


def _unique(errors: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(errors))


def _refuse(errors: list[str]) -> None:
    if errors:
        raise ValidationError("invalid subscription: " + "; ".join(errors), errors)
