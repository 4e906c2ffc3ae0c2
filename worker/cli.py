"""``hipchat-poller``: the command line. Each subcommand is a thin shell over plain functions.

One module per command group, each with its ``register(subparsers)``::

    cli_connections   connection add | list | remove | pause | resume | set-token | test
    cli_subscriptions subscribe, subscriptions, unsubscribe
    cli_subscription_edit  subscription update | pause | resume
    cli_events        events, events show, events replay
    cli_actions       users, user, post, notify, add-member
    cli_recipes       apply
    cli_handlers      handlers sync
    cli_status        status (a table, --json; a healthcheck by its exit code)
    cli_admin         migrate
    cli_metrics       metrics (Prometheus), and --metrics-port of worker, beat, run
    cli_run           run, demo, worker, beat, emulator
    cli_common        what they share: the runtime (its schema checked), JSON output
    cli_format        tables, ages and --since for people

Exit codes (the README's table): 0 success; 1 a person must act: HipChat or a service said
no (a bad token, a missing scope, Redis or the database unreachable, a database that needs
``migrate``), or ``status`` found something failing (so it serves as a healthcheck, where
Docker reads 1 as unhealthy); 2 bad input: change it (a bad option or setting, an argument
that is not UTF-8, an unknown connection, subscription, room or user); 130 interrupted.
Tokens are never printed; ``connection add`` and ``connection set-token`` take them from
``--token``, from an environment variable (``--token-env``, default ``HIPCHAT_POLLER_TOKEN``)
or from stdin.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from storage.errors import HipChatPollerError, InvalidInput, NotFound, ValidationError
from tasks.settings import LOG_LEVELS, Settings
from worker import (
    cli_actions,
    cli_admin,
    cli_connections,
    cli_events,
    cli_handlers,
    cli_metrics,
    cli_recipes,
    cli_run,
    cli_status,
    cli_subscription_edit,
    cli_subscriptions,
)

Handler = Callable[[argparse.Namespace], int]


class _Parser(argparse.ArgumentParser):
    """Bad usage is one line (and exit 2), not the whole usage text: ``--help`` has that."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="hipchat-poller",
        description="Polling triggers and actions for the HipChat REST API v2.",
    )
    parser.add_argument(
        "--log-level",
        default=None,
        type=str.upper,
        choices=LOG_LEVELS,
        help="DEBUG, INFO, WARNING, ERROR (default $HIPCHAT_POLLER_LOG_LEVEL, else INFO)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in (
        cli_connections,
        cli_subscriptions,
        cli_subscription_edit,
        cli_events,
        cli_actions,
        cli_recipes,
        cli_handlers,
        cli_status,
        cli_admin,
        cli_metrics,
        cli_run,
    ):
        group.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    try:
        _refuse_undecodable(args_list)
        return _dispatch(args_list)
    except ValidationError as exc:
        for line in exc.errors:
            print(f"error: {line}", file=sys.stderr)
        return 2
    except (InvalidInput, NotFound) as exc:  # NotFound: an unknown room or user was typed
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except UnicodeDecodeError:  # a token or a recipes file read as text
        print("error: the input is not valid UTF-8 text", file=sys.stderr)
        return 2
    except HipChatPollerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _refuse_undecodable(args: list[str]) -> None:
    """Python hands over bytes that are not UTF-8 as lone surrogates; sent on, they would
    reach HipChat as garbage (or a traceback). The argument is not quoted: it may be a token."""
    for position, arg in enumerate(args, start=1):
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError:
            raise ValidationError(
                f"argument {position} is not valid UTF-8 text (check the terminal's encoding)"
            ) from None


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
    level = args.log_level or Settings.from_env().log_level.upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if level != "DEBUG":  # a first use creates the schema silently; Alembic's INFO is noise
        logging.getLogger("alembic").setLevel(logging.WARNING)
    handler: Handler = args.handler
    return handler(args)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
