"""Helpers for the end-to-end tests (``tests/test_e2e.py``): real processes, real sockets.

* :class:`WebhookReceiver`: an HTTP server in the test process recording every POST and
  checking its HMAC signature.
* :class:`RedisMonitor`: ``MONITOR`` on a raw socket, keeping every command sent to one
  database: the broker messages exactly as they were written, and the Celery events
  (``task-received``, ``task-started``, ``task-succeeded``) that Flower would show.
* :class:`Service`: one ``hipchat-poller worker|beat`` subprocess with its log file, stopped
  with SIGTERM and killed (its own process group only) if it does not stop in time.
* :func:`max_calls_in_window`: the largest number of calls in any sliding window.
* :func:`hipchat_poller`: one ``hipchat-poller`` command, as a user types it.
"""

from __future__ import annotations

import base64
import bisect
import contextlib
import hashlib
import hmac
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

SIGNATURE_HEADER = "X-HipChat-Poller-Signature"


def max_calls_in_window(times: Iterable[float], window: float) -> tuple[int, float | None]:
    """(n, start): the most calls in any half-open window ``[start, start + window)``."""
    ordered = sorted(times)
    best, best_start = 0, None
    for i, start in enumerate(ordered):
        n = bisect.bisect_left(ordered, start + window) - i
        if n > best:
            best, best_start = n, start
    return best, best_start


# -- the webhook receiver -----------------------------------------------------------------------
@dataclass(frozen=True)
class Delivery:
    path: str
    headers: dict[str, str]
    body: bytes
    signature_ok: bool | None  # None: no secret is known for this path
    at: float
    status: int = 200  # what the receiver answered

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def idempotency_key(self) -> str | None:
        return self.headers.get("idempotency-key")


class WebhookReceiver:
    """``receiver.url("/t2")`` is a webhook URL; ``receiver.secret_for("/t2", s)`` makes the
    receiver check the ``sha256=<hmac>`` signature of every POST to that path."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._deliveries: list[Delivery] = []
        self._secrets: dict[str, str] = {}
        self._failures: dict[str, list[int]] = {}
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                status = receiver._record(
                    self.path, {k.lower(): v for k, v in self.headers.items()}, body
                )
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def start(self) -> WebhookReceiver:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}{path}"

    def secret_for(self, path: str, secret: str) -> None:
        with self._lock:
            self._secrets[path] = secret

    def fail_next(self, path: str, *statuses: int) -> None:
        """Answer the next POSTs to ``path`` with these statuses (then 200 again)."""
        with self._lock:
            self._failures.setdefault(path, []).extend(statuses)

    def _record(self, path: str, headers: dict[str, str], body: bytes) -> int:
        with self._lock:
            secret = self._secrets.get(path)
            failures = self._failures.get(path)
            status = failures.pop(0) if failures else 200
        ok = None
        if secret is not None:
            expected = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
            ok = hmac.compare_digest(expected, headers.get(SIGNATURE_HEADER.lower(), ""))
        delivery = Delivery(path, headers, body, ok, time.time(), status)
        with self._lock:
            self._deliveries.append(delivery)
        return status

    def deliveries(self, path: str | None = None, *, accepted_only: bool = True) -> list[Delivery]:
        """What was POSTed (to ``path``); by default only what the receiver accepted (2xx)."""
        with self._lock:
            return [
                d
                for d in self._deliveries
                if (path is None or d.path == path) and (not accepted_only or d.status < 300)
            ]


# -- Redis: what is sent to it ----------------------------------------------------------------
_ESCAPES = {ord("n"): b"\n", ord("r"): b"\r", ord("t"): b"\t", ord("a"): b"\a", ord("b"): b"\b"}


def parse_monitor_line(line: bytes) -> tuple[float, int, list[bytes]] | None:
    """``+1700000000.1 [11 127.0.0.1:5000] "LPUSH" "q" "..."`` -> (time, db, [LPUSH, q, ...]).

    Redis writes every argument quoted, with ``\\\\``, ``\\"``, ``\\n``... and ``\\xHH``."""
    if not line.startswith(b"+") or b" [" not in line:
        return None
    stamp, _, rest = line[1:].partition(b" [")
    where, _, rest = rest.partition(b"] ")
    try:
        at, db = float(stamp), int(where.split(b" ", 1)[0])
    except ValueError:
        return None
    args: list[bytes] = []
    i, n = 0, len(rest)
    while i < n:
        if rest[i] != ord('"'):
            i += 1
            continue
        i += 1
        out = bytearray()
        while i < n and rest[i] != ord('"'):
            c = rest[i]
            if c == ord("\\") and i + 1 < n:
                nxt = rest[i + 1]
                if nxt == ord("x") and i + 3 < n:
                    out.append(int(rest[i + 2 : i + 4], 16))
                    i += 4
                    continue
                out += _ESCAPES.get(nxt, bytes([nxt]))
                i += 2
                continue
            out.append(c)
            i += 1
        args.append(bytes(out))
        i += 1
    return at, db, args


def kombu_payload(raw: bytes) -> tuple[dict[str, Any], bytes] | None:
    """A kombu message as stored in Redis -> (its envelope, its decoded body), or None."""
    try:
        message = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(message, dict) or "body" not in message:
        return None
    body = message["body"]
    if message.get("properties", {}).get("body_encoding") == "base64":
        body = base64.b64decode(body)
    elif isinstance(body, str):
        body = body.encode()
    return message, body


@dataclass(frozen=True)
class TaskEvent:
    type: str
    uuid: str
    timestamp: float
    fields: dict[str, Any]


@dataclass
class TaskRun:
    uuid: str
    name: str | None = None
    args: str | None = None
    hostname: str | None = None
    started: float | None = None
    finished: float | None = None
    result: str | None = None
    state: str | None = None
    sent_by: list[str] = field(default_factory=list)  # hostname of each task-sent event


class RedisMonitor:
    """``MONITOR`` on a raw socket, in a thread. Keeps the commands sent to ``db`` (parsed) and
    writes them to ``log_path``; decodes the broker messages and the Celery task events."""

    def __init__(self, host: str, port: int, db: int, log_path: Path) -> None:
        self.db = db
        self._sock = socket.create_connection((host, port), timeout=5)
        self._sock.sendall(b"MONITOR\r\n")
        self._sock.settimeout(None)
        self._log = log_path.open("wb")
        self._lock = threading.Lock()
        self.commands: list[tuple[float, list[bytes]]] = []
        self.messages: list[tuple[str, dict[str, Any], bytes]] = []  # (command, envelope, body)
        self.events: list[TaskEvent] = []
        self._stop = False
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, name="redis-monitor", daemon=True)

    def start(self) -> RedisMonitor:
        self._thread.start()
        if not self._started.wait(5):
            raise AssertionError("Redis MONITOR did not answer OK")
        return self

    def stop(self) -> None:
        self._stop = True
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._thread.join(timeout=5)
        self._sock.close()
        self._log.close()

    def _run(self) -> None:
        buffer = b""
        prefix = f" [{self.db} ".encode()
        while not self._stop:
            try:
                chunk = self._sock.recv(1 << 16)
            except OSError:
                break
            if not chunk:
                break
            buffer += chunk
            *lines, buffer = buffer.split(b"\r\n")
            for line in lines:
                if line == b"+OK":
                    self._started.set()
                    continue
                if prefix not in line[:40]:
                    continue
                self._log.write(line + b"\n")
                parsed = parse_monitor_line(line)
                if parsed is not None:
                    self._keep(parsed[0], parsed[2])
        self._log.flush()

    def _keep(self, at: float, args: list[bytes]) -> None:
        if not args:
            return
        command = args[0].decode(errors="replace").upper()
        with self._lock:
            self.commands.append((at, args))
        if command not in ("LPUSH", "RPUSH", "PUBLISH", "HSET", "ZADD") or len(args) < 3:
            return
        for raw in args[2:]:
            decoded = kombu_payload(raw)
            if decoded is None:
                continue
            envelope, body = decoded
            with self._lock:
                self.messages.append((command, envelope, body))
            if command == "PUBLISH" and b"celeryev" in args[1]:
                self._keep_events(body)

    def _keep_events(self, body: bytes) -> None:
        try:
            data = json.loads(body)
        except ValueError:
            return
        for event in data if isinstance(data, list) else [data]:
            if isinstance(event, dict) and str(event.get("type", "")).startswith("task-"):
                with self._lock:
                    self.events.append(
                        TaskEvent(
                            event["type"],
                            str(event.get("uuid")),
                            float(event.get("timestamp") or 0),
                            event,
                        )
                    )

    # -- views --------------------------------------------------------------------------------
    def task_runs(self, name: str | None = None) -> list[TaskRun]:
        """Task executions as the events describe them (one per uuid, retries merged)."""
        with self._lock:
            events = list(self.events)
        runs: dict[str, TaskRun] = {}
        for ev in sorted(events, key=lambda e: e.timestamp):
            run = runs.setdefault(ev.uuid, TaskRun(ev.uuid))
            f = ev.fields
            if ev.type in ("task-sent", "task-received"):
                run.name = run.name or f.get("name")
                run.args = run.args or f.get("args")
            if ev.type == "task-sent":
                run.sent_by.append(str(f.get("hostname")))
            if ev.type == "task-received":
                run.hostname = f.get("hostname")
            elif ev.type == "task-started":
                run.started = ev.timestamp
                run.hostname = f.get("hostname") or run.hostname
            elif ev.type in ("task-succeeded", "task-failed", "task-retried", "task-rejected"):
                run.finished = ev.timestamp
                run.state = ev.type
                run.result = str(f.get("result", f.get("exception", "")))
        return [r for r in runs.values() if name is None or r.name == name]

    def decoded_messages(self) -> list[tuple[str, dict[str, Any], bytes]]:
        with self._lock:
            return list(self.messages)

    def raw_log(self) -> bytes:
        self._log.flush()
        return Path(self._log.name).read_bytes()


# -- processes ------------------------------------------------------------------------------
HIPCHAT_POLLER = str(Path(sys.executable).parent / "hipchat-poller")


def hipchat_poller(
    args: Iterable[str], *, env: dict[str, str], cwd: Path, stdin: str | None = None
) -> str:
    """Run ``hipchat-poller ARGS``; its output, or an assertion error showing it."""
    argv = [HIPCHAT_POLLER, *args]
    done = subprocess.run(
        argv, input=stdin, env=env, cwd=cwd, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, f"{argv[1:]} exited {done.returncode}:\n{done.stdout}{done.stderr}"
    return done.stdout


@dataclass
class Service:
    """One long-running ``hipchat-poller`` subprocess writing to its own log file."""

    name: str
    argv: list[str]
    env: dict[str, str]
    cwd: Path
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    returncode: int | None = None
    _log: Any = field(default=None, repr=False)
    _terminated: bool = field(default=False, repr=False)

    def start(self) -> Service:
        self._log = self.log_path.open("ab")
        self._terminated = False
        self.proc = subprocess.Popen(
            self.argv,
            env=self.env,
            cwd=self.cwd,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: we can end it and its children
        )
        return self

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def terminate(self) -> None:
        """Ask it to stop (SIGTERM) without waiting: several services stop in parallel. Sent
        once: a second SIGTERM during Celery's warm shutdown makes it wait for the timeout."""
        if self.proc is not None and self.proc.poll() is None and not self._terminated:
            self._terminated = True
            self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM (Celery's warm shutdown), then SIGKILL to its process group."""
        proc = self.proc
        if proc is None or self.returncode is not None:  # never started, or already stopped
            return self.returncode
        stopped = False
        try:
            self.terminate()
            proc.wait(timeout=timeout)
            stopped = True
        except subprocess.TimeoutExpired:
            pass
        if not stopped or proc.returncode != 0:
            # It did not stop in time, or it died: end it and any pool child left behind.
            # The group is the one start_new_session gave it (its pgid is its pid).
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):  # the kernel will reap it
            proc.wait(timeout=10)
        self.returncode = proc.returncode
        if self._log is not None:
            self._log.close()
            self._log = None
        return self.returncode


def tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:])
