"""The Celery tasks: thin shells that load what they need, call plain functions, retry.

Task arguments carry ids and names only, never a token or a secret.

* ``hipchat.poll_connection(connection_id, interval_index)`` (queue ``hipchat.polls``);
  its retries add ``done`` (the streams already read in this interval)
* ``hipchat.relay_outbox()`` (queue ``hipchat.polls``)
* ``hipchat.purge_outbox()`` (queue ``hipchat.polls``): closed events past their retention
* ``hipchat.deliver(subscription_id)`` (queue ``hipchat.actions``)
* ``hipchat.action.<name>(connection, ...)`` (queue ``hipchat.actions``): the actions of
  the seeds, callable by name with ``send_task``.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from celery import Task, shared_task
from celery.exceptions import Retry, SoftTimeLimitExceeded

from storage.errors import BucketEmpty, RateLimited, RetryLater, TransportError
from tasks import metrics
from tasks.actions import Actions
from tasks.delivery import backoff_seconds, drain
from tasks.poll import PollResult, poll_connection
from tasks.purge import purge_outbox
from tasks.relay import dispatch, relay
from tasks.runtime import Runtime
from tasks.settings import Settings

log = logging.getLogger(__name__)

DELIVER_TASK = "hipchat.deliver"
# Message headers a re-sent task carries: its failures so far (waits not counted) and the
# call budget reserved for it.
FAILURES_HEADER = "hipchat_failures"
RESERVATION_HEADER = "hipchat_reservation"
STARTED_HEADER = "hipchat_started"
JITTER_SECONDS = 1.0
# A poll whose storage keeps failing gives up this interval after this many tries.
POLL_MAX_FAILURES = 5
# The action tasks keep their results (send_task callers read them) and count their own
# attempts (see _retrying): Celery's retry limit is off.
ACTION_TASK: dict[str, Any] = {"bind": True, "ignore_result": False, "max_retries": None}
ACTION_BACKOFF_BASE_SECONDS = 2.0
ACTION_BACKOFF_MAX_SECONDS = 300.0


def _send_drain(task: Task) -> Callable[[int], None]:
    def send(subscription_id: int) -> None:
        task.app.send_task(DELIVER_TASK, args=[subscription_id])

    return send


@shared_task(
    bind=True,
    name="hipchat.poll_connection",
    acks_late=True,
    max_retries=None,
    ignore_result=True,
)
def poll_connection_task(
    self: Task,
    connection_id: int,
    interval_index: int | None = None,
    done: list[str] | None = None,
) -> str:
    """Poll one connection for interval ``interval_index``.

    It comes back within the interval, for what it has not read yet, when the connection must
    wait (the budget, a 429: not counted as failures) or could not be served (storage down:
    counted, :data:`POLL_MAX_FAILURES` at most), and when a room failed on its own and is due
    again before the next interval. ``done`` (retries only) lists the streams the earlier
    attempts read: each trigger is read once per interval. Anything that would run into the
    next interval is left to the next interval's poll."""
    rt = Runtime.of(self.app)
    interval = rt.settings.poll_interval_seconds
    if (
        interval_index is not None
        and done is None
        and not rt.leases.claim_interval(connection_id, interval_index, ttl_seconds=interval * 2)
    ):
        return f"connection {connection_id}: already polled in interval {interval_index}"
    started = float(_header(self, STARTED_HEADER) or time.time())
    result = PollResult(connection_id)
    failure: RetryLater | None = None
    # The lease is released when the block ends: before a retry, which may run at once.
    with rt.leases.poll(connection_id) as held:
        if not held:
            return f"connection {connection_id}: a poll is already running"
        try:
            with metrics.PollTimer(result):
                poll_connection(rt, connection_id, result=result, done=done or ())
        except RetryLater as exc:
            failure = exc
    # Streams committed before a failure are handed over now, not a minute later by the relay.
    dispatch(rt, result.dispatch, _send_drain(self), datetime.now(UTC))
    failures = int(_header(self, FAILURES_HEADER) or 0)
    if failure is None:
        log.info("poll conn=%s %s", connection_id, result.status)
        wait = result.come_back
        reason = "rooms failing"
    else:
        wait = failure.retry_after + (random.uniform(0, JITTER_SECONDS) if waiting(failure) else 0)
        reason = str(failure)
        if not waiting(failure):
            failures += 1
    if wait is None:
        return f"connection {connection_id}: {result.status}"
    if failures >= POLL_MAX_FAILURES or time.time() + wait - started >= interval:
        log.warning("poll conn=%s left to the next interval: %s", connection_id, reason)
        return f"connection {connection_id}: deferred to next interval ({reason})"
    raise self.retry(
        args=[connection_id, interval_index],
        kwargs={"done": [*(done or []), *result.done]},
        countdown=wait,
        exc=failure,
        headers={FAILURES_HEADER: failures, STARTED_HEADER: started},
    ) from failure


@shared_task(bind=True, name="hipchat.deliver", acks_late=True, max_retries=None)
def deliver_task(self: Task, subscription_id: int) -> str:
    """Drain one subscription. Its attempts are counted per event in the outbox, so the task
    itself retries without limit: when the head event must wait (carrying the budget's
    reservation for it), or at once when the drain handed over."""
    rt = Runtime.of(self.app)
    result = drain(rt, subscription_id, reservation=_header(self, RESERVATION_HEADER))
    if result.busy:  # the holder was asked to drain again after itself: nothing to do here
        return f"subscription {subscription_id}: another drain runs"
    if result.retry_after is not None:
        countdown = max(0.05, result.retry_after)
        if result.reservation is not None:  # just after it is due
            countdown += random.uniform(0, rt.settings.bucket_margin_seconds / 4)
        headers = {RESERVATION_HEADER: result.reservation}
        # The reason goes with the retry, so that Flower and the logs say why it waits.
        why = None if result.reason is None else RetryLater(result.reason, countdown)
        raise self.retry(countdown=countdown, headers=headers, exc=why)
    return f"subscription {subscription_id}: delivered {result.delivered}, dead {result.dead}"


@shared_task(bind=True, name="hipchat.relay_outbox", acks_late=True)
def relay_outbox_task(self: Task) -> str:
    """Re-enqueue drains for events a dead worker committed but never handed over."""
    count = relay(Runtime.of(self.app), _send_drain(self), datetime.now(UTC))
    metrics.relayed(count)
    return f"relayed {count} events"


def _retrying(
    task: Task, call: Callable[[Actions], dict[str, Any]], connection: int | str
) -> dict[str, Any]:
    """Run an action; what may work later is retried.

    Waiting is not failing: a spent budget (the task comes back holding the reservation it
    was given), a 429 or flood control re-send the task after the stated wait, and only
    HipChat's other failures (5xx, timeouts, malformed answers) count toward
    ``ACTION_MAX_ATTEMPTS``. ``task:<id>`` is the operation that keeps a post once in effect
    when the task is redelivered (a retry keeps its id)."""
    rt = Runtime.of(task.app)
    failures = int(_header(task, FAILURES_HEADER) or 0)
    api = Actions(
        rt,
        connection,
        operation=f"task:{task.request.id}",
        reservation=_header(task, RESERVATION_HEADER),
    )
    try:
        return call(api)
    except SoftTimeLimitExceeded as exc:  # HipChat too slow for too long: a failure
        late = TransportError(f"the action took longer than its time limit ({exc!r})")
        failures += 1
        if failures >= rt.settings.action_max_attempts:
            raise late from exc
        raise come_back(task, late, failures, rt.settings) from exc
    except RetryLater as exc:
        if not waiting(exc):
            failures += 1
            if failures >= rt.settings.action_max_attempts:
                raise  # the last attempt: the task fails with HipChat's error
        raise come_back(task, exc, failures, rt.settings) from exc


def waiting(exc: RetryLater) -> bool:
    """Our budget or HipChat's word made it wait: not a failure of anyone."""
    return isinstance(exc, BucketEmpty | RateLimited)


def come_back(task: Task, exc: RetryLater, failures: int, settings: Settings) -> Retry:
    """Re-send ``task`` after ``exc``'s wait (with a reservation, just after it is due; a
    little jitter otherwise, so that waiters do not all come back at once), carrying the
    failure count and the reservation in the message's headers."""
    reservation = getattr(exc, "reservation", None)
    if reservation is not None:
        countdown = exc.retry_after + random.uniform(0, settings.bucket_margin_seconds / 4)
    elif waiting(exc):
        countdown = exc.retry_after + random.uniform(0, JITTER_SECONDS)
    else:
        countdown = max(
            exc.retry_after,
            backoff_seconds(failures, ACTION_BACKOFF_BASE_SECONDS, ACTION_BACKOFF_MAX_SECONDS),
        )
    headers = {FAILURES_HEADER: failures, RESERVATION_HEADER: reservation}
    return task.retry(countdown=countdown, exc=exc, max_retries=None, headers=headers)


def _header(task: Task, name: str) -> Any:
    """A custom header of the running task's message (Celery keeps them in request.headers,
    and older versions as attributes of the request)."""
    headers = task.request.headers or {}
    return headers.get(name, getattr(task.request, name, None))


@shared_task(
    bind=True, ignore_result=False, max_retries=None, name="hipchat.action.list_room_users"
)
def list_room_users_task(self: Task, connection: int | str, room: int | str) -> dict[str, Any]:
    return _retrying(self, lambda api: api.list_room_users(room), connection)


@shared_task(**ACTION_TASK, name="hipchat.action.get_user")
def get_user_task(self: Task, connection: int | str, user: int | str) -> dict[str, Any]:
    return _retrying(self, lambda api: api.get_user(user), connection)


@shared_task(**ACTION_TASK, name="hipchat.action.post_message")
def post_message_task(
    self: Task, connection: int | str, room: int | str, message: str
) -> dict[str, Any]:
    return _retrying(self, lambda api: api.post_message(room, message), connection)


@shared_task(
    bind=True, ignore_result=False, max_retries=None, name="hipchat.action.send_notification"
)
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


@shared_task(**ACTION_TASK, name="hipchat.action.add_member")
def add_member_task(
    self: Task, connection: int | str, room: int | str, user: int | str
) -> dict[str, Any]:
    return _retrying(self, lambda api: api.add_member(room, user), connection)


@shared_task(bind=True, name="hipchat.purge_outbox", acks_late=True, ignore_result=True)
def purge_outbox_task(self: Task) -> str:
    """Delete delivered and dead events older than ``OUTBOX_RETENTION_DAYS``."""
    count = purge_outbox(Runtime.of(self.app), datetime.now(UTC))
    return f"purged {count} events"


ACTION_TASKS = tuple(
    t.name
    for t in (
        list_room_users_task,
        get_user_task,
        post_message_task,
        send_notification_task,
        add_member_task,
    )
)
