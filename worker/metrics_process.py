"""Where the processes that record metrics write them: Prometheus' multiprocess mode.

Each process that records (``worker`` with its prefork children, ``beat``, ``run``) calls
:func:`start_recording` before it makes any metric: it gets a
directory of its own, a *group*, ``METRICS_DIR/<role>-<pid>`` (``worker-4242``), and sets
``PROMETHEUS_MULTIPROC_DIR`` to it, which its children inherit. Every process of the group
then writes its own ``<kind>_<pid>.db`` files there (:mod:`tasks.metrics`).

Why a directory per group and not one for all: ``prometheus_client`` requires its directory
to be wiped when the processes writing it start, and a worker, a beat and a ``run`` on one
host start and stop on their own. So each starts with a fresh group and removes the groups
whose process is gone (the wipe); a scrape labels each group's figures ``process="<group>"``,
so a restarted worker is a counter reset of its own series, never a drop in another's.

A child that exits is marked dead (``mark_process_dead`` on ``worker_process_shutdown``): its
live gauge files go, and a child killed outright is left out at scrape time by its pid.

The groups are told apart by process ids, so a directory belongs to one host (one PID
namespace): never share it between containers or hosts; serve each host's (``worker
--metrics-port``, or ``hipchat-poller metrics`` on that host) instead.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

from tasks.settings import Settings

log = logging.getLogger(__name__)

ENV = "PROMETHEUS_MULTIPROC_DIR"
GROUP = re.compile(r"^(worker|beat|run)-(\d+)$")


def start_recording(settings: Settings, role: str) -> Path:
    """Make this process's group directory, empty, and point ``PROMETHEUS_MULTIPROC_DIR`` at
    it; remove the groups of processes that are gone. Returns the group's directory."""
    root = Path(settings.effective_metrics_dir)
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    for group in groups(root):
        if not alive(group_pid(group)):
            shutil.rmtree(group, ignore_errors=True)
    group = root / f"{role}-{os.getpid()}"
    shutil.rmtree(group, ignore_errors=True)
    group.mkdir(mode=0o700)
    os.environ[ENV] = str(group)
    _multiprocess_mode()
    if role == "worker":
        from celery import signals

        signals.worker_process_shutdown.connect(_child_exited, weak=False)
    return group


def _child_exited(sender: Any = None, pid: int | None = None, **kwargs: Any) -> None:
    """A prefork child is exiting: its live gauges no longer count (run in the child)."""
    from prometheus_client import multiprocess

    directory = os.environ.get(ENV)
    if directory:
        with contextlib.suppress(OSError):
            multiprocess.mark_process_dead(pid or os.getpid(), directory)  # type: ignore[no-untyped-call]


def _multiprocess_mode() -> None:
    """``prometheus_client`` picks its mode when it is first imported (``values.ValueClass``,
    read each time a metric is made). If a library imported it before this process set
    ``PROMETHEUS_MULTIPROC_DIR`` (Celery's command line loads Flower, which does), pick again
    as that import would have now: the metrics :mod:`tasks.metrics` makes later are then
    written to the group's files, not kept in memory where no scrape sees them."""
    if "prometheus_client.values" not in sys.modules:
        return  # the first import will see the variable
    from prometheus_client import values

    if not getattr(values.ValueClass, "_multiprocess", False):
        log.debug("metrics: prometheus_client was imported before %s was set", ENV)
        values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]


def groups(root: Path) -> list[Path]:
    """The group directories under ``root``, by name."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and GROUP.match(p.name))


def group_pid(group: Path) -> int:
    match = GROUP.match(group.name)
    return int(match.group(2)) if match else 0


def alive(pid: int) -> bool:
    """Is there a process with this id (in this PID namespace)?"""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True
