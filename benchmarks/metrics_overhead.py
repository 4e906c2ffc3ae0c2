"""What recording metrics costs a quiet poll, in Prometheus' multiprocess mode (the workers').

    python benchmarks/metrics_overhead.py [--rooms 4] [--polls 200] [--rounds 7]

The process records as ``hipchat-poller worker`` does (``worker.metrics_process.
start_recording``: its own group directory, mmap files), then measures two things, each in
rounds that alternate **with metrics** and **without** (the hooks of :mod:`tasks.metrics`
replaced by no-ops, as if the calls were not there), the median round counting:

* **the hooks alone**: one quiet poll's worth of metric updates, as the poll task makes them:
  a ``PollTimer`` around the poll (polls in progress up and down, the outcome counter, the
  duration histogram) and, per HipChat call, the status counter and the call-duration
  histogram; ``--rooms`` rooms of a history and a participants trigger each, plus a
  room-list trigger, make ``2 * rooms + 1`` calls a poll (9 by default, as in
  ``benchmarks/poll_throughput.py``);
* **real quiet polls**: ``tasks.poll.poll_connection`` in a ``PollTimer`` (as the task runs
  it) of one connection with those triggers, on the embedded default (SQLite and the SQLite
  budget), against ``python -m emulator`` in a process of its own, with nothing new to find.

It prints both, per poll, and the ratios with/without. The quiet poll's own noise (a few
percent from round to round) is far larger than the hooks, so their cost is best read from
the first figure, and the second says what share of a quiet poll that is.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from storage.crypto import generate_key
from tasks import metrics
from tasks.connections_api import add_connection
from tasks.poll import PollResult, poll_connection
from tasks.runtime import Runtime
from tasks.settings import Settings
from tasks.subscribe import SubscriptionSpec
from tasks.subscriptions_api import create_subscriptions
from worker.metrics_process import start_recording

ADMIN_TOKEN = "bench-admin-token"
HOOKS = ("PollTimer", "http_call", "detection_lag_on_commit", "budget_wait", "rate_limited")


class _NoTimer:
    def __init__(self, result: Any) -> None:
        pass

    def __enter__(self) -> _NoTimer:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        return None


def _nothing(*args: Any, **kwargs: Any) -> None:
    return None


@contextmanager
def metrics_off() -> Iterator[None]:
    """The hooks of tasks.metrics replaced by no-ops (the callers look them up per call)."""
    saved = {name: getattr(metrics, name) for name in HOOKS}
    for name in HOOKS:
        setattr(metrics, name, _NoTimer if name == "PollTimer" else _nothing)
    try:
        yield
    finally:
        for name, hook in saved.items():
            setattr(metrics, name, hook)


def hooks_of_a_poll(calls: int) -> Callable[[], None]:
    def poll() -> None:
        result = PollResult(1)
        result.done.append("history:1")
        with metrics.PollTimer(result):
            for _ in range(calls):
                metrics.http_call("hipchat", 200, 0.002)

    return poll


@contextmanager
def emulator(rooms: list[str]) -> Iterator[str]:
    argv = [sys.executable, "-m", "emulator", "--port", "0", "--token", ADMIN_TOKEN]
    argv += ["--rate-limit", "100000000", "--flood-limit", "100000"]
    for room in rooms:
        argv += ["--room", room]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[1])
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        found = re.search(r"(http://\S+)/v2/", line)
        if found is None:
            raise SystemExit(f"the emulator did not start: {line!r}")
        yield found[1]
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def quiet_poll(tmp: str, base_url: str, rooms: list[str]) -> Callable[[], None]:
    settings = Settings(
        data_dir=tmp,
        database_url=f"sqlite:///{tmp}/hipchat-poller.db",
        secret_key=generate_key(),
        bucket_capacity=100_000,
    )
    rt = Runtime(settings)
    rt.db.upgrade()
    conn_id = add_connection(rt, "bench", base_url, ADMIN_TOKEN).id
    specs = [SubscriptionSpec("bench", "room_created", "log")]
    for room in rooms:
        specs += [
            SubscriptionSpec("bench", "room_message", "log", room=room),
            SubscriptionSpec("bench", "room_enter", "log", room=room),
        ]
    create_subscriptions(rt, specs)

    def poll() -> None:
        result = PollResult(conn_id)
        with metrics.PollTimer(result):
            poll_connection(rt, conn_id, result=result)
        if result.event_count or result.problems or result.failing or result.skipped:
            raise SystemExit(f"not a quiet poll: {result.status}")

    poll()  # primes
    poll()
    return poll


def per_call(job: Callable[[], None], n: int) -> float:
    started = time.perf_counter()
    for _ in range(n):
        job()
    return (time.perf_counter() - started) / n


def paired(job: Callable[[], None], n: int, rounds: int) -> tuple[float, float]:
    """Median seconds per call with metrics and without, rounds alternating which goes
    first."""
    on: list[float] = []
    off: list[float] = []
    for i in range(rounds):
        for enabled in (i % 2 == 0, i % 2 == 1):
            if enabled:
                on.append(per_call(job, n))
            else:
                with metrics_off():
                    off.append(per_call(job, n))
    return statistics.median(on), statistics.median(off)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rooms", type=int, default=4)
    parser.add_argument("--polls", type=int, default=200, help="quiet polls per round")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    calls = 2 * args.rooms + 1
    rooms = [f"Bench {i}" for i in range(args.rooms)]
    with tempfile.TemporaryDirectory(prefix="metrics-bench-") as tmp:
        group = start_recording(Settings(data_dir=tmp), "worker")
        hooks_on, hooks_off = paired(hooks_of_a_poll(calls), 20 * args.polls, args.rounds)
        with emulator(rooms) as base_url:
            poll = quiet_poll(tmp, base_url, rooms)
            poll_on, poll_off = paired(poll, args.polls, args.rounds)
        files = sorted(p.name for p in group.glob("*.db"))
    print(
        f"{datetime.now(UTC):%Y-%m-%d}, {os.cpu_count()} cores ({platform.machine()}), "
        f"Python {platform.python_version()}; multiprocess files: {', '.join(files)}"
    )
    print(f"a quiet poll: {calls} HipChat calls ({args.rooms} rooms x 2 triggers + room list)")
    print(f"{'':32} {'with metrics':>14} {'without':>12} {'difference':>12} {'ratio':>7}")
    for label, on, off in (
        ("metric updates of one poll", hooks_on, hooks_off),
        ("one quiet poll (SQLite)", poll_on, poll_off),
    ):
        print(
            f"{label:32} {on * 1e6:11.1f} us {off * 1e6:9.1f} us "
            f"{(on - off) * 1e6:+9.1f} us {on / off:7.3f}"
        )
    share = (hooks_on - hooks_off) / poll_off
    print(f"the updates are {share:.2%} of a quiet poll's time without metrics")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
