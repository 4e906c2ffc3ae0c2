"""End to end with RabbitMQ as the broker: ``HIPCHAT_POLLER_BROKER_URL=amqp://...``, and Redis
(a ``redis-server`` of this module's own) still for the budget, the leases and the results.

Real processes: ``hipchat-poller worker`` (concurrency 2) and ``hipchat-poller beat``, the
emulator and a webhook receiver in this process, a PostgreSQL database of the module's own.
Everything of the broker lives in a RabbitMQ virtual host made for this module and deleted
after it (``tests/rabbitmq.py``): nothing lingers, and runs on other worktrees never meet.

What RabbitMQ is checked for:

* **Queues**: the worker declares ``hipchat.polls`` and ``hipchat.actions``. Celery publishes
  to a direct queue through RabbitMQ's default exchange, so this module watches with
  RabbitMQ's firehose (``rabbitmqctl trace_on`` for the vhost): a *spy* queue bound to
  ``amq.rabbitmq.trace`` gets a copy of every task message as it was published, with its
  AMQP headers: beat's polls, the drains, the actions and each of their retries.
* **Countdowns and custom headers**: a webhook that refuses the first delivery and an action
  that must wait for its reserved call, then fails once, come back through messages with an
  ``eta`` that the worker holds unacknowledged until it is due, carrying
  ``hipchat_reservation`` and ``hipchat_failures`` in their headers.
* **Beat's batched publishing**: ``Producer.batch`` has no AMQP implementation, so beat
  publishes one message at a time inside it; 1,200 polls sent in one call all arrive.
* **Events for Flower**: an event receiver (what Flower runs) on the ``celeryev`` exchange of
  the vhost sees the tasks received, started, retried and succeeded, and the action sent.
* **No secret** (token, webhook secret, Fernet key) in any message RabbitMQ carried.

Nothing waits with a bare sleep: every wait is a condition with a generous timeout.
"""

from __future__ import annotations

import json
import os
import secrets
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from cryptography.fernet import Fernet
from kombu import Connection, Exchange, Queue

from emulator import EmulatorServer
from tasks.budget import Status
from tasks.celery_tasks import FAILURES_HEADER, RESERVATION_HEADER
from tasks.runtime import Runtime
from tasks.settings import Settings
from tests.conftest import new_postgres_database
from tests.e2e_support import HIPCHAT_POLLER, Service, WebhookReceiver, hipchat_poller, tail
from tests.rabbitmq import RabbitVhost
from tests.redis_server import RedisServer
from tests.waiting import wait_for
from worker.app import ACTION_QUEUE, POLL_QUEUE, create_app
from worker.scheduler import POLL_TASK, ConnectionScheduler, Message

pytestmark = [pytest.mark.e2e, pytest.mark.integration, pytest.mark.timeout(240)]

INTERVAL = 2.0  # HIPCHAT_POLLER_POLL_INTERVAL_SECONDS
BUCKET_CAPACITY = 5  # calls per BUCKET_WINDOW (+ the budget's 1 s margin)
BUCKET_WINDOW = 3.0
START_TIMEOUT = 60.0  # a Celery worker starting on a loaded 2-core machine
TIMEOUT = 45.0
DELIVER_TASK = "hipchat.deliver"
ACTION_TASK = "hipchat.action.post_message"
# The firehose's copy of each message published to the default exchange ("publish." and the
# exchange's name, which is empty): the task messages, not the events (exchange celeryev).
SPY = Queue(
    "spy.published",
    Exchange("amq.rabbitmq.trace", "topic", passive=True),
    routing_key="publish.",
    durable=False,
)


@dataclass(frozen=True)
class Sent:
    """One message as RabbitMQ carried it."""

    queue: str
    headers: dict[str, Any]
    body: Any
    raw: bytes
    delivery_mode: int  # 1 transient, 2 persistent

    @property
    def task(self) -> str:
        return str(self.headers.get("task"))


@dataclass
class Stack:
    tmp: Path
    vhost: RabbitVhost
    env: dict[str, str]
    srv: EmulatorServer
    receiver: WebhookReceiver
    app: Celery
    secrets: list[str]
    run_id: str
    services: list[Service] = field(default_factory=list)
    sent: list[Sent] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    _stop_events: threading.Event = field(default_factory=threading.Event)
    _events_thread: threading.Thread | None = None

    @property
    def rt(self) -> Runtime:
        return Runtime.of(self.app)

    # -- processes --------------------------------------------------------------------------
    def cli(self, *args: str, stdin: str | None = None, env: dict[str, str] | None = None) -> str:
        return hipchat_poller(args, env=self.env | (env or {}), cwd=self.tmp, stdin=stdin)

    def start(self) -> None:
        self._start_events()
        worker = ["worker", "-n", f"amqp-{self.run_id}@%h", "--concurrency", "2"]
        for name, argv in (("worker", worker), ("beat", ["beat"])):
            service = Service(name, [HIPCHAT_POLLER, *argv, "--loglevel", "INFO"], self.env,
                              self.tmp, self.tmp / f"{name}.log")  # fmt: skip
            self.services.append(service.start())
        wait_for(
            lambda: " ready." in self.services[0].log_text() or not self.services[0].alive(),
            START_TIMEOUT,
            "the worker to be ready",
            describe=self.describe,
        )
        assert self.services[0].alive(), self.describe()

    def close(self) -> None:
        self._stop_events.set()
        for service in self.services:
            service.terminate()
        for service in self.services:
            service.stop()
        if self._events_thread is not None:
            self._events_thread.join(timeout=10)
        self.app.close()
        self.rt.close()

    def describe(self) -> str:
        return "\n".join(f"--- {s.name} ---\n{tail(s.log_text(), 25)}" for s in self.services)

    # -- what RabbitMQ carried ----------------------------------------------------------------
    def read_spies(self) -> list[Sent]:
        """Every task message published since the last read, added to ``sent``."""
        with Connection(self.vhost.url) as conn:
            spy = SPY(conn.default_channel)
            while (copy := spy.get(no_ack=True)) is not None:
                raw = copy.body if isinstance(copy.body, bytes) else copy.body.encode()
                trace = copy.headers or {}  # the firehose: where it went, and its properties
                properties = trace["properties"]
                headers = dict(properties.get("headers") or {})
                queue = ",".join(trace["routing_keys"])
                mode = int(properties.get("delivery_mode") or 0)
                self.sent.append(Sent(queue, headers, json.loads(raw), raw, mode))
        return self.sent

    def messages(self, task: str) -> list[Sent]:
        return [s for s in self.read_spies() if s.task == task]

    def _start_events(self) -> None:
        """An event receiver, as Flower runs one, from before the worker starts."""
        ready = threading.Event()
        stack = self

        class Receiver(self.app.events.Receiver):  # type: ignore[name-defined,misc]
            def on_consume_ready(self, *args: Any, **kwargs: Any) -> None:
                ready.set()

            def on_iteration(self) -> None:
                self.should_stop = stack._stop_events.is_set()

        def run() -> None:
            with self.app.connection_for_read() as conn:
                receiver = Receiver(conn, handlers={"*": self.events.append}, app=self.app)
                receiver.capture(limit=None, timeout=None, wakeup=False)

        self._events_thread = threading.Thread(target=run, name="celery-events", daemon=True)
        self._events_thread.start()
        assert ready.wait(30), "the event receiver did not start"

    def task_events(self, uuid_: str) -> list[str]:
        return [e["type"] for e in list(self.events) if e.get("uuid") == uuid_]

    # -- configuration, as a user types it ------------------------------------------------------
    def add_connection(self, label: str) -> tuple[str, int, str]:
        token = f"amqp-{label}-{secrets.token_hex(12)}"
        self.srv.state.create_token(1, token=token)
        self.secrets.append(token)
        name = f"{label}-{self.run_id}"
        self.cli("connection", "add", name, "--base-url", self.srv.base_url, "--token-stdin",
                 stdin=token + "\n")  # fmt: skip
        from storage import connections as conns

        with self.rt.db.session() as s:
            row = conns.get_connection(s, name)
            assert row is not None
            return name, int(row.id), token

    def primed(self, conn_id: int) -> bool:
        from storage import subscriptions as subs

        with self.rt.db.session() as s:
            rows = subs.list_subscriptions(s, conn_id)
            return bool(rows) and all(r.primed_at is not None for r in rows)


@pytest.fixture(scope="module")
def vhost() -> Iterator[RabbitVhost]:
    with RabbitVhost() as found:
        yield found


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, vhost: RabbitVhost, redis_server: RedisServer
) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("amqp")
    run_id = uuid.uuid4().hex[:8]
    with new_postgres_database("hp_amqp") as database_url:
        srv = EmulatorServer(
            port=0,
            admin_token=f"amqp-admin-{secrets.token_hex(8)}",
            rate_limit=1_000_000,
            flood_limit=10_000,
        ).start()
        receiver = WebhookReceiver().start()
        fernet_key = Fernet.generate_key().decode()
        env = {k: v for k, v in os.environ.items() if not k.startswith("HIPCHAT_POLLER_")} | {
            "HIPCHAT_POLLER_BROKER_URL": vhost.url,
            "HIPCHAT_POLLER_REDIS_URL": redis_server.url,
            "HIPCHAT_POLLER_REDIS_KEY_PREFIX": f"hp-amqp-{run_id}",
            "HIPCHAT_POLLER_DATABASE_URL": database_url,
            "HIPCHAT_POLLER_SECRET_KEY": fernet_key,
            "HIPCHAT_POLLER_POLL_INTERVAL_SECONDS": str(INTERVAL),
            "HIPCHAT_POLLER_RELAY_INTERVAL_SECONDS": str(INTERVAL),
            "HIPCHAT_POLLER_WEBHOOK_BACKOFF_BASE_SECONDS": "0.5",
            "HIPCHAT_POLLER_BUCKET_CAPACITY": str(BUCKET_CAPACITY),
            "HIPCHAT_POLLER_BUCKET_WINDOW_SECONDS": str(BUCKET_WINDOW),
            "HIPCHAT_POLLER_DATA_DIR": str(tmp / "data"),
            "PYTHONUNBUFFERED": "1",
        }
        app = create_app(Settings.from_env(env))
        found = Stack(tmp, vhost, env, srv, receiver, app, [fernet_key, srv.admin_token], run_id)
        try:
            found.cli("migrate")
            vhost.trace_on()
            with Connection(vhost.url) as conn:
                SPY(conn.default_channel).declare()
            yield found
        finally:
            found.close()
            receiver.stop()
            srv.stop()


@pytest.fixture(scope="module")
def running(stack: Stack) -> Stack:
    """The stack with its worker and beat running."""
    if not stack.services:
        stack.start()
    return stack


def test_beat_publishes_a_batch_of_polls_one_by_one_on_amqp(stack: Stack) -> None:
    """Before any worker runs: 1,200 polls (more than one SEND_BATCH) in one call of beat's
    send, through ``Producer.batch``, which publishes immediately on AMQP."""
    assert not stack.services, "a worker would take the polls"
    with Connection(stack.vhost.url) as conn:
        channel = conn.default_channel
        assert not hasattr(channel, "create_publish_batch")  # kombu's batch falls back
        polls = Queue(POLL_QUEUE, Exchange(POLL_QUEUE), routing_key=POLL_QUEUE)(channel)
        polls.declare()
        scheduler = ConnectionScheduler(stack.app, resume=False)
        messages = [Message(POLL_TASK, [10_000 + i, 1], 60.0) for i in range(1200)]
        started = time.perf_counter()
        assert scheduler._send(messages) == 1200
        took = time.perf_counter() - started
        assert polls.queue_declare(passive=True).message_count == 1200
        copies = stack.read_spies()
        assert len(copies) == 1200
        assert {c.task for c in copies} == {POLL_TASK}
        assert {c.queue for c in copies} == {POLL_QUEUE}
        assert {c.delivery_mode for c in copies} == {1}  # transient: no wait for a disk
        assert sorted(c.body[0][0] for c in copies) == [10_000 + i for i in range(1200)]
        polls.purge()
        stack.sent.clear()
    print(f"beat published 1200 polls on amqp (publisher confirms) in {took:.2f}s")


def test_polls_and_a_retried_webhook_delivery_through_rabbitmq(running: Stack) -> None:
    stack = running
    name, conn_id, _ = stack.add_connection("hook")
    room = stack.srv.state.create_room(f"Room {stack.run_id}")
    alice = stack.srv.state.create_user(f"Alice {stack.run_id}", mention_name=f"a{stack.run_id}")
    secret = secrets.token_urlsafe(24)
    stack.secrets.append(secret)
    stack.receiver.secret_for("/hook", secret)
    stack.receiver.fail_next("/hook", 503)  # the first delivery is refused: a countdown
    stack.cli("subscribe", name, "--event", "room_message", "--room", room["name"],
              "--webhook", stack.receiver.url("/hook"),
              env={"HIPCHAT_POLLER_WEBHOOK_SECRET": secret})  # fmt: skip
    wait_for(lambda: stack.primed(conn_id), TIMEOUT, "priming", describe=stack.describe)
    for text in ("through rabbit 1", "through rabbit 2"):
        stack.srv.state.post_message(room["id"], int(alice["id"]), text)
    wait_for(
        lambda: len(stack.receiver.deliveries("/hook")) >= 2,
        TIMEOUT,
        "two accepted deliveries",
        describe=stack.describe,
    )
    got = stack.receiver.deliveries("/hook")
    assert [d.json["message"] for d in got] == ["through rabbit 1", "through rabbit 2"]
    assert all(d.signature_ok for d in got)
    tried = stack.receiver.deliveries("/hook", accepted_only=False)
    assert [d.status for d in tried] == [503, 200, 200]

    # Beat's polls of this connection went through hipchat.polls, one per interval.
    sent = [m for m in stack.messages(POLL_TASK) if m.body[0][0] == conn_id]
    polls = [m for m in sent if not m.headers.get("retries")]
    intervals = [m.body[0][1] for m in polls]
    assert len(polls) >= 2
    assert len(set(intervals)) == len(intervals), intervals
    # The refused delivery came back through a message with an ETA, carrying its header.
    drains = stack.messages(DELIVER_TASK)
    retried = [m for m in drains if m.headers.get("retries")]
    assert retried, [m.headers for m in drains]
    assert {m.queue for m in drains} == {ACTION_QUEUE}
    assert {m.delivery_mode for m in drains} == {2}  # persistent, the default
    assert all(m.headers.get("eta") for m in retried)
    assert all(RESERVATION_HEADER in m.headers for m in retried)  # None: no budget wait

    # What Flower shows: the polls and the drains, received, started, succeeded. (A poll
    # may expire unrun when its interval is over: any one of them will do.)
    for task, ids in (
        (POLL_TASK, [m.headers["id"] for m in polls]),
        (DELIVER_TASK, [retried[0].headers["id"]]),
    ):
        done = wait_for(
            lambda: [i for i in ids if "task-succeeded" in stack.task_events(i)],  # noqa: B023
            TIMEOUT,
            f"the events of a {task} that succeeded",
        )
        assert {"task-received", "task-started"} <= set(stack.task_events(done[0]))
    stack.cli("connection", "pause", name)


def test_an_action_waits_for_its_reservation_and_retries_with_its_headers(
    running: Stack,
) -> None:
    """``send_task`` of an action whose connection has spent its budget: it is reserved a
    call and comes back for it (``hipchat_reservation``), then HipChat answers 500 once and
    it comes back again (``hipchat_failures``), then it posts, once."""
    stack = running
    name, conn_id, _ = stack.add_connection("action")
    room = stack.srv.state.create_room(f"Actions {stack.run_id}")
    path = f"/v2/room/{room['id']}/message"
    stack.srv.state.inject_fault("status", status=500, path_prefix=path, method="POST")
    budget = stack.rt.budget  # spent (`connection add` took a call to check the token)
    assert sum(budget.take(conn_id).granted for _ in range(BUCKET_CAPACITY)) >= 1
    assert budget.peek(conn_id).status is Status.REFUSED
    result = stack.app.send_task(ACTION_TASK, args=[name, room["id"], "hello from rabbit"])
    answer = result.get(timeout=TIMEOUT)
    assert answer["id"]
    texts = [m["message"] for m in stack.srv.state.history(room["id"])]
    assert texts.count("hello from rabbit") == 1
    posts = stack.srv.state.calls(path_prefix=path)
    assert [c.status for c in posts if c.method == "POST"] == [500, 201]

    sent = [m for m in stack.messages(ACTION_TASK) if m.headers["id"] == result.id]
    assert [m.headers.get("retries") for m in sent] == [0, 1, 2]
    assert {m.queue for m in sent} == {ACTION_QUEUE}
    assert {m.delivery_mode for m in sent} == {2}  # persistent, retries included
    first, reserved, failed = sent
    assert first.headers.get("eta") is None
    assert reserved.headers["eta"]
    assert str(reserved.headers[RESERVATION_HEADER]).count(":") == 2  # "<epoch>:<stamp>:<n>"
    assert reserved.headers[FAILURES_HEADER] == 0  # waiting is not failing
    assert failed.headers["eta"]
    assert failed.headers[FAILURES_HEADER] == 1
    assert failed.headers[RESERVATION_HEADER] is None

    events = stack.task_events(result.id)
    assert {"task-sent", "task-received", "task-started", "task-retried", "task-succeeded"} <= (
        set(events)
    ), events
    assert events.count("task-retried") == 2


def test_rabbitmq_carried_no_secret_and_the_processes_stayed_up(running: Stack) -> None:
    stack = running
    messages = stack.read_spies()
    assert {POLL_TASK, DELIVER_TASK, ACTION_TASK} <= {m.task for m in messages}
    carried = b"\n".join(m.raw + repr(m.headers).encode() for m in messages)
    events = json.dumps(stack.events, default=str).encode()
    for secret in stack.secrets:
        assert secret.encode() not in carried, f"a secret ({secret[:6]}...) in a message"
        assert secret.encode() not in events, f"a secret ({secret[:6]}...) in an event"
    for service in stack.services:
        assert service.alive(), f"{service.name} died:\n{tail(service.log_text())}"
        assert "Traceback" not in service.log_text(), tail(service.log_text(), 60)
