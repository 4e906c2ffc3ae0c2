"""``hipchat-poller``: the command line. Each subcommand is a thin shell over plain functions.

One module per command group, each with its ``register(subparsers)``::

    cli_connections   connection add | list | remove | pause | resume
    cli_subscriptions subscribe, subscriptions, unsubscribe
    cli_actions       users, user, post, notify, add-member
    cli_recipes       apply
    cli_handlers      handlers sync
    cli_admin         migrate, status
    cli_run           run, demo, worker, beat, emulator
    cli_common        what they share: the runtime (its schema checked), JSON output

Exit codes: 0 success, 1 a runtime failure (HipChat or a service said no, or the database
needs ``migrate``: a person must act), 2 bad input.
Tokens are never printed; ``connection add`` takes them from ``--token``, from an
environment variable (``--token-env``, default ``HIPCHAT_POLLER_TOKEN``) or from stdin.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from storage.errors import HipChatPollerError, InvalidInput, ValidationError
from worker import (
    cli_actions,
    cli_admin,
    cli_connections,
    cli_handlers,
    cli_recipes,
    cli_run,
    cli_subscriptions,
)

Handler = Callable[[argparse.Namespace], int]
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hipchat-poller",
        description="Polling triggers and actions for the HipChat REST API v2.",
    )
    parser.add_argument(
        "--log-level",
        default=None,
        type=str.upper,
        choices=LOG_LEVELS,
        help="DEBUG, INFO, WARNING, ERROR (default INFO)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in (
        cli_connections,
        cli_subscriptions,
        cli_actions,
        cli_recipes,
        cli_handlers,
        cli_admin,
        cli_run,
    ):
        group.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    try:
        return _dispatch(args_list)
    except ValidationError as exc:
        for line in exc.errors:
            print(f"error: {line}", file=sys.stderr)
        return 2
    except InvalidInput as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except HipChatPollerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _dispatch(args_list: list[str]) -> int:
    # worker/beat/emulator pass their remaining options through untouched.
    passthrough = cli_run.passthrough(args_list)
    if passthrough is not None:
        return passthrough
    parser = build_parser()
    try:
        args = parser.parse_args(args_list)
    except SystemExit as exc:  # argparse: --help (0) or bad usage (2), already printed
        return exc.code if isinstance(exc.code, int) else 2
    level = args.log_level or "INFO"
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if level != "DEBUG":  # a first use creates the schema silently; Alembic's INFO is noise
        logging.getLogger("alembic").setLevel(logging.WARNING)
    handler: Handler = args.handler
    return handler(args)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
