"""The running system the fault suite (``tests/test_faults.py``) breaks, and its measures.

* :class:`FaultStack`: two ``hipchat-poller worker`` processes (prefork, 3 children each) and
  ``hipchat-poller beat``, against a ``redis-server`` with AOF (``tests/redis_server.py``), a
  PostgreSQL cluster of its own (``tests/pg_server.py``: the suite stops it), the emulator
  over HTTP, and a webhook receiver that can hold a request (``tests/fault_receiver.py``).
  Connections and subscriptions are made in this process through the Python API (the CLI's
  own code path, without a process start each).
* :class:`Room` (:func:`watched`): one scenario's connection, room and user.
* :class:`Figures`: one row of docs/reliability.md's table (lost, doubled, the most calls of
  the connection in any budget window on the emulator's arrival stamps, the recovery time),
  printed at the end of the module.

Every process gets the same settings (:data:`SETTINGS`); see docs/reliability.md for why
each differs from its default.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.fernet import Fernet

from emulator import EmulatorServer
from tests.e2e_support import Delivery, Service, max_calls_in_window, tail
from tests.fault_receiver import HoldingReceiver
from tests.pg_server import PostgresServer
from tests.redis_server import RedisServer
from tests.waiting import wait_for

BIN = Path(sys.executable).parent
HIPCHAT_POLLER = str(BIN / "hipchat-poller")

INTERVAL = 1.0  # POLL_INTERVAL_SECONDS
CAPACITY = 20  # BUCKET_CAPACITY ...
WINDOW = 4.0  # ... per BUCKET_WINDOW_SECONDS (the margin stays at its default, 1 s)
VISIBILITY_TIMEOUT = 15.0  # BROKER_VISIBILITY_TIMEOUT_SECONDS: above every countdown here
WEBHOOK_TIMEOUT = 30.0  # WEBHOOK_TIMEOUT_SECONDS: the receiver holds requests for seconds
WORKERS = ("fw-a", "fw-b")
CONCURRENCY = 3
BEAT_ARGS = ["beat", "--loglevel", "INFO"]
TIMEOUT = 45.0  # for anything that needs a few polls, on a loaded 2-core machine
RECOVERY_TIMEOUT = 120.0  # for a recovery, whose bound each scenario asserts after it

SETTINGS = {
    "POLL_INTERVAL_SECONDS": str(INTERVAL),
    "BUCKET_CAPACITY": str(CAPACITY),
    "BUCKET_WINDOW_SECONDS": str(WINDOW),
    "BROKER_VISIBILITY_TIMEOUT_SECONDS": str(VISIBILITY_TIMEOUT),
    "WEBHOOK_TIMEOUT_SECONDS": str(WEBHOOK_TIMEOUT),
    "WEBHOOK_BACKOFF_BASE_SECONDS": "0.5",
}


# -- what a scenario measured ---------------------------------------------------------------
@dataclass
class Figures:
    scenario: str
    lost: int
    doubled: int
    most_calls: int  # in any WINDOW seconds, on the emulator's arrival stamps
    recovery: str  # seconds, with what was measured

    def row(self) -> str:
        ceiling = f"{self.most_calls} / {CAPACITY} per {WINDOW:g} s"
        return f"| {self.scenario} | {self.lost} | {self.doubled} | {ceiling} | {self.recovery} |"


def doubled(keys: Iterable[str | None]) -> int:
    """How many keys (message texts, idempotency keys) were acted on more than once."""
    return sum(1 for n in Counter(keys).values() if n > 1)


def most_calls(times: Iterable[float]) -> int:
    return max_calls_in_window(times, WINDOW)[0]


@dataclass(frozen=True)
class Conn:
    name: str
    token: str
    id: int
    srv: EmulatorServer

    def calls(self, path_prefix: str | None = None) -> list[Any]:
        return self.srv.state.calls(token=self.token, path_prefix=path_prefix)

    def call_times(self) -> list[float]:
        return [c.time for c in self.calls()]


@dataclass
class FaultStack:
    tmp: Path
    redis: RedisServer
    pg: PostgresServer
    database_url: str
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    figures: list[Figures] = field(default_factory=list)
    cli_output: list[str] = field(default_factory=list)
    services: dict[str, Service] = field(default_factory=dict)
    emulators: list[EmulatorServer] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.fernet_key = Fernet.generate_key().decode()
        # Only our budget limits the workers; flood control (30 sends a minute per room)
        # would make the burst of actions wait for HipChat instead.
        self.srv = self.emulator(rate_limit=1_000_000)
        self.receiver = HoldingReceiver().start()
        self.secrets: list[str] = [self.fernet_key, self.srv.admin_token]
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("HIPCHAT_POLLER_")}
        self.env |= {f"HIPCHAT_POLLER_{k}": v for k, v in SETTINGS.items()} | {
            "HIPCHAT_POLLER_REDIS_URL": self.redis.url,
            "HIPCHAT_POLLER_REDIS_KEY_PREFIX": f"hp-faults-{self.run_id}",
            "HIPCHAT_POLLER_DATABASE_URL": self.database_url,
            "HIPCHAT_POLLER_SECRET_KEY": self.fernet_key,
            "HIPCHAT_POLLER_DATA_DIR": str(self.tmp / "data"),
            "PYTHONUNBUFFERED": "1",
        }
        from tasks.runtime import Runtime
        from tasks.settings import Settings
        from worker.app import create_app

        self.app = create_app(Settings.from_env(self.env))  # this process sends actions
        self.rt = Runtime.of(self.app)

    def emulator(self, **options: Any) -> EmulatorServer:
        srv = EmulatorServer(
            port=0,
            admin_token=f"faults-admin-{secrets.token_hex(8)}",
            flood_limit=10_000,
            **options,
        ).start()
        self.emulators.append(srv)
        return srv

    # -- processes ------------------------------------------------------------------------
    def start(self) -> None:
        self.cli("migrate")
        for name in WORKERS:
            self._start_worker(name)
        self.services["beat"] = self._service("beat", BEAT_ARGS).start()
        for name in WORKERS:
            self.wait_ready(name, 1)

    def _start_worker(self, name: str) -> None:
        args = ["worker", "-n", f"{name}-{self.run_id}@%h", "--concurrency", str(CONCURRENCY)]
        self.services[name] = self._service(name, [*args, "--loglevel", "INFO"]).start()

    def _service(self, name: str, args: list[str]) -> Service:
        log = self.tmp / f"{name}.log"
        return Service(name, [HIPCHAT_POLLER, *args], self.env, self.tmp, log)

    def wait_ready(self, name: str, times: int) -> None:
        """Wait until worker ``name`` said ``ready`` for the ``times``-th time (its log is
        appended to across restarts)."""
        service = self.services[name]
        wait_for(
            lambda: service.log_text().count(" ready.") >= times or not service.alive(),
            60,
            f"{name} to be ready",
            describe=lambda: tail(service.log_text()),
        )
        assert service.alive(), f"{name} exited:\n{tail(service.log_text())}"

    @contextlib.contextmanager
    def supervised(self) -> Iterator[list[str]]:
        """Restart any worker or beat that exits meanwhile, as a supervisor would (compose's
        ``restart:``, systemd); yields the exits seen, each as ``name: why``."""
        exits: list[str] = []
        done = threading.Event()

        def watch() -> None:
            while not done.wait(0.2):
                for name, service in list(self.services.items()):
                    if service.alive():
                        continue
                    exits.append(f"{name}: {_why_it_exited(service.log_text())}")
                    service.stop()
                    if name == "beat":
                        self.services[name] = self._service(name, BEAT_ARGS).start()
                    else:
                        self._start_worker(name)

        watcher = threading.Thread(target=watch, name="fault-supervisor", daemon=True)
        watcher.start()
        try:
            yield exits
        finally:
            done.set()
            watcher.join()

    def kill_workers(self) -> float:
        """SIGKILL every worker's process group (the main process and its pool children) at
        once, as when their host dies; the time of the kill."""
        killed = time.time()
        for name in WORKERS:
            proc = self.services[name].proc
            assert proc is not None
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        for name in WORKERS:
            self.services[name].stop(timeout=10)
        return killed

    def restart_workers(self) -> None:
        ready = {n: self.services[n].log_text().count(" ready.") for n in WORKERS}
        for name in WORKERS:
            self._start_worker(name)
        for name in WORKERS:
            self.wait_ready(name, ready[name] + 1)

    def close(self) -> None:
        for service in self.services.values():
            service.terminate()
        for service in self.services.values():
            service.stop()
        self.receiver.stop()
        for srv in self.emulators:
            srv.stop()
        self.rt.close()

    def logs(self) -> dict[str, str]:
        return {name: s.log_text() for name, s in self.services.items()}

    def describe(self) -> str:
        parts = [f"--- {name} ---\n{tail(text, 25)}" for name, text in self.logs().items()]
        return "\n".join(parts)

    # -- the command line and the Python API ------------------------------------------------
    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [HIPCHAT_POLLER, *args],
            env=self.env,
            cwd=self.tmp,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        self.cli_output.append(f"$ hipchat-poller {' '.join(args)}\n{done.stdout}{done.stderr}")
        if check:
            assert done.returncode == 0, f"{args} exited {done.returncode}:\n{done.stderr}"
        return done

    def status(self) -> tuple[int, dict[str, Any] | None, str]:
        """``hipchat-poller status --json``: exit code, the report (None if not JSON), stderr."""
        done = self.cli("status", "--json", check=False)
        try:
            report = json.loads(done.stdout)
        except ValueError:
            report = None
        return done.returncode, report, done.stderr

    def add_connection(self, label: str, srv: EmulatorServer | None = None) -> Conn:
        """A connection with a token of its own, so the emulator's log of that token is the
        scenario's HipChat traffic."""
        from tasks.connections_api import add_connection

        srv = srv or self.srv
        token = f"faults-{label}-{secrets.token_hex(12)}"
        srv.state.create_token(1, token=token)
        self.secrets.append(token)
        added = add_connection(self.rt, f"{label}-{self.run_id}", srv.base_url, token)
        return Conn(added.name, token, added.id, srv)

    def room(self, label: str, srv: EmulatorServer | None = None) -> dict[str, Any]:
        room: dict[str, Any] = (srv or self.srv).state.create_room(f"{label} {self.run_id}")
        return room

    def user(self, label: str, srv: EmulatorServer | None = None) -> int:
        made = (srv or self.srv).state.create_user(
            f"User {label} {self.run_id}", mention_name=f"u{label}{self.run_id}"
        )
        return int(made["id"])

    def webhook(self, path: str) -> dict[str, Any]:
        """A webhook target on the receiver, signed with a new secret."""
        secret = secrets.token_urlsafe(24)
        self.secrets.append(secret)
        self.receiver.secret_for(path, secret)
        return {"url": self.receiver.url(path), "secret": secret}

    def subscribe(
        self,
        conn: Conn,
        room: dict[str, Any] | None,
        kind: str,
        target: dict[str, Any],
        *,
        event: str = "room_message",
        filter: str | None = None,
    ) -> int:
        """Subscribe ``conn`` to ``event`` in ``room`` (None: a room-list event)."""
        from tasks.subscribe import SubscriptionSpec
        from tasks.subscriptions_api import create_subscriptions

        name = room["name"] if room else None
        spec = SubscriptionSpec(conn.name, event, kind, target, room=name, filter=filter)
        (view,) = create_subscriptions(self.rt, [spec])
        return view.id

    def wait_primed(self, *conns: Conn) -> None:
        from storage import subscriptions as subs

        def primed() -> bool:
            with self.rt.db.session() as s:
                rows = [r for c in conns for r in subs.list_subscriptions(s, c.id)]
                return bool(rows) and all(r.primed_at is not None for r in rows)

        wait_for(primed, TIMEOUT, "priming", describe=self.describe)

    def quiet(self, conn: Conn) -> None:
        """Pause a finished scenario's connection, so the next ones run on idle workers."""
        from storage import connections as conns

        with self.rt.db.session() as s:
            conns.set_connection_state(s, conn.id, "paused", "fault scenario finished")

    def outbox(self, conn: Conn) -> list[Any]:
        """The connection's events, oldest first."""
        from storage import outbox

        with self.rt.db.session() as s:
            rows = outbox.list_events(s, connection_id=conn.id, limit=1000)
            for row in rows:
                s.expunge(row)
            return rows[::-1]

    def texts(self, room: dict[str, Any], srv: EmulatorServer | None = None) -> list[str]:
        """The texts of the room's history, oldest first."""
        return [m["message"] for m in (srv or self.srv).state.history(room["id"])]

    def accepted(self, path: str) -> list[Delivery]:
        return self.receiver.deliveries(path)

    def record(self, figures: Figures) -> None:
        self.figures.append(figures)
        print(figures.row())


def _why_it_exited(log: str) -> str:
    """The line of a process's log that says why it ended (Celery's CRITICAL), or its last."""
    lines = log.splitlines()
    critical = [line for line in lines if "CRITICAL" in line]
    return (critical or lines or ["(no log)"])[-1].strip()[:200]


# -- a scenario's corner of the stack --------------------------------------------------------
@dataclass
class Room:
    """A connection watching one room, and a user who speaks there."""

    conn: Conn
    room: dict[str, Any]
    user: int
    path: str = ""  # the webhook path, when the target is a webhook

    def say(self, text: str) -> float:
        """The user says ``text`` in the room; when."""
        self.conn.srv.state.post_message(self.room["id"], self.user, text)
        return time.time()

    def history_calls(self) -> list[Any]:
        return self.conn.calls(f"/v2/room/{self.room['id']}/history")


def watched(stack: FaultStack, label: str, kind: str = "webhook", **target: Any) -> Room:
    """A new connection watching a new room (``room_message``), sent to a webhook at
    ``/<label>`` on the receiver, or to the target given (``action=..., message=...``)."""
    conn = stack.add_connection(label)
    room = stack.room(label)
    path = f"/{label}" if kind == "webhook" else ""
    stack.subscribe(conn, room, kind, stack.webhook(path) if path else target)
    return Room(conn, room, stack.user(label), path)


def received(stack: FaultStack, path: str) -> dict[str, float]:
    """Message text -> when the receiver accepted it (the first time)."""
    found: dict[str, float] = {}
    for d in stack.accepted(path):
        found.setdefault(d.json["message"], d.at)
    return found


def delivered(stack: FaultStack, room: Room, wanted: Iterable[str], since: float) -> float:
    """Wait until every text of ``wanted`` reached the room's webhook; how long after
    ``since`` the last of them arrived (the first time)."""
    wanted = set(wanted)
    wait_for(
        lambda: wanted <= set(received(stack, room.path)),
        RECOVERY_TIMEOUT,
        f"{sorted(wanted)} delivered",
        describe=stack.describe,
    )
    return max(at for text, at in received(stack, room.path).items() if text in wanted) - since


def keys_doubled(stack: FaultStack, path: str) -> int:
    return doubled(d.idempotency_key for d in stack.accepted(path))
