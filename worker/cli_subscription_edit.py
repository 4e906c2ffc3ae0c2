"""Commands: ``subscription update ID``, ``subscription pause ID``, ``subscription resume ID``.

``update`` changes what a subscription does in place: its filter, name and target (a new
target with ``--webhook``/``--log``/``--reply``/``--notify``/``--handler``, or a change to the
one it has: ``--template``, ``--color``, ``--secret``, ``--to-room``...). Its connection,
event and room stay, and so do its watermark and priming: nothing is skipped and nothing is
fired twice, as unsubscribing and subscribing again would. Every change is checked by the
rules of ``subscribe``; any problem changes nothing (exit 2).

``pause`` stops new events for the subscription (polls skip it; events already in its outbox
are still delivered); ``resume`` makes it active again, also out of ``error``, and hands its
waiting events to the workers.
"""

from __future__ import annotations

import argparse
from typing import Any

from storage import connections as conns
from storage import outbox
from storage import subscriptions as subs
from storage.errors import ValidationError
from storage.models import Subscription
from storage.vocabulary import OPEN_OUTBOX_STATES, SubscriptionState
from tasks.subscribe import SubscriptionSpec, handler_errors
from tasks.subscriptions_api import update_subscription
from worker.cli_common import runtime, send_drains
from worker.cli_subscriptions import (
    add_target_options,
    chosen_target,
    describe_target,
    misplaced_options,
    shown_target,
    target_of,
)

NOTIFY_ONLY = ("color", "format", "from_", "alert")


def register(sub: Any) -> None:
    group = sub.add_parser("subscription", help="update, pause or resume one subscription")
    actions = group.add_subparsers(dest="action", required=True, metavar="ACTION")
    update = actions.add_parser(
        "update", help="change filter, name, target or include-own; keeps its place"
    )
    update.add_argument("id", type=int)
    update.add_argument("--name", help="a new name (unique per connection)")
    found = update.add_mutually_exclusive_group()
    found.add_argument("--filter", help="a new regex for room_message")
    found.add_argument("--no-filter", action="store_true", help="fire on every message")
    update.add_argument("--template", help="a new message template for --reply/--notify targets")
    add_target_options(update, required=False)
    update.add_argument(
        "--no-alert", dest="alert", action="store_false", default=None, help="for --notify"
    )
    update.add_argument("--no-secret", action="store_true", help="webhooks: stop signing")
    update.add_argument(
        "--include-own",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="history events: fire on this connection's own posts too (or not)",
    )
    update.set_defaults(handler=cmd_update)
    for name, handler, text in (
        ("pause", cmd_pause, "stop new events for a subscription"),
        ("resume", cmd_resume, "make a paused or failed subscription active again"),
    ):
        p = actions.add_parser(name, help=text)
        p.add_argument("id", type=int)
        p.set_defaults(handler=handler)


def cmd_update(args: argparse.Namespace) -> int:
    with runtime() as rt:
        with rt.db.session() as s:
            row = _require(s, args.id)
            conn = conns.require_connection(s, row.connection_id)
            kind, target = _edited_target(row, args)
            spec = SubscriptionSpec(
                connection=conn.name,
                event=row.event,
                target_kind=kind,
                target=target,
                room=row.room,
                filter=None if args.no_filter else (args.filter or row.filter),
                backfill=row.backfill,
                name=args.name or row.name,
                include_own=row.include_own if args.include_own is None else args.include_own,
            )
        errors = handler_errors(target)
        if errors:
            raise ValidationError("invalid subscription", errors)
        view = update_subscription(rt, args.id, spec)
    room = f" {view.room}" if view.room else ""
    does = describe_target(view.target_kind, shown_target(view.target_kind, view.target))
    print(f"subscription {view.id} updated: {view.event}{room} -> {does} (its place is kept)")
    return 0


def _edited_target(row: Subscription, args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """The target after the options: a new one, or the stored one changed. Bad input (every
    option that does not go with the resulting target) raises."""
    chosen = chosen_target(args)
    stored = dict(row.target)
    if chosen is not None:
        kind, target = target_of(args)
        if kind == row.target_kind == "webhook" and args.secret is None and not args.no_secret:
            target.pop("secret", None)  # keep signing with the stored secret
            target |= {k: v for k, v in stored.items() if k == "secret_encrypted"}
    else:
        kind, target = row.target_kind, stored
        chosen = _kind_option(kind, target)
        target |= _changes(args)
    problems = misplaced_options(args, chosen)
    if args.template is not None and (
        chosen not in ("reply", "notify") or args.reply or args.notify
    ):
        problems.append("--template changes the message of a --reply or --notify target")
    if args.no_secret and chosen != "webhook":
        problems.append("--no-secret goes with --webhook")
    if problems:
        raise ValidationError("invalid subscription", problems)
    if args.secret is not None or args.no_secret:
        target.pop("secret_encrypted", None)
    return kind, target


def _kind_option(kind: str, target: dict[str, Any]) -> str:
    """The option that would have made this stored target."""
    if kind == "action":
        return "reply" if target.get("action") == "post_message" else "notify"
    return "handler_ref" if kind == "handler" else kind


def _changes(args: argparse.Namespace) -> dict[str, Any]:
    """The fields the options change in a stored target (``secret`` in plain text: it is
    encrypted when stored)."""
    fields = {
        "message": args.template,
        "secret": args.secret,
        "room": args.to_room,
        "color": args.color,
        "format": args.format,
        "from": args.from_,
        "notify": args.alert,
    }
    return {key: value for key, value in fields.items() if value is not None}


def cmd_pause(args: argparse.Namespace) -> int:
    with runtime() as rt, rt.db.session() as s:
        _require(s, args.id)
        subs.set_subscription_state(s, args.id, SubscriptionState.PAUSED, "paused by a person")
    print(f"subscription {args.id} paused: polls skip it until `subscription resume {args.id}`")
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    with runtime() as rt:
        with rt.db.session() as s:
            row = _require(s, args.id)
            was = f" (was {row.state}: {row.state_reason})" if row.state_reason else ""
            subs.set_subscription_state(s, args.id, SubscriptionState.ACTIVE)
            waiting = outbox.count_events(s, states=OPEN_OUTBOX_STATES, subscription_id=args.id)
        print(f"subscription {args.id} active{was}")
        if waiting:
            print(f"{waiting} event(s) waiting: {send_drains(rt, {args.id})}")
    return 0


def _require(s: Any, sub_id: int) -> Subscription:
    row = subs.get_subscription(s, sub_id)
    if row is None:
        raise ValidationError(f"no subscription {sub_id}")
    return row
