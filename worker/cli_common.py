"""What the command modules share: the runtime of a command, JSON output, connection names,
handing re-queued events over to the workers."""

from __future__ import annotations

import json
import logging
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from typing import Any

from kombu.exceptions import KombuError
from sqlalchemy.orm import Session

from storage import connections as conns
from storage.errors import StorageUnavailable, ValidationError
from tasks.celery_tasks import DELIVER_TASK
from tasks.redis_conn import redis_errors
from tasks.runtime import Runtime
from tasks.settings import Settings
from worker.app import create_app
from worker.schema_check import check_schema

log = logging.getLogger(__name__)


@contextmanager
def runtime() -> Iterator[Runtime]:
    """The runtime of one command, built from the environment, its database schema checked
    (see :mod:`worker.schema_check`: an out-of-date database stops the command); its
    database connections are closed when the block ends."""
    rt = Runtime(Settings.from_env())
    try:
        check_schema(rt)
        yield rt
    finally:
        rt.close()


def print_json(value: Any) -> int:
    """Print ``value`` as indented JSON (datetimes as text); the command's exit code, 0."""
    print(json.dumps(value, indent=2, ensure_ascii=False, default=str))
    return 0


def connection_id(s: Session, name: str) -> int:
    """The id of the connection called ``name``; bad input (exit 2) if there is none."""
    row = conns.get_connection(s, name)
    if row is None:
        raise ValidationError(f"no connection named {name!r}")
    return int(row.id)


def send_drains(rt: Runtime, subscription_ids: Collection[int]) -> str:
    """Ask the workers to deliver these subscriptions' open events now (``hipchat.deliver``),
    if their broker can be reached from here; else the relay does it within its interval.
    Returns the sentence to tell the person."""
    relay = (
        f"the relay hands them to a worker within {rt.settings.relay_interval_seconds:g} s "
        "(RELAY_INTERVAL_SECONDS) while beat (or `hipchat-poller run`) is running"
    )
    if not subscription_ids:
        return ""
    if rt.settings.embedded:  # the in-process broker of `run` is out of this process's reach
        return relay
    try:
        with redis_errors("PING", "sending deliveries"):
            rt.redis.ping()
        app = create_app(rt.settings)
        for sub_id in sorted(subscription_ids):
            app.send_task(DELIVER_TASK, args=[sub_id], retry=False, ignore_result=True)
    except (StorageUnavailable, KombuError, OSError) as exc:
        log.debug("could not send deliveries: %s", exc)
        return f"no broker reachable from here: {relay}"
    ids = ", ".join(str(i) for i in sorted(subscription_ids))
    return f"sent a delivery for subscription(s) {ids} to the workers"
