"""Beat at scale: the CPU one beat process spends per second of steady state, with N
connections in PostgreSQL and a ``redis-server`` of its own as the broker.

    python benchmarks/beat_scale.py [--connections 10000,25000,50000] [--impl new,old]
        [--warmup 10] [--seconds 30] [--restart-gap 3] [--old-commit e3d5696]

``new`` is ``worker.scheduler.ConnectionScheduler`` of this tree; ``old`` is the same class as
it was at ``--old-commit`` (before issue 9 item 3: every tick walked every connection, the
connection list was loaded through the ORM every 5 s, each send subscribed to a result channel
and published a task-sent event), read with ``git show`` and run unchanged against the same
app, database and broker.

For each N (connections are added to one database as N grows) and each scheduler, a fresh
process runs Celery's own beat loop (``celery.beat.Service``) on ``hipchat-poller``'s app with
a 60 s poll interval, as ``hipchat-poller beat`` does, and measures itself:

* **start-up**: a restart after an outage of ``--restart-gap`` seconds: before each run this
  process claims (``Keys.poll_slot``, as the poll task does) the current interval of every
  connection whose interval began before the outage; measured are the seconds from start
  until beat first sleeps and the polls it sent by then;
* then, ``--warmup`` seconds later, a window of ``--seconds``: the process's
  CPU time (``time.process_time()``) per second of wall time, i.e. the cores beat uses;
  sends per second; ticks per second and the CPU time of one tick (mean, p99); the drift of
  each poll's send against the start of its interval (``k * interval + offset``), p50, p99
  and max; Redis commands per send (``INFO commandstats`` of the private server, which
  serves nothing else);
* for ``new``, the CPU time of one full scan (``storage.connections.active_poll_offsets``).

Nothing consumes the queue: this process deletes it every second, so Redis stays small.
No workers run, so the only claims are the ones written before the start.
The database is created for the run and dropped at the end. A default run takes 5-6 minutes.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import celery
import psycopg
import redis
import sqlalchemy
from celery.beat import Service

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from storage.connections import active_poll_offsets, poll_offset_for
from storage.crypto import generate_key
from storage.db import Database, chunks
from storage.models import Connection
from tasks.keys import Keys
from tasks.runtime import Runtime
from tasks.settings import Settings
from tests.redis_server import RedisServer
from worker.app import POLL_QUEUE, create_app
from worker.poll_schedule import interval_index, interval_start
from worker.scheduler import CATCH_UP_SECONDS, POLL_TASK

ROOT = Path(__file__).resolve().parents[1]
INTERVAL = 60.0
POSTGRES_ADMIN_URL = os.environ.get(
    "HIPCHAT_POLLER_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
OLD_COMMIT = "e3d5696"  # main before the beat-scale work


# -- the parent: database, broker, one child process per run ------------------------------------


@contextmanager
def fresh_database(admin_url: str) -> Iterator[str]:
    """A new PostgreSQL database (a SQLAlchemy URL), migrated; dropped at the end."""
    name = f"bench_beat_{uuid.uuid4().hex[:10]}"
    plain = admin_url.replace("postgresql+psycopg://", "postgresql://", 1)
    with psycopg.connect(plain, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = sqlalchemy.engine.make_url(plain.replace("postgresql://", "postgresql+psycopg://", 1))
    rendered = url.set(database=name).render_as_string(hide_password=False)
    try:
        db = Database(rendered)
        db.upgrade()
        db.dispose()
        yield rendered
    finally:
        with psycopg.connect(plain, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def versions(broker: RedisServer, url: str) -> str:
    client = broker.client()
    redis_version = client.info("server")["redis_version"]
    client.close()
    db = Database(url)
    with db.session() as s:
        pg_version = s.execute(sqlalchemy.text("SHOW server_version")).scalar()
    db.dispose()
    return f"PostgreSQL {str(pg_version).split()[0]}, redis-server {redis_version} (private)"


def add_connections(url: str, first: int, count: int) -> None:
    """Connections ``bench-<first>`` ... in one Core insert per chunk. Beat never reads a
    token, so the column holds a placeholder instead of a Fernet token."""
    now = datetime.now(UTC)
    rows = [
        {
            "name": f"bench-{i}",
            "name_key": f"bench-{i}",
            "base_url": "http://hipchat.invalid",
            "token_encrypted": "not-a-token",
            "state": "active",
            "poll_offset_seconds": poll_offset_for(f"bench-{i}", INTERVAL),
            "created_at": now,
            "updated_at": now,
        }
        for i in range(first, first + count)
    ]
    db = Database(url)
    with db.session() as s:
        for part in chunks(rows, 5000):
            s.execute(sqlalchemy.insert(Connection), part)
    db.dispose()


def claim_before_outage(client: redis.Redis, url: str, gap: float) -> int:
    """Claim what the workers would have claimed before an outage of ``gap`` seconds: the
    current interval of each connection whose interval began before it. How many."""
    db = Database(url)
    with db.session() as s:
        offsets = active_poll_offsets(s)
    db.dispose()
    keys, now, claimed = Keys(), time.time(), 0
    pipe = client.pipeline(transaction=False)
    for conn_id, offset in offsets.items():
        index = interval_index(now, INTERVAL, offset % INTERVAL)
        if interval_start(index, INTERVAL, offset % INTERVAL) <= now - gap:
            pipe.set(keys.poll_slot(conn_id), index, px=int(2 * INTERVAL * 1000))
            claimed += 1
    pipe.execute()
    return claimed


@contextmanager
def draining(client: redis.Redis) -> Iterator[None]:
    """Delete the poll queue every second: nothing consumes it."""
    stop = threading.Event()

    def run() -> None:
        while not stop.wait(1.0):
            client.delete(POLL_QUEUE)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def run_child(impl: str, args: argparse.Namespace, db_url: str, broker: RedisServer) -> Any:
    client = broker.client()
    client.flushall()  # this server serves nothing but this run
    claim_before_outage(client, db_url, args.restart_gap)
    log = Path(args.tmp) / f"beat-{impl}.log"
    argv = [
        sys.executable, __file__, "--child", impl, "--database-url", db_url,
        "--redis-url", broker.url, "--warmup", str(args.warmup), "--seconds", str(args.seconds),
        "--old-commit", args.old_commit, "--tmp", args.tmp,
    ]  # fmt: skip
    with draining(client), log.open("w") as err:
        done = subprocess.run(argv, stdout=subprocess.PIPE, stderr=err, text=True, check=False)
    client.close()
    if done.returncode != 0:
        raise SystemExit(f"the {impl} beat failed:\n{log.read_text()[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- the child: one beat, measuring itself ------------------------------------------------------


def scheduler_class(impl: str, commit: str, tmp: str) -> Any:
    if impl == "new":
        from worker.scheduler import ConnectionScheduler

        return ConnectionScheduler
    source = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{commit}:worker/scheduler.py"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    path = Path(tmp) / f"old_scheduler_{commit}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("old_scheduler", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module.ConnectionScheduler


class Probe:
    """What the beat loop did: sends with their wall time, ticks with their CPU time, and the
    window of steady state, which ends the loop."""

    def __init__(self, warmup: float, seconds: float, broker: redis.Redis) -> None:
        self.warmup, self.seconds, self.broker = warmup, seconds, broker
        self.sends: list[tuple[float, list[Any]]] = []
        self.ticks: list[tuple[float, float]] = []  # (wall time at the end, CPU seconds)
        self.startup: dict[str, float] = {}
        self.window: dict[str, Any] = {}
        self.service: Service | None = None
        self.started = time.time()

    def sent(self, name: str, args: list[Any] | None) -> None:
        if name == POLL_TASK:
            self.sends.append((time.time(), list(args or [])))

    def ticked(self, cpu: float, wait: float) -> None:
        now = time.time()
        self.ticks.append((now, cpu))
        if not self.startup:
            if wait <= 0:  # the start-up burst goes on
                return
            self.startup = {"end": now, "seconds": now - self.started, "polls": len(self.sends)}
        if "start" not in self.window and now >= self.startup["end"] + self.warmup:
            self.window = {"start": now, "cpu0": time.process_time(), "redis0": self.calls()}
        elif "start" in self.window and now >= self.window["start"] + self.seconds:
            self.window.update(end=now, cpu1=time.process_time(), redis1=self.calls())
            assert self.service is not None
            self.service.stop()

    def calls(self) -> dict[str, int]:
        stats = self.broker.info("commandstats")
        return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()}


def child(args: argparse.Namespace) -> int:
    import logging

    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    settings = Settings(
        database_url=args.database_url,
        redis_url=args.redis_url,
        secret_key=generate_key(),
        data_dir=args.tmp,
        poll_interval_seconds=INTERVAL,
    )
    app = create_app(settings)
    broker = redis.Redis.from_url(args.redis_url)
    probe = Probe(args.warmup, args.seconds, broker)
    send_task = app.send_task

    def recorded(name: str, args: list[Any] | None = None, **options: Any) -> Any:
        probe.sent(name, args)
        return send_task(name, args=args, **options)

    app.send_task = recorded
    base = scheduler_class(args.child, args.old_commit, args.tmp)

    class Measured(base):  # type: ignore[misc,valid-type]
        def tick(self, *a: Any, **k: Any) -> float:
            cpu = time.process_time()
            wait: float = super().tick(*a, **k)
            probe.ticked(time.process_time() - cpu, wait)
            return wait

    probe.service = Service(app, scheduler_cls=Measured)
    probe.started = time.time()
    probe.service.start()
    print(json.dumps(summarise(probe, settings, time.time() - probe.started)))
    return 0


def summarise(probe: Probe, settings: Settings, run_seconds: float) -> dict[str, Any]:
    w = probe.window
    wall = w["end"] - w["start"]
    rt = Runtime(settings)
    with rt.db.session() as s:
        active_poll_offsets(s)  # connects
        cpu = time.process_time()
        offsets = active_poll_offsets(s)
        full_scan = time.process_time() - cpu
    drifts = sorted(
        at - (index * INTERVAL + offsets[conn] % INTERVAL)
        for at, (conn, index) in probe.sends
        if w["start"] <= at <= w["end"]
    )
    ticks = [cpu for at, cpu in probe.ticks if w["start"] <= at <= w["end"]]
    # This probe's own INFO calls and the parent's queue deletes are not beat's.
    spent = {
        k: v - w["redis0"].get(k, 0) for k, v in w["redis1"].items() if k not in ("info", "del")
    }
    commands = sum(spent.values())
    sends = len(drifts) + 1e-9
    return {
        "connections": len(offsets),
        "cores": (w["cpu1"] - w["cpu0"]) / wall,
        "sends_per_s": len(drifts) / wall,
        "ticks_per_s": len(ticks) / wall,
        "tick_ms_mean": 1000 * statistics.fmean(ticks),
        "tick_ms_p99": 1000 * quantile(sorted(ticks), 0.99),
        "drift_ms_p50": 1000 * quantile(drifts, 0.5),
        "drift_ms_p99": 1000 * quantile(drifts, 0.99),
        "drift_ms_max": 1000 * drifts[-1],
        "redis_per_send": commands / sends,
        "redis_mix": {k: round(v / sends, 2) for k, v in spent.items() if v},
        "startup_s": probe.startup["seconds"],
        "startup_polls": probe.startup["polls"],
        "full_scan_ms": 1000 * full_scan,
        "run_s": run_seconds,
    }


def quantile(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))]


# -- the report -----------------------------------------------------------------------------------


def report(results: list[tuple[int, str, dict[str, Any]]]) -> list[str]:
    lines = [
        "| connections | beat | cores | sends/s | ticks/s | tick CPU ms (mean / p99) "
        "| drift ms (p50 / p99 / max) | Redis commands per send | start-up: s, polls |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for n, impl, r in results:
        lines.append(
            f"| {n:,} | {impl} | {r['cores']:.3f} | {r['sends_per_s']:.0f} "
            f"| {r['ticks_per_s']:.1f} | {r['tick_ms_mean']:.2f} / {r['tick_ms_p99']:.1f} "
            f"| {r['drift_ms_p50']:.0f} / {r['drift_ms_p99']:.0f} / {r['drift_ms_max']:.0f} "
            f"| {r['redis_per_send']:.2f} | {r['startup_s']:.1f}, {r['startup_polls']:,} |"
        )
    lines.append("")
    for n, impl, r in results:
        mix = ", ".join(f"{k} {v:g}" for k, v in sorted(r["redis_mix"].items()))
        scan = f"; one full scan {r['full_scan_ms']:.0f} ms CPU" if impl == "new" else ""
        lines.append(f"{n:,} {impl}: Redis per send: {mix}{scan}; run {r['run_s']:.0f} s")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", default="10000,25000,50000")
    parser.add_argument("--impl", default="new,old", help="new, old or both (new,old)")
    parser.add_argument("--warmup", type=float, default=10.0, help="seconds after start-up")
    parser.add_argument("--restart-gap", type=float, default=3.0, help="the outage (seconds)")
    parser.add_argument("--seconds", type=float, default=30.0, help="the measured window")
    parser.add_argument("--old-commit", default=OLD_COMMIT)
    parser.add_argument("--postgres-admin-url", default=POSTGRES_ADMIN_URL)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--database-url", help=argparse.SUPPRESS)
    parser.add_argument("--redis-url", help=argparse.SUPPRESS)
    parser.add_argument("--tmp", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args)
    sizes = sorted(int(n) for n in args.connections.split(","))
    impls = args.impl.split(",")
    if not set(impls) <= {"new", "old"} or min(sizes) < 1:
        parser.error("--impl: new and/or old; --connections: positive counts")
    argv_shown = sys.argv[1:] if argv is None else argv
    print(f"date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC")
    print(f"command: {shlex.join(['python', 'benchmarks/beat_scale.py', *argv_shown])}")
    print(
        f"machine: {os.cpu_count()} cores, {platform.machine()}, Python "
        f"{platform.python_version()}, Celery {celery.__version__}, redis-py "
        f"{redis.__version__}, load average {os.getloadavg()[0]:.2f} at start"
    )
    print(
        f"poll interval {INTERVAL:.0f} s; warm-up {args.warmup:g} s after start-up, then "
        f"{args.seconds:g} s measured; old = worker/scheduler.py at {args.old_commit}; "
        f"restart after a {args.restart_gap:g} s outage; catch-up window of the new beat: "
        f"{CATCH_UP_SECONDS:g} s"
    )
    results: list[tuple[int, str, dict[str, Any]]] = []
    with (
        tempfile.TemporaryDirectory(prefix="beat-bench-") as tmp,
        RedisServer(Path(tmp) / "redis") as broker,
        fresh_database(args.postgres_admin_url) as db_url,
    ):
        args.tmp = tmp
        print(f"services: {versions(broker, db_url)}\n")
        have = 0
        for n in sizes:
            add_connections(db_url, have, n - have)
            have = n
            for impl in impls:
                result = run_child(impl, args, db_url, broker)
                results.append((n, impl, result))
                print(f"  {n:,} {impl}: {result['cores']:.3f} cores", flush=True)
    print("\n" + "\n".join(report(results)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
