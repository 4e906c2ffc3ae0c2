"""Purging the outbox: closed events (delivered, dead) are deleted once they are older than
``OUTBOX_RETENTION_DAYS``, so that the table holds what an operator may still look at or
replay, not every event ever. Beat sends ``hipchat.purge_outbox`` every hour."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from storage import outbox
from tasks.runtime import Runtime

log = logging.getLogger(__name__)


def purge_outbox(rt: Runtime, now: datetime) -> int:
    """Delete the closed events older than the retention; the number deleted."""
    cutoff = now - timedelta(days=rt.settings.outbox_retention_days)
    with rt.db.session() as s:
        deleted = outbox.purge_closed(s, cutoff)
    if deleted:
        log.info("purged %d closed outbox events older than %s", deleted, cutoff.isoformat())
    return deleted
