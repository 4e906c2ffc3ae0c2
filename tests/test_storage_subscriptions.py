"""storage.subscriptions on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import func, select

from storage import connections as conns
from storage import outbox
from storage import subscriptions as subs
from storage.crypto import TokenCipher
from storage.db import Database
from storage.errors import ValidationError
from storage.models import Connection, OutboxEvent, Subscription

ACTION = {"action": "send_notification", "room": "Dev", "message": "pong {matches[0]}"}


def test_add_and_read_back_every_field(db: Database, conn: Connection) -> None:
    with db.session() as s:
        added = subs.add_subscription(
            s,
            conn.id,
            "room_message",
            room=" Dev ",
            filter=r"^ping (\w+)",
            target_kind="action",
            target=ACTION,
            backfill=5,
            name="pinger",
        )
    with db.session() as s:
        found = subs.get_subscription(s, added.id)
        assert found is not None
        assert (found.event, found.room, found.filter) == ("room_message", "Dev", r"^ping (\w+)")
        assert (found.target_kind, found.target, found.backfill) == ("action", ACTION, 5)
        assert (found.state, found.primed_at, found.room_id, found.name) == (
            "active",
            None,
            None,
            "pinger",
        )
        assert found.created_at.tzinfo is UTC


def test_room_list_events_need_no_room(db: Database, conn: Connection) -> None:
    with db.session() as s:
        added = subs.add_subscription(
            s, conn.id, "room_created", target_kind="webhook", target={"url": "https://x"}
        )
    assert added.room is None


@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [
        ({"event": "room_sneeze"}, "unknown event"),
        ({"event": "room_message", "room": None}, "needs a room"),
        ({"event": "room_enter", "room": "  "}, "needs a room"),
        ({"target_kind": "email"}, "unknown target 'email'"),
        ({"target": ["not", "a", "dict"]}, "target must be a JSON object"),
        ({"target": {"when": datetime(2024, 1, 1, tzinfo=UTC)}}, "only JSON values"),
        ({"backfill": -1}, "backfill must be within"),
        ({"backfill": 1001}, "backfill must be within"),
        ({"backfill": True}, "whole number"),
        ({"name": "bad name"}, "bad subscription name"),
    ],
)
def test_bad_input_is_refused(
    db: Database, conn: Connection, kwargs: dict[str, Any], problem: str
) -> None:
    args: dict[str, Any] = {"event": "room_message", "room": "Dev", "target_kind": "log"}
    args["target"] = {}
    args.update(kwargs)
    event = args.pop("event")
    with pytest.raises(ValidationError, match=problem), db.session() as s:
        subs.add_subscription(s, conn.id, event, **args)


def test_unknown_connection_is_refused(db: Database) -> None:
    with pytest.raises(ValidationError, match="no connection with id 42"), db.session() as s:
        subs.add_subscription(s, 42, "room_created", target_kind="log", target={})


def test_names_are_unique_per_connection(
    db: Database, conn: Connection, cipher: TokenCipher
) -> None:
    def add(s: Any, conn_id: int, name: str | None) -> Subscription:
        return subs.add_subscription(
            s, conn_id, "room_created", target_kind="log", target={}, name=name
        )

    with db.session() as s:
        other = conns.add_connection(s, "other", "https://h.example", "t", cipher)
        add(s, conn.id, "recipe-1")
        add(s, other.id, "recipe-1")  # same name, other connection: fine
        add(s, conn.id, None)
        add(s, conn.id, None)  # unnamed ones never clash
        with pytest.raises(ValidationError, match="already has a subscription named 'recipe-1'"):
            add(s, conn.id, "recipe-1")
    with db.session() as s:
        assert len(subs.list_subscriptions(s)) == 4
        assert len(subs.list_subscriptions(s, conn.id)) == 3


def test_states_and_active_subscriptions(db: Database, conn: Connection) -> None:
    with db.session() as s:
        ids = [
            subs.add_subscription(s, conn.id, "room_created", target_kind="log", target={}).id
            for _ in range(3)
        ]
        subs.set_subscription_state(s, ids[1], "error", "room 'Dev' not found")
        subs.set_subscription_state(s, ids[2], "paused")
        with pytest.raises(ValidationError, match="bad subscription state"):
            subs.set_subscription_state(s, ids[0], "broken")
        with pytest.raises(ValidationError, match="no subscription with id 999"):
            subs.set_subscription_state(s, 999, "paused")
    with db.session() as s:
        assert [x.id for x in subs.active_subscriptions(s, conn.id)] == [ids[0]]
        errored = subs.get_subscription(s, ids[1])
        assert errored is not None
        assert (errored.state, errored.state_reason) == ("error", "room 'Dev' not found")


def test_mark_primed_keeps_the_first_time(db: Database, sub: Subscription) -> None:
    first = datetime(2024, 1, 1, tzinfo=UTC)
    with db.session() as s:
        assert subs.mark_primed(s, [sub.id], first) == 1
        assert subs.mark_primed(s, [sub.id], first + timedelta(hours=1)) == 0
        assert subs.mark_primed(s, [], first) == 0
        found = subs.get_subscription(s, sub.id)
        assert found is not None
        assert found.primed_at == first
    with db.session() as s:
        found = subs.get_subscription(s, sub.id)
        assert found is not None
        assert found.primed_at == first


def test_set_room_id(db: Database, sub: Subscription) -> None:
    with db.session() as s:
        subs.set_room_id(s, sub.id, 2_147_483_648)  # wider than 32 bits
    with db.session() as s:
        found = subs.get_subscription(s, sub.id)
        assert found is not None
        assert found.room_id == 2_147_483_648


def test_remove_subscription_takes_its_events(db: Database, sub: Subscription) -> None:
    with db.session() as s:
        outbox.add_events(s, [outbox.NewEvent(sub.connection_id, sub.id, "k", "room_message", {})])
    with db.session() as s:
        assert subs.remove_subscription(s, sub.id) is True
        assert subs.remove_subscription(s, sub.id) is False
    with db.session() as s:
        assert s.scalar(select(func.count()).select_from(OutboxEvent)) == 0
