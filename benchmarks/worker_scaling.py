"""Worker scaling: one worker process on a CPU of its own against two, each on its own CPU.

    python benchmarks/worker_scaling.py [--connections 2000] [--burst 6000] [--repeats 3]
        [--cpus 0,1] [--rooms-per-connection 1-2] [--keep]

Issue 9: "adding a worker host must add capacity linearly: show 2 worker processes on
separate CPU sets doing at least 1.8x one". One run builds the stack once, and removes every
process, the database and the temporary directory at the end, also on Ctrl-C, SIGTERM or a
failure:

* the HipChat emulator in a process of its own (``benchmarks/bench_emulator.py``), one user,
  one token and 1-2 public rooms per connection, its rate limit out of the way;
* a ``redis-server`` of its own (the broker and the project's keys) and a fresh PostgreSQL
  database (created, migrated, dropped);
* N connections through the storage layer, each with a ``room_message`` webhook
  subscription per room; nothing is posted, so every measured poll is a quiet poll (no
  webhook is ever called); the budget's capacity is raised out of the way
  (``HIPCHAT_POLLER_BUCKET_CAPACITY``): each connection is polled a few times a minute.

Then a priming burst (every connection once, by the two workers of B; not measured) and the
measured runs, the configurations interleaved (A B B A A B ...) so that the machine's noise
weighs on both:

* A: one ``hipchat-poller worker --concurrency 1 -P prefork``, pinned to the first CPU of
  ``--cpus`` (``taskset -c``; its pool process inherits the affinity, which is checked);
* B: two such workers, pinned to the first and the second.

A run starts its workers, waits until they are ready, publishes a burst of K polls as beat
publishes them (``worker.scheduler``'s own send: pipelined, no task-sent event, no result
channel), ``hipchat.poll_connection(connection, k)`` with an interval index k not used before
for that connection so that every interval claim succeeds, and waits until all K are done,
then stops the workers. A poll counts when its worker logged ``poll conn=<id> <status>``
(the task's INFO line after a real poll, with the worker's timestamp); a task refused by the
interval claim or the poll lease, a retry or an error is counted apart. The window runs from
the 10th to the 90th percent of the burst's completions: the first tenth (the publishing,
each worker's first database connections and compiled statements) and the last (workers
running dry at different times) are left out. In the window: polls per second; CPU seconds
(``/proc``) of each worker (its main process and pool child), the emulator, the PostgreSQL
backends serving the run's database, ``redis-server`` and this process; how long each
worker's threads were runnable but waited for a CPU (``/proc/<pid>/task/*/schedstat``);
what each core of the machine did (``/proc/stat``), so that what other processes took shows.
Over each whole run: Redis commands (``INFO commandstats``, the publishing's LPUSH and the
commands inside Lua included) and PostgreSQL transactions (``pg_stat_database``, read once
the workers' backends are gone) per poll, which would grow if two workers made each other
work more (refused claims, retries, lock waits).

On a 2-core machine the emulator, PostgreSQL and Redis share the cores with the workers, so
the report also gives what the workers' own CPU says: polls per worker-CPU-second in each
configuration, and what the ratio would be if each worker had a core to itself.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import redis

from benchmarks.bench_emulator import EmulatorProcess, rooms_range
from benchmarks.bench_support import (
    HIPCHAT_POLLER,
    POSTGRES_ADMIN_URL,
    Conn,
    Interrupted,
    PgDatabase,
    check_alive,
    child_pids,
    cleanup_stack,
    commandstats,
    create_connections,
    deferred_interrupts,
    fresh_postgres,
    interrupt_on_signals,
    machine_cpu_seconds,
    machine_state,
    pg_xacts,
    product_env,
    report_header,
    tree_run_delay_seconds,
    unprimed,
    wait_backends_gone,
    wait_for_line,
)
from benchmarks.scale_observe import CpuMeter
from benchmarks.scale_report import commandstats_delta
from tasks.runtime import Runtime
from tasks.settings import Settings
from tests.e2e_support import Service, tail
from tests.redis_server import RedisServer
from worker.app import POLL_QUEUE, create_app
from worker.scheduler import POLL_TASK, ConnectionScheduler, Message

CONFIGS = {"A": 1, "B": 2}  # configuration -> worker processes
GOAL_RATIO = 1.8
WARM_SHARE = TAIL_SHARE = 0.1  # of the burst's completions, left out of the window
EXPIRES = 3600.0  # seconds; beat uses the interval, which a long burst would outlast
STALL_SECONDS = 60.0  # no completion for this long: the run failed
BUCKET_CAPACITY = 100_000
QUIET = "ok: 0 events"
REFUSED = ("already polled in interval", "a poll is already running")


# -- counting the polls: the workers' logs ------------------------------------------------------

# [2026-11-29 16:51:57,474: INFO/ForkPoolWorker-1] poll conn=13 ok: 0 events
LOG_LINE = re.compile(r"\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}): (\w+)/[^\]]*\] (.*)")
POLL_LINE = re.compile(r"poll conn=\d+ (.*)")


@dataclass
class WorkerLog:
    """One worker's log, read as it grows: when each real poll ended (the worker's clock,
    epoch seconds, to the millisecond), and what else its tasks did."""

    path: Path
    polls: list[float] = field(default_factory=list)
    not_quiet: int = 0  # real polls whose status was not "ok: 0 events"
    refused: int = 0  # refused by the interval claim or the poll lease: no poll
    deferred: int = 0  # left to the next interval
    retries: int = 0
    errors: int = 0  # ERROR or CRITICAL lines
    _offset: int = 0
    _partial: str = ""

    @property
    def finished(self) -> int:
        """Tasks that ended for good (a retry comes back and ends later)."""
        return len(self.polls) + self.refused + self.deferred

    def read(self) -> None:
        with self.path.open("rb") as log:
            log.seek(self._offset)
            data = log.read()
        self._offset += len(data)
        *lines, self._partial = (self._partial + data.decode(errors="replace")).split("\n")
        for line in lines:
            self.take(line)

    def take(self, line: str) -> None:
        found = LOG_LINE.match(line)
        if found is None:
            return
        stamp, level, message = found.groups()
        if level in ("ERROR", "CRITICAL"):
            self.errors += 1
        poll = POLL_LINE.match(message)
        if poll is not None:
            if "left to the next interval" in message:
                self.deferred += 1
            elif level == "INFO":
                # A naive time in the worker's local zone, the zone of this process too.
                self.polls.append(datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp())
                self.not_quiet += poll.group(1) != QUIET
        elif any(text in message for text in REFUSED):
            self.refused += 1
        elif " retry: " in message:
            self.retries += 1

    def polls_in(self, t0: float, t1: float) -> int:
        return sum(1 for at in self.polls if t0 <= at < t1)


# -- the stack ------------------------------------------------------------------------------------


def pinned(argv: list[str], cpu: int) -> list[str]:
    """``argv`` allowed on CPU ``cpu`` only (children inherit it): ``taskset`` where it is
    installed, else Python setting its own affinity and exec'ing ``argv`` (the same pid)."""
    if shutil.which("taskset"):
        return ["taskset", "-c", str(cpu), *argv]
    code = "import os,sys; os.sched_setaffinity(0, {int(sys.argv[1])}); os.execv(sys.argv[2], sys.argv[2:])"  # noqa: E501
    return [sys.executable, "-c", code, str(cpu), *argv]


@dataclass
class Stack:
    tmp: Path
    env: dict[str, str]
    redis: RedisServer
    db: PgDatabase
    emulator: EmulatorProcess
    connections: list[Conn]
    scheduler: ConnectionScheduler  # publishes the bursts (it never ticks)
    stats: redis.Redis
    cpus: list[int]
    run_id: str
    next_index: dict[int, int] = field(default_factory=dict)  # connection -> next interval

    def burst(self, size: int) -> list[Message]:
        """``size`` polls, connections round robin, each (connection, interval) new."""
        made = []
        for i in range(size):
            conn = self.connections[i % len(self.connections)].id
            k = self.next_index.get(conn, 1)
            self.next_index[conn] = k + 1
            made.append(Message(POLL_TASK, [conn, k], EXPIRES))
        return made

    def publish(self, messages: list[Message]) -> None:
        """As beat publishes: its scheduler's own send."""
        sent = self.scheduler._send(messages)
        if sent != len(messages):
            raise SystemExit(f"published {sent} of {len(messages)} polls (see the log above)")

    def workers(self, count: int, label: str) -> list[Service]:
        """The configuration's workers, not started yet."""
        workers = []
        for i in range(count):
            argv = [
                HIPCHAT_POLLER, "worker", "-n", f"{self.run_id}-{label}-{i + 1}@%h",
                "--concurrency", "1", "-P", "prefork", "--loglevel", "INFO",
            ]  # fmt: skip
            log = self.tmp / f"{label}-worker-{i + 1}.log"
            name = f"worker {i + 1}"
            workers.append(Service(name, pinned(argv, self.cpus[i]), self.env, self.tmp, log))
        return workers


def affinity(service: Service) -> str:
    """The CPUs the worker and its pool processes may run on, as the kernel says."""
    assert service.proc is not None
    pids = [service.proc.pid, *child_pids(service.proc.pid)]
    cpus = sorted({cpu for pid in pids for cpu in os.sched_getaffinity(pid)})
    return f"{service.name}: CPU {','.join(map(str, cpus))} ({len(pids)} processes)"


# -- one run -------------------------------------------------------------------------------------


@dataclass
class Run:
    config: str
    workers: int
    burst: int
    window: float = math.nan
    polls: list[int] = field(default_factory=list)  # per worker, in the window
    cpu: dict[str, float] = field(default_factory=dict)  # CPU seconds in the window
    waited: list[float] = field(default_factory=list)  # per worker: runnable, no CPU (s)
    cores: dict[str, float] = field(default_factory=dict)  # machine: busy share per core
    busy_cores: float = math.nan  # the whole machine, in the window
    logs: list[WorkerLog] = field(default_factory=list)
    commands: int = 0  # Redis, the whole run
    xacts: int = 0  # PostgreSQL, the whole run
    seconds: float = math.nan  # publishing to the last completion
    pinning: list[str] = field(default_factory=list)
    load: str = ""

    @property
    def in_window(self) -> int:
        return sum(self.polls)

    @property
    def rate(self) -> float:
        return self.in_window / self.window if self.window > 0 else math.nan

    def per_poll_ms(self, seconds: float) -> float:
        return seconds / self.in_window * 1000 if self.in_window else math.nan

    @property
    def worker_cpu(self) -> float:
        return sum(self.cpu.get(f"worker {i + 1}", 0.0) for i in range(self.workers))

    @property
    def services_cpu(self) -> float:
        return sum(self.cpu.get(name, 0.0) for name in SERVICES)

    @property
    def stack_cpu(self) -> float:
        return self.worker_cpu + self.services_cpu

    @property
    def per_worker_cpu_second(self) -> float:
        """Polls per CPU second of the workers (main and pool processes)."""
        return self.in_window / self.worker_cpu if self.worker_cpu > 0 else math.nan

    @property
    def others_cores(self) -> float:
        """Cores busy with what this run did not start (other engineers' suites, the
        PostgreSQL server's own background processes, the kernel)."""
        ours = sum(self.cpu.values())
        return max(0.0, self.busy_cores - ours / self.window) if self.window > 0 else math.nan

    def total(self, name: str) -> int:
        return sum(getattr(log, name) for log in self.logs)

    @property
    def finished_polls(self) -> int:
        return sum(len(log.polls) for log in self.logs)


SERVICES = ("emulator", "PostgreSQL backends", "redis-server")
BENCHMARK = "benchmark (this process)"


def run_once(stack: Stack, config: str, burst: int, label: str) -> Run:
    """Start the configuration's workers, publish a burst, measure the window, stop them."""
    count = CONFIGS[config]
    result = Run(config, count, burst, load=" ".join(f"{x:.2f}" for x in os.getloadavg()))
    xact0 = pg_xacts(stack.db)
    cmd0 = commandstats(stack.stats)
    workers = stack.workers(count, label)
    try:
        for worker in workers:
            with deferred_interrupts():  # a Ctrl-C in Popen would lose the process
                worker.start()
        for worker in workers:
            wait_for_line(worker, " ready.", lambda: check_alive(workers))
        result.pinning = [affinity(w) for w in workers]
        result.logs = [WorkerLog(w.log_path) for w in workers]
        if stack.stats.llen(POLL_QUEUE):
            raise SystemExit(f"{POLL_QUEUE} is not empty before the burst")
        started = time.time()
        stack.publish(stack.burst(burst))
        measure(stack, workers, result)
        result.seconds = max(at for log in result.logs for at in log.polls) - started
    finally:
        with deferred_interrupts():  # a stop cut short would leave the worker running
            for worker in workers:
                worker.terminate()  # all at once: they stop in parallel
            for worker in workers:
                worker.stop()
    for log in result.logs:
        log.read()  # what was logged while stopping
    if not wait_backends_gone(stack.db):
        print("  (PostgreSQL backends still open: transactions may be undercounted)")
    result.xacts = sum(pg_xacts(stack.db)) - sum(xact0)
    result.commands = sum(commandstats_delta(cmd0, commandstats(stack.stats)).values())
    return result


def measure(stack: Stack, workers: list[Service], result: Run) -> None:
    """Until the burst is done: the meters start at WARM_SHARE of its completions and stop
    at 1 - TAIL_SHARE; the polls in between are counted afterwards from the timestamps."""
    warm = math.ceil(result.burst * WARM_SHARE)
    tail_at = max(warm + 1, math.floor(result.burst * (1 - TAIL_SHARE)))
    pids = {w.name: w.proc.pid for w in workers if w.proc is not None}
    assert stack.emulator.service.proc is not None
    pids["emulator"] = stack.emulator.service.proc.pid
    pids["redis-server"] = int(stack.stats.info("server")["process_id"])
    meter = CpuMeter(pids, stack.db.admin_url, stack.db.name, self_name=BENCHMARK)
    t0 = t1 = math.nan
    delay0: dict[str, float] = {}
    machine0: dict[str, tuple[float, float]] = {}
    last, progress = -1, time.monotonic()
    while True:
        for log in result.logs:
            log.read()
        polls = sum(len(log.polls) for log in result.logs)
        if math.isnan(t0) and polls >= warm:
            meter.begin()
            t0 = time.time()
            delay0 = {w.name: tree_run_delay_seconds(pids[w.name]) for w in workers}
            machine0 = machine_cpu_seconds()
        if not math.isnan(t0) and math.isnan(t1) and polls >= tail_at:
            result.cpu = meter.end()
            t1 = time.time()
            delay1 = {w.name: tree_run_delay_seconds(pids[w.name]) for w in workers}
            machine1 = machine_cpu_seconds()
            result.waited = [delay1[w.name] - delay0[w.name] for w in workers]
            result.window = t1 - t0
            result.busy_cores = (machine1["cpu"][0] - machine0["cpu"][0]) / result.window
            result.cores = {
                name: (busy - machine0[name][0]) / (total - machine0[name][1])
                for name, (busy, total) in machine1.items()
                if name != "cpu" and total > machine0[name][1]
            }
        finished = sum(log.finished for log in result.logs)
        if finished >= result.burst:
            if math.isnan(t1):
                raise SystemExit(f"{polls} polls of a burst of {result.burst} ran")
            break
        if finished != last:
            last, progress = finished, time.monotonic()
        elif time.monotonic() - progress > STALL_SECONDS:
            raise SystemExit(
                f"stalled at {finished} of {result.burst} polls; last lines:\n"
                + "\n".join(tail(w.log_text(), 10) for w in workers)
            )
        check_alive(workers)
        time.sleep(0.1)
    result.polls = [log.polls_in(t0, t1) for log in result.logs]


# -- the whole benchmark ---------------------------------------------------------------------------


def build(exits: contextlib.ExitStack, args: argparse.Namespace) -> Stack:
    # Each thing made and its cleanup registered before a signal may interrupt.
    with deferred_interrupts():
        tmp = Path(tempfile.mkdtemp(prefix="worker-scaling-"))
        if not args.keep:
            exits.callback(shutil.rmtree, tmp, ignore_errors=True)
    with deferred_interrupts():
        server = exits.enter_context(RedisServer(tmp / "redis"))
    with deferred_interrupts():
        db = exits.enter_context(fresh_postgres(args.postgres_admin_url, "bench_wscale"))
    run_id = f"wscale-{uuid.uuid4().hex[:8]}"
    print(
        f"run {run_id} (key prefix, worker names), directory {tmp} "
        f"({'kept' if args.keep else 'removed at the end'}), database {db.name}",
        flush=True,
    )
    env = product_env(tmp, server.url, db.url, run_id, bucket_capacity=str(BUCKET_CAPACITY))
    with deferred_interrupts():
        emulator = EmulatorProcess.start(
            tmp, env, args.connections, args.rooms_per_connection, rate_limit=10**9
        )
        exits.callback(emulator.stop)
    rt = Runtime(Settings.from_env(env))
    exits.callback(rt.db.dispose)
    rt.db.upgrade()
    connections = create_connections(
        rt,
        emulator.base_url,
        emulator.connections,
        lambda conn_id, secret: f"http://127.0.0.1:9/hook/{conn_id}",  # never called
        rt.settings.poll_interval_seconds,
    )
    rt.db.dispose()  # its backends would count as the workers'
    app = create_app(Settings.from_env(env))
    scheduler = ConnectionScheduler(app, resume=False)  # reads the connections once
    Runtime.of(app).db.dispose()
    exits.callback(app.close)
    stats = server.client()
    exits.callback(stats.close)
    return Stack(tmp, env, server, db, emulator, connections, scheduler, stats, args.cpus, run_id)


def prime(stack: Stack) -> None:
    """Every connection's first poll (it records where each room stands), by B's workers."""
    began = time.monotonic()
    run = run_once(stack, "B", len(stack.connections), "prime")
    rt = Runtime(Settings.from_env(stack.env))
    try:
        left = unprimed(rt)
    finally:
        rt.db.dispose()
    if left or run.finished_polls != len(stack.connections):
        raise SystemExit(
            f"priming: {run.finished_polls} of {len(stack.connections)} polls, "
            f"{left} subscriptions unprimed"
        )
    print(f"primed {len(stack.connections)} connections in {time.monotonic() - began:.0f} s")


def order(repeats: int) -> list[str]:
    """A B B A A B B A ...: each configuration as often first as second."""
    return [c for i in range(repeats) for c in ("AB" if i % 2 == 0 else "BA")]


def measure_all(args: argparse.Namespace) -> list[Run]:
    runs: list[Run] = []
    with cleanup_stack() as exits:
        began = time.monotonic()
        stack = build(exits, args)
        print(
            f"stack ready in {time.monotonic() - began:.0f} s: {len(stack.connections)} "
            f"connections, PostgreSQL {stack.db.version}, redis-server "
            f"{stack.stats.info('server')['redis_version']}",
            flush=True,
        )
        prime(stack)
        for i, config in enumerate(order(args.repeats), 1):
            run = run_once(stack, config, args.burst, f"run{i}{config}")
            runs.append(run)
            print(f"run {i} {describe(run)}", flush=True)
    return runs


# -- the report ----------------------------------------------------------------------------------


def _f(value: float, digits: int = 1) -> str:
    return "-" if math.isnan(value) else f"{value:.{digits}f}"


def _each(values: Sequence[float], digits: int = 2) -> str:
    return " + ".join(_f(v, digits) for v in values)


def describe(run: Run) -> str:
    waited = [w / run.window for w in run.waited]
    worker_cores = [run.cpu.get(f"worker {i + 1}", 0.0) / run.window for i in range(run.workers)]
    return (
        f"{run.config} ({run.workers} worker{'s' if run.workers > 1 else ''}): "
        f"{_f(run.rate)} polls/s ({run.in_window} in {_f(run.window)} s; "
        f"{run.finished_polls} of {run.burst} in {_f(run.seconds)} s), "
        f"worker cores {_each(worker_cores)}, waited for a CPU {_each(waited)}; "
        f"machine {_f(run.busy_cores, 2)} cores busy, load {run.load}"
    )


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else math.nan


def median(runs: Sequence[Run], value: Callable[[Run], float]) -> float:
    found = [value(r) for r in runs if not math.isnan(value(r))]
    return statistics.median(found) if found else math.nan


def run_table(runs: Sequence[Run]) -> list[str]:
    lines = [
        "| run | config | polls/s | window s (polls) | worker CPU ms/poll | worker cores "
        "| waited for CPU (share) | emulator / PG / Redis ms/poll | stack ms/poll "
        "| cores busy (others) | Redis cmds/poll | PG xacts/poll | not quiet, refused, "
        "deferred, retries, errors |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
        "| ---: |",
    ]
    for i, run in enumerate(runs, 1):
        names = [f"worker {k + 1}" for k in range(run.workers)]
        each = [
            run.cpu.get(n, 0.0) * 1000 / p if p else math.nan
            for n, p in zip(names, run.polls, strict=True)
        ]
        cores = [run.cpu.get(n, 0.0) / run.window for n in names]
        services = " / ".join(_f(run.per_poll_ms(run.cpu.get(n, 0.0)), 2) for n in SERVICES)
        per_core = ", ".join(f"{name} {share:.0%}" for name, share in sorted(run.cores.items()))
        done = max(1, run.finished_polls)
        lines.append(
            f"| {i} | {run.config} | {_f(run.rate)} | {_f(run.window)} ({run.in_window}) "
            f"| {_each(each)} | {_each(cores)} | {_each([w / run.window for w in run.waited])} "
            f"| {services} | {_f(run.per_poll_ms(run.stack_cpu), 2)} "
            f"| {per_core} ({_f(run.others_cores, 2)}) | {_f(run.commands / done)} "
            f"| {_f(run.xacts / done)} | {run.total('not_quiet')}, {run.total('refused')}, "
            f"{run.total('deferred')}, {run.total('retries')}, {run.total('errors')} |"
        )
    return lines


@dataclass
class Summary:
    """Per configuration, the median over its runs of each figure."""

    rate: dict[str, float]
    worker_ms: dict[str, float]  # workers' CPU per poll
    services_ms: dict[str, float]  # the emulator's, PostgreSQL backends' and Redis's
    stack_ms: dict[str, float]
    efficiency: dict[str, float]  # polls per worker-CPU-second
    commands: dict[str, float]  # Redis commands per poll, whole runs
    xacts: dict[str, float]  # PostgreSQL transactions per poll, whole runs
    others: dict[str, float]  # cores busy with what the run did not start
    worker_cores: dict[str, float]  # the workers' CPU seconds per second, all of them
    waited: dict[str, float]  # share of the window a worker waited for its CPU (mean)
    pairs: list[float]  # B/A of each adjacent (A, B) pair, in order
    cores: int = field(default_factory=lambda: len(os.sched_getaffinity(0)))

    @property
    def ratio(self) -> float:
        return _ratio(self.rate["B"], self.rate["A"])

    @property
    def efficiency_ratio(self) -> float:
        return _ratio(self.efficiency["B"], self.efficiency["A"])

    @property
    def cores_ratio(self) -> float:
        return _ratio(self.worker_cores["B"], self.worker_cores["A"])

    @property
    def machine_limit(self) -> float:
        """Polls per second this machine's cores would hold, doing nothing else, at B's
        stack CPU per poll."""
        return _ratio(self.cores * 1000, self.stack_ms["B"])


def summarise(runs: Sequence[Run]) -> Summary:
    by = {c: [r for r in runs if r.config == c] for c in CONFIGS}

    def per_config(value: Callable[[Run], float]) -> dict[str, float]:
        return {c: median(rs, value) for c, rs in by.items()}

    pairs = [
        _ratio(b.rate, a.rate)
        for a, b in (
            sorted(runs[i : i + 2], key=lambda r: r.config) for i in range(0, len(runs) - 1, 2)
        )
        if (a.config, b.config) == ("A", "B")
    ]
    return Summary(
        per_config(lambda r: r.rate),
        per_config(lambda r: r.per_poll_ms(r.worker_cpu)),
        per_config(lambda r: r.per_poll_ms(r.services_cpu)),
        per_config(lambda r: r.per_poll_ms(r.stack_cpu)),
        per_config(lambda r: r.per_worker_cpu_second),
        per_config(lambda r: _ratio(r.commands, r.finished_polls)),
        per_config(lambda r: _ratio(r.xacts, r.finished_polls)),
        per_config(lambda r: r.others_cores),
        per_config(lambda r: _ratio(r.worker_cpu, r.window)),
        per_config(lambda r: _ratio(statistics.mean(r.waited), r.window) if r.waited else math.nan),
        pairs,
    )


def summary_lines(found: Summary, runs: Sequence[Run]) -> list[str]:
    lines = [
        "| config | runs | polls/s | worker CPU ms/poll | polls per worker-CPU-second "
        "| emulator + PG + Redis CPU ms/poll | stack CPU ms/poll | Redis cmds/poll "
        "| PG xacts/poll | other processes, cores |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for c, n in CONFIGS.items():
        lines.append(
            f"| {c}: {n} worker{'s' if n > 1 else ''} | {sum(r.config == c for r in runs)} "
            f"| {_f(found.rate[c])} | {_f(found.worker_ms[c], 2)} | {_f(found.efficiency[c])} "
            f"| {_f(found.services_ms[c], 2)} "
            f"| {_f(found.stack_ms[c], 2)} | {_f(found.commands[c])} | {_f(found.xacts[c], 2)} "
            f"| {_f(found.others[c], 2)} |"
        )
    verdict = "met" if found.ratio >= GOAL_RATIO else "NOT met"
    lines += [
        "(medians over the runs of each configuration)",
        "",
        f"throughput, B / A: {_f(found.ratio, 2)} (per pair of adjacent runs: "
        f"{', '.join(_f(p, 2) for p in found.pairs)}); goal >= {GOAL_RATIO}: {verdict}",
        f"the workers' CPU: one worker used {_f(found.worker_cores['A'], 2)} cores (waiting "
        f"for its CPU {_f(found.waited['A'] * 100, 0)} % of the time), two used "
        f"{_f(found.worker_cores['B'], 2)} (each waiting {_f(found.waited['B'] * 100, 0)} %): "
        f"{_f(found.cores_ratio, 2)}x; they polled {_f(found.efficiency['A'])} and "
        f"{_f(found.efficiency['B'])} times per worker-CPU-second "
        f"({_f(found.efficiency_ratio, 2)}x), so two workers each with a core of its own "
        f"would do {_f(2 * found.efficiency_ratio, 2)}x one, if CPU-bound",
        f"this machine: {found.cores} cores doing nothing else hold {_f(found.machine_limit)} "
        f"polls/s at B's {_f(found.stack_ms['B'], 2)} ms of stack CPU per poll; 1.8x A is "
        f"{_f(GOAL_RATIO * found.rate['A'])} polls/s, "
        f"{_f(_ratio(GOAL_RATIO * found.rate['A'], found.machine_limit) * 100, 0)} % of that "
        f"(other processes took {_f(found.others['B'], 2)} cores during B)",
    ]
    return lines


def final_line(found: Summary) -> str:
    verdict = "met" if found.ratio >= GOAL_RATIO else "NOT met"
    return (
        f"worker_scaling: 2 workers {_f(found.ratio, 2)}x one ({_f(found.rate['B'])} vs "
        f"{_f(found.rate['A'])} polls/s; goal {GOAL_RATIO}x {verdict} on this machine); "
        f"per worker-CPU-second {_f(found.efficiency_ratio, 2)}x"
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument("--burst", type=int, default=6000, help="polls per run (K)")
    parser.add_argument(
        "--repeats", type=int, default=3, help="runs of each configuration (A B B A ...)"
    )
    parser.add_argument("--cpus", default="0,1", help="the two CPUs the workers are pinned to")
    parser.add_argument("--rooms-per-connection", type=rooms_range, default=(1, 2))
    parser.add_argument("--postgres-admin-url", default=POSTGRES_ADMIN_URL)
    parser.add_argument("--keep", action="store_true", help="keep the logs' directory")
    args = parser.parse_args(argv)
    try:
        args.cpus = [int(x) for x in args.cpus.split(",")]
    except ValueError:
        parser.error("--cpus: two CPU numbers, as 0,1")
    allowed = os.sched_getaffinity(0)
    if len(args.cpus) != 2 or len(set(args.cpus)) != 2 or not set(args.cpus) <= allowed:
        parser.error(f"--cpus: two different CPUs of {sorted(allowed)}")
    # Two polls of one connection are a whole round of connections apart in the queue, and
    # at most two polls run at once: they never meet on its poll lease.
    if args.connections < 10 or args.repeats < 1 or args.burst < 10:
        parser.error("--connections >= 10, --burst >= 10 and --repeats >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    interrupt_on_signals()
    shown = report_header("benchmarks/worker_scaling.py", argv)
    print(f"software: Python {platform.python_version()} ({platform.machine()})")
    print(
        f"workers: hipchat-poller worker --concurrency 1 -P prefork, log level INFO, pinned "
        f"with {'taskset -c' if shutil.which('taskset') else 'os.sched_setaffinity'} to CPU "
        f"{args.cpus[0]} (A) and CPUs {args.cpus[0]}, {args.cpus[1]} (B); "
        f"{args.connections} connections, bursts of {args.burst} polls, "
        f"window {WARM_SHARE:.0%}-{1 - TAIL_SHARE:.0%} of each burst"
    )
    try:
        print(f"machine at start: {machine_state()}\n", flush=True)
        runs = measure_all(args)
    except (KeyboardInterrupt, Interrupted) as exc:
        print(f"interrupted ({type(exc).__name__}); everything started was stopped", flush=True)
        return 130
    print("\npinning:", "; ".join(p for run in runs[:2] for p in run.pinning))
    print("\n" + "\n".join(run_table(runs)) + "\n")
    found = summarise(runs)
    print("\n".join(summary_lines(found, runs)))
    print(f"\nmachine at the end: load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"\nreproduce: {shown}")
    print(final_line(found))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
