"""Command: ``apply FILE [--dry-run] [--prune-connections]`` (see docs/recipes.md)."""

from __future__ import annotations

import argparse
from typing import Any

from worker.cli_common import runtime
from worker.recipes_apply import apply


def register(sub: Any) -> None:
    p = sub.add_parser("apply", help="make connections and subscriptions match a recipes file")
    p.add_argument("file", metavar="FILE", help="the recipes file (YAML, see docs/recipes.md)")
    p.add_argument(
        "--dry-run", action="store_true", help="show what would change; change and call nothing"
    )
    p.add_argument(
        "--prune-connections",
        action="store_true",
        help="also remove connections the file does not name, with their subscriptions",
    )
    p.set_defaults(handler=cmd_apply)


def cmd_apply(args: argparse.Namespace) -> int:
    with runtime() as rt:
        lines = apply(rt, args.file, dry_run=args.dry_run, prune_connections=args.prune_connections)
    for line in lines or ["no changes"]:
        print(line)
    if args.dry_run:
        print("dry run: nothing was changed")
    return 0
