"""Command: ``metrics``: serve Prometheus metrics; and ``--metrics-port`` of ``worker``,
``beat`` and ``run``.

``hipchat-poller metrics [--port 9464] [--host 127.0.0.1]`` serves, on ``/metrics``, what
the processes of this host recorded (every group under ``METRICS_DIR``, see
:mod:`worker.metrics_process`) and what the stores hold (:mod:`worker.metrics_store`), read
at each scrape. ``worker``, ``beat`` and ``run`` always record; with ``--metrics-port P
[--metrics-host H]`` they also serve their own group's figures (not the stores'), which is
how a container serves what it recorded.

A port out of range or taken is one line and exit 2, as for ``emulator --port``.
"""

from __future__ import annotations

import argparse
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

from storage.errors import ValidationError
from tasks.runtime import Runtime
from tasks.settings import Settings
from worker.cli_format import port_number
from worker.metrics_process import start_recording
from worker.metrics_server import MetricsServer, ProcessFiles
from worker.metrics_store import StoreCollector

DEFAULT_PORT = 9464  # Prometheus' registry of default ports: "Python client metrics"
DEFAULT_HOST = "127.0.0.1"
PORT_OPTION, HOST_OPTION = "--metrics-port", "--metrics-host"


def register(sub: Any) -> None:
    p = sub.add_parser(
        "metrics",
        help="serve Prometheus metrics: what this host's workers recorded, what the stores hold",
    )
    p.add_argument("--port", type=port_number, default=DEFAULT_PORT, help="default 9464")
    p.add_argument("--host", default=DEFAULT_HOST, help="default 127.0.0.1 (0.0.0.0: any)")
    p.set_defaults(handler=cmd_metrics)


def add_serving_options(parser: argparse.ArgumentParser) -> None:
    """``--metrics-port`` and ``--metrics-host`` (for ``run``)."""
    parser.add_argument(
        PORT_OPTION, type=port_number, default=None, help="serve this process's metrics here"
    )
    parser.add_argument(HOST_OPTION, default=DEFAULT_HOST, help="default 127.0.0.1")


def cmd_metrics(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    rt = Runtime(settings)
    collectors = [
        ProcessFiles(Path(settings.effective_metrics_dir)),
        StoreCollector(rt, limit=settings.metrics_max_connections),
    ]
    server = MetricsServer.bind(args.host, args.port, collectors)
    stopping = threading.Event()

    def _stop(signum: int, frame: FrameType | None) -> None:
        stopping.set()

    previous = {sig: signal.signal(sig, _stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.start()
        print(f"serving metrics at {server.url}", flush=True)
        while not stopping.wait(0.5):
            pass
    finally:
        server.stop()
        rt.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def take_serving_options(options: list[str]) -> tuple[list[str], int | None, str]:
    """Split ``--metrics-port P`` and ``--metrics-host H`` (or ``--opt=value``) off a Celery
    command line: (the rest, the port or None, the host)."""
    rest: list[str] = []
    found: dict[str, str] = {}
    items = iter(options)
    for item in items:
        name, equals, value = item.partition("=")
        if name not in (PORT_OPTION, HOST_OPTION):
            rest.append(item)
            continue
        if not equals:
            value = next(items, "")
        if not value:
            raise ValidationError(f"argument {name}: expected one argument")
        found[name] = value
    port = None
    if PORT_OPTION in found:
        try:
            port = port_number(found[PORT_OPTION])
        except argparse.ArgumentTypeError as exc:
            raise ValidationError(f"argument {PORT_OPTION}: {exc}") from None
    return rest, port, found.get(HOST_OPTION, DEFAULT_HOST)


def record(settings: Settings, role: str, port: int | None, host: str) -> MetricsServer | None:
    """This process records metrics (its own group directory); with ``port``, it serves them
    too. Call it before anything records."""
    group = start_recording(settings, role)
    if port is None:
        return None
    server = MetricsServer.bind(host, port, [ProcessFiles(group.parent, group)])
    server.start()
    print(f"serving this {role}'s metrics at {server.url}", flush=True)
    return server
