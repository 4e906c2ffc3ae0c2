"""The README's "Running it for real" block runs as printed against the emulator it starts:
every command exits 0 and prints what the README shows, and `run` answers a ping with a pong.

Only these differ from a person at a terminal: the port (8080 may be taken here, so a free one
replaces it everywhere), a HOME of the test's own (the embedded data directory is under it)
and a poll interval of 2 s instead of 60 s for `run`.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from tests.e2e_support import Service, tail
from tests.redis_server import free_port
from tests.waiting import wait_for

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def readme_commands(section: str = "## Running it for real") -> list[tuple[str, list[str]]]:
    """(command, the lines it prints) for each ``$`` line of the section's first console
    block; a trailing backslash continues a command."""
    text = (ROOT / "README.md").read_text()
    block = text.split(section, 1)[1].split("```console\n", 1)[1].split("```", 1)[0]
    found: list[tuple[str, list[str]]] = []
    continued = False
    for line in block.splitlines():
        if continued:
            found[-1] = (found[-1][0] + " " + line.strip().rstrip("\\").strip(), [])
        elif line.startswith("$ "):
            found.append((line[2:].rstrip("\\").strip(), []))
        else:
            found[-1][1].append(line)
        continued = line.endswith("\\")
    return found


def test_the_readme_names_the_commands_this_test_runs() -> None:
    commands = [command.split("#")[0].split()[:3] for command, _ in readme_commands()]
    assert commands[0] == ["hipchat-poller", "emulator", "--port"]
    assert commands[-1] == ["hipchat-poller", "run"]


def test_running_it_for_real_works_as_printed(tmp_path: Path) -> None:
    port = str(free_port())
    env = {k: v for k, v in os.environ.items() if not k.startswith("HIPCHAT_POLLER_")}
    env |= {"HOME": str(tmp_path), "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}"}
    services: list[Service] = []
    try:
        for command, expected in readme_commands():
            command = command.replace("8080", port)
            if command.startswith("export "):
                name, _, value = command.split("#")[0].split(None, 1)[1].partition("=")
                env[name] = shlex.split(value)[0]
                continue
            if " emulator " in command or command.startswith("hipchat-poller run"):
                services.append(_start(command, env, tmp_path, port))
                continue
            done = _run(command, env)
            assert done.returncode == 0, (command, done.stderr)
            assert done.stdout.splitlines() == [e.replace("8080", port) for e in expected]
        _ping_pong(port, services[-1])
    finally:
        for service in reversed(services):
            service.stop()


def _run(command: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-c", command], env=env, capture_output=True, text=True, timeout=60, check=False
    )


def _start(command: str, env: dict[str, str], tmp: Path, port: str) -> Service:
    name = command.split()[1]
    run_env = env | {"HIPCHAT_POLLER_POLL_INTERVAL_SECONDS": "2"} if name == "run" else env
    service = Service(name, ["bash", "-c", f"exec {command}"], run_env, tmp, tmp / f"{name}.log")
    service.start()
    if name == "emulator":
        wait_for(
            lambda: "HipChat API v2 emulator at" in service.log_text(),
            30,
            "the emulator to listen",
            describe=lambda: tail(service.log_text()),
        )
        assert "room 10003: Factor (public)" in service.log_text()
    return service


def _ping_pong(port: str, run: Service) -> None:
    base = f"http://127.0.0.1:{port}/_emulator/rooms/Factor"

    def history() -> list[dict[str, object]]:
        return list(requests.get(f"{base}/history", timeout=5).json()["items"])

    def polled() -> bool:
        return "poll conn=1 " in run.log_text()

    wait_for(polled, 60, "the first poll (it primes)", describe=lambda: tail(run.log_text()))
    said = requests.post(
        f"{base}/messages", json={"user": "AliceA", "message": "ping hello"}, timeout=5
    )
    assert said.status_code == 201, said.text

    def pong() -> list[dict[str, object]]:
        return [m for m in history() if m.get("message") == "pong hello"]

    [answer] = wait_for(pong, 60, "pong hello in Factor", describe=lambda: tail(run.log_text()))
    assert answer["color"] == "green"
    assert "MYTOKEN" not in run.log_text()
