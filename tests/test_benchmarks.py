"""The scale, poll-cost and worker-scaling benchmarks: their arithmetic on plain records, and
a smoke run of each script at a tiny level (real processes, a redis-server and a PostgreSQL
database of their own), which checks that they run, clean up and print their final lines."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import psycopg
import pytest

from benchmarks.bench_emulator import rooms_range
from benchmarks.bench_support import (
    POSTGRES_ADMIN_URL,
    Interrupted,
    deferred_interrupts,
    interrupt_on_signals,
    percentile,
)
from benchmarks.scale_observe import BROKER, EVENTS, PROJECT, PROJECT_LUA, TaskRecord, classify
from benchmarks.scale_report import (
    Post,
    detection,
    due_slots,
    message_seq,
    next_slot,
    poll_stats,
    polls_finished_in,
)
from benchmarks.worker_scaling import Run, WorkerLog, order, summarise

ROOT = Path(__file__).resolve().parents[1]


# -- the arithmetic ------------------------------------------------------------------------------


def poll(conn: int, k: int, **fields: object) -> TaskRecord:
    task = TaskRecord(
        f"{conn}-{k}-{fields.get('result', '')}", "hipchat.poll_connection", (conn, k)
    )
    for name, value in fields.items():
        setattr(task, name, value)
    return task


def ok(conn: int, k: int, sent: float, started: float) -> TaskRecord:
    return poll(
        conn,
        k,
        sent=sent,
        started=started,
        finished=started + 0.01,
        state="task-succeeded",
        result=f"'connection {conn}: ok: 0 events'",
    )


def test_due_slots_are_the_slots_starting_inside_the_window() -> None:
    # interval 10 s; connection 1 at offset 2 s, connection 2 at offset 9 s; window [20, 40)
    slots = due_slots({1: 2.0, 2: 9.0}, 10.0, 20.0, 40.0)
    assert sorted(slots) == [(1, 2, 22.0), (1, 3, 32.0), (2, 2, 29.0), (2, 3, 39.0)]
    assert due_slots({1: 0.0}, 10.0, 20.0, 40.0) == [(1, 2, 20.0), (1, 3, 30.0)]


@pytest.mark.parametrize(
    ("at", "expected"), [(21.9, 22.0), (22.0, 32.0), (31.999, 32.0), (-3.0, 2.0)]
)
def test_next_slot_is_strictly_after(at: float, expected: float) -> None:
    assert next_slot(at, 10.0, 2.0) == pytest.approx(expected)


def test_poll_stats_sorts_each_due_slot_by_what_happened_to_it() -> None:
    slots = [(1, 2, 22.0), (1, 3, 32.0), (2, 2, 29.0), (3, 2, 23.0), (4, 2, 24.0), (5, 2, 25.0)]
    tasks = [
        ok(1, 2, sent=22.005, started=22.015),
        # a second beat's copy of the same slot, refused by the interval claim
        poll(1, 2, sent=22.01, finished=22.02, state="task-succeeded", result="already polled"),
        ok(1, 3, sent=32.004, started=42.5),  # ran, but after its interval had ended
        poll(2, 2, sent=29.0, finished=39.0, state="task-revoked", expired=True),
        poll(3, 2, sent=23.0, state="task-failed", finished=23.5),
        poll(4, 2, sent=24.0),  # sent, never finished
        # connection 5: never sent
    ]
    stats = poll_stats(tasks, slots, 10.0)
    assert (stats.due, stats.done, stats.missed) == (6, 2, 4)
    assert (stats.expired, stats.failed, stats.unfinished, stats.not_seen) == (1, 1, 1, 1)
    assert (stats.late, stats.duplicates, stats.refused_only) == (1, 1, 0)
    assert stats.drift == pytest.approx([0.005, 0.004, 0.0, 0.0, 0.0])
    assert stats.start_lag == pytest.approx([0.015, 10.5])
    assert stats.queue_wait == pytest.approx([0.01, 10.496])


def test_without_task_sent_events_the_send_time_is_the_expiry_minus_the_interval() -> None:
    # Beat sends with expires=interval (10 s here) and may send no task-sent event.
    task = ok(1, 2, sent=0.0, started=22.5)
    task.sent, task.expires = None, 32.25
    stats = poll_stats([task], [(1, 2, 22.0)], 10.0)
    assert stats.drift == pytest.approx([0.25])
    assert stats.queue_wait == pytest.approx([0.25])
    assert stats.sent_from_expires == 1


def test_polls_finished_in_counts_real_polls_only() -> None:
    tasks = [
        ok(1, 2, sent=1.0, started=1.0),
        ok(1, 3, sent=5.0, started=5.0),
        poll(2, 2, finished=1.5, state="task-succeeded", result="a poll is already running"),
    ]
    assert polls_finished_in(tasks, 0.0, 2.0) == 1


def payload(seq: int, date: float) -> dict[str, object]:
    stamp = datetime.fromtimestamp(date, UTC).isoformat()
    return {"item": {"message": {"message": f"scale {seq}", "date": stamp}}}


def test_detection_measures_against_the_next_slot_and_counts_repeats() -> None:
    posts = [Post(1, 7, 100.0), Post(2, 7, 104.0), Post(3, 8, 104.0)]
    offsets = {7: 2.0, 8: 0.0}  # interval 10: slots at 102, 112, ... and 100, 110, ...
    arrivals = [
        (102.05, payload(1, 100.0)),
        (112.10, payload(2, 104.0)),
        (112.50, payload(2, 104.0)),  # the same message again
        (50.0, payload(99, 40.0)),  # not posted in the window
    ]
    found = detection(posts, arrivals, offsets, 10.0)
    assert (found.posted, found.delivered, found.undelivered, found.duplicates) == (3, 2, 1, 1)
    assert found.latency == pytest.approx([2.05, 8.10])
    assert found.ideal == pytest.approx([2.0, 8.0])
    assert found.excess == pytest.approx([0.05, 0.10])


@pytest.mark.parametrize(
    ("text", "seq"), [("scale 12", 12), ("scale x", None), ("hello 3", None), ("scale", None)]
)
def test_message_seq(text: str, seq: int | None) -> None:
    assert message_seq(text) == seq


@pytest.mark.parametrize(
    ("source", "args", "who"),
    [
        (b"127.0.0.1:5", [b"EVALSHA", b"abc", b"2", b"pfx:{conn:1}:budget-log"], PROJECT),
        (b"127.0.0.1:5", [b"SET", b"pfx:{conn:1}:poll-lease", b"t", b"NX"], PROJECT),
        (b"lua", [b"ZCARD", b"pfx:{conn:1}:budget-log"], PROJECT_LUA),
        (b"127.0.0.1:5", [b"PUBLISH", b"/0.celeryev/task.sent", b"{}"], EVENTS),
        (b"127.0.0.1:5", [b"LPUSH", b"hipchat.polls", b"{}"], BROKER),
        (b"127.0.0.1:5", [b"MULTI"], BROKER),
    ],
)
def test_monitor_lines_are_sorted_by_who_sent_them(
    source: bytes, args: list[bytes], who: str
) -> None:
    assert classify(source, args, b"pfx:") == who


def test_rooms_range_and_percentile() -> None:
    assert rooms_range("1-2") == (1, 2)
    assert rooms_range("3") == (3, 3)
    assert percentile([5.0, 1.0, 3.0, 2.0, 4.0], 50) == 3.0
    assert percentile([1.0, 2.0], 99) == 2.0


def test_worker_logs_count_real_polls_and_put_the_rest_apart(tmp_path: Path) -> None:
    log = WorkerLog(tmp_path / "w.log")
    for line in [
        "[2026-11-29 16:51:57,474: INFO/ForkPoolWorker-1] poll conn=13 ok: 0 events",
        "[2026-11-29 16:51:57,474: INFO/ForkPoolWorker-1] Task hipchat.poll_connection[1] "
        "succeeded in 0.008s: 'connection 13: ok: 0 events'",
        "[2026-11-29 16:51:58,000: INFO/ForkPoolWorker-1] poll conn=14 ok: 2 events",
        "[2026-11-29 16:51:58,100: INFO/ForkPoolWorker-1] Task hipchat.poll_connection[2] "
        "succeeded in 0.001s: 'connection 15: already polled in interval 3'",
        "[2026-11-29 16:51:58,200: WARNING/ForkPoolWorker-1] poll conn=16 left to the next "
        "interval: rooms failing",
        "[2026-11-29 16:51:58,300: INFO/MainProcess] Task hipchat.poll_connection[3] retry: "
        "Retry in 2s",
        "[2026-11-29 16:51:58,400: ERROR/ForkPoolWorker-1] Task hipchat.poll_connection[4] "
        "raised unexpected: OSError()",
        "a traceback line",
    ]:
        log.take(line)
    at = datetime(2026, 11, 29, 16, 51, 57, 474000).timestamp()
    assert log.polls == pytest.approx([at, at + 0.526])
    assert (log.not_quiet, log.refused, log.deferred, log.retries, log.errors) == (1, 1, 1, 1, 1)
    assert log.finished == 4
    assert log.polls_in(at, at + 0.5) == 1


def test_worker_logs_are_read_as_they_grow(tmp_path: Path) -> None:
    path = tmp_path / "w.log"
    log = WorkerLog(path)
    path.write_text("[2026-11-29 16:51:57,474: INFO/ForkPoolWorker-1] poll conn=1 ok: 0 ev")
    log.read()
    assert log.polls == []  # the line is not complete yet
    with path.open("a") as f:
        f.write("ents\n[2026-11-29 16:51:57,480: INFO/ForkPoolWorker-1] poll conn=2 ok: 0 events\n")
    log.read()
    assert len(log.polls) == 2
    assert log.not_quiet == 0


def test_configurations_alternate_which_goes_first() -> None:
    assert order(1) == ["A", "B"]
    assert order(3) == ["A", "B", "B", "A", "A", "B"]


def test_the_headline_ratio_is_of_the_medians_and_each_pair_is_shown() -> None:
    def run(config: str, polls: int, worker_cpu: float) -> Run:
        n = 1 if config == "A" else 2
        made = Run(config, n, 100, window=10.0, polls=[polls // n] * n)
        made.cpu = {f"worker {i + 1}": worker_cpu / n for i in range(n)}
        made.cpu |= {"emulator": 0.5, "PostgreSQL backends": 0.3, "redis-server": 0.2}
        return made

    found = summarise(
        [run("A", 1000, 8.0), run("B", 1600, 13.0), run("B", 1400, 12.0), run("A", 1000, 8.0)]
    )
    assert found.rate == {"A": 100.0, "B": 150.0}
    assert found.ratio == pytest.approx(1.5)
    assert found.pairs == pytest.approx([1.6, 1.4])
    assert found.efficiency["A"] == pytest.approx(125.0)
    assert found.efficiency_ratio == pytest.approx(((1600 / 13 + 1400 / 12) / 2) / 125)
    assert found.worker_ms["A"] == pytest.approx(8.0)


def test_a_signal_inside_deferred_interrupts_is_raised_when_the_block_ends() -> None:
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)}
    stopped = []

    def stop_while_deferred() -> None:
        with deferred_interrupts():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)  # the handler runs here, and must not raise
            stopped.append(True)

    def signalled() -> None:
        os.kill(os.getpid(), signal.SIGHUP)
        time.sleep(0.05)

    try:
        interrupt_on_signals()
        with pytest.raises(Interrupted, match="SIGTERM"):
            stop_while_deferred()
        assert stopped == [True]
        with pytest.raises(Interrupted, match="SIGHUP"):
            signalled()
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


# -- the scripts, at a tiny level ---------------------------------------------------------------


def run_script(*argv: str, timeout: float) -> list[str]:
    done = subprocess.run(
        [sys.executable, *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, f"exit {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done.stdout.strip().splitlines()


@pytest.mark.e2e
@pytest.mark.integration
@pytest.mark.timeout(120)
def test_scale_runs_a_tiny_level_and_prints_its_final_line() -> None:
    lines = run_script(
        "benchmarks/scale.py",
        "--connections", "5", "--interval", "2", "--intervals", "2", "--message-rate", "2",
        timeout=110,
    )  # fmt: skip
    assert re.fullmatch(
        r"scale: 5 connections, \d+ missed, [\d.]+ ms CPU per poll, detection p99 [\d.-]+ s"
        r"( \(\d+ of \d+ messages never delivered\))?",
        lines[-1],
    ), lines[-1]
    assert any(line.startswith("reproduce: python benchmarks/scale.py") for line in lines)
    due = next(line for line in lines if line.startswith("polls: due "))
    assert not due.startswith("polls: due 0,"), due


@pytest.mark.e2e
@pytest.mark.integration
@pytest.mark.timeout(120)
def test_poll_cost_runs_with_few_polls_and_prints_its_final_lines() -> None:
    lines = run_script(
        "benchmarks/poll_cost.py", "--polls", "10", "--connections", "2", timeout=110
    )
    pattern = (
        r"poll_cost: {}: CPU [\d.]+x bare, [\d.]+ database transactions, "
        r"[\d.]+ Redis commands sent( \([\d.]+ executed\))? per quiet poll"
    )
    assert re.fullmatch(pattern.format(r"SQLite \+ fakeredis \(embedded\)"), lines[-2]), lines
    assert re.fullmatch(pattern.format(r"PostgreSQL [\d.]+ \+ Redis [\d.]+"), lines[-1]), lines
    assert any("goal <= 3" in line for line in lines)


@pytest.mark.e2e
@pytest.mark.integration
@pytest.mark.timeout(90)
def test_worker_scaling_runs_tiny_bursts_prints_its_final_line_and_cleans_up() -> None:
    lines = run_script(
        "benchmarks/worker_scaling.py",
        "--connections", "20", "--burst", "60", "--repeats", "1",
        timeout=80,
    )  # fmt: skip
    assert re.fullmatch(
        r"worker_scaling: 2 workers [\d.]+x one \([\d.]+ vs [\d.]+ polls/s; goal 1\.8x "
        r"(met|NOT met) on this machine\); per worker-CPU-second [\d.]+x",
        lines[-1],
    ), lines[-1]
    assert any(line.startswith("reproduce: python benchmarks/worker_scaling.py") for line in lines)
    runs = [line for line in lines if re.match(r"run \d [AB] ", line)]
    assert [line.split()[2] for line in runs] == ["A", "B"], lines
    assert all("60 of 60 in" in line for line in runs), runs
    assert any(line.startswith("throughput, B / A: ") for line in lines)
    # Everything it made is gone: its directory, its database, its processes.
    made = next(line for line in lines if line.startswith("run wscale-"))
    found = re.match(r"run (wscale-\w+) .*directory (\S+) .*database (\w+)", made)
    assert found is not None, made
    run_id, directory, database = found.groups()
    assert not Path(directory).exists()
    left = [
        p for p in Path("/proc").iterdir()
        if p.name.isdigit() and run_id.encode() in _cmdline(p)
    ]  # fmt: skip
    assert left == []
    with psycopg.connect(POSTGRES_ADMIN_URL.replace("+psycopg", ""), autocommit=True) as admin:
        row = admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,))
        assert row.fetchone() is None


def _cmdline(proc: Path) -> bytes:
    try:
        return (proc / "cmdline").read_bytes()
    except OSError:
        return b""
