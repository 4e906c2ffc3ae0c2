"""What ``benchmarks/scale.py`` watches while the system under test runs.

* :class:`TaskEvents`: the Celery task events (``task-sent`` from beat, ``task-received``,
  ``task-started``, ``task-succeeded``, ... from the worker), the ones Flower shows, read
  from Redis pub/sub (``PSUBSCRIBE /*.celeryev/*``) in a thread: one record per task id.
  The product already publishes them (``task_send_sent_event``, ``-E``); listening adds one
  subscriber, which costs Redis one more delivery per event and nothing else.
* :class:`CpuMeter`: CPU seconds of the processes under test from ``/proc``, including the
  PostgreSQL backends serving the benchmark's database, which come and go: a sampler
  thread keeps the last figure of each.
* :func:`monitor_sample`: ``MONITOR`` for a few seconds, each command counted under who sent
  it (the project's own keys, Celery's broker, task events, or inside a Lua script).
"""

from __future__ import annotations

import ast
import base64
import contextlib
import json
import os
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg
import redis

from benchmarks.bench_support import cpu_seconds, tree_cpu_seconds
from tests.e2e_support import parse_monitor_line

POLL_TASK = "hipchat.poll_connection"


# -- Celery task events ------------------------------------------------------------------------


@dataclass
class TaskRecord:
    """One task id, as its events describe it (times are the senders' ``time.time()``)."""

    uuid: str
    name: str | None = None
    args: tuple[Any, ...] = ()
    sent: float | None = None  # the task-sent event: beat may send none (see scale_report)
    expires: float | None = None  # the message's expiry: beat sets it to send time + interval
    received: float | None = None
    started: float | None = None
    finished: float | None = None
    state: str | None = None  # the last of succeeded, failed, retried, rejected, revoked
    result: str = ""
    expired: bool = False


def _epoch(text: Any) -> float | None:
    """An ISO time with its zone (Celery's ``expires``) as epoch seconds."""
    if not isinstance(text, str) or not text:
        return None
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None


def _decode_args(text: Any) -> tuple[Any, ...]:
    if not isinstance(text, str):
        return ()
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return ()
    return tuple(value) if isinstance(value, list | tuple) else ()


class TaskEvents:
    """Every task event published on one Redis, kept per task id, from a thread."""

    def __init__(self, redis_url: str) -> None:
        self._client = redis.Redis.from_url(redis_url)
        self._pubsub = self._client.pubsub(ignore_subscribe_messages=True)
        self._pubsub.psubscribe("/*.celeryev/*")
        self._lock = threading.Lock()
        self._tasks: dict[str, TaskRecord] = {}
        self.events = 0
        self.errors = 0  # connection lost (e.g. Redis dropped a slow subscriber): events lost
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="task-events", daemon=True)

    def start(self) -> TaskEvents:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        with contextlib.suppress(redis.RedisError):
            self._pubsub.close()
        self._client.close()

    def tasks(self, name: str | None = None) -> list[TaskRecord]:
        with self._lock:
            return [t for t in self._tasks.values() if name is None or t.name == name]

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                message = self._pubsub.get_message(timeout=0.2)
            except (redis.RedisError, OSError):
                if self._stop.is_set():
                    return
                self.errors += 1
                time.sleep(0.2)
                continue
            if message is not None and message.get("type") == "pmessage":
                self._take(message["data"])

    def _take(self, raw: bytes) -> None:
        try:
            envelope = json.loads(raw)
            body = envelope["body"]
            if envelope.get("properties", {}).get("body_encoding") == "base64":
                body = base64.b64decode(body)
            data = json.loads(body)
        except (ValueError, KeyError, TypeError):
            return
        for event in data if isinstance(data, list) else [data]:
            if isinstance(event, dict) and str(event.get("type", "")).startswith("task-"):
                self._apply(event)

    def _apply(self, event: dict[str, Any]) -> None:
        kind, at = event["type"], float(event.get("timestamp") or 0.0)
        uuid = str(event.get("uuid"))
        with self._lock:
            self.events += 1
            task = self._tasks.get(uuid)
            if task is None:
                task = self._tasks[uuid] = TaskRecord(uuid)
            if kind in ("task-sent", "task-received"):
                task.name = task.name or event.get("name")
                task.args = task.args or _decode_args(event.get("args"))
                task.expires = task.expires or _epoch(event.get("expires"))
            if kind == "task-sent":
                task.sent = at if task.sent is None else min(task.sent, at)
            elif kind == "task-received":
                task.received = task.received or at
            elif kind == "task-started":
                task.started = at  # a retry starts it again: the last start counts
            elif kind in ("task-succeeded", "task-failed", "task-retried", "task-rejected"):
                task.finished, task.state = at, kind
                task.result = str(event.get("result", event.get("exception", "")))
            elif kind == "task-revoked":
                task.finished, task.state = at, kind
                task.expired = bool(event.get("expired"))


# -- CPU of the processes under test -----------------------------------------------------------


@dataclass
class _Backend:
    first: float  # CPU seconds when first seen in the window (0 if it started in it)
    last: float


@dataclass
class CpuMeter:
    """CPU seconds used between :meth:`begin` and :meth:`end` by each named process tree and
    by the PostgreSQL backends serving ``database`` (found in ``pg_stat_activity`` through
    ``admin_url``, a connection to another database so that our queries are not counted in
    the benchmark database's statistics)."""

    pids: dict[str, int]
    admin_url: str
    database: str
    self_name: str = "benchmark (this process)"
    period: float = 1.0
    used: dict[str, float] = field(default_factory=dict)
    backends_seen: int = 0
    _start: dict[str, float] = field(default_factory=dict)
    _backends: dict[int, _Backend] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def _trees(self) -> dict[str, float]:
        found = {name: tree_cpu_seconds(pid) or 0.0 for name, pid in self.pids.items()}
        found[self.self_name] = cpu_seconds(os.getpid()) or 0.0
        return found

    def _sample_backends(self, conn: psycopg.Connection[Any], *, first: bool = False) -> None:
        rows = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
            (self.database,),
        ).fetchall()
        for (pid,) in rows:
            cpu = cpu_seconds(int(pid))
            if cpu is None:
                continue
            known = self._backends.get(int(pid))
            if known is None:
                # Seen for the first time: if this is the window's start, count from now;
                # a backend born inside the window counts from zero.
                self._backends[int(pid)] = _Backend(cpu if first else 0.0, cpu)
            else:
                known.last = cpu

    def begin(self) -> None:
        self._conn = psycopg.connect(self.admin_url, autocommit=True)
        self._sample_backends(self._conn, first=True)
        self._start = self._trees()
        self._thread = threading.Thread(target=self._run, name="cpu-meter", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            with contextlib.suppress(psycopg.Error):
                self._sample_backends(self._conn)

    def end(self) -> dict[str, float]:
        """CPU seconds per process (tree) in the window; ``PostgreSQL backends`` too."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._sample_backends(self._conn)
        ended = self._trees()
        self._conn.close()
        self.used = {name: ended[name] - self._start.get(name, 0.0) for name in ended}
        self.used["PostgreSQL backends"] = sum(b.last - b.first for b in self._backends.values())
        self.backends_seen = len(self._backends)
        return self.used

    def backend_pids(self) -> list[int]:
        return list(self._backends)


# -- MONITOR: who sends which commands -------------------------------------------------------------


@dataclass
class CommandSample:
    """Commands seen by MONITOR in ``seconds``: (who, command) -> count."""

    seconds: float
    started: float
    counts: Counter[tuple[str, str]]

    def total(self, who: str | None = None) -> int:
        return sum(n for (w, _), n in self.counts.items() if who is None or w == who)

    def top(self, who: str, n: int = 6) -> list[tuple[str, int]]:
        mine = Counter({cmd: c for (w, cmd), c in self.counts.items() if w == who})
        return mine.most_common(n)


PROJECT, PROJECT_LUA, BROKER, EVENTS, OTHER_LUA = (
    "project",
    "project (inside Lua)",
    "Celery broker",
    "Celery task events",
    "other (inside Lua)",
)


def classify(source: bytes, args: list[bytes], prefix: bytes) -> str:
    """Who a MONITOR line's command belongs to: a key under the project's ``prefix`` makes it
    the project's (the budget, leases, interval claims, drain locks); a PUBLISH on a
    ``celeryev`` channel is a task event; the rest from clients is Celery's broker."""
    ours = any(a.startswith(prefix) for a in args[1:5])
    if source == b"lua":
        return PROJECT_LUA if ours else OTHER_LUA
    if ours:
        return PROJECT
    if args and args[0].upper() == b"PUBLISH" and len(args) > 1 and b"celeryev" in args[1]:
        return EVENTS
    return BROKER


def monitor_sample(
    host: str, port: int, seconds: float, prefix: str, skip: Callable[[bytes], bool]
) -> CommandSample:
    """MONITOR for ``seconds``; lines whose client address ``skip`` accepts are left out
    (this benchmark's own connections)."""
    sock = socket.create_connection((host, port), timeout=5)
    counts: Counter[tuple[str, str]] = Counter()
    key_prefix = (prefix + ":").encode()
    started = time.time()
    try:
        sock.sendall(b"MONITOR\r\n")
        buffer = b""
        deadline = time.monotonic() + seconds
        sock.settimeout(0.2)
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(1 << 18)
            except TimeoutError:
                continue
            if not chunk:
                break
            buffer += chunk
            *lines, buffer = buffer.split(b"\r\n")
            for line in lines:
                if line == b"+OK":
                    continue
                source = line.partition(b" [")[2].partition(b"]")[0].partition(b" ")[2]
                if skip(source):
                    continue
                parsed = parse_monitor_line(line)
                if parsed is None or not parsed[2]:
                    continue
                args = parsed[2]
                who = classify(source, args, key_prefix)
                counts[(who, args[0].decode(errors="replace").upper())] += 1
    finally:
        sock.close()
    return CommandSample(seconds, started, counts)
