"""Draining a subscription's outbox: order, retries with backoff, dead letters, flood waits,
the drain lock, and the relay. Time is passed in (``now=``), never slept through.
"""

from __future__ import annotations

import random
import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from redis.lock import Lock

from emulator import EmulatorServer
from storage import outbox
from storage.errors import BucketEmpty, RateLimited
from tasks import delivery
from tasks.delivery import DrainResult, backoff_seconds, drain
from tasks.relay import relay
from tests.pipeline_support import (
    ROOM,
    Backend,
    Pipeline,
    Receiver,
    make_pipeline,
)

T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def _webhook(p: Pipeline, receiver: Receiver) -> int:
    return p.subscribe("room_message", kind="webhook", target={"url": receiver.url}).id


def _numbers(receiver: Receiver) -> list[int]:
    return [r.json()["n"] for r in receiver.requests]


def test_drain_delivers_in_commit_order(pipeline: Pipeline, receiver: Receiver) -> None:
    p = pipeline
    sub = _webhook(p, receiver)
    ids = p.add_events(sub, 5)
    assert drain(p.rt, sub, now=T0) == DrainResult(delivered=5)
    assert _numbers(receiver) == [0, 1, 2, 3, 4]
    for event_id in ids:
        event = p.event(event_id)
        assert event.state == "delivered"
        assert event.outcome == "webhook 200"
        assert event.delivered_at == T0
    assert drain(p.rt, sub, now=T0) == DrainResult()
    assert len(receiver.requests) == 5


def test_poll_then_drain_delivers_each_event_once(pipeline: Pipeline, receiver: Receiver) -> None:
    p = pipeline
    sub = _webhook(p, receiver)
    p.poll()
    sent = [p.say(f"m{i}")["id"] for i in range(3)]
    result = p.poll()
    assert drain(p.rt, sub).delivered == 3
    assert [r.json()["item"]["message"]["id"] for r in receiver.requests] == sent
    assert p.poll().event_count == 0
    assert drain(p.rt, sub).delivered == 0
    assert result.dispatch == {sub: [e.id for e in p.events()]}


def test_server_errors_back_off_exponentially_then_go_dead(
    backend: Backend, pipeline_emulator: EmulatorServer, receiver: Receiver
) -> None:
    p = make_pipeline(
        backend,
        pipeline_emulator,
        webhook_max_attempts=4,
        webhook_backoff_base_seconds=2.0,
        webhook_backoff_max_seconds=600.0,
    )
    sub = _webhook(p, receiver)
    first, later = p.add_events(sub, 2)
    receiver.answer(500, 502, 503, 500)

    now, waits = T0, []
    for attempt in (1, 2, 3):
        result = drain(p.rt, sub, now=now)
        assert result.delivered == 0
        assert result.retry_after is not None
        event = p.event(first)
        assert event.attempts == attempt
        assert event.state == "dispatched"
        assert event.next_attempt_at == now + timedelta(seconds=result.retry_after)
        # Equal jitter: at least half the exponential step, at most the whole step.
        step = 2.0 * 2 ** (attempt - 1)
        assert step / 2 <= result.retry_after <= step
        waits.append(result.retry_after)
        # Not due yet: nothing is sent, neither this event nor the one behind it.
        early = drain(p.rt, sub, now=now + timedelta(seconds=result.retry_after / 2))
        assert early.retry_after == pytest.approx(result.retry_after / 2, abs=1e-5)
        assert len(receiver.requests) == attempt
        assert p.event(later).state == "pending"
        assert p.event(later).next_attempt_at is None
        now = event.next_attempt_at
    assert waits == sorted(waits)

    result = drain(p.rt, sub, now=now)  # 4th failure: dead, and the next event goes
    assert result == DrainResult(delivered=1, dead=1, retry_after=None)
    dead = p.event(first)
    assert dead.state == "dead"
    assert dead.attempts == 4
    assert dead.last_error is not None
    assert "500" in dead.last_error
    assert p.event(later).state == "delivered"
    assert len(receiver.requests) == 5


def test_backoff_is_capped_and_jittered() -> None:
    rng = random.Random(7)
    draws = [backoff_seconds(3, 2.0, 600.0, rng) for _ in range(50)]
    assert all(4.0 <= d <= 8.0 for d in draws)
    assert len(set(draws)) > 40  # jitter: not one fixed value
    assert all(300.0 <= backoff_seconds(30, 2.0, 600.0, rng) <= 600.0 for _ in range(20))


def test_retry_after_from_the_receiver_is_a_floor(pipeline: Pipeline, receiver: Receiver) -> None:
    p = pipeline
    sub = _webhook(p, receiver)
    (event_id,) = p.add_events(sub, 1)
    receiver.answer((503, {"Retry-After": "120"}))
    result = drain(p.rt, sub, now=T0)
    assert result.retry_after == 120.0
    assert p.event(event_id).next_attempt_at == at(120)


def test_gone_is_dead_at_once_and_the_next_event_goes(
    pipeline: Pipeline, receiver: Receiver
) -> None:
    p = pipeline
    sub = _webhook(p, receiver)
    first, second = p.add_events(sub, 2)
    receiver.answer(410)
    assert drain(p.rt, sub, now=T0) == DrainResult(delivered=1, dead=1)
    gone = p.event(first)
    assert gone.state == "dead"
    assert gone.attempts == 1
    assert "410" in (gone.last_error or "")
    assert p.event(second).state == "delivered"


def test_redirect_is_not_followed(pipeline: Pipeline, receiver: Receiver) -> None:
    """A POST answered 302 must not become a GET whose 200 would count as delivered."""
    p = pipeline
    sub = _webhook(p, receiver)
    (event_id,) = p.add_events(sub, 1)
    receiver.answer((302, {"Location": receiver.url + "/moved"}))
    assert drain(p.rt, sub, now=T0) == DrainResult(dead=1)
    assert [r.path for r in receiver.requests] == ["/hook"]
    assert p.event(event_id).state == "dead"


def test_unreachable_receiver_is_retried_with_backoff(pipeline: Pipeline) -> None:
    p = pipeline
    url = "http://127.0.0.1:9/hook?key=hunter2"  # port 9 (discard): connection refused
    sub = p.subscribe("room_message", kind="webhook", target={"url": url}).id
    (event_id,) = p.add_events(sub, 1)
    result = drain(p.rt, sub, now=T0)
    assert result.retry_after is not None
    assert 1.0 <= result.retry_after <= 2.0  # the first backoff step, not a fixed 5 s
    event = p.event(event_id)
    assert event.attempts == 1
    assert "TransportError" in (event.last_error or "")
    assert "hunter2" not in (event.last_error or "")


@pytest.mark.parametrize(
    "error",
    [
        RateLimited("POST /v2/room/1/notification: HTTP 429", 7.25, flood_control=True),
        BucketEmpty("bucket empty", 3.5),
    ],
    ids=["flood-control", "bucket-empty"],
)
def test_a_stated_wait_is_honoured_exactly_and_is_no_attempt(
    pipeline: Pipeline, receiver: Receiver, monkeypatch: pytest.MonkeyPatch, error: Exception
) -> None:
    p = pipeline
    sub = _webhook(p, receiver)
    first, second = p.add_events(sub, 2)
    real_deliver = delivery.deliver
    calls: list[int] = []

    def limited_once(rt: Any, view: Any, payload: dict[str, Any], **options: Any) -> str:
        calls.append(payload["n"])
        if len(calls) <= 3:
            raise error
        return real_deliver(rt, view, payload, **options)

    monkeypatch.setattr(delivery, "deliver", limited_once)
    wait = error.retry_after  # type: ignore[attr-defined]
    now = T0
    for _ in range(3):
        result = drain(p.rt, sub, now=now)
        assert result.retry_after == wait
        event = p.event(first)
        assert event.attempts == 0  # not the target's failure
        assert event.next_attempt_at == now + timedelta(seconds=wait)
        assert p.event(second).state == "pending"
        # A microsecond early is still early: the later event does not overtake.
        early = drain(p.rt, sub, now=event.next_attempt_at - timedelta(microseconds=1))
        assert early.delivered == 0
        now = event.next_attempt_at
    assert calls == [0, 0, 0]
    assert drain(p.rt, sub, now=now) == DrainResult(delivered=2)
    assert _numbers(receiver) == [0, 1]
    assert p.event(first).attempts == 0


def test_flood_control_on_an_action_target_waits_in_order(
    backend: Backend, make_emulator: Any
) -> None:
    server = make_emulator(rate_limit=100_000, flood_limit=1, admin_token="flood-admin-token")
    p = make_pipeline(backend, server)
    target = {"action": "send_notification", "message": "pong {message}", "format": "text"}
    sub = p.subscribe("room_message", kind="action", target=target).id
    p.poll()
    p.say("one")
    p.say("two")
    p.poll()
    first, second = (e.id for e in p.events(sub))

    result = drain(p.rt, sub)
    assert result.delivered == 1
    assert result.retry_after is not None
    # The emulator's flood window is 60 s from the first send: HipChat's stated wait.
    assert 55.0 <= result.retry_after <= 61.0
    assert p.event(first).state == "delivered"
    waiting = p.event(second)
    assert waiting.attempts == 0
    assert "flood control" in (waiting.last_error or "")
    sent = [m["message"] for m in server.state.history(ROOM) if m["type"] == "notification"]
    assert sent == ["pong one"]
    assert drain(p.rt, sub).delivered == 0  # still waiting: nothing sent


def test_more_than_one_drain_worth_hands_over(
    pipeline: Pipeline, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    p = pipeline
    sub = _webhook(p, receiver)
    p.add_events(sub, 5)
    monkeypatch.setattr(delivery, "MAX_EVENTS_PER_DRAIN", 3)
    assert drain(p.rt, sub, now=T0) == DrainResult(delivered=3, retry_after=0.0)
    assert drain(p.rt, sub, now=T0) == DrainResult(delivered=2)
    assert _numbers(receiver) == [0, 1, 2, 3, 4]


def test_a_second_concurrent_drain_asks_the_first_to_drain_again(
    pipeline: Pipeline, receiver: Receiver
) -> None:
    """No busy loop: the second drain leaves a request and ends; the first, once done, says
    to drain again (events may have been committed meanwhile)."""
    p = pipeline
    sub = _webhook(p, receiver)
    p.add_events(sub, 2)
    receiver.hold()
    results: list[DrainResult] = []
    worker = threading.Thread(target=lambda: results.append(drain(p.rt, sub, now=T0)))
    worker.start()
    try:
        assert receiver.arrived.wait(10)  # the first drain is inside the webhook call
        assert drain(p.rt, sub, now=T0) == DrainResult(busy=True)
        p.add_events(sub, 1, first=2)  # committed while the first drain finishes
    finally:
        receiver.release()
        worker.join(10)
    assert results == [DrainResult(delivered=3, retry_after=0.0)]  # the request was seen
    assert _numbers(receiver) == [0, 1, 2]
    assert drain(p.rt, sub, now=T0) == DrainResult()  # the lock was released, request taken


def test_a_request_left_when_the_lock_frees_is_taken_by_the_second_try(
    pipeline: Pipeline, receiver: Receiver
) -> None:
    p = pipeline
    sub = _webhook(p, receiver)
    p.add_events(sub, 1)
    p.rt.leases.request_drain(sub)  # left by a drain that found the lock busy a moment ago
    assert drain(p.rt, sub, now=T0) == DrainResult(delivered=1, retry_after=0.0)
    assert drain(p.rt, sub, now=T0) == DrainResult()


def test_relay_finds_events_committed_but_never_dispatched(pipeline: Pipeline) -> None:
    p = pipeline
    sub = p.subscribe("room_message").id
    p.poll()
    p.say("one")
    p.say("two")
    result = p.poll()  # committed; the worker dies before enqueueing
    ids = result.dispatch[sub]
    with p.rt.db.session() as s:
        # Too young for the relay: the poll may still be about to dispatch them.
        assert outbox.undispatched(s, older_than=datetime.now(UTC) - timedelta(minutes=1)) == []
        stale = outbox.undispatched(s, older_than=datetime.now(UTC) + timedelta(seconds=1))
        assert [e.id for e in stale] == ids
    assert drain(p.rt, sub).delivered == 2
    with p.rt.db.session() as s:
        assert outbox.undispatched(s, older_than=datetime.now(UTC) + timedelta(hours=1)) == []


def test_the_relay_resends_what_nobody_drains_and_leaves_live_drains_alone(
    pipeline: Pipeline,
) -> None:
    """A worker killed mid-delivery leaves dispatched events and, for 10 s, its lock: the relay
    skips the subscription while the lock is held, and re-sends its drain once it is gone."""
    p = pipeline
    sub = p.subscribe("room_message").id
    p.add_events(sub, 1)
    sent: list[int] = []
    later = datetime.now(UTC) + timedelta(minutes=5)
    dead_drain = Lock(p.rt.redis, p.rt.keys.drain_lock(sub), timeout=60, thread_local=False)
    assert dead_drain.acquire(blocking=False)
    assert relay(p.rt, sent.append, later) == 0
    assert sent == []
    dead_drain.release()  # its TTL ran out
    assert relay(p.rt, sent.append, later) == 1
    assert sent == [sub]
