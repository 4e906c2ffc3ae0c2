"""Is the database's schema the one this code was written for? Checked before a command
touches the database, with one connection and without running Alembic when it is.

============================  =================================================================
the database's revision       what happens
============================  =================================================================
this code's head              go on
none, embedded default        the schema is created (SQLite in the data directory, empty: a
                              first use, nothing to lose), so that first use is one step
none, or an older revision    :class:`NeedsAttention` (exit 1): run ``hipchat-poller migrate``
one this code does not know   :class:`NeedsAttention` (exit 1): the database is newer than
                              this code
============================  =================================================================

An existing schema is upgraded only by ``hipchat-poller migrate``, and by ``run`` on embedded
defaults (one process owns the database); ``worker``, ``beat`` and ``run`` with Redis refuse to
start on an old one. Upgrading is a step of its own because processes of two versions may share
one database (``docker-compose.yml`` runs it as a one-shot job before the workers start).
"""

from __future__ import annotations

import logging
from collections.abc import Collection

from alembic.script import ScriptDirectory

from storage.db import alembic_config, head_revision
from storage.errors import NeedsAttention
from tasks.runtime import Runtime

log = logging.getLogger(__name__)
MIGRATE = "run `hipchat-poller migrate`"


def check_schema(rt: Runtime) -> None:
    """Return if the schema is this code's; create it in an empty embedded database; else
    raise :class:`NeedsAttention` with a one-line message saying what to do."""
    current = rt.db.current_revision()
    head = head_revision()
    if current == head:
        return
    if current is None and rt.settings.database_url is None:
        log.debug("creating the database schema of the embedded database")
        rt.db.upgrade()
        return
    raise NeedsAttention(mismatch(current, head, shipped_revisions()))


def mismatch(current: str | None, head: str | None, shipped: Collection[str]) -> str:
    """What to tell a person whose database is at ``current`` when this code needs ``head``;
    ``shipped`` holds every revision this code knows."""
    if current is None:
        return f"the database has no schema yet: {MIGRATE}"
    if current in shipped:
        where = f"at {current}, this code needs {head}"
        return f"the database schema is out of date ({where}): {MIGRATE}"
    return (
        f"the database schema (at {current}) is newer than this code (at {head}): "
        "run a newer hipchat-poller"
    )


def shipped_revisions() -> set[str]:
    """Every migration shipped with this code (read from the package, no database)."""
    script = ScriptDirectory.from_config(alembic_config())
    return {revision.revision for revision in script.walk_revisions()}
