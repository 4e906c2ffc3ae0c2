"""Command: ``handlers sync [MODULE]``, one stored subscription per ``@on`` handler."""

from __future__ import annotations

import argparse
from typing import Any

from storage.errors import ValidationError
from tasks.handlers import sync_handlers
from worker.cli_common import runtime


def register(sub: Any) -> None:
    h = sub.add_parser("handlers", help="Python handlers registered with @on")
    hs = h.add_subparsers(dest="action", required=True, metavar="ACTION")
    sync = hs.add_parser("sync", help="store one subscription per handler of a module")
    sync.add_argument("module", nargs="?", help="default: $HIPCHAT_POLLER_HANDLERS_MODULE")
    sync.set_defaults(handler=cmd_handlers_sync)


def cmd_handlers_sync(args: argparse.Namespace) -> int:
    with runtime() as rt:
        module = args.module or rt.settings.handlers_module
        if not module:
            raise ValidationError("name a module, or set HIPCHAT_POLLER_HANDLERS_MODULE")
        lines = sync_handlers(rt, module)
    for line in lines or ["no changes"]:
        print(line)
    return 0
