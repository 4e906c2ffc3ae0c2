"""Beat's connection scheduler under a controlled clock, and the thin Celery tasks it feeds:
the interval claim, the hand-over to delivery, the relay."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from celery import Celery
from celery.exceptions import Retry
from redis.lock import Lock
from sqlalchemy import update

from emulator.testing import ManualClock
from storage import connections as conns
from storage import outbox
from storage.health import get_health
from storage.models import OutboxEvent
from tasks import celery_tasks
from tasks.connections_api import add_connection
from tasks.delivery import drain
from tasks.poll import poll_connection
from tasks.runtime import Runtime
from tests.pipeline_support import (
    ROOM,
    Backend,
    Pipeline,
    Receiver,
)
from worker import scheduler as scheduler_module
from worker.app import create_app
from worker.scheduler import (
    POLL_TASK,
    RELAY_TASK,
    SYNC_EVERY_SECONDS,
    ConnectionScheduler,
    interval_index,
)

INTERVAL = 60.0
RELAY_EVERY = 30.0
T0 = 1_900_000_020.0  # 20 s into an interval of 60 s


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

    def start(self) -> ConnectionScheduler:
        self.scheduler = ConnectionScheduler(self.app, clock=self.clock)
        return self.scheduler

    def run_until(self, end: float, step: float = 1.0) -> None:
        """Tick every ``step`` seconds of fake time up to and including ``end``."""
        assert self.scheduler is not None
        while self.clock() <= end:
            self.scheduler.tick()
            self.clock.advance(step)

    def polls(self, conn_id: int | None = None) -> list[Sent]:
        return [x for x in self.sent if x.name == POLL_TASK and conn_id in (None, x.args[0])]

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
    later = [p for p in beat.polls() if p.at >= start]
    assert sorted(p.args[0] for p in later) == sorted(ids)  # each once in one interval
    for sent in later:
        assert (sent.at - offsets[sent.args[0]]) % INTERVAL < 1.0
    assert len({p.at for p in later}) == len(ids)


def test_a_new_connection_is_picked_up_without_a_restart(beat: Beat) -> None:
    beat.add("alpha")
    beat.start()
    beat.run_until(T0)
    late = beat.add("late")
    beat.run_until(T0 + SYNC_EVERY_SECONDS - 1)
    assert beat.polls(late) == []  # not yet re-read
    beat.run_until(T0 + SYNC_EVERY_SECONDS)
    (sent,) = beat.polls(late)
    assert sent.at == T0 + SYNC_EVERY_SECONDS
    assert sent.args == [late, interval_index(sent.at, INTERVAL, beat.offset(late))]


def test_paused_and_removed_connections_stop(beat: Beat) -> None:
    paused, removed, kept = beat.add("paused"), beat.add("removed"), beat.add("kept")
    beat.start()
    beat.run_until(T0)
    assert {p.args[0] for p in beat.polls()} == {paused, removed, kept}
    with beat.rt.db.session() as s:
        conns.set_connection_state(s, paused, "paused", "by an operator")
        conns.remove_connection(s, removed)
    beat.run_until(T0 + SYNC_EVERY_SECONDS)
    before = len(beat.polls())
    beat.run_until(T0 + 3 * INTERVAL)
    assert {p.args[0] for p in beat.polls()[before:]} == {kept}
    assert len(beat.polls(paused)) == len(beat.polls(removed)) == 1


def test_the_relay_is_sent_every_relay_interval(beat: Beat) -> None:
    beat.start()
    beat.run_until(T0 + 4 * RELAY_EVERY)
    relays = beat.relays()
    assert [r.at - T0 for r in relays] == [0.0, 30.0, 60.0, 90.0, 120.0]
    assert all(r.args == [] for r in relays)


def test_tick_sleeps_until_the_next_due_poll(beat: Beat) -> None:
    conn = beat.add("alpha")
    offset = beat.offset(conn)
    scheduler = beat.start()
    wait = scheduler.tick()
    assert 0 <= wait <= scheduler.max_interval
    due = (interval_index(T0, INTERVAL, offset) + 1) * INTERVAL + offset
    assert wait == pytest.approx(min(due - T0, RELAY_EVERY, scheduler.max_interval))


def test_a_database_blip_keeps_the_schedule(beat: Beat, monkeypatch: pytest.MonkeyPatch) -> None:
    conn = beat.add("alpha")
    beat.start()
    beat.run_until(T0)

    def broken(_session: Any) -> Any:
        raise RuntimeError("database down")

    monkeypatch.setattr(scheduler_module, "due_connections", broken)
    beat.run_until(T0 + 2 * INTERVAL)
    assert len(beat.polls(conn)) == 3


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
