"""Command: ``migrate``, the one command that upgrades the database schema."""

from __future__ import annotations

import argparse
from typing import Any

from tasks.runtime import Runtime
from tasks.settings import Settings


def register(sub: Any) -> None:
    sub.add_parser("migrate", help="create or upgrade the database schema").set_defaults(
        handler=cmd_migrate
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
