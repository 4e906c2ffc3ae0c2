"""The HipChat emulator of the benchmarks, in a process of its own, seeded in-process.

Run as a script, it is that process::

    python benchmarks/bench_emulator.py --port P --admin-token T --connections N \
        --rooms-per-connection 1-2 --token-prefix PFX --manifest out.json

Seeding 10,000 users, tokens and 15,000 rooms through the control API would take a minute of
HTTP; here it is done on :class:`emulator.state.EmulatorState` before the server answers.
Connection ``i`` gets a user of its own (``@scale<i>``), a token of its own
(``<PFX><i>``) and its own public rooms (``scale-<i>-<j>``); connection ``i`` has
``lo + i % (hi - lo + 1)`` rooms. The seeded ``@AliceA`` is the one who posts. HipChat's
rate limit (100 calls per 300 s per token) is kept: with one token per connection and one or
two calls a minute it is never reached (``--rate-limit`` raises it for benchmarks that poll
one connection many times a second).

When the server answers, the manifest (base URL, and per connection its user, token and
rooms) is written to ``--manifest`` (atomically: the parent polls for it). The process then
serves until SIGTERM or SIGINT.

Imported, :class:`EmulatorProcess` is the parent's handle: it starts that process, reads the
manifest and talks to the control API.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import requests

from emulator import EmulatorServer
from tests.e2e_support import Service, tail
from tests.redis_server import free_port

POSTER = "@AliceA"


def rooms_range(text: str) -> tuple[int, int]:
    """``"1-2"`` -> (1, 2); ``"1"`` -> (1, 1)."""
    low, _, high = text.partition("-")
    try:
        lo, hi = int(low), int(high or low)
    except ValueError:
        lo, hi = 0, 0
    if not 1 <= lo <= hi:
        raise argparse.ArgumentTypeError("expected LOW-HIGH with 1 <= LOW <= HIGH")
    return lo, hi


def seed(
    server: EmulatorServer, count: int, rooms: tuple[int, int], prefix: str
) -> list[dict[str, Any]]:
    state = server.state
    lo, hi = rooms
    made = []
    for i in range(count):
        user = state.create_user(f"Scale User {i}", f"scale{i}")
        token = state.create_token(user["id"], token=f"{prefix}{i}")
        mine = []
        for j in range(lo + i % (hi - lo + 1)):
            room = state.create_room(f"scale-{i}-{j}", owner=user["id"])
            mine.append([room["id"], room["name"]])
        made.append({"user": user["id"], "token": token, "rooms": mine})
    return made


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--admin-token", required=True)
    parser.add_argument("--connections", type=int, required=True)
    parser.add_argument("--rooms-per-connection", type=rooms_range, default=(1, 2))
    parser.add_argument("--token-prefix", required=True)
    parser.add_argument("--manifest", type=Path, required=True)
    parser.add_argument("--rate-limit", type=int, default=100, help="calls per token per 300 s")
    args = parser.parse_args(argv)

    stopping = threading.Event()

    def stop(signum: int, frame: FrameType | None) -> None:
        stopping.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)
    server = EmulatorServer(
        port=args.port, admin_token=args.admin_token, rate_limit=args.rate_limit
    )
    connections = seed(server, args.connections, args.rooms_per_connection, args.token_prefix)
    server.start()
    try:
        manifest = {"base_url": server.base_url, "poster": POSTER, "connections": connections}
        partial = args.manifest.with_suffix(".partial")
        partial.write_text(json.dumps(manifest))
        os.replace(partial, args.manifest)
        while not stopping.wait(0.5):
            pass
    finally:
        server.stop()
    return 0


# -- the parent's side ---------------------------------------------------------------------------


@dataclass
class EmulatorProcess:
    """The emulator process and its control API (``/_emulator``)."""

    service: Service
    base_url: str
    poster: str
    connections: list[dict[str, Any]]  # from the manifest: user, token, rooms [[id, name]]
    control: requests.Session = field(default_factory=requests.Session)

    @classmethod
    def start(
        cls,
        tmp: Path,
        env: dict[str, str],
        connections: int,
        rooms: tuple[int, int],
        *,
        rate_limit: int = 100,
    ) -> EmulatorProcess:
        manifest = tmp / "emulator.json"
        argv = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--port", str(free_port()),
            "--admin-token", secrets.token_hex(12),
            "--connections", str(connections),
            "--rooms-per-connection", f"{rooms[0]}-{rooms[1]}",
            "--token-prefix", f"bench-{secrets.token_hex(6)}-",
            "--manifest", str(manifest),
            "--rate-limit", str(rate_limit),
        ]  # fmt: skip
        service = Service("emulator", argv, env, tmp, tmp / "emulator.log").start()
        deadline = time.monotonic() + 120
        try:
            while not manifest.exists():
                if not service.alive() or time.monotonic() > deadline:
                    raise SystemExit(f"the emulator did not start:\n{tail(service.log_text())}")
                time.sleep(0.05)
        except BaseException:  # Ctrl-C included: the caller has no handle to stop it yet
            service.stop()
            raise
        data = json.loads(manifest.read_text())
        made = cls(service, data["base_url"], data["poster"], data["connections"])
        made.control.trust_env = False
        return made

    def stop(self) -> None:
        self.control.close()
        self.service.stop()

    def _call(self, method: str, path: str, **options: Any) -> Any:
        answer = self.control.request(
            method, f"{self.base_url}/_emulator{path}", timeout=120, **options
        )
        answer.raise_for_status()
        return answer.json()

    def post(self, room_id: int, text: str) -> dict[str, Any]:
        found: dict[str, Any] = self._call(
            "POST", f"/rooms/{room_id}/messages", json={"user": self.poster, "message": text}
        )
        return found

    def history(self, room_id: int) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = self._call("GET", f"/rooms/{room_id}/history")["items"]
        return found

    def new_token(self, user_id: int) -> str:
        return str(self._call("POST", "/tokens", json={"user": user_id})["token"])

    def calls(self, **query: Any) -> list[dict[str, Any]]:
        """The call log (``token``, ``since``, ``until``, ``path_prefix``, ``method``)."""
        found: list[dict[str, Any]] = self._call("GET", "/calls", params=query)["items"]
        return found


if __name__ == "__main__":
    raise SystemExit(main())
