"""The Celery tasks: thin shells that load what they need, call plain functions, retry.

Task arguments carry ids and names only, never a token or a secret.

* ``hipchat.poll_connection(connection_id, interval_index)`` (queue ``hipchat.polls``);
  its retries add ``first_try_at`` (an ISO time)
* ``hipchat.relay_outbox()`` (queue ``hipchat.polls``)
* ``hipchat.purge_outbox()`` (queue ``hipchat.polls``): closed events past their retention
* ``hipchat.deliver(subscription_id)`` (queue ``hipchat.actions``)
* ``hipchat.action.<name>(connection, ...)`` (queue ``hipchat.actions``): the actions of
  the seeds, callable by name with ``send_task``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from celery import Task, shared_task

from storage.errors import RetryLater
from tasks.actions import Actions
from tasks.delivery import drain
from tasks.poll import PollResult, poll_connection
from tasks.purge import purge_outbox
from tasks.relay import dispatch, relay
from tasks.runtime import Runtime

log = logging.getLogger(__name__)

DELIVER_TASK = "hipchat.deliver"


def _send_drain(task: Task) -> Callable[[int], None]:
    def send(subscription_id: int) -> None:
        task.app.send_task(DELIVER_TASK, args=[subscription_id])

    return send


@shared_task(bind=True, name="hipchat.poll_connection", acks_late=True, max_retries=5)
def poll_connection_task(
    self: Task,
    connection_id: int,
    interval_index: int | None = None,
    first_try_at: str | None = None,
) -> str:
    """``first_try_at`` is set on retries only: the streams the first attempt of this
    interval's poll already read are not read again (each trigger once per interval)."""
    rt = Runtime.of(self.app)
    interval = rt.settings.poll_interval_seconds
    first_try = self.request.retries == 0
    if (
        interval_index is not None
        and first_try
        and not rt.leases.claim_interval(connection_id, interval_index, ttl_seconds=interval * 2)
    ):
        return f"connection {connection_id}: already polled in interval {interval_index}"
    started = datetime.fromisoformat(first_try_at) if first_try_at else datetime.now(UTC)
    result = PollResult(connection_id)
    failure: RetryLater | None = None
    # The lease is released when the block ends: before a retry, which may run at once.
    with rt.leases.poll(connection_id) as held:
        if not held:
            return f"connection {connection_id}: a poll is already running"
        try:
            done_since = started if first_try_at else None
            poll_connection(rt, connection_id, result=result, done_since=done_since)
        except RetryLater as exc:
            failure = exc
    # Streams committed before a failure are handed over now, not a minute later by the relay.
    dispatch(rt, result.dispatch, _send_drain(self), datetime.now(UTC))
    if failure is None:
        log.info("poll conn=%s %s", connection_id, result.status)
        return f"connection {connection_id}: {result.status}"
    if failure.retry_after >= interval:  # the next interval's poll will do it
        log.warning("poll conn=%s gave up for this interval: %s", connection_id, failure)
        return f"connection {connection_id}: deferred to next interval ({failure})"
    raise self.retry(
        args=[connection_id, interval_index],
        kwargs={"first_try_at": started.isoformat()},
        countdown=failure.retry_after,
        exc=failure,
    ) from failure


@shared_task(bind=True, name="hipchat.deliver", acks_late=True, max_retries=None)
def deliver_task(self: Task, subscription_id: int) -> str:
    rt = Runtime.of(self.app)
    result = drain(rt, subscription_id)
    if result.busy:
        # Another worker is draining; try again shortly so nothing it missed is left behind.
        raise self.retry(countdown=1.0, max_retries=30)
    if result.retry_after is not None:
        raise self.retry(countdown=max(0.05, result.retry_after))
    return f"subscription {subscription_id}: delivered {result.delivered}, dead {result.dead}"


@shared_task(bind=True, name="hipchat.relay_outbox", acks_late=True)
def relay_outbox_task(self: Task) -> str:
    """Re-enqueue drains for events a dead worker committed but never handed over."""
    count = relay(Runtime.of(self.app), _send_drain(self), datetime.now(UTC))
    return f"relayed {count} events"


def _retrying(
    task: Task, call: Callable[[Actions], dict[str, Any]], connection: int | str
) -> dict[str, Any]:
    """Run an action; what may work later is retried after the wait HipChat stated."""
    rt = Runtime.of(task.app)
    try:
        return call(Actions(rt, connection))
    except RetryLater as exc:
        limit = rt.settings.action_max_attempts - 1  # retries after the first attempt
        raise task.retry(countdown=exc.retry_after, exc=exc, max_retries=limit) from exc


@shared_task(bind=True, ignore_result=False, name="hipchat.action.list_room_users")
def list_room_users_task(self: Task, connection: int | str, room: int | str) -> dict[str, Any]:
    return _retrying(self, lambda api: api.list_room_users(room), connection)


@shared_task(bind=True, ignore_result=False, name="hipchat.action.get_user")
def get_user_task(self: Task, connection: int | str, user: int | str) -> dict[str, Any]:
    return _retrying(self, lambda api: api.get_user(user), connection)


@shared_task(bind=True, ignore_result=False, name="hipchat.action.post_message")
def post_message_task(
    self: Task, connection: int | str, room: int | str, message: str
) -> dict[str, Any]:
    return _retrying(self, lambda api: api.post_message(room, message), connection)


@shared_task(bind=True, ignore_result=False, name="hipchat.action.send_notification")
def send_notification_task(
    self: Task,
    connection: int | str,
    room: int | str,
    message: str,
    color: str = "yellow",
    message_format: str = "html",
    notify: bool = False,
    from_: str | None = None,
) -> dict[str, Any]:
    return _retrying(
        self,
        lambda api: api.send_notification(
            room, message, color=color, message_format=message_format, notify=notify, from_=from_
        ),
        connection,
    )


@shared_task(bind=True, ignore_result=False, name="hipchat.action.add_member")
def add_member_task(
    self: Task, connection: int | str, room: int | str, user: int | str
) -> dict[str, Any]:
    return _retrying(self, lambda api: api.add_member(room, user), connection)


@shared_task(bind=True, name="hipchat.purge_outbox", acks_late=True)
def purge_outbox_task(self: Task) -> str:
    """Delete delivered and dead events older than ``OUTBOX_RETENTION_DAYS``."""
    count = purge_outbox(Runtime.of(self.app), datetime.now(UTC))
    return f"purged {count} events"
