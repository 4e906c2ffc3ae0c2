"""The scale and poll-cost benchmarks: their arithmetic on plain records, and a smoke run of
each script at a tiny level (real processes, a redis-server and a PostgreSQL database of their
own), which checks that they run, clean up and print their final lines."""

from __future__ import annotations

import re
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from benchmarks.bench_emulator import rooms_range
from benchmarks.bench_support import percentile
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
