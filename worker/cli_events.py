"""Commands: ``events`` (what happened to each event), ``events show ID`` (its payload and
every attempt), ``events replay`` (re-queue dead letters under their idempotency keys)."""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.orm import Session

from storage import connections as conns
from storage import outbox
from storage import subscriptions as subs
from storage.errors import ValidationError
from storage.models import OutboxEvent
from storage.vocabulary import OutboxState, SubscriptionState
from worker.cli_common import connection_id, print_json, runtime, send_drains
from worker.cli_format import WHEN_HELP, one_line, parse_when, positive_int, stamp, table

USAGE = """hipchat-poller events [CONN] [--subscription ID] [--state STATE] [--since WHEN]
                             [--limit N] [--json]
       hipchat-poller events show ID [--json]
       hipchat-poller events replay (ID [ID ...] | --subscription ID | --dead) [--since WHEN]"""
STATES = tuple(state.value for state in OutboxState)


def register(sub: Any) -> None:
    p = sub.add_parser("events", help="recent events and their fate; show one; replay", usage=USAGE)
    p.add_argument("words", nargs="*", metavar="CONN | show ID | replay ID ...")
    p.add_argument("--subscription", type=int, metavar="ID", help="only this subscription's")
    p.add_argument("--state", choices=STATES, action="append", help="repeat for several")
    p.add_argument("--since", type=parse_when, metavar="WHEN", help=f"created since: {WHEN_HELP}")
    p.add_argument("--limit", type=positive_int, default=50, help="at most N events (default 50)")
    p.add_argument("--dead", action="store_true", help="replay: every dead event")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_events)


def cmd_events(args: argparse.Namespace) -> int:
    words: list[str] = args.words
    if words[:1] == ["show"]:
        return _show(args, _event_ids(words[1:], "events show needs one event ID", one=True)[0])
    if words[:1] == ["replay"]:
        return _replay(args, _event_ids(words[1:], "", one=False))
    if len(words) > 1 or args.dead:
        raise ValidationError("events lists with [CONN]; `events show ID`, `events replay ...`")
    return _list(args, words[0] if words else None)


def _event_ids(words: list[str], missing: str, *, one: bool) -> list[int]:
    if (one and len(words) != 1) or not all(w.isdigit() for w in words):
        raise ValidationError(missing or f"event IDs are numbers, not {' '.join(words)!r}")
    return [int(w) for w in words]


# -- events [CONN] ------------------------------------------------------------------------------


def _list(args: argparse.Namespace, connection: str | None) -> int:
    with runtime() as rt, rt.db.session() as s:
        events = outbox.list_events(
            s,
            connection_id=connection_id(s, connection) if connection else None,
            subscription_id=args.subscription,
            states=args.state or (),
            since=args.since,
            limit=args.limit,
        )
        views = [_view(s, e) for e in events]
    if args.json:
        return print_json(views)
    if not views:
        print("no events")
        return 0
    rows = [
        [v["id"], v["connection"]["name"], _sub_label(v["subscription"]), v["event"],
         v["state"], v["attempts"], stamp(v["created_at"]), stamp(v["delivered_at"]),
         one_line(v["last_error"])]
        for v in views
    ]  # fmt: skip
    heads = ["ID", "CONNECTION", "SUBSCRIPTION", "EVENT", "STATE", "FAILED", "CREATED"]
    print(table([*heads, "DELIVERED", "LAST ERROR"], rows))
    return 0


def _view(s: Session, event: OutboxEvent) -> dict[str, Any]:
    """An event as shown to people (the payload only in ``events show``)."""
    conn = conns.get_connection(s, event.connection_id)
    sub = subs.get_subscription(s, event.subscription_id)
    return {
        "id": event.id,
        "connection": {"id": event.connection_id, "name": conn.name if conn else None},
        "subscription": {"id": event.subscription_id, "name": sub.name if sub else None},
        "event": event.event,
        "state": event.state,
        "attempts": event.attempts,
        "last_error": event.last_error,
        "outcome": event.outcome,
        "idempotency_key": event.idempotency_key,
        "created_at": event.created_at,
        "dispatched_at": event.dispatched_at,
        "next_attempt_at": event.next_attempt_at,
        "delivered_at": event.delivered_at,
    }


def _sub_label(sub: dict[str, Any]) -> str:
    return f"{sub['id']} {sub['name']}" if sub["name"] else str(sub["id"])


# -- events show ID -----------------------------------------------------------------------------


def _show(args: argparse.Namespace, event_id: int) -> int:
    with runtime() as rt, rt.db.session() as s:
        event = outbox.get_event(s, event_id)
        if event is None:
            raise ValidationError(f"no event {event_id}")
        view = _view(s, event) | {"attempt_log": event.attempt_log or [], "payload": event.payload}
    if args.json:
        return print_json(view)
    state = view["state"]
    if view["next_attempt_at"] and state in (OutboxState.PENDING, OutboxState.DISPATCHED):
        state += f", next attempt at {stamp(view['next_attempt_at'])}"
    print(
        f"event {view['id']}: {view['event']} for subscription {view['subscription']['id']}"
        f" ({view['subscription']['name'] or 'no name'}) of connection"
        f" {view['connection']['name']}\n"
        f"state: {state}; failed attempts: {view['attempts']}\n"
        f"idempotency key: {view['idempotency_key']}\n"
        f"created {stamp(view['created_at'])}, delivered {stamp(view['delivered_at'])}"
    )
    print(_attempts(view["attempt_log"]))
    print("payload:\n" + json.dumps(view["payload"], indent=2, ensure_ascii=False))
    return 0


def _attempts(log: list[dict[str, Any]]) -> str:
    if not log:
        return "attempts: none yet"
    rows = []
    for entry in log:
        at = stamp(_parse(entry.get("at")))
        ms = f"{entry['ms']} ms" if isinstance(entry.get("ms"), int) else ""
        if entry.get("replayed"):
            rows.append([at, "", "replayed by a person"])
        elif "error" in entry:
            rows.append([at, ms, f"error: {one_line(str(entry['error']), 100)}"])
        else:
            rows.append([at, ms, f"ok: {one_line(str(entry.get('outcome')), 100)}"])
    lines = table(["AT", "TOOK", "RESULT"], rows).splitlines()
    return "attempts:\n" + "\n".join(f"  {line}" for line in lines)


def _parse(text: object) -> datetime | None:
    try:
        return datetime.fromisoformat(str(text))
    except ValueError:
        return None


# -- events replay ------------------------------------------------------------------------------


def _replay(args: argparse.Namespace, ids: list[int]) -> int:
    chosen = sum([bool(ids), args.subscription is not None or args.dead])
    if chosen != 1:
        raise ValidationError("events replay needs event IDs, or --subscription ID, or --dead")
    with runtime() as rt:
        with rt.db.session() as s:
            events = _replayable(s, args, ids)
            replayed = outbox.replay(s, events, datetime.now(UTC))
            affected = {e.subscription_id for e in events}
            held = _held(s, affected)
        if not replayed:
            print("nothing to replay")
            return 0
        note = send_drains(rt, affected - set(held))
    shown = ", ".join(str(i) for i in replayed)
    print(f"re-queued {len(replayed)} event(s) under their idempotency keys: {shown}")
    for line in [*held.values(), note]:
        if line:
            print(line)
    return 0


def _replayable(s: Session, args: argparse.Namespace, ids: list[int]) -> list[OutboxEvent]:
    """The events to replay; with IDs, all of them or (bad input) none."""
    if not ids:
        if args.subscription is not None and subs.get_subscription(s, args.subscription) is None:
            raise ValidationError(f"no subscription {args.subscription}")
        return outbox.closed_events(s, subscription_id=args.subscription, since=args.since)
    found = {e.id: e for e in outbox.closed_events(s, ids=ids, states=outbox.CLOSED_OUTBOX_STATES)}
    errors = []
    for event_id in ids:
        if event_id not in found:
            event = outbox.get_event(s, event_id)
            errors.append(
                f"no event {event_id}"
                if event is None
                else f"event {event_id} is {event.state}: it is queued already"
            )
    if errors:
        raise ValidationError("nothing replayed", errors)
    return [found[i] for i in dict.fromkeys(ids)]


def _held(s: Session, sub_ids: set[int]) -> dict[int, str]:
    """Subscriptions whose events wait for a person, with what to tell them."""
    held = {}
    for sub_id in sorted(sub_ids):
        row = subs.get_subscription(s, sub_id)
        if row is not None and row.state == SubscriptionState.ERROR:
            held[sub_id] = (
                f"subscription {sub_id} is in error ({row.state_reason}): its events wait "
                f"for `hipchat-poller subscription resume {sub_id}`"
            )
    return held
