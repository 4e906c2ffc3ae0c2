"""What the command modules share: the runtime of a command, JSON output, connection names."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy.orm import Session

from storage import connections as conns
from storage.errors import ValidationError
from tasks.runtime import Runtime
from tasks.settings import Settings
from worker.schema_check import check_schema


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
