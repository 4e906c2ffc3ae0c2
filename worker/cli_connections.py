"""Commands: ``connection add | list | remove | pause | resume``."""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from collections.abc import Callable
from typing import Any

from sqlalchemy.orm import Session

from storage import connections as conns
from storage.errors import ValidationError
from tasks.connections_api import add_connection, remove_connection
from worker.cli_common import connection_id, runtime

TOKEN_ENV = "HIPCHAT_POLLER_TOKEN"  # noqa: S105 (a variable name, not a secret)


def register(sub: Any) -> None:
    conn = sub.add_parser("connection", help="manage HipChat connections")
    csub = conn.add_subparsers(dest="action", required=True, metavar="ACTION")
    add = csub.add_parser("add", help="add a connection (base URL + personal access token)")
    add.add_argument("name")
    add.add_argument("--base-url", required=True, help="e.g. https://api.hipchat.com")
    src = add.add_mutually_exclusive_group()
    src.add_argument("--token", help="the token itself (visible in `ps`; prefer the others)")
    src.add_argument("--token-env", metavar="VAR", help=f"read it from $VAR (default {TOKEN_ENV})")
    src.add_argument("--token-stdin", action="store_true", help="read it from standard input")
    add.set_defaults(handler=cmd_connection_add)
    for name, handler, text in (
        ("list", cmd_connection_list, "list connections and their state"),
        ("remove", cmd_connection_remove, "remove a connection and its subscriptions"),
        ("pause", cmd_connection_pause, "stop polling a connection"),
        ("resume", cmd_connection_resume, "poll a paused or auth-failed connection again"),
    ):
        p = csub.add_parser(name, help=text)
        if name != "list":
            p.add_argument("name")
        p.set_defaults(handler=handler)


def read_token(args: argparse.Namespace) -> str:
    """The token from --token, stdin (no echo on a terminal) or an environment variable.
    Error messages never quote it."""
    if args.token is not None:  # even "": an empty --token must not fall back to $VAR
        token = str(args.token)
    elif args.token_stdin:
        token = getpass.getpass("token: ") if sys.stdin.isatty() else sys.stdin.readline()
    else:
        var = args.token_env or TOKEN_ENV
        token = os.environ.get(var, "")
        if not token:
            raise ValidationError(f"no token: pass --token, --token-stdin, or set ${var}")
    return conns.validate_token(token.strip())


def cmd_connection_add(args: argparse.Namespace) -> int:
    with runtime() as rt:
        added = add_connection(rt, args.name, args.base_url, read_token(args))
    print(f"connection {added.name} added (id {added.id}, {added.base_url})")
    return 0


def cmd_connection_list(args: argparse.Namespace) -> int:
    with runtime() as rt, rt.db.session() as s:
        rows = conns.list_connections(s)
        if not rows:
            print("no connections; add one with `hipchat-poller connection add`")
        for row in rows:
            reason = f" ({row.state_reason})" if row.state_reason else ""
            last = row.last_poll_at.isoformat(timespec="seconds") if row.last_poll_at else "never"
            print(
                f"{row.id:>4}  {row.name:<20} {row.state}{reason}  {row.base_url}  "
                f"last poll: {last} {row.last_poll_status or ''}".rstrip()
            )
    return 0


def _on_named(args: argparse.Namespace, change: Callable[[Session, int], object], done: str) -> int:
    """Apply ``change`` to the connection ``args.name`` in one transaction; print ``done``."""
    with runtime() as rt, rt.db.session() as s:
        change(s, connection_id(s, args.name))
    print(f"connection {args.name} {done}")
    return 0


def cmd_connection_remove(args: argparse.Namespace) -> int:
    with runtime() as rt:
        if not remove_connection(rt, args.name):
            raise ValidationError(f"no connection named {args.name!r}")
    print(f"connection {args.name} removed")
    return 0


def cmd_connection_pause(args: argparse.Namespace) -> int:
    def pause(s: Session, conn_id: int) -> None:
        conns.set_connection_state(s, conn_id, "paused", "paused by an operator")

    return _on_named(args, pause, "paused")


def cmd_connection_resume(args: argparse.Namespace) -> int:
    def resume(s: Session, conn_id: int) -> None:
        conns.set_connection_state(s, conn_id, "active", None)

    return _on_named(args, resume, "active")
