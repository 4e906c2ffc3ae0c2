"""``python -m emulator`` / ``python -m emulator.cli``: serve the emulator until SIGINT or
SIGTERM, after printing its base URL and the seeded users and rooms (a token passed with
``--token`` is never printed). ``--room NAME`` adds rooms to the seed (the README's example
uses ``--room Factor``). A port out of range, or one that is taken, is a one-line error and
exit 2."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from types import FrameType
from typing import NoReturn

from emulator.server import EmulatorServer

DEFAULT_TOKEN = "admin-token"  # noqa: S105 (the emulator's well-known default)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, not the whole usage
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="hipchat-poller emulator", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=_port, default=8080, help="0 picks a free port")
    parser.add_argument(
        "--token", help=f"the admin user's token (default {DEFAULT_TOKEN!r}); never printed"
    )
    parser.add_argument("--rate-limit", type=int, default=100, help="calls per token per window")
    parser.add_argument("--rate-window-seconds", type=float, default=300.0)
    parser.add_argument("--flood-limit", type=int, default=30, help="sends per token per room")
    parser.add_argument("--flood-window-seconds", type=float, default=60.0)
    parser.add_argument("--case-insensitive-rooms", action="store_true")
    parser.add_argument("--no-seed", action="store_true", help="only the admin user")
    parser.add_argument(
        "--room", action="append", default=[], metavar="NAME", help="add a public room (repeat)"
    )
    return parser


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a port is a number within 0..65535, not {text!r}")
    return port


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # --help (0) or bad usage (2), already printed by argparse
        return exc.code if isinstance(exc.code, int) else 2
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
        try:
            server.start()
        except OSError as exc:  # taken, not ours to take, or no such address
            reason = exc.strerror or str(exc)
            print(f"error: cannot listen on {args.host}:{args.port}: {reason}", file=sys.stderr)
            return 2
        for name in args.room:
            server.state.create_room(name)
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
