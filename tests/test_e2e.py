"""End to end, with real processes: ``hipchat-poller worker`` x2 and ``hipchat-poller beat`` as
subprocesses, configured through the CLI, against the emulator over HTTP, Redis and PostgreSQL.

How it fits together (see docs/testing.md):

* the emulator runs in this process (``srv.state`` makes rooms and messages; ``srv.state.calls``
  is the HipChat call log) and so does a webhook receiver that checks every signature;
* the subprocesses get ``HIPCHAT_POLLER_*`` settings: a ``redis-server`` of the module's own
  (``redis_server``: Celery's broker keys have fixed names), a unique key prefix, the session's
  fresh PostgreSQL database, a Fernet key, a 2 s poll interval and a budget of 10 HipChat calls
  per 6 s;
* every test gets its own connection (its own emulator token), user, room and webhook path
  from the ``case`` fixture, so the call log of one test's token is that test's traffic only;
  the fixture pauses the connection when the test ends;
* ``MONITOR`` records every Redis command sent to that server: the broker messages as written,
  and the Celery task events (what Flower shows), used to time polls and to hunt secrets.

Nothing waits with a bare sleep: every wait is a condition with a generous timeout.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import secrets
import subprocess
import sys
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.fernet import Fernet

from emulator import EmulatorServer
from storage.vocabulary import ROOM_LIST_EVENTS
from tests.e2e_support import (
    Delivery,
    RedisMonitor,
    Service,
    TaskRun,
    WebhookReceiver,
    max_calls_in_window,
    tail,
)
from tests.redis_server import RedisServer
from tests.waiting import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.integration, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
HIPCHAT_POLLER = str(BIN / "hipchat-poller")
CELERY = str(BIN / "celery")

INTERVAL = 2.0  # HIPCHAT_POLLER_POLL_INTERVAL_SECONDS
BUCKET_CAPACITY = 10  # HIPCHAT_POLLER_BUCKET_CAPACITY
BUCKET_WINDOW = 6.0  # HIPCHAT_POLLER_BUCKET_WINDOW_SECONDS
# The bucket grants a call at its Redis TIME; the emulator stamps it when the request
# arrives, a few milliseconds later and not always the same few. The budget is checked on
# windows this much shorter than the bucket's, so that jitter cannot fake a violation.
ARRIVAL_JITTER = 0.5
TIMEOUT = 45.0  # for anything that needs a few polls; generous for a loaded 2-core machine

POLL_TASK = "hipchat.poll_connection"


@dataclass(frozen=True)
class Conn:
    name: str
    token: str
    id: int


class E2E:
    """Everything a test needs: the emulator, the receiver, the CLI, the logs, the database."""

    def __init__(self, tmp: Path, postgres_url: str, redis: RedisServer) -> None:
        self.tmp = tmp
        self.redis = redis
        self.run_id = uuid.uuid4().hex[:8]
        self.key_prefix = f"hp-e2e-{self.run_id}"
        # The rate limit is ours to enforce (the bucket), not the emulator's.
        self.srv = EmulatorServer(
            port=0,
            admin_token=f"e2e-admin-{secrets.token_hex(8)}",
            rate_limit=1_000_000,
            flood_limit=10_000,
        ).start()
        self.receiver = WebhookReceiver().start()
        self.fernet_key = Fernet.generate_key().decode()
        self.secrets: list[str] = [self.fernet_key, self.srv.admin_token]
        self.cli_output: list[str] = []
        self.services: list[Service] = []
        self.monitor: RedisMonitor | None = None
        self.labels = itertools.count(1)  # t1, t2, ...: each test's connection and webhook path
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("HIPCHAT_POLLER_")} | {
            "HIPCHAT_POLLER_REDIS_URL": redis.url,
            "HIPCHAT_POLLER_REDIS_KEY_PREFIX": self.key_prefix,
            "HIPCHAT_POLLER_DATABASE_URL": postgres_url,
            "HIPCHAT_POLLER_SECRET_KEY": self.fernet_key,
            "HIPCHAT_POLLER_POLL_INTERVAL_SECONDS": str(INTERVAL),
            "HIPCHAT_POLLER_RELAY_INTERVAL_SECONDS": str(INTERVAL),
            # A failed webhook is retried after 0.25-0.5 s, then 0.5-1 s, ... (default base 2 s).
            "HIPCHAT_POLLER_WEBHOOK_BACKOFF_BASE_SECONDS": "0.5",
            "HIPCHAT_POLLER_BUCKET_CAPACITY": str(BUCKET_CAPACITY),
            "HIPCHAT_POLLER_BUCKET_WINDOW_SECONDS": str(BUCKET_WINDOW),
            "HIPCHAT_POLLER_DATA_DIR": str(tmp / "data"),
            "PYTHONUNBUFFERED": "1",
        }
        from tasks.runtime import Runtime
        from tasks.settings import Settings

        self.rt = Runtime(Settings.from_env(self.env))

    # -- processes --------------------------------------------------------------------------
    def start_services(self) -> None:
        assert self.redis.port is not None
        self.monitor = RedisMonitor(
            self.redis.host, self.redis.port, 0, self.tmp / "redis-monitor.log"
        ).start()
        workers = [
            # Worker a runs the thread pool, worker b the default prefork pool: every test
            # runs on both. Worker b logs at DEBUG, which shows the arguments of every task;
            # worker a serves its own metrics (test_metrics_move_during_real_polls).
            ("worker-a", ["-P", "threads", "--concurrency", "4", "--metrics-port", "0"]),
            ("worker-b", ["--concurrency", "2", "--loglevel", "DEBUG"]),
        ]
        for name, options in workers:
            self.services.append(
                self._service(name, ["worker", "-n", f"{name}-{self.run_id}@%h", *options])
            )
        self.services.append(self._service("beat", ["beat", "--loglevel", "INFO"]))
        for service in self.services:
            service.start()
        for service in self.services[:2]:
            self._wait_ready(service)

    @staticmethod
    def _wait_ready(service: Service) -> None:
        wait_for(
            lambda: " ready." in service.log_text() or not service.alive(),
            60,
            f"{service.name} to be ready",
            describe=lambda: tail(service.log_text()),
        )
        assert service.alive(), f"{service.name} exited:\n{tail(service.log_text())}"

    def start_service(self, name: str, args: list[str]) -> Service:
        """One more process (a second beat); stopped by the test, or at teardown."""
        service = self._service(name, args).start()
        self.services.append(service)
        return service

    def _service(self, name: str, args: list[str]) -> Service:
        return Service(name, [HIPCHAT_POLLER, *args], self.env, self.tmp, self.tmp / f"{name}.log")

    def close(self) -> None:
        for service in self.services:
            service.terminate()
        for service in self.services:
            service.stop()
        if self.monitor is not None:
            self.monitor.stop()
        self.receiver.stop()
        self.srv.stop()
        self.rt.close()

    def service_logs(self) -> dict[str, str]:
        return {s.name: s.log_text() for s in self.services}

    def check_services_alive(self) -> None:
        for service in self.services:
            if service.returncode is None:  # not stopped on purpose
                assert service.alive(), f"{service.name} died:\n{tail(service.log_text())}"

    # -- the command line, as a user types it -------------------------------------------------
    def cli(
        self,
        *args: str,
        stdin: str | None = None,
        env: dict[str, str] | None = None,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [HIPCHAT_POLLER, *args],
            input=stdin,
            env=self.env | (env or {}),
            cwd=self.tmp,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        self.cli_output.append(f"$ hipchat-poller {' '.join(args)}\n{done.stdout}{done.stderr}")
        if check:
            assert done.returncode == 0, (
                f"hipchat-poller {' '.join(args)} exited {done.returncode}:\n"
                f"{done.stdout}{done.stderr}"
            )
        return done

    def add_connection(self, label: str) -> Conn:
        """A connection with a token of its own (``connection add --token-stdin``)."""
        token = f"e2e-{label}-{secrets.token_hex(12)}"
        self.srv.state.create_token(1, token=token)
        self.secrets.append(token)
        name = f"{label}-{self.run_id}"
        out = self.cli(
            "connection",
            "add",
            name,
            "--base-url",
            self.srv.base_url,
            "--token-stdin",
            stdin=token + "\n",
        ).stdout
        assert token not in out
        return Conn(name, token, self.connection_row(name).id)

    def webhook(self, path: str) -> tuple[str, dict[str, str]]:
        """A receiver URL and the environment that gives ``subscribe`` its secret."""
        secret = secrets.token_urlsafe(24)
        self.secrets.append(secret)
        self.receiver.secret_for(path, secret)
        return self.receiver.url(path), {"HIPCHAT_POLLER_WEBHOOK_SECRET": secret}

    # -- the database, read directly ------------------------------------------------------------
    def connection_row(self, name: str) -> Any:
        from storage import connections as conns

        with self.rt.db.session() as s:
            row = conns.get_connection(s, name)
            assert row is not None, f"no connection {name}"
            s.expunge(row)
            return row

    def subscriptions(self, conn: Conn) -> list[Any]:
        from storage import subscriptions as subs

        with self.rt.db.session() as s:
            rows = subs.list_subscriptions(s, conn.id)
            for row in rows:
                s.expunge(row)
            return rows

    def all_primed(self, conn: Conn) -> bool:
        rows = self.subscriptions(conn)
        return bool(rows) and all(r.primed_at is not None for r in rows)

    def wait_primed(self, conn: Conn) -> None:
        wait_for(lambda: self.all_primed(conn), TIMEOUT, "priming", describe=self.describe)

    def outbox(self, conn: Conn) -> list[Any]:
        from sqlalchemy import select

        from storage.models import OutboxEvent

        with self.rt.db.session() as s:
            rows = list(
                s.scalars(
                    select(OutboxEvent)
                    .where(OutboxEvent.connection_id == conn.id)
                    .order_by(OutboxEvent.id)
                )
            )
            for row in rows:
                s.expunge(row)
            return rows

    def database_text(self) -> bytes:
        """Every row of every table as text: what is stored at rest."""
        from storage.models import Base

        with self.rt.db.session() as s:
            return "\n".join(
                str(tuple(row))
                for table in Base.metadata.sorted_tables
                for row in s.execute(table.select())
            ).encode()

    def quiet(self, conn: Conn) -> None:
        """Stop polling a finished test's connection, so later tests run on idle workers."""
        from storage import connections as conns

        with self.rt.db.session() as s:
            conns.set_connection_state(s, conn.id, "paused", "e2e test finished")

    # -- what HipChat saw -------------------------------------------------------------------
    def calls(self, conn: Conn, path_prefix: str | None = None) -> list[Any]:
        return self.srv.state.calls(token=conn.token, path_prefix=path_prefix)

    def history_calls(self, conn: Conn, room_id: int) -> list[Any]:
        return self.calls(conn, f"/v2/room/{room_id}/history")

    def poll_runs(self, conn: Conn) -> list[TaskRun]:
        """Finished poll tasks of ``conn`` that polled (not skipped as a duplicate)."""
        assert self.monitor is not None
        runs = []
        for run in self.monitor.task_runs(POLL_TASK):
            if not (run.args or "").startswith(f"[{conn.id},") or run.finished is None:
                continue
            if run.state == "task-succeeded" and " events" in (run.result or ""):
                runs.append(run)
        return sorted(runs, key=lambda r: r.started or 0)

    def wait_more_history_calls(self, conn: Conn, room_id: int, n: int) -> None:
        """Wait until ``n`` more polls have fetched this room's history."""
        before = len(self.history_calls(conn, room_id))
        wait_for(
            lambda: len(self.history_calls(conn, room_id)) >= before + n,
            TIMEOUT,
            f"{n} more history polls of room {room_id}",
            describe=self.describe,
        )

    def describe(self) -> str:
        parts = [f"--- {name} ---\n{tail(text, 25)}" for name, text in self.service_logs().items()]
        return "\n".join(parts)


@pytest.fixture(scope="module")
def e2e_env(
    tmp_path_factory: pytest.TempPathFactory, postgres_url: str, redis_server: RedisServer
) -> Iterator[E2E]:
    """Emulator, receiver, Redis server, settings and schema; no worker yet."""
    e2e = E2E(tmp_path_factory.mktemp("e2e"), postgres_url, redis_server)
    try:
        e2e.cli("migrate")
        yield e2e
    finally:
        e2e.close()


@pytest.fixture(scope="module")
def stack(e2e_env: E2E) -> E2E:
    """Two workers and beat, running."""
    if not e2e_env.services:
        e2e_env.start_services()
    e2e_env.check_services_alive()
    return e2e_env


@dataclass
class Case:
    """One test's own corner of the running stack: a connection with its own token (so the
    call log of that token is this test's HipChat traffic), a user, a room, and a webhook path
    with its own secret."""

    stack: E2E
    conn: Conn
    alice: int
    room: dict[str, Any]
    path: str
    url: str
    secret_env: dict[str, str]

    def subscribe(
        self,
        *target: str,
        events: Sequence[str] = ("room_message",),
        room: dict[str, Any] | None = None,
    ) -> None:
        """``hipchat-poller subscribe`` of this connection to ``events`` in ``room`` (this
        case's unless given; room-list events name none), sent to ``target``: ``"--log"``,
        ``"--webhook", case.url`` (signed with this case's secret), ``"--reply", ...``."""
        args = ["subscribe", self.conn.name]
        for event in events:
            args += ["--event", event]
        if not set(events) <= ROOM_LIST_EVENTS:
            args += ["--room", (room or self.room)["name"]]
        self.stack.cli(*args, *target, env=self.secret_env)

    def wait_primed(self) -> None:
        self.stack.wait_primed(self.conn)

    def say(self, text: str) -> None:
        """Alice posts ``text`` in the room."""
        self.stack.srv.state.post_message(self.room["id"], self.alice, text)

    def messages(self) -> list[dict[str, Any]]:
        """The room's history, as the emulator holds it."""
        found: list[dict[str, Any]] = self.stack.srv.state.history(self.room["id"])
        return found

    def deliveries(self, *, accepted_only: bool = True) -> list[Delivery]:
        return self.stack.receiver.deliveries(self.path, accepted_only=accepted_only)

    def history_calls(self, room: dict[str, Any] | None = None) -> list[Any]:
        return self.stack.history_calls(self.conn, (room or self.room)["id"])

    def wait_more_history_calls(self, n: int) -> None:
        self.stack.wait_more_history_calls(self.conn, self.room["id"], n)

    def quiet(self) -> None:
        self.stack.quiet(self.conn)


@pytest.fixture
def case(stack: E2E) -> Iterator[Case]:
    """This test's connection, user, room and webhook path; the connection is paused when the
    test ends (passed or not), so the next test runs on idle workers."""
    label = f"t{next(stack.labels)}"
    conn = stack.add_connection(label)
    alice = f"Alice {label} {stack.run_id}"
    user = stack.srv.state.create_user(alice, mention_name=f"alice{label}{stack.run_id}")
    room = stack.srv.state.create_room(f"Room {label} {stack.run_id}")
    url, secret_env = stack.webhook(f"/{label}")
    found = Case(stack, conn, int(user["id"]), room, f"/{label}", url, secret_env)
    yield found
    found.quiet()


# -- the deployment file ----------------------------------------------------------------------
def test_docker_compose_services_run_commands_that_exist(e2e_env: E2E) -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {
        "redis", "postgres", "migrate", "worker", "beat", "flower", "metrics", "prometheus",
    }  # fmt: skip
    dockerfile = (ROOT / "Dockerfile").read_text().splitlines()
    entrypoint = json.loads(
        next(line for line in dockerfile if line.startswith("ENTRYPOINT")).split(None, 1)[1]
    )
    assert entrypoint == ["hipchat-poller"]
    from tasks.settings import Settings

    fields = {f"HIPCHAT_POLLER_{name.upper()}" for name in Settings.__dataclass_fields__}
    running: dict[str, tuple[list[str], subprocess.Popen[str]]] = {}
    for name, service in services.items():
        if "build" not in service:  # redis, postgres, prometheus: upstream images
            continue
        env = service.get("environment") or {}
        unknown = {k for k in env if k.startswith("HIPCHAT_POLLER_")} - fields
        assert not unknown, f"{name}: settings that do not exist: {unknown}"
        argv = list(service.get("entrypoint") or entrypoint) + list(service.get("command") or [])
        exe = {"hipchat-poller": HIPCHAT_POLLER, "celery": CELERY}[argv[0]]
        running[name] = (
            argv,
            subprocess.Popen(
                [exe, *argv[1:], "--help"],
                env=e2e_env.env,
                cwd=e2e_env.tmp,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            ),
        )
    checked = []
    for name, (argv, proc) in running.items():
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, f"{name}: {argv} --help exited {proc.returncode}:\n{out}"
        assert "usage" in out.lower(), f"{name}: {argv} --help:\n{out}"
        checked.append(name)
    assert sorted(checked) == ["beat", "flower", "metrics", "migrate", "worker"]
    assert "migrate" in services["worker"]["depends_on"]
    assert services["worker"]["depends_on"]["migrate"]["condition"] == (
        "service_completed_successfully"
    )


def test_dockerfile_copies_files_that_exist() -> None:
    """``docker compose build`` must be able to build the image every service runs."""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            *sources, _dest = line.split()[1:]
            missing = [src for src in sources if not (ROOT / src).exists()]
            assert not missing, f"Dockerfile: {line!r}: {missing} not in the repository"


# -- triggers -------------------------------------------------------------------------------
def test_first_poll_primes_and_fires_nothing(case: Case) -> None:
    for i in range(5):
        case.say(f"before {i}")
    case.subscribe("--webhook", case.url)
    wait_for(
        case.history_calls,
        TIMEOUT,
        "the first poll in the emulator's call log",
        describe=case.stack.describe,
    )
    case.wait_primed()
    case.wait_more_history_calls(2)
    assert case.deliveries() == []
    assert case.stack.outbox(case.conn) == []

    # Primed: what comes after does fire, and only that.
    case.say("after")
    got = wait_for(case.deliveries, TIMEOUT, "the message after priming")
    assert [d.json["message"] for d in got] == ["after"]


def test_messages_files_and_rooms_reach_the_webhook_exactly_once(case: Case) -> None:
    stack, conn, room = case.stack, case.conn, case.room
    case.subscribe("--webhook", case.url, events=["room_message", "room_file_upload"])
    case.subscribe("--webhook", case.url, events=["room_created"])
    case.wait_primed()

    new_room_name = f"Launch {stack.run_id}"
    case.say("hello one")
    stack.srv.state.upload_file(room["id"], case.alice, "report.pdf", b"%PDF-1.4 e2e", message="Q3")
    case.say("hello two")
    new_room = stack.srv.state.create_room(new_room_name)

    def arrived() -> list[Any]:
        got = case.deliveries()
        return got if len(got) >= 4 else []

    got = wait_for(arrived, TIMEOUT, "4 webhook deliveries", describe=stack.describe)
    seen_at = len(stack.calls(conn))
    # A few more polls, then still exactly once each.
    wait_for(
        lambda: len(stack.calls(conn)) >= seen_at + 6,
        TIMEOUT,
        "three more polls (history + room list each)",
    )
    undelivered = [e for e in stack.outbox(conn) if e.state != "delivered"]
    assert not undelivered, [(e.id, e.state, e.last_error) for e in undelivered]
    got = case.deliveries()
    assert len(got) == 4, [d.json for d in got]
    assert all(d.signature_ok for d in got), [d.headers for d in got]
    keys = [d.idempotency_key for d in got]
    assert all(keys), keys
    assert len(set(keys)) == 4, keys
    assert [d.json["idempotency_key"] for d in got] == keys
    by_event: dict[str, list[dict[str, Any]]] = {}
    for d in got:
        by_event.setdefault(d.json["event"], []).append(d.json)
        assert d.headers["x-hipchat-poller-event"] == d.json["event"]
    messages = sorted(e["message"] for e in by_event["room_message"])
    assert messages == ["hello one", "hello two"]
    (upload,) = by_event["room_file_upload"]
    assert upload["item"]["file"]["name"] == "report.pdf"
    (created,) = by_event["room_created"]
    assert created["item"]["room"]["id"] == new_room["id"]
    assert created["item"]["room"]["name"] == new_room_name


def test_three_triggers_on_one_room_cost_one_history_call_per_poll(case: Case) -> None:
    stack, conn, busy = case.stack, case.conn, case.room
    calm = stack.srv.state.create_room(f"Calm {stack.run_id}")
    case.subscribe("--log", events=["room_message", "room_file_upload", "room_notification"])
    case.subscribe("--log", room=calm)
    calm_since = time.time()  # polls before this one had no subscription on the calm room
    case.wait_primed()
    case.say("a message")
    stack.srv.state.upload_file(busy["id"], case.alice, "a.txt", b"a file")
    stack.srv.state.send_notification(busy["id"], "a notification")
    primed_polls = len(stack.poll_runs(conn))
    wait_for(
        lambda: len(stack.poll_runs(conn)) >= primed_polls + 3,
        TIMEOUT,
        "3 more polls",
        describe=stack.describe,
    )
    case.quiet()
    runs = stack.poll_runs(conn)
    assert len(runs) >= 4
    busy_calls = [c.time for c in case.history_calls()]
    calm_calls = [c.time for c in case.history_calls(calm)]
    for run in runs:
        assert run.started is not None
        assert run.finished is not None
        in_run = [t for t in busy_calls if run.started - 0.05 <= t <= run.finished + 0.05]
        calm_in_run = [t for t in calm_calls if run.started - 0.05 <= t <= run.finished + 0.05]
        assert len(in_run) == 1, (
            f"poll {run.uuid} ({run.result}) fetched the busy room's history {len(in_run)} times"
        )
        if run.started > calm_since:
            assert len(calm_in_run) == 1, f"poll {run.uuid}: calm room fetched {calm_in_run}"
    # Every history call belongs to one of these polls.
    last = runs[-1].finished or 0
    assert len([t for t in busy_calls if t <= last + 0.05]) == len(runs)

    # And the three triggers all fired from those single fetches.
    def three_events() -> list[Any]:
        rows = stack.outbox(conn)
        return rows if len(rows) >= 3 else []

    events = wait_for(three_events, TIMEOUT, "three events")
    assert sorted(e.event for e in events) == [
        "room_file_upload",
        "room_message",
        "room_notification",
    ]


def test_pausing_a_connection_stops_its_polls_and_resume_restarts_them(case: Case) -> None:
    stack, conn = case.stack, case.conn
    case.subscribe("--log")
    case.wait_primed()

    stack.cli("connection", "pause", conn.name)
    paused_at = time.time()
    assert stack.connection_row(conn.name).state == "paused"

    def quiet_for(seconds: float) -> bool:
        calls = stack.calls(conn)
        last = calls[-1].time if calls else 0.0
        return time.time() - last >= seconds

    # The polls stop at once (a poll already running may finish), and stay stopped for
    # three intervals, where an active connection is polled in each.
    wait_for(lambda: quiet_for(3 * INTERVAL), TIMEOUT, "the paused connection to go quiet")
    late = [c for c in stack.calls(conn) if c.time > paused_at + INTERVAL]
    assert late == [], f"calls more than {INTERVAL}s after the pause: {late}"

    resumed_at = time.time()
    stack.cli("connection", "resume", conn.name)
    wait_for(
        lambda: [c for c in case.history_calls() if c.time > resumed_at],
        TIMEOUT,
        "a poll after resume",
        describe=stack.describe,
    )


def test_ping_pong_answers_each_ping_exactly_once_in_order(case: Case) -> None:
    case.subscribe("--filter", "^ping (.*)", "--reply", "pong {matches[0]}")
    case.wait_primed()
    words = ["one", "two", "three"]
    for word in words:
        case.say(f"ping {word}")
    case.say("not a ping")

    def texts() -> list[str]:
        return [m["message"] for m in case.messages()]

    def pongs() -> list[str]:
        return [t for t in texts() if t.startswith("pong ")]

    wait_for(lambda: len(pongs()) >= 3, TIMEOUT, "three pongs", describe=case.stack.describe)
    case.wait_more_history_calls(2)
    assert pongs() == [f"pong {w}" for w in words], texts()
    history = texts()
    for word in words:  # each pong comes after its ping
        assert history.index(f"pong {word}") > history.index(f"ping {word}")
    sent = case.stack.calls(case.conn, f"/v2/room/{case.room['id']}/message")
    assert len(sent) == 3
    assert all(c.status == 201 for c in sent)


@dataclass(frozen=True)
class Overload:
    conn: Conn
    rooms: list[dict[str, Any]]
    calls: list[Any]


@pytest.fixture(scope="module")
def overloaded(stack: E2E) -> Overload:
    """A connection that wants ~4x its budget, run for two budget windows, then paused.

    Each poll wants 6 history + 6 participant calls + 1 room list = 13 calls; the budget is
    10 per 6 s and beat asks for a poll every 2 s. Configured with ``apply`` (a recipes file),
    the way an operator declares many triggers at once."""
    rooms = [stack.srv.state.create_room(f"Budget {i} {stack.run_id}") for i in range(6)]
    token = f"e2e-budget-{secrets.token_hex(12)}"
    stack.srv.state.create_token(1, token=token)
    stack.secrets.append(token)
    name = f"budget-{stack.run_id}"
    recipes = {
        "connections": {name: {"base_url": stack.srv.base_url, "token_env": "E2E_BUDGET_TOKEN"}},
        "subscriptions": [
            {
                "name": f"room{i}",
                "connection": name,
                "event": ["room_message", "room_notification", "room_enter"],
                "room": room["name"],
                "log": True,
            }
            for i, room in enumerate(rooms)
        ]
        + [{"name": "rooms", "connection": name, "event": "room_created", "log": True}],
    }
    path = stack.tmp / "budget-recipes.yml"
    path.write_text(yaml.safe_dump(recipes))
    started = time.time()
    stack.cli("apply", str(path), env={"E2E_BUDGET_TOKEN": token})
    conn = Conn(name, token, stack.connection_row(name).id)
    try:
        wait_for(
            lambda: (
                len(stack.calls(conn)) >= 2 * BUCKET_CAPACITY
                and time.time() - started >= 2 * BUCKET_WINDOW
            ),
            90,
            f"{2 * BUCKET_CAPACITY} calls over {2 * BUCKET_WINDOW:g}s",
            describe=stack.describe,
        )
    finally:
        stack.quiet(conn)
    return Overload(conn, rooms, stack.calls(conn))


def test_budget_is_never_exceeded_across_both_workers(stack: E2E, overloaded: Overload) -> None:
    times = [c.time for c in overloaded.calls]
    most, at = max_calls_in_window(times, BUCKET_WINDOW - ARRIVAL_JITTER)
    assert most <= BUCKET_CAPACITY, f"{most} calls in {BUCKET_WINDOW}s from {at}: {times}"
    assert most >= BUCKET_CAPACITY - 2, f"the budget was not the limit: {times}"
    # Both workers polled (this connection and the others of the module).
    assert stack.monitor is not None
    workers = {
        (run.hostname or "").split("@")[0].rsplit("-", 1)[0]
        for run in stack.monitor.task_runs(POLL_TASK)
        if run.hostname
    }
    assert workers == {"worker-a", "worker-b"}, workers
    # And no connection of this module ever went over it.
    for token in {c.token for c in stack.srv.state.calls() if c.token}:
        t = [c.time for c in stack.srv.state.calls(token=token)]
        most, at = max_calls_in_window(t, BUCKET_WINDOW - ARRIVAL_JITTER)
        assert most <= BUCKET_CAPACITY, f"token {token[:7]}...: {most} calls from {at}"


def test_a_saturated_budget_still_polls_every_trigger(stack: E2E, overloaded: Overload) -> None:
    """In two budget windows (20 calls) a fair poll reaches all 13 streams at least once;
    a poll that always starts over at the first room starves the rest for ever."""
    paths = Counter(c.path for c in overloaded.calls)
    starved = [
        f"{row.name} ({row.event}, room {row.room})"
        for row in stack.subscriptions(overloaded.conn)
        if row.primed_at is None
    ]
    assert not starved, (
        f"{len(starved)} subscriptions never polled in {len(overloaded.calls)} calls while "
        f"the budget was saturated: {starved}; calls by path: {dict(paths)}"
    )


def test_a_failing_webhook_is_retried_until_delivered_once_in_order(case: Case) -> None:
    case.stack.receiver.fail_next(case.path, 503, 503)
    case.subscribe("--webhook", case.url)
    case.wait_primed()
    words = ["first", "second", "third"]
    for word in words:
        case.say(word)
    wait_for(
        lambda: len(case.deliveries()) >= 3,
        TIMEOUT,
        "three accepted deliveries",
        describe=case.stack.describe,
    )
    case.wait_more_history_calls(2)
    case.quiet()
    accepted = case.deliveries()
    assert [d.json["message"] for d in accepted] == words
    tried = case.deliveries(accepted_only=False)
    assert [d.status for d in tried] == [503, 503, 200, 200, 200]
    # The retries were the first event again (same key), and nothing overtook it.
    assert len({d.idempotency_key for d in tried[:3]}) == 1
    assert all(d.signature_ok for d in tried)
    rows = case.stack.outbox(case.conn)
    assert next((r.state, r.attempts) for r in rows) == ("delivered", 2)
    assert all(r.state == "delivered" for r in rows)


def test_a_second_beat_does_not_poll_twice_per_interval(case: Case) -> None:
    stack, conn = case.stack, case.conn
    case.subscribe("--webhook", case.url)
    beat2 = stack.start_service("beat-2", ["beat", "--loglevel", "INFO"])
    assert stack.monitor is not None
    monitor = stack.monitor

    def by_interval() -> dict[str, list[TaskRun]]:
        runs: dict[str, list[TaskRun]] = {}
        for run in monitor.task_runs(POLL_TASK):
            if (run.args or "").startswith(f"[{conn.id},"):
                runs.setdefault(run.args or "", []).append(run)
        return runs

    def doubly_sent() -> list[str]:
        # Beat's polls carry no task-sent event (worker/scheduler.py), so the beat that sent a
        # run is not known: two runs of one interval are the two beats' sends.
        return [
            k
            for k, runs in by_interval().items()
            if len(runs) >= 2 and all(r.finished for r in runs)
        ]

    try:
        case.wait_primed()
        for i in range(3):
            case.say(f"two beats {i}")
        wait_for(
            lambda: len(case.deliveries()) >= 3,
            TIMEOUT,
            "three deliveries",
            describe=stack.describe,
        )
        wait_for(
            lambda: len(doubly_sent()) >= 3,
            TIMEOUT,
            "three intervals for which both beats sent a poll",
            describe=lambda: f"{by_interval()}\n{tail(beat2.log_text())}",
        )
    finally:
        case.quiet()
        beat2.stop()
    for interval, runs in by_interval().items():
        polled = [r for r in runs if " events" in (r.result or "")]
        assert len(polled) <= 1, f"interval {interval} polled {len(polled)} times: {runs}"
    got = case.deliveries()
    assert sorted(d.json["message"] for d in got) == [f"two beats {i}" for i in range(3)]
    assert len({d.idempotency_key for d in got}) == 3


# -- metrics ----------------------------------------------------------------------------------
Samples = list[tuple[str, dict[str, str], float]]


def scrape(url: str) -> tuple[str, Samples]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=10) as answer:
        text = answer.read().decode()
    found = [
        (s.name, s.labels, s.value) for f in text_string_to_metric_families(text) for s in f.samples
    ]
    return text, found


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum over every process (and any other label) of ``name`` with ``labels``."""
    return sum(v for n, got, v in samples if n == name and labels.items() <= got.items())


def test_metrics_move_during_real_polls(case: Case) -> None:
    """``hipchat-poller metrics`` beside the two workers and beat: two scrapes over HTTP while
    real polls run; the counters of every process move, the stores' gauges are there, and no
    secret is in the scrape."""
    stack = case.stack
    server = stack.start_service("metrics", ["metrics", "--port", "0"])
    url = wait_for(
        lambda: (found := re.search(r"serving metrics at (\S+)", server.log_text())) and found[1],
        TIMEOUT,
        "the metrics server",
        describe=lambda: server.log_text(),
    )
    case.subscribe("--webhook", case.url)
    case.wait_primed()
    _, first = scrape(url)
    case.say("count me")
    wait_for(case.deliveries, TIMEOUT, "the webhook delivery", describe=stack.describe)

    counters = (
        ("hipchat_poller_polls_total", {"outcome": "ok"}),
        ("hipchat_poller_hipchat_calls_total", {"status": "200"}),
        ("hipchat_poller_deliveries_total", {"outcome": "delivered", "target_kind": "webhook"}),
        ("hipchat_poller_detection_lag_seconds_count", {}),
        ("hipchat_poller_poll_duration_seconds_count", {}),
        ("hipchat_poller_beat_polls_sent_total", {}),
    )

    def moved() -> tuple[str, Samples] | None:
        text, now = scrape(url)
        grew = all(total(now, n, **labels) > total(first, n, **labels) for n, labels in counters)
        return (text, now) if grew else None

    text, second = wait_for(
        moved, TIMEOUT, "every counter to move", describe=lambda: scrape(url)[0][-3000:]
    )
    processes = {labels.get("process", "") for _, labels, _ in second}
    assert {p.split("-")[0] for p in processes if p} == {"worker", "beat"}, processes
    assert len([p for p in processes if p.startswith("worker-")]) == 2, processes
    conn = str(case.conn.id)
    assert total(second, "hipchat_poller_store_up") == 2  # the database and the budgets
    assert total(second, "hipchat_poller_connections", state="active") >= 1
    assert any(
        n == "hipchat_poller_budget_used_calls" and labels == {"connection": conn}
        for n, labels, _ in second
    )
    for secret in stack.secrets:
        assert secret not in text, f"a secret ({secret[:6]}...) is in the scrape"

    # Worker a serves its own processes' counts (--metrics-port), and only those.
    worker_a = next(s for s in stack.services if s.name == "worker-a")
    own = re.search(r"serving this worker's metrics at (\S+)", worker_a.log_text())
    assert own is not None, tail(worker_a.log_text())
    assert worker_a.proc is not None
    _, mine = scrape(own[1])  # empty until its pool has polled or delivered once
    assert {labels.get("process") for _, labels, _ in mine} <= {f"worker-{worker_a.proc.pid}"}
    assert not any(n.startswith("hipchat_poller_store_") for n, _, _ in mine)


def test_secrets_never_reach_logs_broker_messages_or_events(case: Case) -> None:
    stack = case.stack
    case.subscribe("--webhook", case.url)
    case.subscribe("--filter", "^ping (.*)", "--notify", "pong {matches[0]}", "--color", "green")
    case.wait_primed()
    case.say("ping secret")
    wait_for(case.deliveries, TIMEOUT, "the webhook delivery")
    wait_for(
        lambda: any(
            m.get("message") == "pong secret" and m.get("color") == "green" for m in case.messages()
        ),
        TIMEOUT,
        "the green pong",
    )
    case.quiet()
    assert stack.monitor is not None
    messages = stack.monitor.decoded_messages()
    task_names = {env.get("headers", {}).get("task") for cmd, env, _ in messages if cmd == "LPUSH"}
    assert {POLL_TASK, "hipchat.deliver", "hipchat.relay_outbox"} <= task_names, task_names
    haystacks: dict[str, bytes] = {
        f"{name} log": text.encode() for name, text in stack.service_logs().items()
    }
    haystacks["CLI output"] = "\n".join(stack.cli_output).encode()
    haystacks["Redis commands (MONITOR)"] = stack.monitor.raw_log()
    haystacks["broker messages and events (decoded)"] = b"\n".join(
        json.dumps(env).encode() + b"\n" + body for _, env, body in messages
    )
    haystacks["database (at rest)"] = stack.database_text()
    assert b"hipchat.poll_connection" in haystacks["worker-b log"]  # DEBUG shows task args
    for secret in stack.secrets:
        for where, text in haystacks.items():
            assert secret.encode() not in text, f"a secret ({secret[:6]}...) is in the {where}"


def test_workers_and_beat_stayed_up_without_tracebacks(stack: E2E) -> None:
    stack.check_services_alive()
    for name, text in stack.service_logs().items():
        assert "Traceback" not in text, f"{name}:\n{text[text.index('Traceback') - 2000 :][:6000]}"
