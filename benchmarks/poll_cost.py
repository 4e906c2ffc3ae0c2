"""Poll cost: one quiet poll next to the same HTTP calls on a bare ``requests.Session``.

    python benchmarks/poll_cost.py [--polls 300] [--connections 4] [--rooms-per-connection 1-2]
        [--backends postgresql,sqlite]

A quiet poll is a poll that finds nothing new: a connection with 1-2 watched rooms (a
``room_message`` webhook subscription each), primed, whose rooms hold a few old messages.
Its HTTP is one ``history/latest?not-before=<last id>`` per room. The bare baseline makes
exactly those calls on one pooled, keep-alive ``requests.Session`` of this process (Bearer
header, timeout, ``.json()``), with a second token of the same user so that the emulator's call
log tells the two apart. The emulator runs in a process of its own
(``benchmarks/bench_emulator.py``), so this process's CPU is the client's alone.

Two phases per backend, each interleaving a measured thing with the bare calls (pairs
alternate which goes first, connections taken round robin):

* ``poll_connection``: :func:`tasks.poll.poll_connection` called in this process, what the
  issue's "at most 3x its bare HTTP calls in worker CPU" is about;
* ``task``: the Celery task ``hipchat.poll_connection`` run by ``Task.apply`` (eager: the
  interval claim and the poll lease around the poll, Celery's tracing, no broker), which
  is what makes the "3 Redis commands per poll".

Measured per poll: CPU (``time.process_time``) and wall time, each as a ratio to the bare
calls of the same pairs; HipChat calls (the emulator's call log); PostgreSQL transactions
as the server counts them (``pg_stat_database`` of the run's own database, read after the
engine's connections closed, which flushes their statistics) and as SQLAlchemy sees them
(``begin`` events, plus one ``pool_pre_ping`` per checkout when the engine pre-pings); SQL
statements (``before_cursor_execute``); Redis commands sent (a hook on the client's
``execute_command``) and, on the run's own ``redis-server``, executed (``INFO
commandstats``: the commands inside Lua scripts too). The Redis goal is printed for both.

Backends: ``postgresql`` (a fresh database, dropped at the end; a ``redis-server`` of the
run's own) and ``sqlite`` (the embedded default: SQLite in a temporary directory and
in-process fakeredis, where the commands inside Lua cannot be counted). The bucket capacity
and the emulator's rate limit are raised out of the way: the benchmark polls each
connection many times a second.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psycopg
import redis
import requests
import sqlalchemy
from sqlalchemy import event

from benchmarks.bench_emulator import EmulatorProcess, rooms_range
from benchmarks.bench_support import (
    POSTGRES_ADMIN_URL,
    Conn,
    Interrupted,
    commit_of_product,
    create_connections,
    fresh_postgres,
    interrupt_on_signals,
    machine_state,
    percentile,
)
from storage.crypto import generate_key
from tasks.poll import poll_connection
from tasks.runtime import Runtime
from tasks.settings import Settings
from tests.redis_server import RedisServer
from worker.app import create_app

SEED_MESSAGES = 3
GOAL_CPU_RATIO = 3.0
GOAL_TRANSACTIONS = 2
GOAL_COMMANDS_PER_CALL, GOAL_COMMANDS_PER_POLL = 4, 3
POLL_TASK = "hipchat.poll_connection"


# -- counting ----------------------------------------------------------------------------------


@dataclass
class Tally:
    begins: int = 0
    checkouts: int = 0
    statements: int = 0
    redis_sent: int = 0

    def minus(self, other: Tally) -> Tally:
        return Tally(
            self.begins - other.begins,
            self.checkouts - other.checkouts,
            self.statements - other.statements,
            self.redis_sent - other.redis_sent,
        )


@contextlib.contextmanager
def counting(rt: Runtime) -> Iterator[Tally]:
    """Count the Runtime's transactions, pool checkouts and SQL statements (SQLAlchemy
    events on its engine) and the Redis commands its client sends (``execute_command``
    shadowed on the instance: scripts and locks call it too)."""
    tally = Tally()
    engine, client = rt.db.engine, rt.redis

    def on_begin(conn: Any) -> None:
        tally.begins += 1

    def on_checkout(*_: Any) -> None:
        tally.checkouts += 1

    def on_statement(*_: Any) -> None:
        tally.statements += 1

    send = client.execute_command

    def counted(*args: Any, **options: Any) -> Any:
        tally.redis_sent += 1
        return send(*args, **options)

    event.listen(engine, "begin", on_begin)
    event.listen(engine.pool, "checkout", on_checkout)
    event.listen(engine, "before_cursor_execute", on_statement)
    client.execute_command = counted  # type: ignore[method-assign]
    try:
        yield tally
    finally:
        del client.execute_command
        event.remove(engine, "before_cursor_execute", on_statement)
        event.remove(engine.pool, "checkout", on_checkout)
        event.remove(engine, "begin", on_begin)


@dataclass
class Backend:
    label: str
    settings: Settings
    redis_server: RedisServer | None = None
    pg_admin_url: str | None = None
    pg_database: str | None = None
    pre_ping: bool = False  # the engine pings each connection it checks out (set when run)

    def server_commands(self) -> dict[str, int] | None:
        if self.redis_server is None:
            return None
        client = self.redis_server.client()
        try:
            info = client.info("commandstats")
        finally:
            client.close()
        return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in info.items()}

    def server_transactions(self, rt: Runtime) -> int | None:
        """``xact_commit + xact_rollback`` of the database, after closing the engine's
        connections: a backend flushes its statistics when it exits."""
        if self.pg_admin_url is None:
            return None
        rt.db.dispose()
        with psycopg.connect(self.pg_admin_url, autocommit=True) as admin:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                row = admin.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = %s",
                    (self.pg_database,),
                ).fetchone()
                if row is not None and int(row[0]) == 0:
                    break
                time.sleep(0.05)
            found = admin.execute(
                "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = %s",
                (self.pg_database,),
            ).fetchone()
        return int(found[0]) if found else None


# -- the two sides ------------------------------------------------------------------------------


@dataclass
class Bare:
    """The quiet poll's HTTP, bare: one pooled session for the whole process."""

    base_url: str
    tokens: dict[int, str]  # connection id -> the bare side's own token
    marks: dict[int, str]  # room id -> id of its newest message
    timeout: tuple[float, float]
    session: requests.Session = field(default_factory=requests.Session)

    def calls(self, conn: Conn) -> None:
        headers = {"Authorization": f"Bearer {self.tokens[conn.id]}", "Accept": "application/json"}
        for room in conn.rooms:
            answer = self.session.get(
                f"{self.base_url}/v2/room/{room}/history/latest",
                params={"max-results": 1000, "not-before": self.marks[room]},
                headers=headers,
                timeout=self.timeout,
            )
            answer.raise_for_status()
            answer.json()


def quiet_poll(rt: Runtime) -> Callable[[Conn], None]:
    def run(conn: Conn) -> None:
        result = poll_connection(rt, conn.id)
        if result.skipped or result.problems or result.event_count:
            raise SystemExit(f"connection {conn.id}: not a quiet poll: {result.status}")

    return run


def quiet_task(app: Any) -> Callable[[Conn], None]:
    app.loader.import_default_modules()  # tasks.celery_tasks, as a worker does at start
    task = app.tasks[POLL_TASK]
    intervals: dict[int, int] = {}

    def run(conn: Conn) -> None:
        # A new interval each time: the task claims it before polling.
        k = intervals[conn.id] = intervals.get(conn.id, 0) + 1
        done = task.apply(args=[conn.id, k])
        text = str(done.result)
        if done.state != "SUCCESS" or ": ok: 0 events" not in text:
            raise SystemExit(f"connection {conn.id}: not a quiet poll: {done.state} {text}")

    return run


@dataclass
class Phase:
    what: str
    polls: int = 0
    cpu: list[float] = field(default_factory=list)
    wall: list[float] = field(default_factory=list)
    bare_cpu: list[float] = field(default_factory=list)
    bare_wall: list[float] = field(default_factory=list)
    calls: int = 0
    bare_calls: int = 0
    tally: Tally = field(default_factory=Tally)
    server_polls: int = 0  # the polls the server-side counts cover (the warm ones too)
    transactions: int | None = None  # server side
    commands: int | None = None  # executed by redis-server, Lua's included

    def per_poll(self, value: float | None) -> float:
        return math.nan if value is None or not self.polls else value / self.polls

    def per_server_poll(self, value: int | None) -> float:
        return math.nan if value is None or not self.server_polls else value / self.server_polls

    def ratio(self, mine: list[float], bare: list[float]) -> float:
        return statistics.mean(mine) / statistics.mean(bare)

    def block_ratios(self, mine: list[float], bare: list[float], size: int = 10) -> list[float]:
        return [
            sum(mine[i : i + size]) / sum(bare[i : i + size])
            for i in range(0, len(mine) - size + 1, size)
            if sum(bare[i : i + size]) > 0
        ]


def timed(fn: Callable[[], None]) -> tuple[float, float]:
    cpu, wall = time.process_time(), time.perf_counter()
    fn()
    return time.process_time() - cpu, time.perf_counter() - wall


def run_phase(
    what: str,
    measured: Callable[[Conn], None],
    bare: Bare,
    connections: list[Conn],
    polls: int,
    rt: Runtime,
    backend: Backend,
    emulator: EmulatorProcess,
) -> Phase:
    phase = Phase(what)
    xact0, cmds0 = backend.server_transactions(rt), backend.server_commands()
    started = time.time()
    # Warm (the engine's connections were just closed; statements to compile, scripts to
    # load): not timed, but in the server's counts, which are divided by these polls too.
    for conn in connections:
        measured(conn)
        bare.calls(conn)
    with counting(rt) as tally:
        for i in range(polls):
            conn = connections[i % len(connections)]
            pair = [("poll", lambda c=conn: measured(c)), ("bare", lambda c=conn: bare.calls(c))]
            for side, fn in pair if i % 2 == 0 else reversed(pair):
                cpu, wall = timed(fn)
                (phase.cpu if side == "poll" else phase.bare_cpu).append(cpu)
                (phase.wall if side == "poll" else phase.bare_wall).append(wall)
        phase.tally = Tally(tally.begins, tally.checkouts, tally.statements, tally.redis_sent)
    ended = time.time()
    xact1, cmds1 = backend.server_transactions(rt), backend.server_commands()
    phase.polls, phase.server_polls = polls, polls + len(connections)
    if xact0 is not None and xact1 is not None:
        phase.transactions = xact1 - xact0
    if cmds0 is not None and cmds1 is not None:
        phase.commands = sum(n - cmds0.get(c, 0) for c, n in cmds1.items() if c != "info")
    for conn in connections:
        phase.calls += len(emulator.calls(token=conn.token, since=started, until=ended))
        phase.bare_calls += len(
            emulator.calls(token=bare.tokens[conn.id], since=started, until=ended)
        )
    return phase


# -- one backend -----------------------------------------------------------------------------------


@contextlib.contextmanager
def backends(names: list[str], admin_url: str, tmp: Path) -> Iterator[list[Backend]]:
    with contextlib.ExitStack() as exits:
        made = []
        for name in names:
            if name == "postgresql":
                server = exits.enter_context(RedisServer(tmp / "redis"))
                db = exits.enter_context(fresh_postgres(admin_url, "bench_cost"))
                version = server.client().info("server")["redis_version"]
                settings = Settings(
                    database_url=db.url,
                    redis_url=server.url,
                    secret_key=generate_key(),
                    data_dir=str(tmp / "pg-data"),
                    bucket_capacity=100_000,
                )
                label = f"PostgreSQL {db.version} + Redis {version}"
                made.append(Backend(label, settings, server, db.admin_url, db.name))
            else:
                settings = Settings(
                    database_url=f"sqlite:///{tmp / 'sqlite' / 'hipchat-poller.db'}",
                    secret_key=generate_key(),
                    data_dir=str(tmp / "sqlite"),
                    bucket_capacity=100_000,
                )
                made.append(Backend("SQLite + fakeredis (embedded)", settings))
        yield made


def run_backend(
    backend: Backend, emulator: EmulatorProcess, args: argparse.Namespace
) -> list[Phase]:
    app = create_app(backend.settings)
    rt = Runtime.of(app)
    # A pre-ping is a transaction of its own on the server; SQLAlchemy has no event for it.
    backend.pre_ping = bool(getattr(rt.db.engine.pool, "_pre_ping", False))
    try:
        rt.db.upgrade()
        connections = create_connections(
            rt,
            emulator.base_url,
            emulator.connections,
            lambda conn_id, secret: f"http://127.0.0.1:9/hook/{conn_id}",
            rt.settings.poll_interval_seconds,
        )
        for conn in connections:  # priming: the first poll records where each room is
            poll_connection(rt, conn.id)
        marks = {room: emulator.history(room)[-1]["id"] for c in connections for room in c.rooms}
        tokens = {c.id: emulator.new_token(c.user) for c in connections}
        timeout = (
            rt.settings.http_connect_timeout_seconds,
            rt.settings.http_read_timeout_seconds,
        )
        bare = Bare(emulator.base_url, tokens, marks, timeout)
        try:
            return [
                run_phase(
                    "poll_connection", quiet_poll(rt), bare, connections, args.polls, rt,
                    backend, emulator,
                ),
                run_phase(
                    "task (eager apply)", quiet_task(app), bare, connections, args.polls, rt,
                    backend, emulator,
                ),
            ]  # fmt: skip
        finally:
            bare.session.close()
    finally:
        rt.db.dispose()


# -- the report ---------------------------------------------------------------------------------


def _f(value: float, digits: int = 1) -> str:
    return "-" if math.isnan(value) else f"{value:.{digits}f}"


def report(results: list[tuple[Backend, list[Phase]]]) -> list[str]:
    lines = [
        "| backend | measured | polls | CPU ms | bare CPU ms | CPU ratio (blocks p10-p90) "
        "| wall ms | bare wall ms | wall ratio | calls/poll (bare) | PG xacts/poll "
        "| SQLAlchemy txns (+ pings) | SQL stmts | Redis cmds sent | Redis cmds executed |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
        "| ---: | ---: | ---: |",
    ]
    for backend, phases in results:
        for p in phases:
            blocks = p.block_ratios(p.cpu, p.bare_cpu)
            pings = p.tally.checkouts if backend.pre_ping else 0
            lines.append(
                f"| {backend.label} | {p.what} | {p.polls} "
                f"| {statistics.mean(p.cpu) * 1000:.2f} | {statistics.mean(p.bare_cpu) * 1000:.2f} "
                f"| **{p.ratio(p.cpu, p.bare_cpu):.1f}** ({_f(percentile(blocks, 10))}-"
                f"{_f(percentile(blocks, 90))}) "
                f"| {statistics.mean(p.wall) * 1000:.2f} "
                f"| {statistics.mean(p.bare_wall) * 1000:.2f} "
                f"| {p.ratio(p.wall, p.bare_wall):.1f} "
                f"| {_f(p.per_server_poll(p.calls), 2)} ({_f(p.per_server_poll(p.bare_calls), 2)}) "
                f"| {_f(p.per_server_poll(p.transactions))} "
                f"| {_f(p.per_poll(p.tally.begins))} (+ {_f(p.per_poll(pings))}) "
                f"| {_f(p.per_poll(p.tally.statements))} | {_f(p.per_poll(p.tally.redis_sent))} "
                f"| {_f(p.per_server_poll(p.commands))} |"
            )
    return lines


@dataclass
class Goals:
    """The goals of issue 9 for one backend. The Redis goal is read two ways, both printed:
    commands *sent* (round trips) and commands *executed* (the scripts' own included, how
    the issue counts "7 Redis commands inside its Lua"); fakeredis shows only the first."""

    backend: str
    cpu_ratio: float
    transactions: float
    sent: float
    executed: float | None
    commands_goal: float

    def lines(self) -> list[str]:
        def verdict(value: float, goal: float) -> str:
            return f"{value:.1f} (goal <= {goal:g}): " + ("met" if value <= goal else "NOT met")

        goal = self.commands_goal
        lines = [
            f"{self.backend}:",
            "  CPU of a quiet poll / its bare HTTP calls: "
            + verdict(self.cpu_ratio, GOAL_CPU_RATIO),
            "  database transactions per quiet poll: "
            + verdict(self.transactions, GOAL_TRANSACTIONS),
            f"  Redis commands per quiet poll task (goal: {GOAL_COMMANDS_PER_CALL} per HipChat "
            f"call + {GOAL_COMMANDS_PER_POLL}), sent: " + verdict(self.sent, goal),
        ]
        if self.executed is not None:
            lines.append(
                "  Redis commands per quiet poll task, executed (inside Lua included): "
                + verdict(self.executed, goal)
            )
        return lines

    def final(self) -> str:
        executed = f" ({self.executed:.1f} executed)" if self.executed is not None else ""
        return (
            f"poll_cost: {self.backend}: CPU {self.cpu_ratio:.1f}x bare, "
            f"{self.transactions:.1f} database transactions, {self.sent:.1f} Redis commands "
            f"sent{executed} per quiet poll"
        )


def goals(backend: Backend, phases: list[Phase]) -> Goals:
    poll, task = phases
    if backend.pg_database:
        transactions = poll.per_server_poll(poll.transactions)
    else:
        transactions = poll.per_poll(poll.tally.begins)
    executed = task.per_server_poll(task.commands) if task.commands is not None else None
    calls = task.per_server_poll(task.calls)
    return Goals(
        backend.label,
        poll.ratio(poll.cpu, poll.bare_cpu),
        transactions,
        task.per_poll(task.tally.redis_sent),
        executed,
        GOAL_COMMANDS_PER_CALL * calls + GOAL_COMMANDS_PER_POLL,
    )


def measure_all(
    args: argparse.Namespace, names: list[str]
) -> tuple[list[tuple[Backend, list[Phase]]], float]:
    """Every backend's phases, and the mean number of rooms per connection."""
    results: list[tuple[Backend, list[Phase]]] = []
    with tempfile.TemporaryDirectory(prefix="poll-cost-") as tmp_name:
        tmp = Path(tmp_name)
        emulator = EmulatorProcess.start(
            tmp, dict(os.environ), args.connections, args.rooms_per_connection, rate_limit=10**9
        )
        try:
            for spec in emulator.connections:
                for room_id, _ in spec["rooms"]:
                    for n in range(SEED_MESSAGES):
                        emulator.post(room_id, f"old message {n}")
            with backends(names, args.postgres_admin_url, tmp) as made:
                for backend in made:
                    print(f"{backend.label} ...", flush=True)
                    results.append((backend, run_backend(backend, emulator, args)))
        finally:
            emulator.stop()
    rooms = sum(len(s["rooms"]) for s in emulator.connections) / len(emulator.connections)
    return results, rooms


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--polls", type=int, default=300, help="measured polls per phase")
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--rooms-per-connection", type=rooms_range, default=(1, 2))
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--postgres-admin-url", default=POSTGRES_ADMIN_URL)
    args = parser.parse_args(argv)
    names = args.backends.split(",")
    if not names or not set(names) <= {"sqlite", "postgresql"}:
        parser.error("--backends: a comma-separated list of sqlite and postgresql")
    if args.polls < 10 or args.connections < 1:
        parser.error("--polls must be >= 10 and --connections >= 1")
    shown = shlex.join(
        ["python", "benchmarks/poll_cost.py", *(sys.argv[1:] if argv is None else argv)]
    )
    interrupt_on_signals()
    print(f"date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC")
    print(f"reproduce: {shown}")
    print(f"commit measured: {commit_of_product()}")
    print(
        f"software: Python {platform.python_version()} ({platform.machine()}), SQLAlchemy "
        f"{sqlalchemy.__version__}, psycopg {psycopg.__version__}, redis-py "
        f"{redis.__version__}, requests {requests.__version__}"
    )
    try:
        print(f"machine at start: {machine_state()}\n", flush=True)
        results, rooms = measure_all(args, names)
    except (KeyboardInterrupt, Interrupted) as exc:
        print(f"interrupted ({type(exc).__name__}); everything started was stopped", flush=True)
        return 130
    print(
        f"\n{args.connections} connections, {rooms:g} rooms each on average; "
        f"per poll, means over {args.polls} interleaved pairs per phase:\n"
    )
    print("\n".join(report(results)))
    print(f"\nmachine at the end: load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print("\ngoals (issue 9):")
    checked = [goals(backend, phases) for backend, phases in results]
    for found in checked:
        print("\n".join(found.lines()))
    print(f"\nreproduce: {shown}")
    for found in sorted(checked, key=lambda g: g.backend.startswith("PostgreSQL")):
        print(found.final())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
