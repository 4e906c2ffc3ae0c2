"""Commands: ``run`` (worker + beat in one process), ``demo``, ``worker`` and ``beat``
(Celery's own commands with our app), ``emulator``.

Before ``run``, ``worker`` and ``beat`` start, :mod:`worker.preflight` checks that Redis,
the broker and the database answer (one line and exit 1 within seconds when one does not).

The database schema: ``run`` on embedded defaults (no Redis: this process is the only one)
upgrades it like ``migrate``; ``run`` with Redis, ``worker`` and ``beat`` only check it and
refuse to start on an out-of-date database (:mod:`worker.schema_check`), because other
processes of another version may be using it: upgrading is ``hipchat-poller migrate``'s job.

``run``, ``worker`` and ``beat`` record metrics (:func:`worker.cli_metrics.record`, before
the app runs anything, so before any metric exists: see :mod:`worker.metrics_process`);
``--metrics-port P [--metrics-host H]`` serves them, taken off the options before Celery
sees them.

The log level is ``--log-level`` (or Celery's ``--loglevel``), else
``HIPCHAT_POLLER_LOG_LEVEL``. Settings that work but that HipChat will punish (a budget above
its 100 calls a minute) are warned about once, at start.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from emulator.cli import main as emulator_main
from tasks.runtime import Runtime
from tasks.settings import Settings
from worker.app import ACTION_QUEUE, POLL_QUEUE, create_app
from worker.cli_format import positive_int
from worker.cli_metrics import add_serving_options, record, take_serving_options
from worker.demo import run_demo
from worker.embedded import EmbeddedWorker
from worker.preflight import services_ready

log = logging.getLogger(__name__)
APP = "worker.celery_app:app"


def register(sub: Any) -> None:
    run = sub.add_parser(
        "run",
        help="worker and beat in one process (embedded defaults when no Redis/database URL is set)",
    )
    run.add_argument("--concurrency", type=positive_int, default=4)
    add_serving_options(run)
    run.set_defaults(handler=cmd_run)
    demo = sub.add_parser(
        "demo",
        help="emulator + worker + beat in one process: ping/pong "
        "and every trigger, printed as they happen",
    )
    demo.add_argument("--interval", type=float, default=2.0, help="poll interval (seconds)")
    demo.add_argument("--timeout", type=float, default=60.0)
    demo.set_defaults(handler=cmd_demo)
    for name, text in (
        ("worker", "a Celery worker (options are Celery's: --concurrency, -Q, ...)"),
        ("beat", "Celery beat with the per-connection scheduler (options are Celery's)"),
        ("emulator", "the HipChat API v2 emulator (--port, --token, ...)"),
    ):
        sub.add_parser(name, help=text, add_help=False)


PASSTHROUGH = ("worker", "beat", "emulator")
HELP_FLAGS = ("-h", "--help")


def passthrough(argv: list[str]) -> int | None:
    """worker/beat/emulator take their own options; None if argv is not one of them.

    A leading ``--log-level LEVEL`` (our global option), else ``HIPCHAT_POLLER_LOG_LEVEL``,
    is handed to Celery as ``--loglevel`` unless the Celery options already set one.
    """
    level, rest = _global_log_level(argv)
    if not rest or rest[0] not in PASSTHROUGH:
        return None
    command = rest[0]
    # Celery knows only --help; -h is what people type.
    options = ["--help" if a == "-h" else a for a in rest[1:]]
    if command == "emulator":
        return emulator_main(options)
    options, port, host = take_serving_options(options)
    wants_help = any(a in HELP_FLAGS for a in options)
    pool = _pool(options) if command == "worker" else None
    if pool in UNSUPPORTED_POOLS:
        print(
            f"error: `-P {pool}` is not supported: a green-thread pool must patch the standard "
            "library before anything else is imported, and by then this command has imported "
            "Redis, requests and SQLAlchemy (one task's I/O would block the others); for many "
            "slow HipChat calls use `-P threads --concurrency N`, else the default prefork pool",
            file=sys.stderr,
        )
        return 2
    if not wants_help:
        settings = Settings.from_env()
        if settings.embedded:
            # An in-process broker and bucket cannot be shared with another process: a
            # lone worker would never receive a task, a lone beat would send into the void.
            print(
                f"error: `hipchat-poller {command}` needs HIPCHAT_POLLER_REDIS_URL (a broker "
                "and token buckets shared by every process); for one process on embedded "
                "defaults use `hipchat-poller run`",
                file=sys.stderr,
            )
            return 2
        _warn(settings.warnings())  # first: they say why what follows may fail
        _warn(services_ready(settings))
        level = level or settings.log_level.upper()
        record(settings, command, port, host)
    if level and not any(a.startswith(("-l", "--loglevel")) for a in options):
        options = [*options, "--loglevel", level]
    return _celery(command, options)


# Celery's green-thread pools (its -P names and their aliases).
UNSUPPORTED_POOLS = ("gevent", "eventlet")


def _pool(options: list[str]) -> str | None:
    """The pool Celery's options ask for (``-P X``, ``-PX``, ``--pool X``, ``--pool=X``)."""
    for i, option in enumerate(options):
        if option in ("-P", "--pool"):
            return options[i + 1] if i + 1 < len(options) else None
        if option.startswith("--pool="):
            return option.partition("=")[2]
        if option.startswith("-P") and len(option) > 2:
            return option[2:]
    return None


def _global_log_level(argv: list[str]) -> tuple[str | None, list[str]]:
    if argv and argv[0] == "--log-level" and len(argv) > 1:
        return argv[1], argv[2:]
    if argv and argv[0].startswith("--log-level="):
        return argv[0].partition("=")[2], argv[1:]
    return None, argv


def _celery(command: str, options: list[str]) -> int:
    """Run Celery's own ``worker`` or ``beat`` command on our app; its exit code."""
    if command == "worker":
        queues = any(a.startswith(("-Q", "--queues")) for a in options)
        extra = [] if queues else ["-Q", f"{POLL_QUEUE},{ACTION_QUEUE}"]
        named = any(a.startswith("--hostname") or (a[:2] == "-n") for a in options)
        # Celery's default, celery@HOST, is the same for every worker on a host: Flower and
        # `celery inspect` would see two workers as one. The process id tells them apart.
        extra += [] if named else ["-n", f"hipchat-{os.getpid()}@%h"]
        args = ["-A", APP, "worker", "-E", *extra, *options]
    else:
        args = ["-A", APP, "beat", *options]
    try:
        # Imported here: Celery's command line loads click, Flower and tornado, which no other
        # command needs. celery.bin.celery.main() takes no arguments: call its click group.
        from celery.bin.celery import celery

        celery.main(args=args, prog_name="hipchat-poller", auto_envvar_prefix="CELERY")
    except SystemExit as exc:  # click always ends with SystemExit in standalone mode
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    return 0


def _warn(warnings: list[str]) -> None:
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)


def cmd_run(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    # On embedded defaults this is the one process using the database: it may upgrade it.
    _warn(settings.warnings())
    _warn(services_ready(settings, upgrade=settings.embedded))
    record(settings, "run", args.metrics_port, args.metrics_host)
    app = create_app(settings)
    rt = Runtime.of(app)
    mode = "embedded (in-process broker and bucket)" if settings.embedded else "Redis"
    log.info(
        "hipchat-poller run: %s; database %s; poll every %ss",
        mode,
        rt.db.dialect,
        settings.poll_interval_seconds,
    )
    level = args.log_level or settings.log_level.upper()
    EmbeddedWorker(app, concurrency=args.concurrency, loglevel=level).run()
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    logging.getLogger().setLevel((args.log_level or "WARNING").upper())
    return run_demo(interval=args.interval, timeout=args.timeout)
