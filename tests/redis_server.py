"""A ``redis-server`` of a test's own: its own loopback port, its own directory.

Celery's broker keys have fixed names (the ``hipchat.polls`` and ``hipchat.actions`` lists,
``unacked``, ``_kombu.*``) that no key prefix reaches, so tests that start Celery processes
run them against a Redis that nothing else on the machine uses, and that they never have to
clean::

    with RedisServer(tmp_path) as server:
        client = server.client()
        server.restart()  # a Redis that lost everything, on the same port

The server is a subprocess in its own process group, started without persistence
(``--save "" --appendonly no``) unless ``appendonly=True``, with which
``restart(empty=False)`` comes back with the data. Its log is ``<directory>/redis.log``.
``options`` are more ``redis-server`` arguments (``tests/redis_cluster.py`` makes cluster
nodes with them); with ``password`` the server requires it and every client sends it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import redis

from tests.waiting import wait_for

HOST = "127.0.0.1"
START_TIMEOUT = 30.0  # seconds; an append-only file is loaded before the first PONG
STOP_TIMEOUT = 10.0


def free_port() -> int:
    """A loopback port free now (another process may take it before we bind it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


class RedisServer:
    """``redis-server`` on ``127.0.0.1``, data under ``directory / "data"``.

    The port is chosen at the first :meth:`start` and kept by :meth:`restart`, so clients
    (and Celery processes) reconnect to the new server as to a Redis that came back.
    """

    def __init__(
        self,
        directory: Path,
        *,
        appendonly: bool = False,
        executable: str = "redis-server",
        options: Sequence[str] = (),
        password: str | None = None,
    ) -> None:
        self.directory = directory
        self.data_dir = directory / "data"
        self.log_path = directory / "redis.log"
        self.appendonly = appendonly
        self.executable = executable
        self.options = list(options)
        self.password = password
        self.host = HOST
        self.port: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port>/0``."""
        if self.port is None:
            raise RuntimeError("the server has not been started")
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}{self.host}:{self.port}/0"

    def client(self, **options: Any) -> redis.Redis:
        """A new client of database 0; the caller closes it. It survives restarts."""
        return redis.Redis.from_url(self.url, socket_connect_timeout=2, **options)

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # -- life cycle -----------------------------------------------------------------------------
    def start(self) -> RedisServer:
        """Start the server and wait until it answers ``PING``.

        On the first start a port taken between its choice and the bind is chosen again."""
        if self.running():
            raise RuntimeError(f"redis-server is already running on port {self.port}")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        retries = 3 if self.port is None else 1
        for _ in range(retries):
            port = self.port if self.port is not None else free_port()
            proc = self._spawn(port)
            if self._answering(proc, port):
                self.port, self._proc = port, proc
                return self
            if "Address already in use" not in self.log_tail():
                break
        raise AssertionError(f"redis-server did not start:\n{self.log_tail()}")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it has not stopped in time (its process group only)."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            self._signal(proc, signal.SIGTERM)
            try:
                proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self._signal(proc, signal.SIGKILL)
                proc.wait(timeout=STOP_TIMEOUT)

    def restart(self, *, empty: bool = True) -> RedisServer:
        """Stop and start again on the same port; ``empty`` deletes its data files first
        (without persistence a restarted server is empty anyway)."""
        self.stop()
        if empty:
            shutil.rmtree(self.data_dir, ignore_errors=True)
        return self.start()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- details ----------------------------------------------------------------------------------
    def _spawn(self, port: int) -> subprocess.Popen[bytes]:
        argv = [
            self.executable,
            "--port", str(port),
            "--bind", self.host,
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--dir", str(self.data_dir),
            "--daemonize", "no",
            *(["--requirepass", self.password] if self.password else []),
            *self.options,
        ]  # fmt: skip
        with self.log_path.open("ab") as log:
            return subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, ended as a whole
            )

    def _answering(self, proc: subprocess.Popen[bytes], port: int) -> bool:
        """Wait until ``proc`` answers PING (True) or exits (False); ended if neither."""
        try:
            wait_for(
                lambda: self._answers(port) or proc.poll() is not None,
                START_TIMEOUT,
                f"redis-server to answer PING on port {port}",
                describe=self.log_tail,
            )
        except AssertionError:
            self._signal(proc, signal.SIGKILL)
            proc.wait(timeout=STOP_TIMEOUT)
            raise
        return proc.poll() is None

    def _answers(self, port: int) -> bool:
        client = redis.Redis(
            host=self.host,
            port=port,
            password=self.password,
            socket_connect_timeout=1,
            socket_timeout=1,
        )
        try:
            return bool(client.ping())
        except redis.RedisError:  # not listening yet, or still loading its data
            return False
        finally:
            client.close()

    @staticmethod
    def _signal(proc: subprocess.Popen[bytes], signum: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signum)

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])
