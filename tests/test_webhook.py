"""The webhook target against a real local HTTP receiver, and secrets staying secret along
the whole pipeline (logs, payloads, error messages, task arguments)."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from dataclasses import replace
from typing import Any

import pytest
from celery.exceptions import Retry

from storage.health import get_health
from tasks import celery_tasks
from tasks.delivery import drain
from tasks.runtime import Runtime
from tasks.webhook import EVENT_HEADER, SIGNATURE_HEADER
from tests.pipeline_support import (
    ROOM,
    Backend,
    Pipeline,
    Receiver,
)
from worker.app import create_app
from worker.scheduler import ConnectionScheduler

SECRET = "whsec-7d1e0c-do-not-leak"


def _verify(secret: str, body: bytes, header: str) -> bool:
    expected = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, header)


def test_webhook_body_key_and_signature(pipeline: Pipeline, receiver: Receiver) -> None:
    p = pipeline
    target = {"url": receiver.url, "secret": SECRET}
    sub = p.subscribe("room_message", kind="webhook", target=target, filter=r"deploy (\w+)")
    p.poll()
    p.say("deploy api — ünïcode ok")
    p.poll()
    (event,) = p.events(sub.id)

    assert drain(p.rt, sub.id).delivered == 1
    (request,) = receiver.requests
    assert request.path == "/hook"
    assert request.json() == event.payload
    assert request.json()["matches"] == ["api"]
    assert request.headers["Content-Type"] == "application/json"
    assert request.headers["Idempotency-Key"] == event.idempotency_key
    assert request.headers[EVENT_HEADER] == "room_message"
    assert _verify(SECRET, request.body, request.headers[SIGNATURE_HEADER])
    assert not _verify(SECRET, request.body + b" ", request.headers[SIGNATURE_HEADER])
    assert not _verify("another-secret", request.body, request.headers[SIGNATURE_HEADER])
    assert p.event(event.id).state == "delivered"


def test_the_same_event_redelivered_keeps_its_key_and_signature(
    pipeline: Pipeline, receiver: Receiver
) -> None:
    p = pipeline
    sub = p.subscribe("room_message", kind="webhook", target={"url": receiver.url, "secret": "s"})
    (event_id,) = p.add_events(sub.id, 1)
    receiver.answer(500)
    first = drain(p.rt, sub.id)
    assert first.retry_after is not None
    drain(p.rt, sub.id, now=p.event(event_id).next_attempt_at)
    one, two = receiver.requests
    assert one.body == two.body
    assert one.headers["Idempotency-Key"] == two.headers["Idempotency-Key"]
    assert one.headers[SIGNATURE_HEADER] == two.headers[SIGNATURE_HEADER]


def test_webhook_without_a_secret_is_not_signed(pipeline: Pipeline, receiver: Receiver) -> None:
    p = pipeline
    sub = p.subscribe("room_message", kind="webhook", target={"url": receiver.url})
    p.add_events(sub.id, 1)
    assert drain(p.rt, sub.id).delivered == 1
    (request,) = receiver.requests
    assert SIGNATURE_HEADER not in request.headers
    assert request.headers["Idempotency-Key"] == f"sub:{sub.id}:test-0"


def test_the_secret_is_stored_encrypted(pipeline: Pipeline, receiver: Receiver) -> None:
    p = pipeline
    sub = p.subscribe(
        "room_message", kind="webhook", target={"url": receiver.url, "secret": SECRET}
    )
    stored = p.subscription(sub.id).target
    assert "secret" not in stored
    assert SECRET not in json.dumps(stored)
    assert p.rt.cipher.decrypt(stored["secret_encrypted"]) == SECRET


# -- secrets across the whole pipeline ---------------------------------------------------------


def test_no_token_or_secret_in_logs_payloads_errors_or_task_arguments(
    backend: Backend,
    pipeline: Pipeline,
    receiver: Receiver,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    caplog.set_level(logging.DEBUG)
    p = pipeline
    secrets = [p.token, SECRET]
    app = create_app(p.rt.settings)
    rt = backend.adopt(Runtime.of(app))
    sent: list[tuple[str, Any, dict[str, Any]]] = []
    monkeypatch.setattr(
        app, "send_task", lambda name, args=None, **kw: sent.append((name, args, kw))
    )

    target = {"url": receiver.url + "?token=" + SECRET, "secret": SECRET}
    hook = p.subscribe("room_message", kind="webhook", target=target)
    p.subscribe("room_enter")
    p.subscribe("room_created", room=None)
    scheduler = ConnectionScheduler(app)
    scheduler.tick()

    celery_tasks.poll_connection_task.run(p.conn_id)
    p.say(f"a message that quotes nothing secret in {ROOM}")
    p.state.enter_room(ROOM, p.bob)
    p.state.create_room("Fresh")
    p.state.inject_fault("status", status=503, path_prefix="/v2/room", count=1)
    errors: list[str] = []
    with pytest.raises(Retry):  # a room failed: it comes back for it (directly: Retry)
        celery_tasks.poll_connection_task.run(p.conn_id)
    with rt.db.session() as s:
        stored = get_health(s, p.conn_id)  # written at once: a room started failing
    errors += [room["error"] for room in stored.rooms.values()]
    assert any("503" in e for e in errors)
    rt.health.record(replace(stored, rooms={}), at_once=True)  # as if its wait were over
    celery_tasks.poll_connection_task.run(p.conn_id)
    receiver.answer(500, 401)
    for _ in range(3):
        result = drain(rt, hook.id)
        if result.retry_after:
            drain(rt, hook.id, now=p.event(p.events(hook.id)[0].id).next_attempt_at)
    p.state.revoke_token(p.token)
    celery_tasks.poll_connection_task.run(p.conn_id)
    celery_tasks.relay_outbox_task.run()

    for event in p.events():
        errors.append(event.last_error or "")
        text = json.dumps(event.payload)
        for secret in secrets:
            assert secret not in text
    errors.append(p.connection().state_reason or "")
    rt.health.flush()
    with rt.db.session() as s:
        errors.append(get_health(s, p.conn_id).status or "")
    assert p.connection().state == "auth_failed"
    assert any("401" in e for e in errors), errors
    assert any("answered 500" in r.getMessage() for r in caplog.records)
    for secret in secrets:
        assert all(secret not in e for e in errors)
    assert sent
    for name, args, options in sent:
        assert name.startswith("hipchat.")
        assert all(isinstance(a, int) for a in args or [])
        for secret in secrets:
            assert secret not in repr((name, args, options))
    assert caplog.records
    for record in caplog.records:
        text = record.getMessage() + repr(record.args) + (record.exc_text or "")
        for secret in secrets:
            assert secret not in text, record.getMessage()
