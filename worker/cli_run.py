"""``run`` (worker + beat in one process), ``worker`` and ``beat`` (Celery's own commands
with our app), ``emulator``, ``flower``."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from tasks.runtime import Runtime
from tasks.settings import Settings
from worker.app import ACTION_QUEUE, POLL_QUEUE, create_app

log = logging.getLogger(__name__)
APP = "worker.celery_app:app"


def register(sub: Any) -> None:
    run = sub.add_parser(
        "run",
        help="worker and beat in one process (embedded defaults when no Redis/database URL is set)",
    )
    run.add_argument("--concurrency", type=int, default=4)
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


def passthrough(argv: list[str]) -> int | None:
    """worker/beat/emulator take their own options; None if argv is not one of them."""
    if not argv or argv[0] not in ("worker", "beat", "emulator"):
        return None
    command, rest = argv[0], argv[1:]
    if command == "emulator":
        from emulator.cli import main as emulator_main

        return emulator_main(rest)
    from celery.bin.celery import main as celery_main

    Runtime(Settings.from_env()).db.upgrade()
    if command == "worker":
        extra = (
            []
            if any(a.startswith(("-Q", "--queues")) for a in rest)
            else ["-Q", f"{POLL_QUEUE},{ACTION_QUEUE}"]
        )
        args = ["-A", APP, "worker", "-E", *extra, *rest]
    else:
        args = ["-A", APP, "beat", *rest]
    try:
        celery_main(args)  # exits through SystemExit
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from worker.embedded import EmbeddedWorker

    settings = Settings.from_env()
    app = create_app(settings)
    rt = Runtime.of(app)
    rt.db.upgrade()
    mode = "embedded (in-process broker and bucket)" if settings.embedded else "Redis"
    log.info(
        "hipchat-poller run: %s; database %s; poll every %ss",
        mode,
        rt.db.dialect,
        settings.poll_interval_seconds,
    )
    EmbeddedWorker(app, concurrency=args.concurrency, loglevel=args.log_level or "INFO").run()
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from worker.demo import run_demo

    logging.getLogger().setLevel(args.log_level or "WARNING")
    return run_demo(interval=args.interval, timeout=args.timeout)
