"""``python -m emulator`` / ``python -m emulator.cli``: serve the emulator until SIGINT or
SIGTERM, after printing its base URL and the seeded users and rooms (a token passed with
``--token`` is never printed)."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from types import FrameType

from emulator.server import EmulatorServer

DEFAULT_TOKEN = "admin-token"  # noqa: S105 (the emulator's well-known default)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hipchat-emulator", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080, help="0 picks a free port")
    parser.add_argument(
        "--token", help=f"the admin user's token (default {DEFAULT_TOKEN!r}); never printed"
    )
    parser.add_argument("--rate-limit", type=int, default=100, help="calls per token per window")
    parser.add_argument("--rate-window-seconds", type=float, default=300.0)
    parser.add_argument("--flood-limit", type=int, default=30, help="sends per token per room")
    parser.add_argument("--flood-window-seconds", type=float, default=60.0)
    parser.add_argument("--case-insensitive-rooms", action="store_true")
    parser.add_argument("--no-seed", action="store_true", help="only the admin user")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    server = EmulatorServer(
        args.host,
        args.port,
        admin_token=args.token or DEFAULT_TOKEN,
        seed=not args.no_seed,
        rate_limit=args.rate_limit,
        rate_window_seconds=args.rate_window_seconds,
        flood_limit=args.flood_limit,
        flood_window_seconds=args.flood_window_seconds,
        case_insensitive_rooms=args.case_insensitive_rooms,
    )
    stopping = threading.Event()

    def _stop(signum: int, frame: FrameType | None) -> None:
        stopping.set()

    previous = {sig: signal.signal(sig, _stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.start()
        print(f"HipChat API v2 emulator at {server.base_url}/v2/", flush=True)
        # A token a person chose is a secret like any other: it is never printed.
        given = "the one given with --token" if args.token else f"{DEFAULT_TOKEN} (the default)"
        print(f"admin token: {given}", flush=True)
        for user in server.state.users_list():
            print(f"user {user['id']}: {user['name']} @{user['mention_name']}", flush=True)
        for room in server.state.rooms_list():
            print(f"room {room['id']}: {room['name']} ({room['privacy']})", flush=True)
        while not stopping.wait(0.5):
            pass
    finally:
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print("stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
