"""storage.outbox on SQLite and PostgreSQL: idempotency, atomicity, delivery states, relay."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select

from storage import connections, outbox, subscriptions, watermarks
from storage.crypto import TokenCipher
from storage.db import Database
from storage.errors import ValidationError
from storage.models import OutboxEvent, Subscription, Watermark
from storage.outbox import NewEvent

T0 = datetime(2024, 6, 1, 12, 0, tzinfo=UTC)
MINUTE = timedelta(minutes=1)


def new(sub: Subscription, key: str, **payload: object) -> NewEvent:
    return NewEvent(sub.connection_id, sub.id, key, sub.event, dict(payload))


def count(db: Database) -> int:
    with db.session() as s:
        return int(s.scalar(select(func.count()).select_from(OutboxEvent)) or 0)


def test_add_events_skips_known_keys_and_returns_only_new_rows(
    db: Database, sub: Subscription
) -> None:
    with db.session() as s:
        first = outbox.add_events(s, [new(sub, "k1", n=1), new(sub, "k2", n=2)], at=T0)
        assert [(e.idempotency_key, e.payload, e.state) for e in first] == [
            ("k1", {"n": 1}, "pending"),
            ("k2", {"n": 2}, "pending"),
        ]
        assert all(e.created_at == T0 and e.attempts == 0 for e in first)
    with db.session() as s:
        again = outbox.add_events(s, [new(sub, "k3"), new(sub, "k2", n=99), new(sub, "k3")])
        assert [e.idempotency_key for e in again] == ["k3"]
        assert outbox.add_events(s, []) == []
    with db.session() as s:
        stored = {e.idempotency_key: e.payload for e in s.scalars(select(OutboxEvent))}
    assert stored == {"k1": {"n": 1}, "k2": {"n": 2}, "k3": {}}


def test_payloads_read_back_exactly_as_written(db: Database, sub: Subscription) -> None:
    payload = {"z": 1, "a": {"y": [1, "two", None], "b": "ünïcødé"}, "m": True}
    with db.session() as s:
        (event,) = outbox.add_events(
            s, [NewEvent(sub.connection_id, sub.id, "k", "room_message", payload)]
        )
    with db.session() as s:
        stored = outbox.get_event(s, event.id)
        assert stored is not None
        assert list(stored.payload) == ["z", "a", "m"]
        assert stored.payload == payload


def test_add_events_keeps_the_callers_order_across_chunks(db: Database, sub: Subscription) -> None:
    keys = [f"key-{i:04d}" for i in reversed(range(1200))]
    with db.session() as s:
        outbox.add_events(s, [new(sub, keys[5])])
        added = outbox.add_events(s, [new(sub, k, i=i) for i, k in enumerate(keys)])
    assert [e.idempotency_key for e in added] == keys[:5] + keys[6:]
    assert count(db) == 1200


@pytest.mark.parametrize(
    ("key", "event", "problem"),
    [
        ("", "room_message", "idempotency key"),
        ("k" * 256, "room_message", "idempotency key"),
        ("k", "room_sneeze", "unknown event"),
    ],
)
def test_bad_events_are_refused(
    db: Database, sub: Subscription, key: str, event: str, problem: str
) -> None:
    with pytest.raises(ValidationError, match=problem), db.session() as s:
        outbox.add_events(s, [NewEvent(sub.connection_id, sub.id, key, event, {})])


def test_concurrent_writers_of_one_key_make_exactly_one_row(
    db: Database, sub: Subscription
) -> None:
    writers = 8
    barrier = threading.Barrier(writers)
    inserted: list[int] = []
    errors: list[BaseException] = []

    def write() -> None:
        try:
            barrier.wait()
            with db.session() as s:
                inserted.append(len(outbox.add_events(s, [new(sub, "same-item")])))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write) for _ in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert sorted(inserted) == [0] * (writers - 1) + [1]
    assert count(db) == 1


def test_events_and_watermark_commit_or_roll_back_together(db: Database, sub: Subscription) -> None:
    def poll(fail: bool) -> None:
        with db.session() as s:
            outbox.add_events(s, [new(sub, "item-1")])
            watermarks.advance_watermark(s, sub.connection_id, 7, "history", "m1", T0)
            if fail:
                raise RuntimeError("worker died before commit")

    with pytest.raises(RuntimeError):
        poll(fail=True)
    with db.session() as s:
        assert s.scalar(select(func.count()).select_from(Watermark)) == 0
    assert count(db) == 0
    poll(fail=False)
    with db.session() as s:
        assert watermarks.get_watermark(s, sub.connection_id, 7, "history") is not None
    assert count(db) == 1


def test_delivery_life_cycle(db: Database, sub: Subscription) -> None:
    with db.session() as s:
        (event,) = outbox.add_events(s, [new(sub, "k")], at=T0)
        assert outbox.mark_dispatched(s, [event.id], T0) == 1
    with db.session() as s:
        claimed = outbox.get_event(s, event.id)
        assert claimed is not None
        assert (claimed.state, claimed.dispatched_at) == ("dispatched", T0)
        assert outbox.mark_failed(s, event.id, "HTTP 503", T0 + MINUTE, dead=False)
        assert outbox.mark_failed(s, event.id, "HTTP 503", T0 + MINUTE, dead=False, attempts=5)
        assert outbox.mark_delivered(s, event.id, T0 + 2 * MINUTE, "HTTP 200")
    with db.session() as s:
        done = outbox.get_event(s, event.id)
        assert done is not None
        assert (done.state, done.attempts, done.last_error, done.outcome) == (
            "delivered",
            5,
            "HTTP 503",
            "HTTP 200",
        )
        assert (done.delivered_at, done.next_attempt_at) == (T0 + 2 * MINUTE, None)
        # Closed events stay closed: idempotent delivery.
        assert not outbox.mark_delivered(s, event.id, T0)
        assert not outbox.mark_failed(s, event.id, "late", None, dead=True)
        assert outbox.mark_dispatched(s, [event.id], T0) == 0
        assert outbox.next_for_subscription(s, sub.id) is None


def test_mark_failed_counts_and_dead_is_final(db: Database, sub: Subscription) -> None:
    with db.session() as s:
        (event,) = outbox.add_events(s, [new(sub, "k")], at=T0)
        outbox.mark_failed(s, event.id, "timeout", T0 + MINUTE, dead=False)
        outbox.mark_failed(s, event.id, "x" * 5000, None, dead=True)
    with db.session() as s:
        dead = outbox.get_event(s, event.id)
        assert dead is not None
        assert (dead.state, dead.attempts, dead.next_attempt_at) == ("dead", 2, None)
        assert dead.last_error is not None
        assert len(dead.last_error) == outbox.MAX_TEXT_LENGTH
        assert outbox.next_for_subscription(s, sub.id) is None


def test_undispatched_finds_what_the_relay_must_resend(db: Database, sub: Subscription) -> None:
    old, recent, cutoff = T0 - 10 * MINUTE, T0 + MINUTE, T0
    with db.session() as s:
        keys = ["lost-pending", "young-pending", "stuck", "fresh", "retry-later", "retry-overdue"]
        keys += ["delivered", "dead"]
        made = {e.idempotency_key: e.id for e in outbox.add_events(s, [new(sub, k) for k in keys])}
        for key in keys:
            s.get_one(OutboxEvent, made[key]).created_at = old
        s.get_one(OutboxEvent, made["young-pending"]).created_at = recent
        outbox.mark_dispatched(s, [made[k] for k in keys[2:]], old)
        outbox.mark_dispatched(s, [made["fresh"]], recent)
        outbox.mark_failed(s, made["retry-later"], "503", recent, dead=False)
        outbox.mark_failed(s, made["retry-overdue"], "503", old, dead=False)
        outbox.mark_delivered(s, made["delivered"], old)
        outbox.mark_failed(s, made["dead"], "410", None, dead=True)
    with db.session() as s:
        found = outbox.undispatched(s, older_than=cutoff, limit=100)
        assert [e.idempotency_key for e in found] == ["lost-pending", "stuck", "retry-overdue"]
        assert len(outbox.undispatched(s, older_than=cutoff, limit=2)) == 2
        later = outbox.undispatched(s, older_than=cutoff, dispatched_before=T0 + 2 * MINUTE)
        assert [e.idempotency_key for e in later] == [
            "lost-pending",
            "stuck",
            "fresh",
            "retry-later",
            "retry-overdue",
        ]


def test_two_relays_split_the_work_on_postgresql(pg_db: Database, cipher: TokenCipher) -> None:
    # SKIP LOCKED is PostgreSQL's; SQLite serializes writers with BEGIN IMMEDIATE instead.
    with pg_db.session() as s:
        conn = connections.add_connection(s, "main", "https://h.example", "t", cipher)
        sub = subscriptions.add_subscription(
            s, conn.id, "room_created", target_kind="log", target={}
        )
        outbox.add_events(s, [new(sub, f"k{i}") for i in range(4)], at=T0)
    with pg_db.session() as first:
        taken = outbox.undispatched(first, older_than=T0 + MINUTE, limit=3)
        with pg_db.session() as second:
            rest = outbox.undispatched(second, older_than=T0 + MINUTE, limit=10)
        assert [e.idempotency_key for e in taken] == ["k0", "k1", "k2"]
        assert [e.idempotency_key for e in rest] == ["k3"]


def test_next_for_subscription_is_the_oldest_open_event(db: Database, sub: Subscription) -> None:
    with db.session() as s:
        events = outbox.add_events(s, [new(sub, "a"), new(sub, "b")], at=T0)
        outbox.mark_failed(s, events[0].id, "503", T0 + MINUTE, dead=False)
    with db.session() as s:
        head = outbox.next_for_subscription(s, sub.id, T0)
        assert head is not None
        assert (head.idempotency_key, head.state, head.dispatched_at) == ("a", "dispatched", T0)
        assert head.next_attempt_at == T0 + MINUTE  # not due yet, still the head
        outbox.mark_delivered(s, head.id, T0)
        following = outbox.next_for_subscription(s, sub.id)
        assert following is not None
        assert (following.idempotency_key, following.state) == ("b", "pending")
        outbox.mark_delivered(s, following.id, T0)
        assert outbox.next_for_subscription(s, sub.id) is None
        assert [e.idempotency_key for e in outbox.delivered_since(s)] == ["a", "b"]
        assert [e.idempotency_key for e in outbox.delivered_since(s, after_id=head.id)] == ["b"]


def test_stats_and_purge(db: Database, sub: Subscription) -> None:
    with db.session() as s:
        assert outbox.stats(s) == {"pending": 0, "dispatched": 0, "delivered": 0, "dead": 0}
        a, b, c, _ = outbox.add_events(s, [new(sub, k) for k in "abcd"], at=T0)
        outbox.mark_dispatched(s, [b.id], T0)
        outbox.mark_delivered(s, c.id, T0)
        outbox.mark_failed(s, a.id, "gone", None, dead=True)
        assert outbox.stats(s) == {"pending": 1, "dispatched": 1, "delivered": 1, "dead": 1}
        assert outbox.purge_closed(s, T0) == 0
        assert outbox.purge_closed(s, T0 + MINUTE) == 2
        assert outbox.stats(s) == {"pending": 1, "dispatched": 1, "delivered": 0, "dead": 0}


# -- the attempt log, listing, replay (operators: `hipchat-poller events`) ----------------------


def test_every_attempt_is_logged_with_its_time_and_duration(
    db: Database, sub: Subscription
) -> None:
    with db.session() as s:
        (event,) = outbox.add_events(s, [new(sub, "k")], at=T0)
        outbox.mark_failed(
            s, event.id, "HTTP 503", T0 + MINUTE, dead=False, at=T0, duration_ms=12.4
        )
        outbox.mark_failed(s, event.id, "429", T0 + MINUTE, dead=False, at=T0 + MINUTE, attempts=1)
        outbox.mark_delivered(s, event.id, T0 + 2 * MINUTE, "webhook 200", duration_ms=3)
        outbox.mark_delivered(s, event.id, T0 + 3 * MINUTE, "again")  # closed: nothing logged
    with db.session() as s:
        done = outbox.get_event(s, event.id)
        assert done is not None
        assert done.attempt_log == [
            {"at": T0.isoformat(), "error": "HTTP 503", "ms": 12},
            {"at": (T0 + MINUTE).isoformat(), "error": "429", "ms": None},
            {"at": (T0 + 2 * MINUTE).isoformat(), "outcome": "webhook 200", "ms": 3},
        ]


def test_the_attempt_log_keeps_the_newest_entries(db: Database, sub: Subscription) -> None:
    with db.session() as s:
        (event,) = outbox.add_events(s, [new(sub, "k")], at=T0)
        for i in range(outbox.MAX_ATTEMPT_LOG + 5):
            outbox.mark_failed(s, event.id, f"try {i}", None, dead=False, at=T0)
    with db.session() as s:
        log = s.get_one(OutboxEvent, event.id).attempt_log or []
    assert len(log) == outbox.MAX_ATTEMPT_LOG
    assert (log[0]["error"], log[-1]["error"]) == ("try 5", f"try {outbox.MAX_ATTEMPT_LOG + 4}")


def test_list_events_filters_and_puts_the_newest_first(db: Database, sub: Subscription) -> None:
    with db.session() as s:
        other = subscriptions.add_subscription(
            s, sub.connection_id, "room_created", target_kind="log", target={}
        )
        outbox.add_events(s, [new(sub, "old")], at=T0 - 10 * MINUTE)
        a, b = outbox.add_events(s, [new(sub, "a"), new(other, "b")], at=T0)
        outbox.mark_failed(s, b.id, "gone", None, dead=True)
    with db.session() as s:
        keys = [e.idempotency_key for e in outbox.list_events(s)]
        assert keys == ["b", "a", "old"]
        assert [e.id for e in outbox.list_events(s, subscription_id=other.id)] == [b.id]
        assert [e.id for e in outbox.list_events(s, states=["dead"])] == [b.id]
        assert [e.id for e in outbox.list_events(s, since=T0)] == [b.id, a.id]
        assert [e.id for e in outbox.list_events(s, limit=1)] == [b.id]
        assert outbox.list_events(s, connection_id=sub.connection_id + 1) == []
        assert outbox.count_events(s, states=["dead"]) == 1
        assert outbox.count_events(s, states=["dead"], since=T0 + MINUTE) == 0
        assert outbox.counts_by_subscription(s) == {
            sub.id: {"pending": 2},
            other.id: {"dead": 1},
        }


def test_replay_requeues_closed_events_under_their_keys(db: Database, sub: Subscription) -> None:
    with db.session() as s:
        dead, delivered, open_ = outbox.add_events(s, [new(sub, k) for k in "abc"], at=T0)
        for _ in range(3):
            outbox.mark_failed(s, dead.id, "HTTP 503", T0 + MINUTE, dead=False, at=T0)
        outbox.mark_failed(s, dead.id, "HTTP 503", None, dead=True, at=T0)
        outbox.mark_delivered(s, delivered.id, T0, "logged")
    with db.session() as s:
        assert [e.id for e in outbox.closed_events(s)] == [dead.id]
        chosen = outbox.closed_events(
            s, ids=[dead.id, delivered.id, open_.id], states=outbox.CLOSED_OUTBOX_STATES
        )
        assert [e.id for e in chosen] == [dead.id, delivered.id]
        assert outbox.replay(s, [*chosen, s.get_one(OutboxEvent, open_.id)], T0 + MINUTE) == [
            dead.id,
            delivered.id,
        ]
    with db.session() as s:
        again = s.get_one(OutboxEvent, dead.id)
        assert (again.idempotency_key, again.state, again.attempts) == ("a", "pending", 0)
        assert (again.next_attempt_at, again.last_error, again.delivered_at) == (None, None, None)
        assert again.attempt_log is not None
        assert len(again.attempt_log) == 5  # the four attempts are kept
        assert again.attempt_log[-1] == {"at": (T0 + MINUTE).isoformat(), "replayed": True}
        # The relay hands it over like any pending event left behind.
        found = outbox.undispatched(s, older_than=T0 + MINUTE)
        assert [e.idempotency_key for e in found] == ["a", "b", "c"]
        assert outbox.closed_events(s) == []


def test_replay_by_subscription_and_since(db: Database, sub: Subscription) -> None:
    with db.session() as s:
        early, late = outbox.add_events(s, [new(sub, "early")], at=T0 - MINUTE) + (
            outbox.add_events(s, [new(sub, "late")], at=T0)
        )
        for event in (early, late):
            outbox.mark_failed(s, event.id, "gone", None, dead=True)
    with db.session() as s:
        assert outbox.closed_events(s, subscription_id=sub.id + 1) == []
        recent = outbox.closed_events(s, subscription_id=sub.id, since=T0)
        assert [e.idempotency_key for e in recent] == ["late"]
