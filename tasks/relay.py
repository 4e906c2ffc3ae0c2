"""The outbox relay: hands over events whose delivery was never started or was lost.

A poll commits its events, marks them dispatched and sends one drain per subscription
(:func:`dispatch`). A worker that dies between the commit and the send, or a drain message
that is lost, leaves events open; beat runs :func:`relay` every
``RELAY_INTERVAL_SECONDS``, which re-sends a drain for every subscription whose events have
stayed open longer than ``RELAY_MIN_AGE_SECONDS``. A drain is idempotent (one per
subscription at a time, in order, each event once), so a re-sent drain costs nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta

from storage import outbox
from tasks.runtime import Runtime

# subscription id -> ids of its open events
Dispatch = dict[int, list[int]]
SendDrain = Callable[[int], None]

RELAY_BATCH = 1000


def dispatch(rt: Runtime, events: Dispatch, send_drain: SendDrain, now: datetime) -> None:
    """After commit: one drain per subscription that got events.

    The events are marked dispatched *before* the drain is sent, so the mark can never land
    after a fast drain already recorded a failure. A send that fails after the mark loses
    nothing: the relay re-sends dispatched events that stay open too long.
    """
    for subscription_id, event_ids in events.items():
        with rt.db.session() as s:
            outbox.mark_dispatched(s, event_ids, now)
        send_drain(subscription_id)


def relay(rt: Runtime, send_drain: SendDrain, now: datetime) -> int:
    """Re-send a drain for each subscription with events left behind; the number of events.

    A subscription whose drain lock is held is left alone: a live drain is at work (a dead
    one's lock frees within seconds, and the next relay sends it). The events are marked in
    the transaction that selected them (SKIP LOCKED on PostgreSQL), so two relays running at
    once split them instead of both sending them."""
    cutoff = now - timedelta(seconds=rt.settings.relay_min_age_seconds)
    found: Dispatch = {}
    with rt.db.session() as s:
        for event in outbox.undispatched(s, older_than=cutoff, limit=RELAY_BATCH):
            found.setdefault(event.subscription_id, []).append(event.id)
        for busy in rt.leases.draining(list(found)):
            del found[busy]
        outbox.mark_dispatched(s, [i for ids in found.values() for i in ids], now)
    for subscription_id in found:
        send_drain(subscription_id)
    return sum(map(len, found.values()))
