"""Bad input gets one clear line and exit 2, and nothing is stored or sent (issue 10, item 5).
Services that cannot be reached at start get one line and exit 1 within seconds."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from emulator import EmulatorServer
from tests.cli_support import ENV_PREFIX, ROOT, TOKEN, Cli, stored
from tests.redis_server import RedisServer
from worker import cli_run
from worker.preflight import persistence_warning

BIN = Path(sys.executable).parent


def sent(server: EmulatorServer, room: str = "Factor") -> list[Any]:
    return list(server.state.history(room))


# -- arguments that are not UTF-8 --------------------------------------------------------------


def test_an_argument_that_is_not_utf8_is_refused_before_anything_is_sent(
    cli: Cli, ops: EmulatorServer
) -> None:
    # What Python makes of `post ops Factor $'caf\xe9 \xff'` in a UTF-8 locale.
    text = b"caf\xe9 \xff".decode("utf-8", "surrogateescape")

    assert cli("post", "ops", "Factor", text) == (
        2,
        "",
        "error: argument 4 is not valid UTF-8 text (check the terminal's encoding)\n",
    )
    assert sent(ops) == []


BAD = b"Caf\xe9".decode("utf-8", "surrogateescape")


@pytest.mark.parametrize(
    ("argv", "position"),
    [
        (["--room", BAD, "--log"], 6),
        (["--room", "Factor", "--filter", BAD, "--log"], 8),
        (["--room", "Factor", "--log", "--name", BAD], 9),
    ],
)
def test_a_room_filter_or_name_that_is_not_utf8_is_refused(
    cli: Cli, ops: EmulatorServer, argv: list[str], position: int
) -> None:
    code, out, err = cli("subscribe", "ops", "--event", "room_message", *argv)
    assert (code, out) == (2, "")
    assert err == (
        f"error: argument {position} is not valid UTF-8 text (check the terminal's encoding)\n"
    )
    assert stored() == []


def test_a_token_on_stdin_that_is_not_utf8_is_refused(
    cli: Cli, server: EmulatorServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"tok\xff\n"), "utf-8"))
    code, _, err = cli("connection", "add", "x", "--base-url", server.base_url, "--token-stdin")
    assert (code, err) == (2, "error: the input is not valid UTF-8 text\n")
    assert cli("connection", "list")[1].startswith("no connections")


# -- settings ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value", "error"),
    [
        ("POLL_INTERVAL_SECONDS", "nan",
         "HIPCHAT_POLLER_POLL_INTERVAL_SECONDS must be a number of seconds above 0 and at most "
         "86400 (got nan)"),
        ("DATABASE_URL", "foo://bar", "HIPCHAT_POLLER_DATABASE_URL: foo is not supported; use "
         "sqlite:///PATH or postgresql+psycopg://USER:PASSWORD@HOST/DB"),
        ("DATABASE_URL", "mysql://root:hunter2@db/app", "HIPCHAT_POLLER_DATABASE_URL: mysql is "
         "not supported; use sqlite:///PATH or postgresql+psycopg://USER:PASSWORD@HOST/DB"),
        ("LOG_LEVEL", "LOUD", "HIPCHAT_POLLER_LOG_LEVEL must be one of DEBUG, INFO, WARNING, "
         "ERROR, CRITICAL"),
    ],
)  # fmt: skip
@pytest.mark.parametrize("command", ["status", "run", "worker", "beat", "migrate"])
def test_bad_settings_stop_every_command_with_one_line(
    cli: Cli, monkeypatch: pytest.MonkeyPatch, command: str, name: str, value: str, error: str
) -> None:
    monkeypatch.setenv(ENV_PREFIX + name, value)
    monkeypatch.setenv(ENV_PREFIX + "REDIS_URL", "redis://127.0.0.1:1/0")  # worker, beat
    assert cli(command) == (2, "", f"error: {error}\n")


def test_a_budget_above_hipchats_is_warned_about_at_start(
    cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENV_PREFIX + "BUCKET_CAPACITY", "150")
    monkeypatch.setenv(ENV_PREFIX + "REDIS_URL", "redis://127.0.0.1:1/0")
    code, _, err = cli("worker")
    assert code == 1  # Redis is not there; the warning came first
    assert err.splitlines()[0] == (
        "warning: HIPCHAT_POLLER_BUCKET_CAPACITY=150 per HIPCHAT_POLLER_BUCKET_WINDOW_SECONDS=60 "
        "allows more than HipChat's 100 calls per 60 s: expect 429s"
    )


# -- the log level -------------------------------------------------------------------------------


def test_the_log_level_setting_reaches_the_command_line(data_dir: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    env |= {ENV_PREFIX + "DATA_DIR": str(data_dir / "d")}
    quiet = subprocess.run(
        [str(BIN / "hipchat-poller"), "connection", "list"],
        env=env, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    env |= {ENV_PREFIX + "DATA_DIR": str(data_dir / "e"), ENV_PREFIX + "LOG_LEVEL": "debug"}
    loud = subprocess.run(
        [str(BIN / "hipchat-poller"), "connection", "list"],
        env=env, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert "creating the database schema" not in quiet.stderr
    assert "DEBUG worker.schema_check: creating the database schema" in loud.stderr


@pytest.mark.parametrize(
    ("argv", "level"),
    [
        (["worker"], "WARNING"),  # the setting
        (["--log-level", "ERROR", "worker"], "ERROR"),  # our option wins
        (["worker", "--loglevel", "DEBUG"], None),  # Celery's own wins
        (["beat"], "WARNING"),
    ],
)
def test_worker_and_beat_get_the_log_level_setting(
    cli: Cli, monkeypatch: pytest.MonkeyPatch, argv: list[str], level: str | None
) -> None:
    monkeypatch.setenv(ENV_PREFIX + "LOG_LEVEL", "WARNING")
    monkeypatch.setenv(ENV_PREFIX + "REDIS_URL", "redis://127.0.0.1:1/0")
    calls: list[list[str]] = []
    monkeypatch.setattr(cli_run, "services_ready", lambda settings, upgrade=False: [])
    monkeypatch.setattr(cli_run, "_celery", lambda command, options: calls.append(options) or 0)
    assert cli(*argv)[0] == 0
    [options] = calls
    if level is None:
        assert options == ["--loglevel", "DEBUG"]
    else:
        assert options[-2:] == ["--loglevel", level]


def test_workers_get_distinct_node_names_unless_one_is_given(
    cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Celery's default ``celery@HOST`` is one name for every worker of a host: Flower would
    show two workers as one."""
    started: list[list[str]] = []

    class FakeCelery:
        @staticmethod
        def main(args: list[str], **_: Any) -> None:
            started.append(args)
            raise SystemExit(0)

    monkeypatch.setenv(ENV_PREFIX + "REDIS_URL", "redis://127.0.0.1:1/0")
    monkeypatch.setattr(cli_run, "services_ready", lambda settings, upgrade=False: [])
    monkeypatch.setattr("celery.bin.celery.celery", FakeCelery)
    assert cli("worker")[0] == 0
    assert cli("worker", "-n", "mine@%h")[0] == 0
    assert cli("worker", "--hostname=other@%h")[0] == 0
    names = [args[args.index("-n") + 1] if "-n" in args else None for args in started]
    assert names == [f"hipchat-{os.getpid()}@%h", "mine@%h", None]
    assert "--hostname=other@%h" in started[2]


@pytest.mark.parametrize(
    "options", [["-P", "gevent"], ["-Peventlet"], ["--pool", "gevent"], ["--pool=eventlet"]]
)
def test_green_thread_pools_are_refused_with_a_reason(
    cli: Cli, monkeypatch: pytest.MonkeyPatch, options: list[str]
) -> None:
    started: list[list[str]] = []
    monkeypatch.setattr(cli_run, "_celery", lambda command, opts: started.append(opts) or 0)
    code, out, err = cli("worker", "--concurrency", "4", *options)
    assert (code, out, started) == (2, "", [])
    assert err.startswith("error: `-P ")
    assert "use `-P threads --concurrency N`" in err


def test_start_up_warnings_are_printed_and_do_not_stop_the_worker(
    cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENV_PREFIX + "REDIS_URL", "redis://127.0.0.1:1/0")
    monkeypatch.setattr(
        cli_run, "services_ready", lambda settings, upgrade=False: ["Redis has no persistence"]
    )
    monkeypatch.setattr(cli_run, "_celery", lambda command, options: 0)
    assert cli("worker") == (0, "", "warning: Redis has no persistence\n")


def test_redis_without_persistence_is_warned_about(redis_server: RedisServer) -> None:
    client = redis_server.client(decode_responses=True)
    client.config_set("appendonly", "no")
    client.config_set("save", "")
    warning = persistence_warning(client)
    assert warning is not None
    assert warning.startswith("Redis has no persistence")
    assert "--appendonly yes" in warning
    client.config_set("save", "3600 1")
    assert persistence_warning(client) is None  # snapshots are persistence
    client.config_set("save", "")
    client.config_set("appendonly", "yes")
    assert persistence_warning(client) is None


def test_a_redis_that_refuses_config_is_not_warned_about() -> None:
    class ManagedRedis(redis.Redis):
        def config_get(self, *args: Any, **kwargs: Any) -> Any:
            raise redis.ResponseError("unknown command 'CONFIG'")

    assert persistence_warning(ManagedRedis(host="127.0.0.1", port=1)) is None


# -- services that are not there at start ---------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed again when the block ends


@pytest.mark.parametrize(
    ("command", "env", "error"),
    [
        ("run", {"REDIS_URL": "redis://127.0.0.1:{port}/0"},
         "error: Redis unavailable during PING for start-up: ConnectionError: Error 111 "
         "connecting to 127.0.0.1:{port}. Connection refused."),
        ("worker", {"REDIS_URL": "redis://127.0.0.1:{port}/0"}, "error: Redis unavailable"),
        ("beat", {"REDIS_URL": "redis://127.0.0.1:{port}/0"}, "error: Redis unavailable"),
        ("worker", {"DATABASE_URL": "postgresql+psycopg://u:hunter2@127.0.0.1:{port}/db"},
         "error: database unavailable: connection failed: connection to server at "
         "\"127.0.0.1\", port {port} failed: Connection refused"),
        ("beat", {"BROKER_URL": "amqp://guest:hunter2@127.0.0.1:{port}//"},
         "error: the broker at amqp://127.0.0.1:{port} cannot be reached: [Errno 111] "
         "Connection refused"),
    ],
)  # fmt: skip
def test_run_worker_and_beat_stop_at_once_when_a_service_is_not_there(
    data_dir: Path, command: str, env: dict[str, str], error: str
) -> None:
    port = _closed_port()
    environ = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    environ |= {
        ENV_PREFIX + "DATA_DIR": str(data_dir),
        ENV_PREFIX + "REDIS_URL": "redis://127.0.0.1:6379/0",
    }
    environ |= {ENV_PREFIX + k: v.format(port=port) for k, v in env.items()}
    started = time.monotonic()
    done = subprocess.run(
        [str(BIN / "hipchat-poller"), command],
        env=environ, cwd=ROOT, capture_output=True, text=True, timeout=15, check=False,
    )  # fmt: skip
    assert time.monotonic() - started < 15
    assert done.returncode == 1
    [line] = done.stderr.splitlines()
    assert line.startswith(error.format(port=port))
    assert "hunter2" not in done.stderr


# -- the emulator ---------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["emulator", "metrics"])
@pytest.mark.parametrize("port", ["99999", "-1", "http"])
def test_the_emulator_and_metrics_refuse_a_port_out_of_range(
    cli: Cli, command: str, port: str
) -> None:
    code, out, err = cli(command, "--port", port)
    assert (code, out) == (2, "")
    assert err == (
        f"error: argument --port: a port is a number within 0..65535, not {port!r} "
        f"(see `hipchat-poller {command} --help`)\n"
    )


@pytest.mark.parametrize("command", ["emulator", "metrics"])
def test_the_emulator_and_metrics_refuse_a_busy_port(cli: Cli, command: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert cli(command, "--port", str(port)) == (
            2,
            "",
            f"error: cannot listen on 127.0.0.1:{port}: Address already in use\n",
        )


# -- subscribe ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "errors"),
    [
        (["--event", "room_created", "--webhook", "https://ci.x/h", "--secret", ""],
         ["a webhook secret must not be empty (leave it out for unsigned deliveries)"]),
        (["--event", "room_created", "--log", "--color", "green"], ["--color goes with --notify"]),
        (["--event", "room_created", "--reply", "hi", "--format", "text", "--alert"],
         ["--format goes with --notify", "--alert goes with --notify"]),
        (["--event", "room_created", "--log", "--secret", "s3cret"],
         ["--secret goes with --webhook"]),
        (["--event", "room_created", "--webhook", "https://ci.x/h", "--to-room", "General"],
         ["--to-room goes with --reply or --notify"]),
        (["--event", "room_created", "--handler", "nosuchmod:fn"],
         ["handler 'nosuchmod:fn': cannot import 'nosuchmod' (ModuleNotFoundError: No module "
          "named 'nosuchmod'); is it on PYTHONPATH?"]),
        (["--event", "room_created", "--handler", "tests.handlers_example:nope"],
         ["handler 'tests.handlers_example:nope': 'tests.handlers_example' has no function "
          "'nope'"]),
        (["--event", "room_created", "--reply", "new room", "--to-room", "Nowhere"],
         ["room 'Nowhere' not found on this connection"]),
        (["--event", "room_message", "--room", "Factor", "--reply", "{item.nope}"],
         ["message template: field {item.nope} at position 0: in a room_message event, item "
          "has no 'nope'; it has message, room"]),
        (["--event", "room_message", "--room", "Factor", "--reply", "{item.mesage.message}"],
         ["message template: field {item.mesage.message} at position 0: in a room_message "
          "event, item has no 'mesage'; did you mean 'message'?"]),
        (["--event", "room_message", "--event", "room_enter", "--room", "Factor",
          "--notify", "{item.message.message}"],
         ["message template: field {item.message.message} at position 0: in a room_enter "
          "event, item has no 'message'; it has room, sender"]),
    ],
)  # fmt: skip
def test_subscribe_refuses_what_could_never_work(
    cli: Cli, ops: EmulatorServer, argv: list[str], errors: list[str]
) -> None:
    code, out, err = cli("subscribe", "ops", *argv)
    assert (code, out) == (2, "")
    assert err.splitlines() == [f"error: {e}" for e in errors]
    assert stored() == []


def test_an_empty_secret_is_not_replaced_by_the_variable(
    cli: Cli, ops: EmulatorServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENV_PREFIX + "WEBHOOK_SECRET", "from-the-environment")
    code, _, _ = cli("subscribe", "ops", "--event", "room_created", "--webhook", "https://x/h",
                     "--secret", "")  # fmt: skip
    assert code == 2
    monkeypatch.setenv(ENV_PREFIX + "WEBHOOK_SECRET", "")  # empty: no secret, as if unset
    assert cli("subscribe", "ops", "--event", "room_created", "--webhook", "https://x/h")[0] == 0
    [(_, _, _, _, _, target)] = stored()
    assert target == {"url": "https://x/h"}


def test_a_to_room_that_exists_is_accepted(cli: Cli, ops: EmulatorServer) -> None:
    code, _, err = cli("subscribe", "ops", "--event", "room_created", "--reply", "new room",
                       "--to-room", "General")  # fmt: skip
    assert code == 0, err
    assert TOKEN not in err
