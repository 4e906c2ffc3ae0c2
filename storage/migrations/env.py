"""Alembic environment for the storage package.

``storage.db.Database.upgrade()`` passes an open connection in ``config.attributes``; the
``alembic`` command line (see docs/storage.md) builds an engine from ``-x url=...`` or from
``HIPCHAT_POLLER_DATABASE_URL``. Logging is left to the host process on purpose.
"""

from __future__ import annotations

import os

from alembic import context
from sqlalchemy import Connection

from storage.db import Database
from storage.models import Base

config = context.config


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=connection.dialect.name == "sqlite",  # SQLite ALTERs via table copy
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def _url() -> str:
    url = context.get_x_argument(as_dictionary=True).get("url")
    url = url or os.environ.get("HIPCHAT_POLLER_DATABASE_URL")
    if not url:
        raise SystemExit("give the database as -x url=... or HIPCHAT_POLLER_DATABASE_URL")
    return url


if context.is_offline_mode():
    context.configure(url=_url(), target_metadata=Base.metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
elif (given := config.attributes.get("connection")) is not None:
    _run(given)
else:
    # The same engine setup as the worker's (SQLite directory, pragmas, BEGIN IMMEDIATE).
    database = Database(_url())
    try:
        with database.engine.connect() as connection:
            _run(connection)
    finally:
        database.dispose()
