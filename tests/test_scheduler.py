"""Beat's connection scheduler under a controlled clock, and the thin Celery tasks it feeds:
the interval claim, the hand-over to delivery, the relay.

The scheduler tests record ``send_task`` calls instead of publishing; one test publishes to a
``redis-server`` of its own and counts the Redis commands a send costs. The heap itself is
tested in ``test_poll_schedule.py``."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from celery.exceptions import Retry
from cryptography.fernet import Fernet
from redis.lock import Lock
from sqlalchemy import text, update

from emulator.testing import ManualClock
from storage import connections as conns
from storage import outbox
from storage.errors import RetryLater
from storage.health import get_health
from storage.models import Connection, OutboxEvent
from tasks import celery_tasks
from tasks.connections_api import add_connection
from tasks.delivery import drain
from tasks.poll import poll_connection
from tasks.runtime import Runtime
from tasks.settings import Settings
from tests.pipeline_support import (
    ROOM,
    Backend,
    Pipeline,
    Receiver,
)
from tests.redis_server import RedisServer
from tests.storage_support import opened, sqlite_url
from worker import scheduler as scheduler_module
from worker.app import POLL_QUEUE, create_app
from worker.poll_schedule import interval_index
from worker.scheduler import (
    BROKER_RETRY_SECONDS,
    FULL_SCAN_EVERY_SECONDS,
    HEARTBEAT_EVERY,
    POLL_TASK,
    PURGE_TASK,
    RELAY_TASK,
    SYNC_EVERY_SECONDS,
    ConnectionScheduler,
)

INTERVAL = 60.0
RELAY_EVERY = 30.0
T0 = 1_900_000_020.0  # a multiple of 60: interval k of offset o began at T0 - 60 + o


@dataclass
class Sent:
    at: float
    name: str
    args: list[Any]
    options: dict[str, Any]


@dataclass
class Beat:
    app: Celery
    rt: Runtime
    clock: ManualClock
    sent: list[Sent] = field(default_factory=list)
    scheduler: ConnectionScheduler | None = None

    def add(self, name: str) -> int:
        return add_connection(self.rt, name, "http://hipchat.example", f"tok-{name}").id

    def offset(self, conn_id: int) -> float:
        with self.rt.db.session() as s:
            row = conns.get_connection(s, conn_id)
            assert row is not None
            return row.poll_offset_seconds % INTERVAL

    def set_offset(self, conn_id: int, offset: float) -> None:
        with self.rt.db.session() as s:
            row = conns.get_connection(s, conn_id)
            assert row is not None
            row.poll_offset_seconds = offset

    def age_rows(self) -> None:
        """Every connection row last changed an hour ago (of real time: rows are stamped
        with the wall clock, not the scheduler's)."""
        with self.rt.db.session() as s:
            s.execute(update(Connection).values(updated_at=datetime.now(UTC) - timedelta(hours=1)))

    def start(self, resume: bool | None = None) -> ConnectionScheduler:
        self.scheduler = ConnectionScheduler(self.app, clock=self.clock, resume=resume)
        return self.scheduler

    def run_until(self, end: float, step: float = 1.0) -> None:
        """Tick every ``step`` seconds of fake time up to and including ``end``."""
        assert self.scheduler is not None
        while self.clock() <= end:
            self.scheduler.tick()
            self.clock.advance(step)

    def polls(self, conn_id: int | None = None, since: float = -1.0) -> list[Sent]:
        return [
            x
            for x in self.sent
            if x.name == POLL_TASK and conn_id in (None, x.args[0]) and x.at >= since
        ]

    def relays(self) -> list[Sent]:
        return [x for x in self.sent if x.name == RELAY_TASK]


@pytest.fixture(name="beat")
def beat_fixture(backend: Backend, monkeypatch: pytest.MonkeyPatch) -> Iterator[Beat]:
    settings = backend.settings(poll_interval_seconds=INTERVAL, relay_interval_seconds=RELAY_EVERY)
    app = create_app(settings)
    rt = backend.adopt(Runtime.of(app))
    clock = ManualClock(T0)
    beat = Beat(app, rt, clock)

    def send_task(name: str, args: list[Any] | None = None, **options: Any) -> None:
        beat.sent.append(Sent(clock(), name, list(args or []), options))

    monkeypatch.setattr(app, "send_task", send_task)
    return beat


# -- the scheduler ------------------------------------------------------------------------------


def test_a_connection_is_sent_once_per_interval(beat: Beat) -> None:
    conn = beat.add("alpha")
    offset = beat.offset(conn)
    beat.start()
    beat.run_until(T0 + 3 * INTERVAL)
    polls = beat.polls(conn)
    first = interval_index(T0, INTERVAL, offset)
    assert [p.args for p in polls] == [[conn, first + k] for k in range(4)]
    assert polls[0].at == T0  # a new connection is polled right away
    for sent in polls[1:]:  # then at its offset in each interval, within one tick
        index = sent.args[1]
        assert 0 <= sent.at - (index * INTERVAL + offset) < 1.0
        assert sent.options["expires"] == INTERVAL


def test_offsets_spread_connections_over_the_interval(beat: Beat) -> None:
    ids = [beat.add(name) for name in ("alpha", "bravo", "charlie", "delta")]
    offsets = {conn: beat.offset(conn) for conn in ids}
    assert len({round(o) for o in offsets.values()}) == len(ids)
    beat.start()
    beat.run_until(T0)
    start = beat.clock()
    beat.run_until(start + INTERVAL - 1)
    later = beat.polls(since=start)
    assert sorted(p.args[0] for p in later) == sorted(ids)  # each once in one interval
    for sent in later:
        assert (sent.at - offsets[sent.args[0]]) % INTERVAL < 1.0
    assert len({p.at for p in later}) == len(ids)


def test_a_tick_with_nothing_due_visits_no_connection(beat: Beat) -> None:
    ids = [beat.add(f"conn-{i}") for i in range(20)]
    scheduler = beat.start()
    scheduler.tick()
    assert sorted(p.args[0] for p in beat.polls()) == sorted(ids)
    visits, due = scheduler.schedule.visits, scheduler.schedule.next_due()
    assert due is not None
    # Between two due polls (and before the next read of the database): no connection is
    # looked at, nothing is sent.
    beat.clock.set(T0 + min(due - T0, SYNC_EVERY_SECONDS) / 2)
    scheduler.tick()
    assert (scheduler.schedule.visits, len(beat.polls())) == (visits, len(ids))
    # When the next one falls due, that one alone.
    beat.clock.set(due)
    scheduler.tick()
    assert scheduler.schedule.visits == visits + 1
    assert len(beat.polls(since=due)) == 1


def test_tick_sleeps_until_the_next_due_poll(beat: Beat) -> None:
    conn = beat.add("alpha")
    offset = beat.offset(conn)
    scheduler = beat.start()
    wait = scheduler.tick()
    assert 0 <= wait <= scheduler.max_interval
    due = (interval_index(T0, INTERVAL, offset) + 1) * INTERVAL + offset
    assert wait == pytest.approx(min(due - T0, RELAY_EVERY, scheduler.max_interval))


def test_the_relay_is_sent_every_relay_interval(beat: Beat) -> None:
    beat.start()
    beat.run_until(T0 + 4 * RELAY_EVERY)
    relays = beat.relays()
    assert [r.at - T0 for r in relays] == [0.0, 30.0, 60.0, 90.0, 120.0]
    assert all(r.args == [] for r in relays)


def test_polls_and_relays_keep_no_result_and_send_no_sent_event(beat: Beat) -> None:
    beat.add("alpha")
    beat.start()
    beat.run_until(T0)
    assert {s.name for s in beat.sent} == {POLL_TASK, RELAY_TASK, PURGE_TASK}
    for sent in beat.sent:
        assert sent.options["ignore_result"] is True
        dispatcher = sent.options["event_dispatcher"]  # what publishes the task-sent event
        assert dispatcher.publish("task-sent", {"uuid": "x"}, None) is None


# -- reading the connections --------------------------------------------------------------------


def test_a_new_connection_is_picked_up_without_a_restart(beat: Beat) -> None:
    beat.add("alpha")
    beat.start()
    beat.run_until(T0)
    late = beat.add("late")
    beat.run_until(T0 + SYNC_EVERY_SECONDS - 1)
    assert beat.polls(late) == []  # not yet re-read
    beat.run_until(T0 + SYNC_EVERY_SECONDS)
    (sent,) = beat.polls(late)
    assert sent.at == T0 + SYNC_EVERY_SECONDS  # in its current interval
    assert sent.args == [late, interval_index(sent.at, INTERVAL, beat.offset(late))]


def test_only_edited_connections_are_read_again(
    beat: Beat, monkeypatch: pytest.MonkeyPatch
) -> None:
    kept, paused = beat.add("kept"), beat.add("paused")
    beat.age_rows()  # both changed, together, long ago
    reads: list[list[int]] = []
    changes = scheduler_module.connection_changes

    def spy(session: Any, since: datetime) -> list[conns.ConnectionChange]:
        rows = changes(session, since)
        reads.append([row.id for row in rows])
        return rows

    monkeypatch.setattr(scheduler_module, "connection_changes", spy)
    scheduler = beat.start()
    beat.run_until(T0 + 2 * SYNC_EVERY_SECONDS)
    assert reads == [[], []]  # unchanged rows are not read again and again

    with beat.rt.db.session() as s:
        conns.set_connection_state(s, paused, "paused", "by an operator")
    beat.run_until(T0 + 3 * SYNC_EVERY_SECONDS)
    assert reads[-1] == [paused]
    assert paused not in scheduler.schedule
    assert kept in scheduler.schedule

    with beat.rt.db.session() as s:  # resumed: polled at once, in its current interval
        conns.set_connection_state(s, paused, "active")
    beat.run_until(T0 + 4 * SYNC_EVERY_SECONDS)
    assert reads[-1] == [paused]
    (resumed,) = beat.polls(paused, since=T0 + 1)
    assert resumed.at == T0 + 4 * SYNC_EVERY_SECONDS
    assert resumed.args[1] == interval_index(resumed.at, INTERVAL, beat.offset(paused))

    beat.set_offset(kept, 59.0)  # an edited offset: the connection's polls move
    beat.run_until(T0 + 3 * INTERVAL)
    moved = beat.polls(kept, since=T0 + 5 * SYNC_EVERY_SECONDS + 1)
    assert moved
    assert all((p.at - 59.0) % INTERVAL < 1.0 for p in moved)


def test_the_full_scan_sees_what_updated_at_cannot_show(beat: Beat) -> None:
    """A deleted row, and a state changed by SQL that bypassed the ORM's updated_at."""
    gone, hidden, kept = beat.add("gone"), beat.add("hidden"), beat.add("kept")
    scheduler = beat.start()
    beat.run_until(T0)
    beat.age_rows()
    with beat.rt.db.session() as s:
        conns.remove_connection(s, gone)
        s.execute(text("UPDATE connections SET state = 'paused' WHERE id = :id"), {"id": hidden})
    beat.run_until(T0 + FULL_SCAN_EVERY_SECONDS - 1)
    assert {gone, hidden, kept} <= scheduler.schedule.ids()  # the changes reads cannot see them
    beat.run_until(T0 + FULL_SCAN_EVERY_SECONDS)
    assert scheduler.schedule.ids() == {kept}
    beat.run_until(T0 + 3 * INTERVAL)
    assert {p.args[0] for p in beat.polls(since=T0 + FULL_SCAN_EVERY_SECONDS)} == {kept}


def test_a_database_blip_keeps_the_schedule(beat: Beat, monkeypatch: pytest.MonkeyPatch) -> None:
    conn = beat.add("alpha")
    beat.start()
    beat.run_until(T0)

    def broken(*_args: Any) -> Any:
        raise RuntimeError("database down")

    for name in ("active_poll_offsets", "connection_changes"):
        monkeypatch.setattr(scheduler_module, name, broken)
    beat.run_until(T0 + 2 * INTERVAL)
    assert len(beat.polls(conn)) == 3


# -- a restarted beat ---------------------------------------------------------------------------


def test_a_restarted_beat_resumes_the_spread_from_the_claims(beat: Beat) -> None:
    recent, old = 55.0, 20.0  # current intervals that began 5 s and 40 s before T0
    current = interval_index(T0, INTERVAL, recent)
    assert current == interval_index(T0, INTERVAL, old)
    cases = {  # name: (offset, claimed interval)
        "polled": (recent, current),
        "missed": (recent, None),
        "missed-again": (recent, current - 1),
        "long-ago": (old, None),
        "polled-long-ago": (old, current),
    }
    ids = {}
    for name, (offset, claimed) in cases.items():
        ids[name] = conn = beat.add(name)
        beat.set_offset(conn, offset)
        if claimed is not None:
            assert beat.rt.leases.claim_interval(conn, claimed, ttl_seconds=2 * INTERVAL)

    beat.start(resume=True)
    beat.run_until(T0)  # what a short outage missed goes now; nothing else
    assert sorted(p.args for p in beat.polls()) == sorted(
        [[ids["missed"], current], [ids["missed-again"], current]]
    )
    beat.run_until(T0 + INTERVAL - 1)  # the others at their next slot, as usual
    firsts = {p.args[0]: p for p in reversed(beat.polls(since=T0 + 1))}
    for name in ("polled", "long-ago", "polled-long-ago"):
        offset, _ = cases[name]
        assert firsts[ids[name]].args[1] == current + 1
        assert firsts[ids[name]].at == T0 - INTERVAL + offset + INTERVAL


def test_without_redis_a_started_beat_polls_every_connection_at_once(beat: Beat) -> None:
    conn = beat.add("alpha")
    beat.set_offset(conn, 20.0)  # its current interval began 40 s ago
    assert beat.rt.leases.claim_interval(conn, interval_index(T0, INTERVAL, 20.0) - 1, 120.0)
    beat.start()  # embedded settings: no claims are read
    beat.run_until(T0)
    assert [p.args for p in beat.polls()] == [[conn, interval_index(T0, INTERVAL, 20.0)]]


def test_a_restart_with_redis_away_waits_for_the_next_slots(
    beat: Beat, monkeypatch: pytest.MonkeyPatch
) -> None:
    recent, old = beat.add("recent"), beat.add("old")
    beat.set_offset(recent, 55.0)
    beat.set_offset(old, 20.0)

    def down(*_args: Any, **_kwargs: Any) -> Any:
        raise redis.ConnectionError("Redis is away")

    monkeypatch.setattr(beat.rt.redis, "pipeline", down)
    beat.start(resume=True)  # nothing is known to be claimed
    beat.run_until(T0)
    assert [p.args[0] for p in beat.polls()] == [recent]


# -- the broker -----------------------------------------------------------------------------------


def test_a_broker_error_keeps_the_slot(beat: Beat, monkeypatch: pytest.MonkeyPatch) -> None:
    conn = beat.add("alpha")
    recorded = beat.app.send_task

    def broker_down(*_args: Any, **_kwargs: Any) -> None:
        raise ConnectionError("broker down")

    monkeypatch.setattr(beat.app, "send_task", broker_down)
    scheduler = beat.start()
    assert scheduler.tick() == BROKER_RETRY_SECONDS  # nothing went out: try again soon
    monkeypatch.setattr(beat.app, "send_task", recorded)
    beat.clock.advance(BROKER_RETRY_SECONDS)
    scheduler.tick()
    (sent,) = beat.polls(conn)
    assert sent.args == [conn, interval_index(T0, INTERVAL, beat.offset(conn))]

    # Down for longer than an interval: only the latest missed interval is sent.
    monkeypatch.setattr(beat.app, "send_task", broker_down)
    beat.run_until(T0 + 2.5 * INTERVAL)
    monkeypatch.setattr(beat.app, "send_task", recorded)
    beat.run_until(T0 + 2.5 * INTERVAL + BROKER_RETRY_SECONDS)
    (late,) = beat.polls(conn, since=T0 + 2)
    assert late.args == [conn, interval_index(late.at, INTERVAL, beat.offset(conn))]


def test_beat_touches_its_heartbeat_while_the_broker_takes_its_sends(
    beat: Beat, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the compose healthcheck reads: a file touched every few seconds while beat ticks
    and the broker takes what it sends; stale when either stops."""
    heartbeat = tmp_path / "beat.alive"
    beat.rt.settings = replace(beat.rt.settings, beat_heartbeat_file=str(heartbeat))
    scheduler = beat.start()
    scheduler.tick()
    assert heartbeat.exists()
    os.utime(heartbeat, (0, 0))
    beat.clock.advance(1.0)
    scheduler.tick()  # within HEARTBEAT_EVERY of the last touch
    assert heartbeat.stat().st_mtime == 0

    def broker_down(*_args: Any, **_kwargs: Any) -> None:
        raise ConnectionError("broker down")

    recorded = beat.app.send_task
    monkeypatch.setattr(beat.app, "send_task", broker_down)
    beat.clock.advance(RELAY_EVERY)  # a relay is due: its send fails
    scheduler.tick()
    assert heartbeat.stat().st_mtime == 0
    beat.clock.advance(HEARTBEAT_EVERY)
    scheduler.tick()  # nothing was sent: the broker is still taken to be down
    assert heartbeat.stat().st_mtime == 0
    monkeypatch.setattr(beat.app, "send_task", recorded)
    beat.clock.advance(RELAY_EVERY)  # the next relay goes out
    scheduler.tick()
    assert heartbeat.stat().st_mtime > 0


@pytest.fixture(name="broker_app")
def broker_app_fixture(
    redis_server: RedisServer, tmp_path: Path, key_prefix: str
) -> Iterator[Celery]:
    """A Celery app whose broker is this module's own redis-server; SQLite."""
    url = sqlite_url(tmp_path)
    with opened(url, migrate=True):
        pass
    settings = Settings(
        database_url=url,
        redis_url=redis_server.url,
        data_dir=str(tmp_path),
        secret_key=Fernet.generate_key().decode(),
        redis_key_prefix=key_prefix,
        poll_interval_seconds=INTERVAL,
        relay_interval_seconds=RELAY_EVERY,
    )
    app = create_app(settings)
    yield app
    rt = Runtime.of(app)
    rt.close()
    rt.redis.close()
    app.close()


def _command_calls(client: redis.Redis) -> dict[str, int]:
    stats = client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(s["calls"]) for name, s in stats.items()}


def test_a_send_is_one_redis_command_and_a_broker_restart_loses_no_slot(
    broker_app: Celery, redis_server: RedisServer
) -> None:
    rt = Runtime.of(broker_app)
    ids = [add_connection(rt, f"c{i}", "http://h.example", "t").id for i in range(5)]
    client = redis_server.client()
    clock = ManualClock(T0)
    scheduler = ConnectionScheduler(broker_app, clock=clock, resume=False)
    before = _command_calls(client)
    scheduler.tick()  # 5 polls, the relay and the purge
    after = _command_calls(client)
    spent = {name: after.get(name, 0) - before.get(name, 0) for name in after}
    assert spent["lpush"] == 7
    assert {name: spent.get(name, 0) for name in ("publish", "subscribe", "unsubscribe")} == {
        "publish": 0,  # no task-sent event
        "subscribe": 0,  # no result channel
        "unsubscribe": 0,
    }
    assert client.llen(POLL_QUEUE) == 7

    redis_server.stop()  # the broker goes away as a poll falls due
    due = scheduler.schedule.next_due()
    assert due is not None
    clock.set(due)
    scheduler.tick()
    redis_server.restart()  # and comes back, empty
    clock.advance(BROKER_RETRY_SECONDS)
    scheduler.tick()
    headers = [json.loads(m)["headers"] for m in client.lrange(POLL_QUEUE, 0, -1)]
    polls = [h for h in headers if h["task"] == POLL_TASK]
    assert len(polls) == 1
    conn_id, index = json.loads(polls[0]["argsrepr"])
    assert conn_id in ids
    assert due == index * INTERVAL + scheduler.schedule.offset(conn_id)
    assert polls[0]["ignore_result"] is True
    client.close()


# -- the tasks beat sends ---------------------------------------------------------------------


@pytest.fixture(name="worker")
def worker_fixture(pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch) -> Iterator[Beat]:
    """A Celery app whose Runtime uses the pipeline's database and Redis; sends recorded."""
    app = create_app(pipeline.rt.settings)
    rt = pipeline.backend.adopt(Runtime.of(app))
    beat = Beat(app, rt, ManualClock(T0))

    def send_task(
        name: str,
        args: list[Any] | None = None,
        kwargs: dict[str, Any] | None = None,
        **options: Any,
    ) -> None:
        beat.sent.append(Sent(0.0, name, list(args or []), options | {"kwargs": kwargs or {}}))

    monkeypatch.setattr(app, "send_task", send_task)
    return beat


def test_a_second_poll_of_the_same_interval_is_a_no_op(pipeline: Pipeline, worker: Beat) -> None:
    p = pipeline
    p.subscribe("room_message")
    first = celery_tasks.poll_connection_task.run(p.conn_id, 41)
    assert "ok" in first
    again = celery_tasks.poll_connection_task.run(p.conn_id, 41)
    assert again == f"connection {p.conn_id}: already polled in interval 41"
    older = celery_tasks.poll_connection_task.run(p.conn_id, 40)
    assert "already polled" in older
    assert p.history_calls() == 1
    assert "ok" in celery_tasks.poll_connection_task.run(p.conn_id, 42)
    assert p.history_calls() == 2


def test_a_poll_running_elsewhere_makes_the_task_a_no_op(pipeline: Pipeline, worker: Beat) -> None:
    p = pipeline
    p.subscribe("room_message")
    other = Lock(worker.rt.redis, worker.rt.keys.poll_lease(p.conn_id), timeout=60)
    assert other.acquire(blocking=False)  # another worker's poll
    result = celery_tasks.poll_connection_task.run(p.conn_id, 7)
    assert result == f"connection {p.conn_id}: a poll is already running"
    assert p.history_calls() == 0


def test_the_poll_task_hands_committed_events_to_delivery(pipeline: Pipeline, worker: Beat) -> None:
    p = pipeline
    sub = p.subscribe("room_message")
    celery_tasks.poll_connection_task.run(p.conn_id, 1)
    p.say("one")
    p.say("two")
    celery_tasks.poll_connection_task.run(p.conn_id, 2)
    assert [(s.name, s.args) for s in worker.sent] == [("hipchat.deliver", [sub.id])]
    assert {e.state for e in p.events()} == {"dispatched"}


def test_a_failed_poll_still_hands_over_the_rooms_it_committed(
    pipeline: Pipeline, worker: Beat
) -> None:
    p = pipeline
    other = p.state.create_room("Other")
    sub = p.subscribe("room_message")
    p.subscribe("room_message", room="Other")
    celery_tasks.poll_connection_task.run(p.conn_id, 1)
    p.say("in dev")
    p.state.post_message("Other", p.alice, "in other")
    p.state.inject_fault("status", status=503, path_prefix=f"/v2/room/{other['id']}/history")
    # Other fails on its own and is due again in 5 s: the task comes back for it (called
    # directly, retry() raises Retry).
    with pytest.raises(Retry):
        celery_tasks.poll_connection_task.run(p.conn_id, 2)
    assert [(s.name, s.args) for s in worker.sent] == [("hipchat.deliver", [sub.id])]
    assert [e.state for e in p.events(sub.id)] == ["dispatched"]
    with worker.rt.leases.poll(p.conn_id) as held:
        assert held  # the poll released its lease


def test_the_relay_sends_what_a_dead_poll_left_behind(pipeline: Pipeline, worker: Beat) -> None:
    p = pipeline
    sub = p.subscribe("room_message")
    poll_connection(p.rt, p.conn_id)
    p.say(f"hello {ROOM}")
    assert poll_connection(p.rt, p.conn_id).event_count == 1  # and then the worker died

    assert celery_tasks.relay_outbox_task.run() == "relayed 0 events"  # too young yet
    with p.rt.db.session() as s:  # ... two minutes ago
        s.execute(update(OutboxEvent).values(created_at=datetime.now(UTC) - timedelta(minutes=2)))
    assert celery_tasks.relay_outbox_task.run() == "relayed 1 events"
    assert [(s.name, s.args) for s in worker.sent] == [("hipchat.deliver", [sub.id])]
    (event,) = p.events(sub.id)
    assert event.state == "dispatched"
    assert celery_tasks.relay_outbox_task.run() == "relayed 0 events"  # just re-sent
    with p.rt.db.session() as s:
        future = datetime.now(UTC) + timedelta(minutes=5)
        assert [e.id for e in outbox.undispatched(s, older_than=future)] == [event.id]


def test_a_deliver_task_that_finds_another_drain_leaves_it_a_request(
    pipeline: Pipeline, worker: Beat
) -> None:
    p = pipeline
    sub = p.subscribe("room_message")
    p.add_events(sub.id, 1)
    other = Lock(worker.rt.redis, worker.rt.keys.drain_lock(sub.id), timeout=60)
    assert other.acquire(blocking=False)  # another worker's drain
    # No busy loop: it leaves a request for the holder and ends.
    assert celery_tasks.deliver_task.run(sub.id) == f"subscription {sub.id}: another drain runs"
    other.release()  # (this holder does not look at the request: the next drain takes it)
    with pytest.raises(Retry):  # delivered, and the request says: drain once more
        celery_tasks.deliver_task.run(sub.id)
    assert p.events(sub.id)[0].state == "delivered"
    assert celery_tasks.deliver_task.run(sub.id) == f"subscription {sub.id}: delivered 0, dead 0"


def test_a_fast_drain_keeps_its_backoff_when_the_poll_marks_dispatch(
    pipeline: Pipeline, worker: Beat, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker may drain (and fail) an event before the poll task has returned: the poll's
    bookkeeping must not wipe the retry time that drain recorded."""
    p = pipeline
    sub = p.subscribe("room_message", kind="webhook", target={"url": receiver.url})
    celery_tasks.poll_connection_task.run(p.conn_id, 1)
    p.say("hello")
    receiver.answer(500)

    def drain_at_once(name: str, args: list[Any] | None = None, **options: Any) -> None:
        worker.sent.append(Sent(0.0, name, list(args or []), options))
        drain(worker.rt, sub.id)

    monkeypatch.setattr(worker.app, "send_task", drain_at_once)
    celery_tasks.poll_connection_task.run(p.conn_id, 2)
    (event,) = p.events(sub.id)
    assert len(receiver.requests) == 1
    assert event.attempts == 1
    assert event.next_attempt_at is not None
    assert drain(worker.rt, sub.id).delivered == 0  # still backing off


def test_a_waiting_deliver_task_says_why(
    pipeline: Pipeline, worker: Beat, receiver: Receiver
) -> None:
    """The retry carries its reason (Flower and the worker's log show it), not a bare
    "Retry in 3s"."""
    p = pipeline
    sub = p.subscribe("room_message", kind="webhook", target={"url": receiver.url})
    (event_id,) = p.add_events(sub.id, 1)
    receiver.answer(503)
    task = celery_tasks.deliver_task
    task.push_request(
        id="deliver-id", args=[sub.id], kwargs={}, retries=0, is_eager=False,
        called_directly=False, delivery_info={},
    )  # fmt: skip
    try:
        with pytest.raises(Retry) as caught:
            task.run(sub.id)
        with pytest.raises(Retry) as again:  # still backing off
            task.run(sub.id)
    finally:
        task.pop_request()
    assert isinstance(caught.value.exc, RetryLater)
    assert str(caught.value.exc).startswith(f"event {event_id}: ServerError: ")
    assert f"event {event_id} waits " in str(again.value.exc)


def test_a_retried_poll_task_reads_only_what_the_first_attempt_missed(
    pipeline: Pipeline, worker: Beat
) -> None:
    p = pipeline
    other = p.state.create_room("Other")
    dev = p.subscribe("room_message")
    elsewhere = p.subscribe("room_message", room="Other")
    celery_tasks.poll_connection_task.run(p.conn_id, 1)
    p.say("in dev")
    p.state.post_message("Other", p.alice, "in other")
    p.state.inject_fault("status", status=503, path_prefix=f"/v2/room/{other['id']}/history")
    task = celery_tasks.poll_connection_task
    task.push_request(
        id="poll-id", args=[p.conn_id, 2], kwargs={}, retries=0, is_eager=False,
        called_directly=False, delivery_info={},
    )  # fmt: skip
    try:
        with pytest.raises(Retry) as caught:
            task.run(p.conn_id, 2)
    finally:
        task.pop_request()
    retry = caught.value
    assert retry.sig is not None
    assert retry.sig.kwargs == {"done": [f"history:{p.room_id}"]}
    assert 4.0 <= float(retry.when or 0) <= 6.0  # when Other is due again
    assert retry.sig.options["headers"][celery_tasks.FAILURES_HEADER] == 0  # not a failure

    # Other's wait is over when the retry runs: only Other is read.
    with worker.rt.db.session() as s:
        stored = get_health(s, p.conn_id)  # written at once: Other started failing
    due = {k: {**v, "retry_at": "2000-01-01T00:00:00+00:00"} for k, v in stored.rooms.items()}
    worker.rt.health.record(replace(stored, rooms=due), at_once=True)
    outcome = task.run(p.conn_id, 2, done=retry.sig.kwargs["done"])
    assert "ok: 1 events" in outcome
    assert (p.history_calls(), p.history_calls(other["id"])) == (2, 3)
    assert [(s.name, s.args) for s in worker.sent] == [
        ("hipchat.deliver", [dev.id]),
        ("hipchat.poll_connection", [p.conn_id, 2]),  # the retry, sent by retry()
        ("hipchat.deliver", [elsewhere.id]),
    ]
    assert task.run(p.conn_id, 2).endswith("interval 2")
