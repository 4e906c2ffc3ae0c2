"""The ``hipchat.action.*`` Celery tasks: callable by name, routed to the action queue, given
a connection name (never a token), and retried after exactly the wait HipChat or the bucket
stated. Tasks run in-process against the emulator over real HTTP."""

from __future__ import annotations

import inspect
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from celery import Celery, Task
from celery.exceptions import Retry, SoftTimeLimitExceeded

import tasks.celery_tasks  # noqa: F401  (registers the shared tasks)
from emulator import EmulatorServer, ManualClock
from storage.errors import NotFound, RateLimited, ServerError, ValidationError
from tasks import celery_tasks
from tasks.actions import Actions
from tasks.budget import BudgetEmpty, Status
from tasks.celery_tasks import (
    FAILURES_HEADER,
    JITTER_SECONDS,
    RESERVATION_HEADER,
)
from tasks.runtime import Runtime
from tests.actions_support import add_connection, make_settings
from tests.waiting import wait_for
from worker.app import ACTION_QUEUE, broker_url_for, create_app, transport_options

ACTION_TASKS = [
    "hipchat.action.list_room_users",
    "hipchat.action.get_user",
    "hipchat.action.post_message",
    "hipchat.action.send_notification",
    "hipchat.action.add_member",
]


CONN_ID = 1


def make_app(tmp_path: Path, server: EmulatorServer, **overrides: Any) -> Celery:
    app = create_app(make_settings(tmp_path, **overrides))
    rt = Runtime.of(app)
    rt.db.upgrade()
    add_connection(rt, "ops", server.base_url, server.admin_token)
    return app


@pytest.fixture
def app(tmp_path: Path, emulator: EmulatorServer) -> Celery:
    app = make_app(tmp_path, emulator)
    app.conf.task_always_eager = True
    return app


def run_as_worker(
    task: Task, *args: Any, headers: dict[str, Any] | None = None, task_id: str = "test-task-id"
) -> Any:
    """Run ``task`` the way a worker does (not eager, not called directly), so that
    ``self.retry`` publishes the retry and raises :class:`Retry` carrying its countdown.
    (``task.apply()`` would re-run an eager retry at once, without the countdown.)
    ``headers``: the custom headers of the message, as a retry carries them."""
    task.push_request(
        id=task_id, args=list(args), kwargs={}, retries=0, is_eager=False,
        called_directly=False, delivery_info={}, headers=headers,
    )  # fmt: skip
    try:
        return task.run(*args)
    finally:
        task.pop_request()


# -- by name -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ACTION_TASKS)
def test_action_tasks_are_registered_by_name_and_routed_to_the_action_queue(
    app: Celery, name: str
) -> None:
    task = app.tasks[name]

    assert task.name == name
    assert app.amqp.router.route({}, name)["queue"].name == ACTION_QUEUE
    assert task.ignore_result is False  # send_task callers can read the answer


def test_post_message_by_name(app: Celery, emulator: EmulatorServer) -> None:
    result = app.tasks["hipchat.action.post_message"].apply(args=["ops", "General", "by name"])

    assert result.successful(), result.traceback
    [item] = emulator.state.history("General")
    assert result.result == {"id": item["id"], "timestamp": item["date"]}
    assert item["message"] == "by name"


def test_send_notification_by_name_with_keyword_options(
    app: Celery, emulator: EmulatorServer
) -> None:
    result = app.tasks["hipchat.action.send_notification"].apply(
        args=["ops", 10001, "built"],
        kwargs={"color": "green", "message_format": "text", "notify": True, "from_": "CI"},
    )

    assert result.successful(), result.traceback
    item = emulator.state.history(10001)[-1]
    assert (item["color"], item["message_format"], item["from"]) == ("green", "text", "CI")


def test_list_room_users_get_user_and_add_member_by_name(
    app: Celery, emulator: EmulatorServer
) -> None:
    carol = emulator.state.create_user("Carol Clark", "carol")

    users = app.tasks["hipchat.action.list_room_users"].apply(args=["ops", "Ops Room"]).get()
    user = app.tasks["hipchat.action.get_user"].apply(args=["ops", "@carol"]).get()
    added = app.tasks["hipchat.action.add_member"].apply(args=["ops", "Ops Room", "carol"]).get()

    assert users["source"] == "members"
    assert len(users["items"]) == 3
    assert user["id"] == carol["id"]
    assert added == {"added": True, "room": 10002, "user": "@carol"}


def test_results_are_json_for_send_task_callers(app: Celery) -> None:
    result = app.tasks["hipchat.action.list_room_users"].apply(args=["ops", "General"])
    assert json.loads(json.dumps(result.result)) == result.result


def test_a_connection_id_works_as_well_as_its_name(app: Celery) -> None:
    result = app.tasks["hipchat.action.get_user"].apply(args=[1, 2])
    assert result.get()["mention_name"] == "AliceA"


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["ops", "General", ""], ValidationError),
        (["ops", "Nowhere", "hi"], NotFound),
        (["nope", "General", "hi"], ValidationError),
    ],
)
def test_what_will_not_work_later_fails_at_once_without_retrying(
    app: Celery, args: list[Any], error: type[Exception]
) -> None:
    result = app.tasks["hipchat.action.post_message"].apply(args=args)

    assert result.failed()
    assert isinstance(result.result, error)


@pytest.mark.parametrize("name", ACTION_TASKS)
def test_task_arguments_are_a_connection_never_a_token(
    app: Celery, emulator: EmulatorServer, name: str
) -> None:
    parameters = list(inspect.signature(app.tasks[name].run).parameters)
    assert parameters[0] == "connection"
    assert not [p for p in parameters if "token" in p or "secret" in p]

    signature = app.tasks[name].s("ops", "General", "hi")
    message = json.dumps({"args": signature.args, "kwargs": signature.kwargs})
    assert emulator.admin_token not in message


# -- retries after the stated wait ------------------------------------------------------------


@pytest.fixture
def flood_server(make_emulator: Callable[..., EmulatorServer]) -> EmulatorServer:
    clock = ManualClock(time.time())
    return make_emulator(flood_limit=1, flood_window_seconds=120.0, clock=clock)


def test_flood_control_retries_after_exactly_the_wait_hipchat_stated(
    tmp_path: Path, flood_server: EmulatorServer
) -> None:
    app = make_app(tmp_path, flood_server)
    task = app.tasks["hipchat.action.post_message"]
    assert run_as_worker(task, "ops", "General", "first")["id"]

    before = time.time()
    with pytest.raises(Retry) as caught:
        run_as_worker(task, "ops", "General", "second")
    after = time.time()

    retry = caught.value
    # Retry.exc is a pickled copy (see the note in the report on errors.py); the original
    # is the exception being handled when the task retried.
    limited = retry.__context__
    assert isinstance(limited, RateLimited)
    assert limited.flood_control is True
    # HipChat's wait, plus a little jitter so that waiting tasks do not all come back at once.
    assert limited.retry_after <= retry.when <= limited.retry_after + JITTER_SECONDS
    reset = math.ceil(flood_server.state.clock() + 120.0)  # X-FloodControl-Reset
    assert reset - after <= limited.retry_after <= reset - before  # 120 s, not the default
    assert retry.sig is not None
    assert retry.sig.options["countdown"] == retry.when
    assert retry.sig.options["headers"][FAILURES_HEADER] == 0  # waiting is not failing
    assert list(retry.sig.args) == ["ops", "General", "second"]
    assert flood_server.admin_token not in json.dumps(list(retry.sig.args))
    assert flood_server.admin_token not in str(retry)


def test_a_spent_budget_reserves_the_call_and_the_task_comes_back_for_it(
    tmp_path: Path, emulator: EmulatorServer
) -> None:
    app = make_app(
        tmp_path, emulator, bucket_capacity=2, bucket_window_seconds=1.0, bucket_margin_seconds=0.2
    )
    task = app.tasks["hipchat.action.get_user"]
    run_as_worker(task, "ops", "@bobb")
    run_as_worker(task, "ops", "@bobb")

    with pytest.raises(Retry) as caught:
        run_as_worker(task, "ops", "@bobb")

    retry = caught.value
    empty = retry.__context__
    assert isinstance(empty, BudgetEmpty)
    assert empty.reservation is not None
    assert 0 < empty.retry_after <= 1.2  # when the first call leaves the (margined) window
    assert empty.retry_after <= retry.when <= empty.retry_after + 0.05  # a quarter margin
    assert retry.sig is not None
    headers = retry.sig.options["headers"]
    assert headers == {FAILURES_HEADER: 0, RESERVATION_HEADER: empty.reservation}
    assert len(emulator.state.call_log.select()) == 2

    # Back when the reservation is due: granted without taking again, and nobody who came
    # in between got that slot.
    rt = Runtime.of(app)
    assert rt.budget.take(CONN_ID).status is Status.REFUSED
    due = time.monotonic() + empty.retry_after
    wait_for(lambda: time.monotonic() >= due, 5, "the reservation to be due")
    assert run_as_worker(task, "ops", "@bobb", headers=headers)["mention_name"] == "bobb"
    assert len(emulator.state.call_log.select()) == 3


def test_a_post_that_waited_for_the_budget_comes_back_for_one_call(
    tmp_path: Path, emulator: EmulatorServer
) -> None:
    """A post refused by the budget never called HipChat: it comes back as a first attempt,
    for the one call it reserved, not as one that may have posted, which would look at the
    room's history first: a second call the reservation does not cover (the fault suite saw
    40 calls in a window of 20 from a burst of posts)."""
    app = make_app(
        tmp_path, emulator, bucket_capacity=2, bucket_window_seconds=1.0, bucket_margin_seconds=0.2
    )
    task = app.tasks["hipchat.action.post_message"]
    for first in ("first", "then"):
        run_as_worker(task, "ops", "General", first, task_id=first)
    with pytest.raises(Retry) as caught:
        run_as_worker(task, "ops", "General", "second", task_id="second")
    empty = caught.value.__context__
    assert isinstance(empty, BudgetEmpty)
    assert caught.value.sig is not None
    headers = caught.value.sig.options["headers"]
    due = time.monotonic() + empty.retry_after
    wait_for(lambda: time.monotonic() >= due, 5, "the reservation to be due")
    sent = run_as_worker(task, "ops", "General", "second", headers=headers, task_id="second")
    assert "repeated" not in sent
    calls = [(c.method, c.path) for c in emulator.state.call_log.select()]
    assert calls == [("POST", "/v2/room/General/message")] * 3


def test_only_hipchats_failures_count_toward_action_max_attempts(
    tmp_path: Path, emulator: EmulatorServer
) -> None:
    app = make_app(tmp_path, emulator, action_max_attempts=3, bucket_capacity=3)
    task = app.tasks["hipchat.action.get_user"]
    emulator.state.inject_fault("status", status=503, path_prefix="/v2/user", count=10)

    def attempt(failures: int) -> Any:
        return run_as_worker(task, "ops", "@bobb", headers={FAILURES_HEADER: failures})

    for failures in (0, 1):  # attempts 1 and 2 of 3 are retried ...
        with pytest.raises(Retry) as caught:
            attempt(failures)
        assert caught.value.sig is not None
        assert caught.value.sig.options["headers"][FAILURES_HEADER] == failures + 1
    with pytest.raises(ServerError):  # ... the third one is the last
        attempt(2)
    # The budget is spent now: waiting for it is no failure, even after two failures.
    with pytest.raises(Retry) as caught:
        attempt(2)
    assert isinstance(caught.value.__context__, BudgetEmpty)
    assert caught.value.sig is not None
    assert caught.value.sig.options["headers"][FAILURES_HEADER] == 2


def test_every_task_has_soft_and_hard_time_limits(tmp_path: Path, emulator: EmulatorServer) -> None:
    app = make_app(tmp_path, emulator, poll_interval_seconds=60.0)
    assert tuple(ACTION_TASKS) == celery_tasks.ACTION_TASKS
    for name in [*ACTION_TASKS, "hipchat.poll_connection", "hipchat.deliver"]:
        task = app.tasks[name]
        assert task.soft_time_limit is not None
        assert task.time_limit == task.soft_time_limit + 30.0
    # An action makes up to three calls, each within the HTTP timeouts (5 s + 30 s).
    assert app.tasks["hipchat.action.post_message"].soft_time_limit == 3 * 35.0 + 10.0
    assert app.conf.broker_transport_options == {"polling_interval": 0.1}  # in-process


def test_a_dead_workers_messages_come_back_soon_after_the_visibility_timeout(
    tmp_path: Path,
) -> None:
    """kombu looks for messages whose visibility timeout has passed every
    ``unacked_restore_interval`` seconds, but (since kombu 5.7) scans Redis only on every
    ``unacked_restore_throttle``-th look: every 100 s by default. A task a killed worker held
    came back 95 s after the kill with a 15 s timeout (the fault suite, scenario 3a)."""
    settings = make_settings(
        tmp_path, redis_url="redis://127.0.0.1:6379/0", broker_visibility_timeout_seconds=15.0
    )
    options = transport_options(broker_url_for(settings), settings)
    assert options["visibility_timeout"] == 15.0
    # kombu's defaults are 10 and 10: what is not set here is left to them.
    sweep = options.get("unacked_restore_interval", 10) * options.get(
        "unacked_restore_throttle", 10
    )
    assert sweep <= 10


def test_an_action_past_its_soft_time_limit_is_a_failure_and_retried(
    tmp_path: Path, emulator: EmulatorServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = make_app(tmp_path, emulator)
    task = app.tasks["hipchat.action.get_user"]

    def too_slow(*args: Any, **kwargs: Any) -> Any:
        raise SoftTimeLimitExceeded

    monkeypatch.setattr(Actions, "get_user", too_slow)
    with pytest.raises(Retry) as caught:
        run_as_worker(task, "ops", "@bobb")
    assert caught.value.sig is not None
    assert caught.value.sig.options["headers"][FAILURES_HEADER] == 1
