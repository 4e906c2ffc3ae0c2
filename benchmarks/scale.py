"""Scale: N connections polled by one real ``hipchat-poller worker`` and ``beat``.

    python benchmarks/scale.py --connections N --interval S --intervals K
        [--rooms-per-connection 1-2] [--message-rate 2] [--concurrency 2]
        [--pool prefork|threads|solo] [--monitor-seconds 10]

``--connections`` may list levels (``100,500``): each runs on a stack of its own, one after
the other. Per level, everything is started fresh and stopped at the end, also on Ctrl-C or
failure:

* the HipChat emulator in a process of its own (``benchmarks/bench_emulator.py``): one user,
  one token and 1-2 public rooms per connection, HipChat's own rate limit;
* a ``redis-server`` of its own on a free port (``tests/redis_server.py``): the broker and
  the project's keys, with nothing else on the machine using it;
* a PostgreSQL database of its own (created, migrated, dropped);
* ``hipchat-poller worker`` (prefork, concurrency 2 by default) and ``hipchat-poller beat``,
  configured by ``HIPCHAT_POLLER_*`` variables as an operator would;
* in this process: a webhook receiver (``tests/e2e_support.WebhookReceiver``, checking
  signatures), a listener of the Celery task events on Redis pub/sub, a CPU meter, and a
  poster of messages through the emulator's control API.

N connections are created through the storage layer (``storage.connections.add_connection``,
``storage.subscriptions.add_subscription``; each connection's rooms resolved as the first
poll would resolve them, its budget started where the code has ``budget.initialise``), each
with a ``room_message`` webhook subscription per room. Beat
then sends every connection's first (priming) poll at once; the warm-up waits until every
subscription is primed and at least one interval has passed. Then K intervals are measured,
while messages are posted into random watched rooms at ``--message-rate`` per second. After
the window the run waits one more interval (the last slots' polls and the last messages'
webhooks), then samples ``MONITOR`` for ``--monitor-seconds`` to split the Redis commands
by who sent them. What each figure means is defined in ``benchmarks/scale_report.py``.

CPU per poll is the CPU a process used in the window divided by the real polls that
finished in it (webhook deliveries, the relay and beat's bookkeeping are part of the cost).
PostgreSQL CPU is that of the backends serving the benchmark's database (not the server's
shared background processes); transactions come from ``pg_stat_database``, Redis commands
from ``INFO commandstats`` (commands run inside Lua scripts included).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import random
import shlex
import shutil
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psycopg
import redis
import requests
from cryptography.fernet import Fernet
from sqlalchemy import func, select

from benchmarks.bench_emulator import EmulatorProcess, rooms_range
from benchmarks.bench_support import (
    POSTGRES_ADMIN_URL,
    Conn,
    Interrupted,
    PgDatabase,
    commit_of_product,
    create_connections,
    fresh_postgres,
    interrupt_on_signals,
    machine_state,
    rss_bytes,
    tree_rss_bytes,
)
from benchmarks.scale_observe import (
    POLL_TASK,
    CommandSample,
    CpuMeter,
    TaskEvents,
    monitor_sample,
)
from benchmarks.scale_report import (
    LevelResult,
    Post,
    commandstats_delta,
    detection,
    due_slots,
    final_line,
    poll_stats,
    polls_finished_in,
    report,
    summary,
)
from storage.models import Subscription
from tasks.runtime import Runtime
from tasks.settings import Settings
from tests.e2e_support import Service, WebhookReceiver, tail
from tests.redis_server import RedisServer

BIN = Path(sys.executable).parent
HIPCHAT_POLLER = str(BIN / "hipchat-poller")


# -- the run ----------------------------------------------------------------------------------


def webhook(receiver: WebhookReceiver) -> Callable[[int, str], str]:
    """Each connection's own path on the receiver, which checks its signatures."""

    def url(connection_id: int, secret: str) -> str:
        receiver.secret_for(f"/c{connection_id}", secret)
        return receiver.url(f"/c{connection_id}")

    return url


def unprimed(rt: Runtime) -> int:
    with rt.db.session() as s:
        query = select(func.count()).where(Subscription.primed_at.is_(None))
        return int(s.scalar(query) or 0)


# -- the message poster --------------------------------------------------------------------------


class Poster:
    """Posts ``"scale <seq>"`` into a random watched room at a steady rate, from a thread."""

    def __init__(self, emulator: EmulatorProcess, connections: list[Conn], rate: float) -> None:
        self.emulator, self.connections, self.rate = emulator, connections, rate
        self.posts: list[Post] = []
        self.errors = 0
        self._stop = threading.Event()
        self._rng = random.Random(7)
        self._thread = threading.Thread(target=self._run, name="poster", daemon=True)

    def start(self) -> Poster:
        if self.rate > 0:
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=35)

    def _run(self) -> None:
        began = time.monotonic()
        seq = 0
        while not self._stop.wait(max(0.0, began + seq / self.rate - time.monotonic())):
            conn = self._rng.choice(self.connections)
            room = self._rng.choice(conn.rooms)
            at = time.time()
            try:
                self.emulator.post(room, f"scale {seq}")
            except requests.RequestException:
                self.errors += 1
            else:
                self.posts.append(Post(seq, conn.id, at))
            seq += 1


# -- measuring -----------------------------------------------------------------------------------


def pg_xacts(db: PgDatabase) -> tuple[int, int]:
    """Commits and rollbacks of the database, read through another database so that the
    reading is not counted. A backend reports its counts up to 1-10 s late: read windows of
    a minute or more."""
    with psycopg.connect(db.admin_url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT xact_commit, xact_rollback FROM pg_stat_database WHERE datname = %s",
            (db.name,),
        ).fetchone()
    return (int(row[0]), int(row[1])) if row else (0, 0)


def commandstats(client: redis.Redis) -> dict[str, int]:
    info = client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in info.items()}


@dataclass
class Stack:
    """The processes and services of one level (stopped by the caller's ExitStack)."""

    tmp: Path
    env: dict[str, str]
    redis: RedisServer
    db: PgDatabase
    emulator: EmulatorProcess
    receiver: WebhookReceiver
    rt: Runtime
    connections: list[Conn]
    events: TaskEvents
    services: list[Service] = field(default_factory=list)

    @property
    def offsets(self) -> dict[int, float]:
        return {c.id: c.offset for c in self.connections}

    def pid(self, name: str) -> int:
        for service in [*self.services, self.emulator.service]:
            if service.name == name and service.proc is not None:
                return service.proc.pid
        raise LookupError(f"no process {name!r} started")

    def start(self, name: str, argv: list[str]) -> Service:
        service = Service(
            name, [HIPCHAT_POLLER, *argv], self.env, self.tmp, self.tmp / f"{name}.log"
        )
        self.services.append(service.start())
        return service

    def check_alive(self) -> None:
        for service in [*self.services, self.emulator.service]:
            if not service.alive():
                raise SystemExit(f"{service.name} exited:\n{tail(service.log_text())}")

    def stop(self) -> None:
        # One SIGTERM each, beat first: a second SIGTERM during a worker's warm shutdown
        # makes it hang until Service.stop's SIGKILL (20 s later).
        for service in reversed(self.services):
            service.stop()


def wait_ready(stack: Stack, service: Service, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while " ready." not in service.log_text():
        stack.check_alive()
        if time.monotonic() > deadline:
            raise SystemExit(f"{service.name} not ready:\n{tail(service.log_text())}")
        time.sleep(0.2)


def sleep_until(stack: Stack, when: float) -> None:
    while (left := when - time.time()) > 0:
        stack.check_alive()
        time.sleep(min(1.0, left))


def warm_up(stack: Stack, args: argparse.Namespace, n: int, started: float) -> str:
    """Until every subscription is primed, at least one interval has passed since beat
    started and the poll queue holds less than a second's worth of polls (beat sends every
    connection's first poll at once); '' or what was still not so at the timeout."""
    deadline = started + args.warmup_timeout
    short = max(4.0, n / args.interval)
    client = stack.redis.client()
    shown = time.time()
    try:
        while True:
            stack.check_alive()
            left, queued = unprimed(stack.rt), int(client.llen("hipchat.polls"))
            settled = time.time() >= started + args.interval and left == 0
            if settled and queued <= short:
                return ""
            if time.time() >= deadline:
                return f"warm-up timed out: {left} subscriptions unprimed, {queued} polls queued"
            if time.time() - shown >= 10:
                shown = time.time()
                print(f"    {left} subscriptions unprimed, {queued} polls queued", flush=True)
            time.sleep(min(1.0, args.interval / 4))
    finally:
        client.close()


def start_stack(exits: contextlib.ExitStack, args: argparse.Namespace, n: int) -> Stack:
    """Redis, a database, the emulator, the receiver, N connections, the event listener
    and a ready worker; each registered with ``exits`` to be stopped or dropped."""
    tmp = Path(tempfile.mkdtemp(prefix=f"scale-{n}-"))
    if args.keep:
        print(f"  logs and data: {tmp}", flush=True)
    else:
        exits.callback(shutil.rmtree, tmp, ignore_errors=True)
    server = exits.enter_context(RedisServer(tmp / "redis"))
    db = exits.enter_context(fresh_postgres(args.postgres_admin_url, "bench_scale"))
    run = uuid.uuid4().hex[:8]
    env = {k: v for k, v in os.environ.items() if not k.startswith("HIPCHAT_POLLER_")} | {
        "HIPCHAT_POLLER_REDIS_URL": server.url,
        "HIPCHAT_POLLER_REDIS_KEY_PREFIX": f"scale-{run}",
        "HIPCHAT_POLLER_DATABASE_URL": db.url,
        "HIPCHAT_POLLER_SECRET_KEY": Fernet.generate_key().decode(),
        "HIPCHAT_POLLER_POLL_INTERVAL_SECONDS": f"{args.interval:g}",
        "HIPCHAT_POLLER_DATA_DIR": str(tmp / "data"),
        "PYTHONUNBUFFERED": "1",
    }
    emulator = EmulatorProcess.start(tmp, env, n, args.rooms_per_connection)
    exits.callback(emulator.stop)
    receiver = WebhookReceiver().start()
    exits.callback(receiver.stop)
    rt = Runtime(Settings.from_env(env))
    exits.callback(rt.db.dispose)
    rt.db.upgrade()
    connections = create_connections(
        rt, emulator.base_url, emulator.connections, webhook(receiver), args.interval
    )
    events = TaskEvents(server.url).start()
    exits.callback(events.stop)
    stack = Stack(tmp, env, server, db, emulator, receiver, rt, connections, events)
    exits.callback(stack.stop)
    worker = stack.start(
        "worker",
        ["worker", "-n", f"scale-{run}@%h", "--concurrency", str(args.concurrency),
         "-P", args.pool, "--loglevel", args.loglevel],
    )  # fmt: skip
    wait_ready(stack, worker)
    return stack


def run_level(args: argparse.Namespace, n: int) -> LevelResult:
    began = time.time()
    with contextlib.ExitStack() as exits:
        stack = start_stack(exits, args, n)
        setup = time.time() - began
        print(f"  setup {setup:.0f} s; warming up ...", flush=True)
        beat_started = time.time()
        stack.start("beat", ["beat", "--loglevel", args.loglevel])
        note = warm_up(stack, args, n, beat_started)
        warmup = time.time() - beat_started
        if note:
            print(f"  {note}", flush=True)
        stats = stack.redis.client()
        exits.callback(stats.close)
        window = measure(exits, stack, args, stats)
        slots = due_slots(stack.offsets, args.interval, window.t0, window.t1)
        wait_for_the_tail(stack, args, window, slots)
        sample, sample_polls, sample_calls = None, 0, 0
        if args.monitor_seconds > 0:
            sample = sample_commands(stack, args, stats)
            s0, s1 = sample.started, sample.started + sample.seconds
            time.sleep(0.5)  # the last events of the sample
            sample_polls = polls_finished_in(stack.events.tasks(POLL_TASK), s0, s1)
            sample_calls = len(stack.emulator.calls(since=s0, until=s1))
        tasks = stack.events.tasks(POLL_TASK)
        deliveries = stack.receiver.deliveries()
        return LevelResult(
            connections=n,
            interval=args.interval,
            window=window.t1 - window.t0,
            polls=poll_stats(tasks, slots, args.interval),
            polls_in_window=polls_finished_in(tasks, window.t0, window.t1),
            detect=detection(
                window.posts, [(d.at, d.json) for d in deliveries], stack.offsets, args.interval
            ),
            cpu=window.cpu,
            rss=window.rss,
            xacts=window.xacts,
            commands=window.commands,
            calls=len(stack.emulator.calls(since=window.t0, until=window.t1)),
            sample=sample,
            sample_polls=sample_polls,
            sample_calls=sample_calls,
            warmup_seconds=warmup,
            warmup_note=note,
            setup_seconds=setup,
            backends=window.backends,
            posts_failed=window.posts_failed,
            event_errors=stack.events.errors,
            bad_signatures=sum(1 for d in deliveries if d.signature_ok is False),
            machine_after=f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
            versions=f"redis-server {stats.info('server')['redis_version']}, "
            f"PostgreSQL {stack.db.version}",
        )


@dataclass
class Window:
    """What was measured between ``t0`` and ``t1``."""

    t0: float
    t1: float
    cpu: dict[str, float]
    rss: dict[str, int]
    xacts: tuple[int, int]
    commands: dict[str, int]
    backends: int
    posts: list[Post]
    posts_failed: int


def measure(
    exits: contextlib.ExitStack, stack: Stack, args: argparse.Namespace, stats: redis.Redis
) -> Window:
    """K intervals: CPU, transactions and commands from their start to their end, while
    messages are posted; RSS at the end."""
    t0 = time.time()
    t1 = t0 + args.intervals * args.interval
    pids = {name: stack.pid(name) for name in ("worker", "beat", "emulator")}
    pids["redis-server"] = int(stats.info("server")["process_id"])
    meter = CpuMeter(pids, stack.db.admin_url, stack.db.name)
    meter.begin()
    xact0, cmd0 = pg_xacts(stack.db), commandstats(stats)
    poster = Poster(stack.emulator, stack.connections, args.message_rate).start()
    exits.callback(poster.stop)
    print(f"  measuring {args.intervals} x {args.interval:g} s ...", flush=True)
    sleep_until(stack, t1)
    cpu = meter.end()
    xact1, cmd1 = pg_xacts(stack.db), commandstats(stats)
    poster.stop()
    rss = {name: tree_rss_bytes(pid) for name, pid in pids.items()}
    rss["PostgreSQL backends"] = sum(rss_bytes(p) or 0 for p in meter.backend_pids())
    rss["benchmark (this process)"] = rss_bytes(os.getpid()) or 0
    return Window(
        t0,
        t1,
        cpu,
        rss,
        (xact1[0] - xact0[0], xact1[1] - xact0[1]),
        commandstats_delta(cmd0, cmd1),
        meter.backends_seen,
        [p for p in poster.posts if p.at < t1],
        poster.errors,
    )


def wait_for_the_tail(
    stack: Stack, args: argparse.Namespace, window: Window, slots: list[tuple[int, int, float]]
) -> None:
    """One more interval (and a little): the polls of the window's last slots, the webhooks
    of its last messages. Ends early once all of them are in."""
    ends = window.t1 + args.interval + min(10.0, args.interval)
    while time.time() < ends:
        stack.check_alive()
        if time.time() >= window.t1 + args.interval:
            done = poll_stats(stack.events.tasks(POLL_TASK), slots, args.interval)
            if done.done == done.due and len(stack.receiver.deliveries()) >= len(window.posts):
                return
        time.sleep(0.5)


def sample_commands(stack: Stack, args: argparse.Namespace, stats: redis.Redis) -> CommandSample:
    own = _client_port(stats)
    return monitor_sample(
        stack.redis.host,
        int(stack.redis.port or 0),
        args.monitor_seconds,
        stack.env["HIPCHAT_POLLER_REDIS_KEY_PREFIX"],
        lambda source: source.rpartition(b":")[2] == own,
    )


def _client_port(client: redis.Redis) -> bytes:
    """The local port of one of ``client``'s connections (to leave our commands out)."""
    info = client.client_info()
    return str(info.get("addr", "")).rpartition(":")[2].encode()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--connections",
        default="100",
        help="connections, or levels run one after the other: 100,500",
    )
    parser.add_argument("--interval", type=float, default=60.0, help="poll interval, seconds")
    parser.add_argument("--intervals", type=int, default=3, help="measured intervals (K)")
    parser.add_argument("--rooms-per-connection", type=rooms_range, default=(1, 2))
    parser.add_argument("--message-rate", type=float, default=2.0, help="messages per second")
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--pool", default="prefork", help="Celery pool (-P)")
    parser.add_argument("--loglevel", default="INFO", help="worker and beat log level")
    parser.add_argument(
        "--monitor-seconds", type=float, default=None,
        help="MONITOR sample after the window (default: min(interval, 10); 0: none)",
    )  # fmt: skip
    parser.add_argument(
        "--warmup-timeout", type=float, default=None,
        help="seconds from beat's start (default: 2 intervals + 60)",
    )  # fmt: skip
    parser.add_argument("--postgres-admin-url", default=POSTGRES_ADMIN_URL)
    parser.add_argument("--keep", action="store_true", help="keep the logs' directory")
    args = parser.parse_args(argv)
    try:
        args.levels = [int(x) for x in args.connections.split(",")]
    except ValueError:
        parser.error("--connections: a number or a comma-separated list of numbers")
    if min(args.levels) < 1 or args.interval <= 0 or args.intervals < 1 or args.concurrency < 1:
        parser.error("connections, interval, intervals and concurrency must be positive")
    if args.monitor_seconds is None:
        args.monitor_seconds = min(args.interval, 10.0)
    if args.warmup_timeout is None:
        args.warmup_timeout = 2 * args.interval + 60
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    shown = shlex.join(["python", "benchmarks/scale.py", *(sys.argv[1:] if argv is None else argv)])
    interrupt_on_signals()
    print(f"date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC")
    print(f"reproduce: {shown}")
    print(f"commit measured: {commit_of_product()}")
    print(f"software: Python {platform.python_version()} ({platform.machine()})")
    results = []
    try:
        print(f"machine at start: {machine_state()}\n", flush=True)
        for n in args.levels:
            print(f"level {n} connections:", flush=True)
            results.append(run_level(args, n))
            print("\n".join(report(results[-1])) + "\n", flush=True)
    except (KeyboardInterrupt, Interrupted) as exc:
        print(f"interrupted ({type(exc).__name__}); everything started was stopped", flush=True)
        return 130
    print("\n".join(summary(results)))
    print(f"\nreproduce: {shown}")
    for r in results:
        print(final_line(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
