"""The arithmetic of ``benchmarks/scale.py``, as pure functions over plain records.

Definitions (every time is an epoch second from the same machine clock):

* **slot** of connection ``c`` in interval ``k``: ``k * I + offset(c)``, where ``offset`` is
  ``poll_offset_seconds mod I``, exactly as ``worker.scheduler`` computes it. Beat sends
  ``hipchat.poll_connection(c, k)`` when the slot starts.
* **due**: the slots that start inside the measured window ``[t0, t1)``.
* **done**: a due slot with a poll task ``(c, k)`` that succeeded with a real poll (not
  "already polled in interval k", not "a poll is already running"), whenever it finished.
  **missed** = due - done, split by why: never seen (never sent, or still queued at the
  end), expired before it ran, failed, not finished by the end of the run, or only refused
  as a duplicate.
* **send time**: the ``task-sent`` event's time (stamped by beat), or, when beat sends polls
  without that event (it may: the event costs a PUBLISH per poll), the message's
  ``expires`` minus the interval: beat sends every poll with ``expires=interval``, which
  Celery turns into send time + interval (carried by ``task-received``).
* **beat drift**: send time minus the slot (how late beat sent it); **start lag**:
  ``task-started`` minus the slot; **queue wait**: ``task-started`` minus the send time.
  ``task-started`` is stamped by the worker's main process when a pool process accepts the
  task.
* **CPU per poll**: CPU a process used in the window divided by the real polls that
  finished in it; transactions and commands per poll likewise.
* **detection latency**: the webhook's arrival at the receiver minus the message's date in
  the emulator (both this machine's clock). **ideal**: the time from that date to the
  connection's next slot, what a poll exactly on time at no cost would give.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from benchmarks.bench_support import fmt_ms, fmt_s, percentile
from benchmarks.scale_observe import (
    BROKER,
    EVENTS,
    PROJECT,
    PROJECT_LUA,
    CommandSample,
    TaskRecord,
)

NOT_A_POLL = ("already polled", "already running")
STACK = ("worker", "beat", "PostgreSQL backends", "redis-server")


def slot_start(index: int, interval: float, offset: float) -> float:
    return index * interval + offset


def next_slot(at: float, interval: float, offset: float) -> float:
    """The first slot strictly after ``at``."""
    return (math.floor((at - offset) / interval) + 1) * interval + offset


def due_slots(
    offsets: Mapping[int, float], interval: float, t0: float, t1: float
) -> list[tuple[int, int, float]]:
    """(connection, interval index, slot start) of every slot in ``[t0, t1)``."""
    found = []
    for conn, offset in offsets.items():
        k = math.ceil((t0 - offset) / interval)
        while (start := slot_start(k, interval, offset)) < t1:
            found.append((conn, k, start))
            k += 1
    return found


def sent_at(task: TaskRecord, interval: float) -> float | None:
    """When beat sent the task: its task-sent event, else its expiry minus the interval."""
    if task.sent is not None:
        return task.sent
    return task.expires - interval if task.expires is not None else None


def is_real_poll(task: TaskRecord) -> bool:
    return task.state == "task-succeeded" and not any(x in task.result for x in NOT_A_POLL)


def poll_key(task: TaskRecord) -> tuple[int, int] | None:
    if len(task.args) >= 2 and isinstance(task.args[0], int) and isinstance(task.args[1], int):
        return task.args[0], task.args[1]
    return None


@dataclass
class PollStats:
    due: int = 0
    done: int = 0
    not_seen: int = 0
    expired: int = 0
    failed: int = 0
    unfinished: int = 0
    refused_only: int = 0  # every task of the slot answered "already polled/running"
    late: int = 0  # done, but started after the slot's interval had ended
    duplicates: int = 0  # tasks refused as a second poll of a slot (any slot)
    sent_from_expires: int = 0  # send times taken from the expiry (no task-sent event)
    drift: list[float] = field(default_factory=list)
    start_lag: list[float] = field(default_factory=list)
    queue_wait: list[float] = field(default_factory=list)

    @property
    def missed(self) -> int:
        return self.due - self.done


def poll_stats(
    tasks: Iterable[TaskRecord], slots: Sequence[tuple[int, int, float]], interval: float
) -> PollStats:
    by_slot: dict[tuple[int, int], list[TaskRecord]] = defaultdict(list)
    stats = PollStats(due=len(slots))
    for task in tasks:
        key = poll_key(task)
        if key is not None:
            by_slot[key].append(task)
            if task.state == "task-succeeded" and not is_real_poll(task):
                stats.duplicates += 1
    for conn, k, start in slots:
        mine = by_slot.get((conn, k), [])
        sent = [x for t in mine if (x := sent_at(t, interval)) is not None]
        if sent:
            stats.drift.append(min(sent) - start)
            stats.sent_from_expires += all(t.sent is None for t in mine)
        done = [t for t in mine if is_real_poll(t)]
        if done:
            stats.done += 1
            task = done[0]
            if task.started is not None:
                stats.start_lag.append(task.started - start)
                if (at := sent_at(task, interval)) is not None:
                    stats.queue_wait.append(task.started - at)
                if task.started >= start + interval:
                    stats.late += 1
        elif not mine:
            stats.not_seen += 1
        elif any(t.expired for t in mine):
            stats.expired += 1
        elif any(t.state == "task-failed" for t in mine):
            stats.failed += 1
        elif any(t.state is None or t.state == "task-retried" for t in mine):
            stats.unfinished += 1
        else:
            stats.refused_only += 1
    return stats


def polls_finished_in(tasks: Iterable[TaskRecord], t0: float, t1: float) -> int:
    """Real polls that finished inside ``[t0, t1)``: the divisor of every per-poll figure
    measured over that window (CPU, transactions, commands)."""
    return sum(
        1 for t in tasks if is_real_poll(t) and t.finished is not None and t0 <= t.finished < t1
    )


@dataclass(frozen=True)
class Post:
    seq: int
    connection_id: int
    at: float  # when the benchmark sent it (the message's date is taken from the payload)


@dataclass
class Detection:
    posted: int = 0
    delivered: int = 0
    duplicates: int = 0
    latency: list[float] = field(default_factory=list)
    ideal: list[float] = field(default_factory=list)
    excess: list[float] = field(default_factory=list)

    @property
    def undelivered(self) -> int:
        return self.posted - self.delivered


def message_seq(text: str) -> int | None:
    """The sequence number of a benchmark message (``"scale <seq>"``)."""
    head, _, tail = text.partition(" ")
    return int(tail) if head == "scale" and tail.isdigit() else None


def detection(
    posts: Sequence[Post],
    arrivals: Iterable[tuple[float, dict[str, object]]],
    offsets: Mapping[int, float],
    interval: float,
) -> Detection:
    """``arrivals``: (arrival time, webhook payload). Only ``posts`` count; a repeat of the
    same message is counted as a duplicate, its first arrival as the detection."""
    wanted = {p.seq: p for p in posts}
    found = Detection(posted=len(posts))
    seen: set[int] = set()
    for at, payload in sorted(arrivals, key=lambda x: x[0]):
        item = payload.get("item")
        message = item.get("message") if isinstance(item, dict) else None
        if not isinstance(message, dict):
            continue
        seq = message_seq(str(message.get("message", "")))
        if seq is None or seq not in wanted:
            continue
        if seq in seen:
            found.duplicates += 1
            continue
        seen.add(seq)
        posted = datetime.fromisoformat(str(message["date"])).timestamp()
        ideal = next_slot(posted, interval, offsets[wanted[seq].connection_id]) - posted
        found.delivered += 1
        found.latency.append(at - posted)
        found.ideal.append(ideal)
        found.excess.append(at - posted - ideal)
    return found


def commandstats_delta(before: Mapping[str, int], after: Mapping[str, int]) -> dict[str, int]:
    """Calls per command between two ``INFO commandstats`` (our own ``info`` left out)."""
    delta = {cmd: after.get(cmd, 0) - before.get(cmd, 0) for cmd in after}
    return {cmd: n for cmd, n in delta.items() if n > 0 and cmd != "info"}


# -- the report ---------------------------------------------------------------------------------


@dataclass
class LevelResult:
    connections: int
    interval: float
    window: float
    polls: PollStats
    polls_in_window: int
    detect: Detection
    cpu: dict[str, float]
    rss: dict[str, int]
    xacts: tuple[int, int]
    commands: dict[str, int]
    calls: int
    sample: CommandSample | None
    sample_polls: int
    sample_calls: int
    warmup_seconds: float
    warmup_note: str
    setup_seconds: float
    backends: int
    posts_failed: int
    event_errors: int
    bad_signatures: int
    machine_after: str
    versions: str

    def per_poll(self, value: float) -> float:
        return value / self.polls_in_window if self.polls_in_window else math.nan

    @property
    def stack_cpu(self) -> float:
        return sum(self.cpu.get(name, 0.0) for name in STACK)


def _mb(value: int) -> str:
    return f"{value / 2**20:.0f}"


def report(r: LevelResult) -> list[str]:
    p, d = r.polls, r.detect
    sent_from = (
        "sent from task-sent events"
        if not p.sent_from_expires
        else f"sent from expires - interval for {p.sent_from_expires} of {len(p.drift)}"
    )
    lines = [
        f"### {r.connections} connections, interval {r.interval:g} s, window {r.window:.0f} s",
        "",
        f"setup {r.setup_seconds:.0f} s, warm-up {r.warmup_seconds:.0f} s"
        + (f" ({r.warmup_note})" if r.warmup_note else ""),
        f"polls: due {p.due}, done {p.done}, missed {p.missed} (never seen {p.not_seen}, "
        f"expired {p.expired}, failed {p.failed}, unfinished {p.unfinished}, "
        f"refused as duplicates only {p.refused_only}); started after their interval "
        f"{p.late}; duplicate tasks refused {p.duplicates}",
        f"beat drift (sent - slot; {sent_from}) ms: p50 {fmt_ms(percentile(p.drift, 50))}, "
        f"p99 {fmt_ms(percentile(p.drift, 99))}, max {fmt_ms(max(p.drift, default=math.nan))}",
        f"start lag (task-started - slot) ms: p50 {fmt_ms(percentile(p.start_lag, 50))}, "
        f"p99 {fmt_ms(percentile(p.start_lag, 99))}",
        f"queue wait (task-started - sent) ms: p50 {fmt_ms(percentile(p.queue_wait, 50))}, "
        f"p95 {fmt_ms(percentile(p.queue_wait, 95))}, p99 {fmt_ms(percentile(p.queue_wait, 99))}",
        f"detection (webhook arrival - message date) s: p50 {fmt_s(percentile(d.latency, 50))}, "
        f"p99 {fmt_s(percentile(d.latency, 99))}; ideal (to the next slot) p50 "
        f"{fmt_s(percentile(d.ideal, 50))}, p99 {fmt_s(percentile(d.ideal, 99))}; "
        f"latency - ideal p50 {fmt_s(percentile(d.excess, 50))}, "
        f"p99 {fmt_s(percentile(d.excess, 99))}; {d.delivered} of {d.posted} messages "
        f"delivered, {d.duplicates} duplicates, {r.posts_failed} posts failed, "
        f"{r.bad_signatures} bad signatures",
        f"real polls finished in the window: {r.polls_in_window}; HipChat calls per poll "
        f"{r.per_poll(r.calls):.2f}"
        + (
            f"; WARNING: the task-event listener lost its connection {r.event_errors} times "
            "(events lost: poll counts are low)"
            if r.event_errors
            else ""
        ),
        "",
        "| process | CPU s in window | cores | CPU ms per poll | RSS MB at end |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    names = [*STACK, "emulator", "benchmark (this process)"]
    for name in names:
        cpu = r.cpu.get(name, 0.0)
        label = f"{name} ({r.backends} seen)" if name == "PostgreSQL backends" else name
        lines.append(
            f"| {label} | {cpu:.1f} | {cpu / r.window:.2f} | {r.per_poll(cpu) * 1000:.2f} "
            f"| {_mb(r.rss.get(name, 0))} |"
        )
    lines.append(
        f"| **stack (worker + beat + PostgreSQL + Redis)** | {r.stack_cpu:.1f} "
        f"| {r.stack_cpu / r.window:.2f} | **{r.per_poll(r.stack_cpu) * 1000:.2f}** | |"
    )
    commits, rollbacks = r.xacts
    total_cmds = sum(r.commands.values())
    top = sorted(r.commands.items(), key=lambda x: -x[1])[:8]
    lines += [
        "",
        f"PostgreSQL transactions per poll: {r.per_poll(commits + rollbacks):.1f} "
        f"({commits} commits, {rollbacks} rollbacks in the window)",
        f"Redis commands per poll (INFO commandstats, Lua's included): "
        f"{r.per_poll(total_cmds):.1f}; by command: "
        + ", ".join(f"{cmd} {r.per_poll(k):.1f}" for cmd, k in top),
    ]
    if r.sample is not None and r.sample_polls:
        s = r.sample
        per = 1 / r.sample_polls
        calls = r.sample_calls * per
        ours = (s.total(PROJECT) + s.total(PROJECT_LUA)) * per
        lines.append(
            f"MONITOR sample ({s.seconds:g} s after the window, {r.sample_polls} polls, "
            f"{calls:.2f} HipChat calls per poll), commands per poll: project "
            f"{s.total(PROJECT) * per:.1f} sent + {s.total(PROJECT_LUA) * per:.1f} inside Lua "
            f"= {ours:.1f} (goal: at most 4 per call + 3 = {4 * calls + 3:.1f}); Celery "
            f"broker {s.total(BROKER) * per:.1f}; task events {s.total(EVENTS) * per:.1f}"
        )
        for who in (PROJECT, PROJECT_LUA, BROKER, EVENTS):
            top_who = ", ".join(f"{c} {k * per:.2f}" for c, k in s.top(who))
            lines.append(f"  {who}: {top_who or '-'}")
    lines.append(f"{r.versions}; machine after the level: {r.machine_after}")
    return lines


def summary(results: list[LevelResult]) -> list[str]:
    lines = [
        "| connections | due | missed | beat drift p50/p99 ms | queue wait p50/p95 ms "
        "| detection p50/p99 s (ideal p50/p99) | stack CPU ms/poll | stack cores "
        "| PG xact/poll | Redis cmds/poll |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        p, d = r.polls, r.detect
        lines.append(
            f"| {r.connections:,} | {p.due} | {p.missed} "
            f"| {fmt_ms(percentile(p.drift, 50))} / {fmt_ms(percentile(p.drift, 99))} "
            f"| {fmt_ms(percentile(p.queue_wait, 50))} / {fmt_ms(percentile(p.queue_wait, 95))} "
            f"| {fmt_s(percentile(d.latency, 50))} / {fmt_s(percentile(d.latency, 99))} "
            f"({fmt_s(percentile(d.ideal, 50))} / {fmt_s(percentile(d.ideal, 99))}) "
            f"| {r.per_poll(r.stack_cpu) * 1000:.2f} | {r.stack_cpu / r.window:.2f} "
            f"| {r.per_poll(sum(r.xacts)):.1f} | {r.per_poll(sum(r.commands.values())):.1f} |"
        )
    return lines


def final_line(r: LevelResult) -> str:
    """The one line to compare runs by; the detection p99 is over the delivered messages, so
    undelivered ones are named after it."""
    d = r.detect
    lost = f" ({d.undelivered} of {d.posted} messages never delivered)" if d.undelivered else ""
    return (
        f"scale: {r.connections} connections, {r.polls.missed} missed, "
        f"{r.per_poll(r.stack_cpu) * 1000:.1f} ms CPU per poll, "
        f"detection p99 {fmt_s(percentile(d.latency, 99))} s{lost}"
    )
