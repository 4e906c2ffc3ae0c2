"""The README's main job: ``hipchat-poller demo``, and ``hipchat-poller run`` in both modes.

``run`` is started as a real process, configured the way a user does it (the CLI), against
the emulator over HTTP: once on the embedded defaults (SQLite, in-process broker and bucket)
and once with ``HIPCHAT_POLLER_REDIS_URL`` and ``HIPCHAT_POLLER_DATABASE_URL`` set, where it
must use Redis and PostgreSQL.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from celery._state import _set_task_join_will_block, task_join_will_block
from cryptography.fernet import Fernet

from emulator import EmulatorServer
from tests.e2e_support import Service, tail
from tests.redis_server import RedisServer
from tests.waiting import wait_for
from worker.demo import EXPECTED, run_demo

pytestmark = pytest.mark.e2e

BIN = Path(sys.executable).parent
TOKEN = "run-test-token"


@pytest.fixture
def worker_in_this_process() -> Iterator[None]:
    """The demo runs a Celery worker in this process, which marks the process as a worker
    (``AsyncResult.get()`` then refuses to block); the tests that follow are not workers."""
    before = task_join_will_block()
    yield
    _set_task_join_will_block(before)


@pytest.mark.usefixtures("worker_in_this_process")
def test_demo_answers_the_ping_and_shows_every_trigger() -> None:
    lines: list[str] = []
    assert run_demo(interval=1.0, timeout=90.0, out=lines.append) == 0, "\n".join(lines)
    text = "\n".join(lines)
    for event in EXPECTED:
        assert f"[{event}]" in text
    assert "[room_message] Alice Anders: \"ping hello\"  ->  sent 'pong hello' as a green" in text
    assert "pong hello answered in green: 1 time(s)" in text
    assert lines[-1] == "demo OK"


@pytest.fixture
def emulator_server() -> Iterator[EmulatorServer]:
    server = EmulatorServer(port=0, admin_token=TOKEN, rate_limit=100_000)
    server.start()
    yield server
    server.stop()


def cli(env: dict[str, str], *args: str, stdin: str | None = None) -> str:
    done = subprocess.run(
        [str(BIN / "hipchat-poller"), *args],
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert TOKEN not in done.stdout + done.stderr
    return done.stdout


def base_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HIPCHAT_POLLER_")}
    env.update(
        HIPCHAT_POLLER_DATA_DIR=str(tmp_path / "data"),
        HIPCHAT_POLLER_SECRET_KEY=Fernet.generate_key().decode(),
        HIPCHAT_POLLER_POLL_INTERVAL_SECONDS="1",
        HIPCHAT_POLLER_RELAY_INTERVAL_SECONDS="2",
        **extra,
    )
    return env


def exercise_run(env: dict[str, str], server: EmulatorServer, tmp_path: Path) -> Service:
    """Configure a ping/pong and a log trigger, start ``run``, prove events arrive once.

    A configured database (``HIPCHAT_POLLER_DATABASE_URL``) is migrated first, as the README
    says; the embedded one is created by the first command."""
    if "HIPCHAT_POLLER_DATABASE_URL" in env:
        assert cli(env, "migrate") == "database schema is up to date (postgresql)\n"
    cli(
        env,
        "connection",
        "add",
        "ops",
        "--base-url",
        server.base_url,
        "--token-stdin",
        stdin=TOKEN + "\n",
    )
    cli(
        env,
        "subscribe",
        "ops",
        "--event",
        "room_message",
        "--room",
        "General",
        "--filter",
        "^ping (.*)",
        "--reply",
        "pong {matches[0]}",
    )
    cli(env, "subscribe", "ops", "--event", "room_created", "--log")
    run = Service(
        "run",
        [
            str(
                BIN / "hipchat-poller",
            ),
            "run",
        ],
        env,
        tmp_path,
        tmp_path / "run.log",
    ).start()
    state = server.state
    history = f"/v2/room/{state.get_room('General')['id']}/history/latest"

    def polls() -> int:
        return len(state.calls(token=TOKEN, path_prefix=history))

    def log() -> str:
        return tail(run.log_text())

    wait_for(lambda: polls() >= 2, 60, "two polls of General (the first primes)", describe=log)
    state.post_message("General", "@AliceA", "ping world")
    state.create_room("Launch")

    def pongs() -> list[dict[str, object]]:
        return [m for m in state.history("General") if m.get("message") == "pong world"]

    wait_for(pongs, 60, "pong world in General", describe=log)
    wait_for(
        lambda: "event room_created" in run.log_text(),
        60,
        "the room_created log line",
        describe=log,
    )
    seen = polls()
    wait_for(lambda: polls() >= seen + 3, 60, "three more polls", describe=log)
    assert len(pongs()) == 1
    assert run.alive(), log()
    assert TOKEN not in run.log_text()
    return run


def test_run_on_embedded_defaults(tmp_path: Path, emulator_server: EmulatorServer) -> None:
    env = base_env(tmp_path)
    run = exercise_run(env, emulator_server, tmp_path)
    try:
        assert (tmp_path / "data" / "hipchat-poller.db").exists()
        assert "in-process broker and bucket" in run.log_text()
    finally:
        assert run.stop() == 0, tail(run.log_text())


def test_run_with_redis_and_postgres(
    tmp_path: Path,
    emulator_server: EmulatorServer,
    fresh_postgres: str,
    redis_server: RedisServer,
) -> None:
    prefix = f"hp-run-{uuid.uuid4().hex[:8]}"
    env = base_env(
        tmp_path,
        HIPCHAT_POLLER_REDIS_URL=redis_server.url,
        HIPCHAT_POLLER_DATABASE_URL=fresh_postgres,
        HIPCHAT_POLLER_REDIS_KEY_PREFIX=prefix,
    )
    run = None
    try:
        run = exercise_run(env, emulator_server, tmp_path)
        assert "Redis" in run.log_text()
        assert not (tmp_path / "data" / "hipchat-poller.db").exists()
        # The budget and the leases live in that Redis; the events in that PostgreSQL.
        with redis_server.client() as client:
            assert any(client.scan_iter(match=f"{prefix}:*"))
        url = fresh_postgres.replace("postgresql+psycopg://", "postgresql://")
        with psycopg.connect(url) as conn:
            states = dict(
                conn.execute(
                    "SELECT event, state FROM outbox_events WHERE event = 'room_message'"
                ).fetchall()
            )
        assert states == {"room_message": "delivered"}
    finally:
        if run is not None:
            run.stop()
