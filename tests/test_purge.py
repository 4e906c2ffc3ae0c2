"""Purging the outbox: closed events past OUTBOX_RETENTION_DAYS go, open ones stay; beat sends
``hipchat.purge_outbox`` once an hour (its clock is a ManualClock, never slept through)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import update

from emulator import EmulatorServer
from emulator.testing import ManualClock
from storage import outbox
from storage.models import OutboxEvent
from tasks import celery_tasks
from tasks.purge import purge_outbox
from tasks.runtime import Runtime
from tests.pipeline_support import Backend, Pipeline, make_pipeline
from worker.app import TASK_ROUTES, create_app
from worker.scheduler import PURGE_EVERY_SECONDS, PURGE_TASK, ConnectionScheduler

DAY = timedelta(days=1)


def _aged(p: Pipeline, ids: list[int], when: datetime) -> None:
    with p.rt.db.session() as s:
        s.execute(
            update(OutboxEvent)
            .where(OutboxEvent.id.in_(ids))
            .values(created_at=when, delivered_at=when)
        )


def test_closed_events_past_the_retention_are_purged(pipeline: Pipeline) -> None:
    p = pipeline
    sub = p.subscribe("room_message").id
    delivered, dead, pending, young = p.add_events(sub, 4)
    now = datetime.now(UTC)
    with p.rt.db.session() as s:
        outbox.mark_delivered(s, delivered, now)
        outbox.mark_failed(s, dead, "gone", None, dead=True)
        outbox.mark_delivered(s, young, now)
    _aged(p, [delivered, dead, pending], now - 8 * DAY)
    _aged(p, [young], now - 6 * DAY)

    assert purge_outbox(p.rt, now) == 2
    assert [e.id for e in p.events()] == [pending, young]
    assert purge_outbox(p.rt, now + 2 * DAY) == 1  # the young one's turn
    assert [e.id for e in p.events()] == [pending]


def test_the_retention_is_a_setting(backend: Backend, pipeline_emulator: EmulatorServer) -> None:
    p = make_pipeline(backend, pipeline_emulator, outbox_retention_days=0.5)
    sub = p.subscribe("room_message").id
    (event,) = p.add_events(sub, 1)
    now = datetime.now(UTC)
    with p.rt.db.session() as s:
        outbox.mark_delivered(s, event, now - timedelta(hours=13))
    assert purge_outbox(p.rt, now) == 1


def test_the_purge_task_runs_on_the_poll_queue(pipeline: Pipeline) -> None:
    app = create_app(pipeline.rt.settings)
    pipeline.backend.adopt(Runtime.of(app))
    assert TASK_ROUTES[PURGE_TASK] == {"queue": "hipchat.polls"}
    assert celery_tasks.purge_outbox_task.name == PURGE_TASK
    assert celery_tasks.purge_outbox_task.run() == "purged 0 events"


def test_beat_sends_the_purge_every_hour(backend: Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    app = create_app(backend.settings())
    backend.adopt(Runtime.of(app))
    clock = ManualClock(1_900_000_000.0)
    sent: list[tuple[float, str, dict[str, Any]]] = []

    def send_task(name: str, args: list[Any] | None = None, **options: Any) -> None:
        sent.append((clock(), name, options))

    monkeypatch.setattr(app, "send_task", send_task)
    scheduler = ConnectionScheduler(app, clock=clock)
    start = clock()
    while clock() <= start + 2 * PURGE_EVERY_SECONDS:
        scheduler.tick()
        clock.advance(60.0)
    purges = [(at - start, options["expires"]) for at, name, options in sent if name == PURGE_TASK]
    assert purges == [(k * PURGE_EVERY_SECONDS, PURGE_EVERY_SECONDS) for k in range(3)]
