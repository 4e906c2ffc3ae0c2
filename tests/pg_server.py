"""A PostgreSQL cluster of a test's own, for tests that stop the database under the workers.

The machine's PostgreSQL is shared by every suite and must never be stopped, so a test that
takes the database away makes its own::

    with PostgresServer() as pg:
        url = pg.create_database("faults")  # postgresql+psycopg://postgres@127.0.0.1:PORT/faults
        pg.stop()   # every connection is cut (fast shutdown)
        pg.start()  # same port, same data

``initdb`` refuses to run as root, so under root the cluster belongs to the ``postgres`` OS
user: its directory is made with ``tempfile.mkdtemp`` (pytest's own temporary directories are
private to root) and handed to that user, and ``initdb`` and ``pg_ctl`` run as that user.
Authentication is ``trust`` on 127.0.0.1 only; ``fsync`` is off (the data is thrown away).
The server's log is ``<directory>/postgres.log``.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Any

from tests.redis_server import HOST, free_port

OS_USER = "postgres"  # who owns the cluster when the tests run as root
START_TIMEOUT_SECONDS = 60
SERVER_OPTIONS = "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"


def bin_dir() -> Path:
    """Where ``initdb`` and ``pg_ctl`` are: on PATH, else the newest /usr/lib/postgresql/N."""
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).parent
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"),
        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0,
    )
    if not candidates:
        raise AssertionError("PostgreSQL's server binaries (initdb, pg_ctl) are not installed")
    return Path(candidates[-1]).parent


class PostgresServer:
    """``initdb`` at the first :meth:`start`, then ``pg_ctl start``/``stop`` on one port."""

    def __init__(self) -> None:
        self.bin = bin_dir()
        self.directory = Path(tempfile.mkdtemp(prefix="hp-pg-"))
        self.data_dir = self.directory / "data"
        self.log_path = self.directory / "postgres.log"
        self.port: int | None = None
        self._as_user = OS_USER if os.geteuid() == 0 else None
        if self._as_user is not None:
            owner = pwd.getpwnam(self._as_user)
            os.chown(self.directory, owner.pw_uid, owner.pw_gid)

    def admin_url(self, database: str = "postgres") -> str:
        """A psycopg (libpq) URL of ``database`` as the superuser ``postgres``."""
        if self.port is None:
            raise RuntimeError("the server has not been started")
        return f"postgresql://postgres@{HOST}:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """Create ``name``; the SQLAlchemy URL of it (``postgresql+psycopg://...``)."""
        import psycopg

        with psycopg.connect(self.admin_url(), autocommit=True, connect_timeout=5) as admin:
            admin.execute(f'CREATE DATABASE "{name}"')
        return self.admin_url(name).replace("postgresql://", "postgresql+psycopg://", 1)

    # -- life cycle ---------------------------------------------------------------------------
    def start(self) -> PostgresServer:
        """Start (``initdb`` first, the first time) and wait until it accepts connections."""
        if not self.data_dir.exists():
            self._run(
                "initdb",
                "-D", str(self.data_dir),
                "-A", "trust",
                "-U", "postgres",
                "-E", "UTF8",
                "--no-sync",
            )  # fmt: skip
        self.port = self.port or free_port()
        options = f"-p {self.port} -k {self.directory} -c listen_addresses={HOST} {SERVER_OPTIONS}"
        self._run(
            "pg_ctl",
            "-D", str(self.data_dir),
            "-l", str(self.log_path),
            "-o", options,
            "-w", "-t", str(START_TIMEOUT_SECONDS),
            "start",
        )  # fmt: skip
        return self

    def stop(self, mode: str = "fast") -> None:
        """``pg_ctl stop -m fast``: open sessions are cut, as when a database host goes away."""
        if self.port is not None and (self.data_dir / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", str(self.data_dir), "-m", mode, "-w", "stop")

    def close(self) -> None:
        """Stop it and delete its directory."""
        with contextlib.suppress(AssertionError):
            self.stop(mode="immediate")
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- details ----------------------------------------------------------------------------
    def _run(self, program: str, *args: str) -> None:
        options: dict[str, Any] = {}
        if self._as_user is not None:
            options = {"user": self._as_user, "group": self._as_user, "extra_groups": []}
        done = subprocess.run(
            [str(self.bin / program), *args],
            cwd=self.directory,
            capture_output=True,
            text=True,
            timeout=START_TIMEOUT_SECONDS + 30,
            check=False,
            **options,
        )
        if done.returncode != 0:
            raise AssertionError(
                f"{program} {args[-1]} exited {done.returncode}:\n{done.stdout}{done.stderr}\n"
                f"{self.log_tail()}"
            )

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except (FileNotFoundError, PermissionError):
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])
