"""Commands: ``migrate`` (the one command that upgrades the database schema) and ``status``."""

from __future__ import annotations

import argparse
from typing import Any

from storage import connections as conns
from storage import outbox
from storage import subscriptions as subs
from tasks.runtime import Runtime
from tasks.settings import Settings
from worker.cli_common import print_json, runtime


def register(sub: Any) -> None:
    sub.add_parser("migrate", help="create or upgrade the database schema").set_defaults(
        handler=cmd_migrate
    )
    sub.add_parser("status", help="connections, subscriptions and the outbox").set_defaults(
        handler=cmd_status
    )


def cmd_migrate(args: argparse.Namespace) -> int:
    """Upgrade the schema to this code's head: safe to repeat and to run from several
    processes at once. Every other command only checks it (worker.schema_check)."""
    rt = Runtime(Settings.from_env())
    try:
        rt.db.upgrade()
    finally:
        rt.close()
    print(f"database schema is up to date ({rt.db.dialect})")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """Connections with their state and last poll, subscriptions by state, the outbox."""
    with runtime() as rt, rt.db.session() as s:
        connections = [
            {
                "id": row.id,
                "name": row.name,
                "state": row.state,
                "state_reason": row.state_reason,
                "last_poll_at": row.last_poll_at,
                "last_poll_status": row.last_poll_status,
            }
            for row in conns.list_connections(s)
        ]
        states: dict[str, int] = {}
        for sub in subs.list_subscriptions(s):
            states[sub.state] = states.get(sub.state, 0) + 1
        report = {"connections": connections, "subscriptions": states, "outbox": outbox.stats(s)}
    return print_json(report)
