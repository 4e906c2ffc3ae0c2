"""Commands: ``connection add | list | remove | pause | resume | set-token | test``.

``add`` and ``set-token`` check the token with HipChat before storing it (one cheap call,
:mod:`tasks.token_check`) unless ``--no-check``: a token HipChat refuses, or one without the
scope to list rooms, is bad input (exit 2, nothing stored). ``test`` asks HipChat about the
stored token: 0 when it is valid, 1 when a person must act (refused, a scope missing,
HipChat unreachable)."""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from collections.abc import Callable
from typing import Any

from sqlalchemy.orm import Session

from storage import connections as conns
from storage.errors import (
    AuthFailed,
    Forbidden,
    HipChatPollerError,
    NotFound,
    RetryLater,
    ValidationError,
)
from storage.health import all_health
from tasks.connections_api import remove_connection, start_budgets
from tasks.runtime import Runtime
from tasks.token_check import check_token
from worker.cli_common import connection_id, runtime
from worker.cli_format import one_line, stamp
from worker.status_report import failing_rooms

TOKEN_ENV = "HIPCHAT_POLLER_TOKEN"  # noqa: S105 (a variable name, not a secret)


def register(sub: Any) -> None:
    conn = sub.add_parser("connection", help="manage HipChat connections")
    csub = conn.add_subparsers(dest="action", required=True, metavar="ACTION")
    add = csub.add_parser("add", help="add a connection (base URL + personal access token)")
    add.add_argument("name")
    add.add_argument("--base-url", required=True, help="e.g. https://api.hipchat.com")
    _token_options(add)
    add.set_defaults(handler=cmd_connection_add)
    set_token = csub.add_parser("set-token", help="replace a connection's token")
    set_token.add_argument("name")
    _token_options(set_token)
    set_token.set_defaults(handler=cmd_connection_set_token)
    test = csub.add_parser("test", help="ask HipChat whether the stored token works (one call)")
    test.add_argument("name")
    test.set_defaults(handler=cmd_connection_test)
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


def _token_options(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--token", help="the token itself (visible in `ps`; prefer the others)")
    src.add_argument("--token-env", metavar="VAR", help=f"read it from $VAR (default {TOKEN_ENV})")
    src.add_argument("--token-stdin", action="store_true", help="read it from standard input")
    parser.add_argument(
        "--no-check", action="store_true", help="store the token without asking HipChat first"
    )


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
    token = read_token(args)
    with runtime() as rt, rt.db.session() as s:
        row = conns.add_connection(
            s,
            args.name,
            args.base_url,
            token,
            rt.cipher,
            poll_interval_seconds=rt.settings.poll_interval_seconds,
        )
        s.flush()
        # Before the check, which calls HipChat through this connection's budget.
        start_budgets(rt, [row.id])
        # Inside the transaction: a token HipChat refuses rolls the connection back.
        verdict = "" if args.no_check else _checked(rt, row.id, row.base_url, token)
        print(f"connection {row.name} added (id {row.id}, {row.base_url}){verdict}")
    return 0


def cmd_connection_set_token(args: argparse.Namespace) -> int:
    token = read_token(args)
    with runtime() as rt, rt.db.session() as s:
        row = conns.update_connection(s, connection_id(s, args.name), cipher=rt.cipher, token=token)
        verdict = "" if args.no_check else _checked(rt, row.id, row.base_url, token)
        print(f"connection {row.name}: token replaced ({row.state}){verdict}")
    return 0


def cmd_connection_test(args: argparse.Namespace) -> int:
    with runtime() as rt:
        with rt.db.session() as s:
            row = conns.require_connection(s, connection_id(s, args.name))
            name, base_url = row.name, row.base_url
            conn_id, token = row.id, conns.decrypt_token(row, rt.cipher)
        try:
            verdict = check_token(rt, conn_id, base_url, token)
        except AuthFailed as exc:
            raise AuthFailed(
                f"connection {name}: {exc}; replace it: hipchat-poller connection set-token {name}"
            ) from exc
        except HipChatPollerError as exc:
            raise type(exc)(f"connection {name}: {exc}") from exc
    print(f"connection {name}: {verdict}")
    return 0


def _checked(rt: Runtime, conn_id: int, base_url: str, token: str) -> str:
    """``check_token``'s verdict for a token about to be stored; what HipChat refuses is bad
    input (exit 2: nothing stored)."""
    try:
        check_token(rt, conn_id, base_url, token)
    except (AuthFailed, Forbidden, NotFound) as exc:
        raise ValidationError(f"{exc}; nothing stored (--no-check stores it unchecked)") from exc
    except RetryLater as exc:
        raise type(exc)(
            f"cannot check the token now ({exc}); nothing stored (--no-check stores it unchecked)"
        ) from exc
    return "; token checked with HipChat"


def cmd_connection_list(args: argparse.Namespace) -> int:
    with runtime() as rt, rt.db.session() as s:
        rows = conns.list_connections(s)
        health = all_health(s)
        if not rows:
            print("no connections; add one with `hipchat-poller connection add`")
        for row in rows:
            reason = f" ({row.state_reason})" if row.state_reason else ""
            polled = health.get(row.id)
            at = polled.last_poll_at if polled else None
            last = at.isoformat(timespec="seconds") if at else "never"
            status = (polled.status if polled else None) or ""
            print(
                f"{row.id:>4}  {row.name:<20} {row.state}{reason}  {row.base_url}  "
                f"last poll: {last} {status}".rstrip()
            )
            for room in failing_rooms(polled.rooms if polled else {}, {}):
                tries = f", {room.attempts} attempts" if room.attempts else ""
                print(
                    f"      room {room.room_id} failing since {stamp(room.since)} UTC{tries}: "
                    f"{one_line(room.error, 100)}"
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
