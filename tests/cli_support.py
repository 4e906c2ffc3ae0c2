"""Pytest plugin: the ``hipchat-poller`` command line run in-process (``worker.cli.main``) on
embedded defaults in a temporary data directory, against the emulator over real HTTP.

* ``data_dir``: a fresh ``HIPCHAT_POLLER_DATA_DIR`` (and key, and Redis key prefix); every
  other ``HIPCHAT_POLLER_*`` variable removed.
* ``cli``: a :class:`Cli` that runs a command and returns ``(code, stdout, stderr)``; after
  the test, :data:`TOKEN` must appear in nothing it printed or logged.
* ``server``: the emulator with a token :data:`TOKEN` for its admin and a room ``Factor``.
* ``ops``: ``server`` with a connection ``ops`` to it, added through the CLI.
"""

from __future__ import annotations

import io
import json
import logging
import os
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.fernet import Fernet

from emulator import EmulatorServer
from storage import subscriptions as subs
from tasks.runtime import Runtime
from tasks.settings import Settings
from worker.cli import main

ROOT = Path(__file__).resolve().parent.parent
TOKEN = f"tok-{uuid.uuid4().hex}"  # distinctive, so its absence from the output means something
ENV_PREFIX = "HIPCHAT_POLLER_"


class Cli:
    """Runs ``main(argv)`` and keeps everything it printed and logged, for the token check."""

    def __init__(self, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture):
        self.capsys = capsys
        self.caplog = caplog
        self.everything: list[str] = []

    def __call__(self, *argv: str) -> tuple[int, str, str]:
        code = main(list(argv))
        out, err = self.capsys.readouterr()
        self.everything += [out, err]
        return code, out, err

    def json(self, *argv: str) -> Any:
        code, out, err = self(*argv)
        assert code == 0, err
        return json.loads(out)

    def all_output(self) -> str:
        return "\n".join([*self.everything, self.caplog.text])


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in list(os.environ):
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)
    monkeypatch.setenv(ENV_PREFIX + "DATA_DIR", str(tmp_path))
    monkeypatch.setenv(ENV_PREFIX + "SECRET_KEY", Fernet.generate_key().decode())
    monkeypatch.setenv(ENV_PREFIX + "REDIS_KEY_PREFIX", f"hp-test-{uuid.uuid4().hex[:12]}")
    return tmp_path


@pytest.fixture
def cli(
    data_dir: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Cli]:
    caplog.set_level(logging.DEBUG)  # the client's DEBUG lines too: none may show the token
    runner = Cli(capsys, caplog)
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    yield runner
    assert TOKEN not in runner.all_output()


@pytest.fixture
def server(emulator: EmulatorServer) -> EmulatorServer:
    emulator.state.create_token(1, token=TOKEN)
    emulator.state.create_room("Factor")
    return emulator


@pytest.fixture
def ops(cli: Cli, server: EmulatorServer) -> EmulatorServer:
    code, _, err = cli("connection", "add", "ops", "--base-url", server.base_url, "--token", TOKEN)
    assert code == 0, err
    return server


def runtime() -> Runtime:
    return Runtime(Settings.from_env())


def stored(name: str | None = None) -> list[Any]:
    with runtime().db.session() as s:
        return [
            (r.event, r.room, r.room_id, r.filter, r.target_kind, dict(r.target))
            for r in subs.list_subscriptions(s)
            if name is None or r.name == name
        ]
