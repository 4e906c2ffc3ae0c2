"""The actions of the seeds as commands: ``users``, ``user``, ``post``, ``notify``,
``add-member``. Each prints JSON and takes its calls from the connection's budget like every
other HipChat call; when the workers have spent it, the command waits for its reserved calls
(``--wait``, default one window), saying so on stderr, rather than failing."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from tasks.actions import Actions
from tasks.client_inputs import COLORS
from tasks.client_inputs import MESSAGE_FORMATS as FORMATS
from worker.cli_common import print_json, runtime


def register(sub: Any) -> None:
    def action(name: str, text: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = sub.add_parser(name, help=text)
        p.add_argument("connection", help="connection name")
        p.add_argument(
            "--wait",
            type=_seconds,
            default=DEFAULT_WAIT_SECONDS,
            metavar="SECONDS",
            help="when the budget is spent, wait up to this long for it "
            f"(default {DEFAULT_WAIT_SECONDS:g}; 0: fail at once)",
        )
        return p

    p = action("users", "list the users of a room (members if private, else participants)")
    p.add_argument("room")
    p.set_defaults(handler=lambda a: _act(a, lambda act: act.list_room_users(a.room)))
    p = action("user", "get a user by id, email or @mention name")
    p.add_argument("user")
    p.set_defaults(handler=lambda a: _act(a, lambda act: act.get_user(a.user)))
    p = action("post", "post a message to a room (1..1000 characters)")
    p.add_argument("room")
    p.add_argument("message")
    p.set_defaults(handler=lambda a: _act(a, lambda act: act.post_message(a.room, a.message)))
    p = action("notify", "send a notification to a room (1..10000 characters)")
    p.add_argument("room")
    p.add_argument("message")
    # Checked by Actions, so that every problem is reported at once.
    p.add_argument("--color", default="yellow", help=f"{', '.join(COLORS)} (default yellow)")
    p.add_argument(
        "--format", dest="message_format", default="html", help=f"{' or '.join(FORMATS)}"
    )
    p.add_argument("--notify", action="store_true", help="alert the room's users")
    p.add_argument(
        "--from", dest="from_", metavar="LABEL", help="label shown beside the sender (<= 64)"
    )
    p.set_defaults(handler=cmd_notify)
    p = action("add-member", "add a user (id, email or @mention) to a private room")
    p.add_argument("room")
    p.add_argument("user")
    p.set_defaults(handler=lambda a: _act(a, lambda act: act.add_member(a.room, a.user)))


# A budget window: the longest wait a budget spent by the workers can ask of a command.
DEFAULT_WAIT_SECONDS = 60.0


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 3600:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds in 0..3600")
    return value


def _waiting(seconds: float) -> None:
    print(f"the budget is spent: waiting {seconds:.1f} s for a call", file=sys.stderr)


def _act(args: argparse.Namespace, call: Callable[[Actions], dict[str, Any]]) -> int:
    """Run one action on the connection ``args.connection``; print its JSON result."""
    with runtime() as rt:
        actions = Actions(rt, args.connection, wait_up_to=args.wait, on_wait=_waiting)
        return print_json(call(actions))


def cmd_notify(args: argparse.Namespace) -> int:
    return _act(
        args,
        lambda act: act.send_notification(
            args.room,
            args.message,
            color=args.color,
            message_format=args.message_format,
            notify=args.notify,
            from_=args.from_,
        ),
    )
