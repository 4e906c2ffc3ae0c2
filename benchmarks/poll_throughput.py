"""Poll throughput: ``tasks.poll.poll_connection`` end to end, next to the same HipChat calls
made with a bare HipChatClient in the same run.

    python benchmarks/poll_throughput.py [--rooms 20] [--connections 10] [--watch 4]
        [--messages 5] [--rounds 5] [--backends sqlite,postgresql]

Starts ``python -m emulator`` as a process of its own (rate and flood limits out of the way)
with ``--rooms`` rooms, each seeded with a short history and two people in it. For each backend
(SQLite + fakeredis, the embedded default; PostgreSQL + real Redis) it makes ``--connections``
connections, each with a token of its own (``POST /_emulator/tokens``) and, on each of its
``--watch`` rooms, a ``room_message`` trigger with a filter, a ``room_file_upload`` and a
``room_enter`` trigger, plus one ``room_created`` trigger; the bucket capacity is raised out
of the way (``Settings(bucket_capacity=100000)``). The first poll of each connection primes.

Then, each round: ``--messages`` new messages per room through the control API (every other
one matches the filter), then every connection is polled once (``poll_connection`` called in
this process), with 1 thread and with 2 threads. Measured: polls per second, events
committed per second, HipChat calls per poll (the emulator's call log, ``GET
/_emulator/calls``), mean and p95 time per poll.

Baseline, in the same rounds: the calls each poll makes (``history/latest`` with
``not-before`` per watched room, the participants of each room, the room list), made with a
bare ``HipChatClient`` opened per poll as the poll opens its own: no bucket, no database, no
diff. Bare and poll passes alternate which goes first; the ratio poll / bare (the median over
rounds of the two passes' mean times) is what storage, the bucket and the diff cost on top of
HTTP. Two last, instrumented rounds split a poll's time into database sessions (and their
commits), SQL execution, bucket round trips and the rest.

Redis keys live under a unique prefix and are deleted afterwards; the PostgreSQL database is
created for the run and dropped at the end. The default run takes about 40-50 s.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import redis
import requests
import sqlalchemy
from sqlalchemy import event

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from storage import connections as conns
from storage.crypto import generate_key
from tasks.client import HipChatClient
from tasks.poll import poll_connection
from tasks.runtime import Runtime
from tasks.settings import Settings
from tasks.subscribe import SubscriptionSpec
from tasks.subscriptions_api import create_subscriptions

ROOT = Path(__file__).resolve().parents[1]
ADMIN_TOKEN = "bench-admin-token"
POSTER = "@AliceA"  # seeded by the emulator, like @bobb
SEED_MESSAGES = 10
BREAKDOWN_ROUNDS = 2
FILTER = r"^deploy (\S+)"
REDIS_URL = os.environ.get("HIPCHAT_POLLER_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
POSTGRES_ADMIN_URL = os.environ.get(
    "HIPCHAT_POLLER_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)


# -- the emulator, in its own process --------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Emulator:
    """``python -m emulator`` in a subprocess, and a session on its control API."""

    def __init__(self) -> None:
        port = free_port()
        self.base = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "emulator",
                "--port",
                str(port),
                "--token",
                ADMIN_TOKEN,
                "--rate-limit",
                "1000000000",
                "--flood-limit",
                "1000000000",
            ],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
        )
        self.control = requests.Session()
        self.control.trust_env = False
        deadline = time.monotonic() + 15
        while True:
            try:
                requests.get(self.base + "/v2/capabilities", timeout=1)
                return
            except requests.RequestException:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.stop()
                    raise SystemExit("the emulator did not start") from None
                time.sleep(0.05)

    def call(self, method: str, path: str, body: Any = None) -> Any:
        answer = self.control.request(
            method, self.base + "/_emulator" + path, json=body, timeout=30
        )
        answer.raise_for_status()
        return answer.json()

    def calls(self) -> list[dict[str, Any]]:
        """The /v2 calls logged since the last :meth:`clear_calls`; clears the log."""
        found: list[dict[str, Any]] = self.call("GET", "/calls")["items"]
        self.call("DELETE", "/calls")
        return found

    def stop(self) -> None:
        self.control.close()
        self.proc.terminate()
        self.proc.wait(timeout=10)


@dataclass
class World:
    rooms: list[int]  # the benchmark's rooms, by id
    names: dict[int, str]


def build_world(emu: Emulator, rooms: int) -> World:
    ids, names = [], {}
    for i in range(rooms):
        room = emu.call("POST", "/rooms", {"name": f"bench-{i:03d}", "topic": "poll benchmark"})
        ids.append(int(room["id"]))
        names[int(room["id"])] = room["name"]
        for user in (POSTER, "@bobb"):
            emu.call("POST", f"/rooms/{room['id']}/enter", {"user": user})
        for n in range(SEED_MESSAGES):
            emu.call("POST", f"/rooms/{room['id']}/messages", {"user": POSTER, "message": f"s{n}"})
    return World(ids, names)


def post_round(emu: Emulator, world: World, label: str, messages: int) -> None:
    """``messages`` new messages per room, every other one matching :data:`FILTER`."""
    for room in world.rooms:
        for i in range(messages):
            text = f"deploy {label}-{i}" if i % 2 == 0 else f"chatter {label}-{i}"
            emu.call("POST", f"/rooms/{room}/messages", {"user": POSTER, "message": text})


# -- the storage backends ----------------------------------------------------------------------


@contextmanager
def sqlite_backend(prefix: str) -> Iterator[tuple[Settings, str]]:
    with tempfile.TemporaryDirectory(prefix="poll-bench-") as tmp:
        yield (
            Settings(
                database_url=f"sqlite:///{tmp}/hipchat-poller.db",
                data_dir=tmp,
                secret_key=generate_key(),
                redis_key_prefix=prefix,
                bucket_capacity=100_000,
            ),
            "SQLite + fakeredis",
        )


@contextmanager
def postgres_backend(prefix: str, admin_url: str, redis_url: str) -> Iterator[tuple[Settings, str]]:
    """A database of its own, created here and dropped at the end; real Redis, whose keys
    under ``prefix`` (and only those) are deleted at the end."""
    name = f"bench_poll_{uuid.uuid4().hex[:10]}"
    plain = admin_url.replace("postgresql+psycopg://", "postgresql://", 1)
    with psycopg.connect(plain, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        found = admin.execute("SHOW server_version").fetchone()
    pg_version = str(found[0]).split()[0] if found else "?"
    url = sqlalchemy.engine.make_url(plain.replace("postgresql://", "postgresql+psycopg://", 1))
    client = redis.Redis.from_url(redis_url)
    try:
        redis_version = client.info("server")["redis_version"]
        yield (
            Settings(
                database_url=url.set(database=name).render_as_string(hide_password=False),
                redis_url=redis_url,
                secret_key=generate_key(),
                redis_key_prefix=prefix,
                bucket_capacity=100_000,
            ),
            f"PostgreSQL {pg_version} + Redis {redis_version}",
        )
    finally:
        try:
            keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
            if keys:
                client.delete(*keys)
        finally:
            client.close()
            with psycopg.connect(plain, autocommit=True) as admin:
                admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# -- connections, polls and the bare baseline ---------------------------------------------------


@dataclass
class Conn:
    id: int
    token: str
    rooms: list[int]
    marks: dict[int, str] = field(default_factory=dict)  # the bare client's watermarks


def make_connections(
    rt: Runtime, emu: Emulator, world: World, args: argparse.Namespace
) -> list[Conn]:
    made = []
    for i in range(args.connections):
        token = emu.call("POST", "/tokens", {"user": "@admin"})["token"]
        name = f"bench-{i:03d}"
        with rt.db.session() as s:
            row = conns.add_connection(s, name, emu.base, token, rt.cipher)
            conn_id = row.id
        rooms = [world.rooms[(i * args.watch + j) % len(world.rooms)] for j in range(args.watch)]
        specs = [SubscriptionSpec(name, "room_created", "log")]
        for room in rooms:
            room_name = world.names[room]
            specs += [
                SubscriptionSpec(name, "room_message", "log", room=room_name, filter=FILTER),
                SubscriptionSpec(name, "room_file_upload", "log", room=room_name),
                SubscriptionSpec(name, "room_enter", "log", room=room_name),
            ]
        create_subscriptions(rt, specs)
        made.append(Conn(conn_id, token, rooms))
    return made


def poll_job(rt: Runtime, conn: Conn) -> Callable[[], int]:
    def job() -> int:
        result = poll_connection(rt, conn.id)
        if result.skipped or result.problems:
            raise SystemExit(f"poll of connection {conn.id}: {result.status}")
        return result.event_count

    return job


def bare_job(base: str, settings: Settings, conn: Conn) -> Callable[[], int]:
    """The calls one poll makes, through a bare client opened per poll like the poll's."""
    timeout = (settings.http_connect_timeout_seconds, settings.http_read_timeout_seconds)

    def job() -> int:
        with HipChatClient(
            base, conn.token, timeout=timeout, page_size=settings.history_page_size
        ) as client:
            for room in conn.rooms:
                items = client.latest_history(
                    room, not_before=conn.marks[room], max_results=settings.history_page_size
                )
                if items:
                    conn.marks[room] = items[-1].id
            for room in conn.rooms:
                client.participants(room)
            client.list_rooms(include_private=True, include_archived=True)
        return 0

    return job


def init_marks(base: str, conn_list: list[Conn]) -> None:
    for conn in conn_list:
        with HipChatClient(base, conn.token) as client:
            for room in conn.rooms:
                conn.marks[room] = client.latest_history(room, max_results=1)[-1].id


@dataclass
class Pass:
    """One pass over every connection: per-poll seconds, wall seconds, events, calls."""

    times: list[float]
    wall: float
    events: int
    calls: list[dict[str, Any]]


def run_pass(emu: Emulator, pool: ThreadPoolExecutor | None, jobs: list[Callable[[], int]]) -> Pass:
    times = [0.0] * len(jobs)
    events = [0] * len(jobs)

    def run(i: int) -> None:
        started = time.perf_counter()
        events[i] = jobs[i]()
        times[i] = time.perf_counter() - started

    emu.calls()  # clear the log
    started = time.perf_counter()
    if pool is None:
        for i in range(len(jobs)):
            run(i)
    else:
        list(pool.map(run, range(len(jobs))))
    wall = time.perf_counter() - started
    return Pass(times, wall, sum(events), emu.calls())


@dataclass
class Series:
    polls: list[Pass] = field(default_factory=list)
    bare: list[Pass] = field(default_factory=list)


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


def per_poll(passes: list[Pass]) -> tuple[list[float], float, int, int, int]:
    times = [t for p in passes for t in p.times]
    wall = sum(p.wall for p in passes)
    return times, wall, sum(p.events for p in passes), sum(len(p.calls) for p in passes), len(times)


# -- the instrumented round ---------------------------------------------------------------------


@dataclass
class Breakdown:
    polls: int = 0
    poll_s: float = 0.0
    sessions: int = 0
    session_s: float = 0.0
    commit_s: float = 0.0  # from the end of the block to the connection's return
    statements: int = 0
    statement_s: float = 0.0
    bucket_calls: int = 0
    bucket_s: float = 0.0
    bare_s: float = 0.0  # the bare calls of the same rounds


@contextmanager
def instrumented(rt: Runtime, out: Breakdown) -> Iterator[None]:
    """Count and time database sessions, SQL statements and bucket round trips of ``rt``.

    Instance attributes shadow the methods for the duration; nothing is changed for good."""
    db, bucket = rt.db, rt.budget
    session, acquire, observe = db.session, bucket.acquire, bucket.observe
    started: dict[int, float] = {}

    @contextmanager
    def timed_session() -> Iterator[Any]:
        t0 = time.perf_counter()
        ending = None
        try:
            with session() as s:
                yield s
                ending = time.perf_counter()
        finally:
            done = time.perf_counter()
            out.sessions += 1
            out.session_s += done - t0
            out.commit_s += (done - ending) if ending is not None else 0.0

    def timed(method: Callable[..., None]) -> Callable[..., None]:
        def call(*a: Any, **kw: Any) -> None:
            t0 = time.perf_counter()
            try:
                method(*a, **kw)
            finally:
                out.bucket_calls += 1
                out.bucket_s += time.perf_counter() - t0

        return call

    def before(conn: Any, cursor: Any, *rest: Any) -> None:
        started[id(cursor)] = time.perf_counter()

    def after(conn: Any, cursor: Any, *rest: Any) -> None:
        out.statements += 1
        out.statement_s += time.perf_counter() - started.pop(id(cursor), time.perf_counter())

    db.session = timed_session  # type: ignore[method-assign]
    bucket.acquire = timed(acquire)  # type: ignore[method-assign]
    bucket.observe = timed(observe)  # type: ignore[method-assign]
    event.listen(db.engine, "before_cursor_execute", before)
    event.listen(db.engine, "after_cursor_execute", after)
    try:
        yield
    finally:
        event.remove(db.engine, "after_cursor_execute", after)
        event.remove(db.engine, "before_cursor_execute", before)
        for obj, name in ((db, "session"), (bucket, "acquire"), (bucket, "observe")):
            delattr(obj, name)


# -- one backend -----------------------------------------------------------------------------


@dataclass
class Figures:
    label: str
    prime_ms: float
    prime_calls: float
    series: dict[int, Series]
    breakdown: Breakdown
    call_mix: Counter[str]
    expected_events: int


def kind_of(path: str) -> str:
    if path.endswith("/history/latest"):
        return "history/latest"
    if path.endswith("/participant"):
        return "participant"
    if path.rstrip("/") == "/v2/room":
        return "room list"
    return path


def run_backend(
    emu: Emulator, world: World, settings: Settings, label: str, args: argparse.Namespace
) -> Figures:
    rt = Runtime(settings)
    try:
        rt.db.upgrade()
        _built_before_threads_share_them = (rt.keys, rt.redis, rt.cipher, rt.budget)
        conn_list = make_connections(rt, emu, world, args)
        polls = [poll_job(rt, c) for c in conn_list]
        bares = [bare_job(emu.base, settings, c) for c in conn_list]
        prime = run_pass(emu, None, polls)
        if prime.events:
            raise SystemExit(f"the priming polls fired {prime.events} events")
        init_marks(emu.base, conn_list)
        matching = (args.messages + 1) // 2
        expected = len(conn_list) * args.watch * matching
        series: dict[int, Series] = {}
        rnd = 0
        with ThreadPoolExecutor(2) as pair:
            for threads in (1, 2):
                pool = pair if threads == 2 else None
                found = series[threads] = Series()
                for i in range(-1, args.rounds):  # round -1 warms up and is not counted
                    rnd += 1
                    post_round(emu, world, f"r{rnd}", args.messages)
                    order = ["bare", "poll"] if rnd % 2 else ["poll", "bare"]
                    for which in order:
                        done = run_pass(emu, pool, bares if which == "bare" else polls)
                        if which == "poll" and done.events != expected:
                            raise SystemExit(f"{done.events} events, expected {expected}")
                        if i >= 0:
                            (found.bare if which == "bare" else found.polls).append(done)
        breakdown = Breakdown()
        for _ in range(BREAKDOWN_ROUNDS):
            rnd += 1
            post_round(emu, world, f"r{rnd}", args.messages)
            breakdown.bare_s += sum(run_pass(emu, None, bares).times)
            with instrumented(rt, breakdown):
                done = run_pass(emu, None, polls)
            breakdown.polls += len(done.times)
            breakdown.poll_s += sum(done.times)
        mix = Counter(kind_of(c["path"]) for p in series[1].polls for c in p.calls)
        return Figures(
            label,
            statistics.mean(prime.times) * 1000,
            len(prime.calls) / len(prime.times),
            series,
            breakdown,
            mix,
            expected,
        )
    finally:
        rt.db.dispose()


# -- the report -------------------------------------------------------------------------------


def report(figures: list[Figures]) -> list[str]:
    lines = [
        "| backend | threads | polls/s | events/s | calls/poll (bare) | mean ms | p95 ms "
        "| bare mean ms | bare p95 ms | poll / bare |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for fig in figures:
        for threads, series in fig.series.items():
            times, wall, events, calls, n = per_poll(series.polls)
            b_times, _, _, b_calls, b_n = per_poll(series.bare)
            ratio = statistics.median(
                statistics.mean(p.times) / statistics.mean(b.times)
                for p, b in zip(series.polls, series.bare, strict=True)
            )
            lines.append(
                f"| {fig.label} | {threads} | {n / wall:.1f} | {events / wall:.0f} "
                f"| {calls / n:.1f} ({b_calls / b_n:.1f}) | {statistics.mean(times) * 1000:.1f} "
                f"| {p95(times) * 1000:.1f} | {statistics.mean(b_times) * 1000:.1f} "
                f"| {p95(b_times) * 1000:.1f} | {ratio:.2f} |"
            )
    lines += [
        "",
        f"Where a poll's time goes ({BREAKDOWN_ROUNDS} instrumented rounds, 1 thread; "
        "per poll, ms):",
        "",
        "| backend | poll | DB sessions | in sessions | of which commit | SQL statements "
        "| in SQL execute | bucket scripts | in bucket | rest | bare calls |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for fig in figures:
        b = fig.breakdown
        per = 1000 / b.polls
        rest = b.poll_s - b.session_s - b.bucket_s
        lines.append(
            f"| {fig.label} | {b.poll_s * per:.1f} | {b.sessions / b.polls:.0f} "
            f"| {b.session_s * per:.1f} | {b.commit_s * per:.1f} | {b.statements / b.polls:.0f} "
            f"| {b.statement_s * per:.1f} | {b.bucket_calls / b.polls:.0f} "
            f"| {b.bucket_s * per:.1f} | {rest * per:.1f} | {b.bare_s * per:.1f} |"
        )
    lines.append("")
    for fig in figures:
        polls = sum(len(p.times) for p in fig.series[1].polls)
        mix = ", ".join(f"{count / polls:g} {kind}" for kind, count in fig.call_mix.items())
        lines.append(
            f"{fig.label}: priming poll {fig.prime_ms:.1f} ms mean, {fig.prime_calls:g} calls; "
            f"a steady poll calls {mix}; {fig.expected_events} events per round"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rooms", type=int, default=20)
    parser.add_argument("--connections", type=int, default=10)
    parser.add_argument("--watch", type=int, default=4, help="rooms watched per connection (4)")
    parser.add_argument("--messages", type=int, default=5, help="new messages per room per round")
    parser.add_argument("--rounds", type=int, default=5, help="measured rounds per thread count")
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--postgres-admin-url", default=POSTGRES_ADMIN_URL)
    parser.add_argument("--redis-url", default=REDIS_URL)
    args = parser.parse_args(argv)
    backends = args.backends.split(",")
    if not set(backends) <= {"sqlite", "postgresql"}:
        parser.error("--backends: a comma-separated list of sqlite and postgresql")
    if min(args.rooms, args.connections, args.watch, args.messages, args.rounds) < 1:
        parser.error("every count must be >= 1")
    if args.watch > args.rooms:
        parser.error("--watch must not exceed --rooms")
    argv_shown = sys.argv[1:] if argv is None else argv
    print(f"date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC")
    print(f"command: {shlex.join(['python', 'benchmarks/poll_throughput.py', *argv_shown])}")
    print(
        f"machine: {os.cpu_count()} cores, {platform.machine()}, Python "
        f"{platform.python_version()}, SQLAlchemy {sqlalchemy.__version__}, psycopg "
        f"{psycopg.__version__}, redis-py {redis.__version__}, "
        f"load average {os.getloadavg()[0]:.2f} at start"
    )
    print(
        f"{args.connections} connections x {args.watch} watched rooms (of {args.rooms}), "
        f"3 triggers per room + room_created; {args.messages} new messages per room per round; "
        f"{args.rounds} measured rounds per thread count\n"
    )
    prefix = f"bench-poll-{uuid.uuid4().hex[:10]}"
    started = time.perf_counter()
    emu = Emulator()
    figures: list[Figures] = []
    try:
        world = build_world(emu, args.rooms)
        for backend in backends:
            make = (
                sqlite_backend(prefix)
                if backend == "sqlite"
                else postgres_backend(prefix, args.postgres_admin_url, args.redis_url)
            )
            with make as (settings, label):
                figures.append(run_backend(emu, world, settings, label, args))
    finally:
        emu.stop()
    print("\n".join(report(figures)))
    print(f"\nrun time: {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
