"""Commands: ``subscribe``, ``subscriptions``, ``unsubscribe``. Secrets are never shown."""

from __future__ import annotations

import argparse
import os
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from storage import subscriptions as subs
from storage.errors import ValidationError
from storage.vocabulary import Event
from tasks.client_inputs import COLORS
from tasks.client_inputs import MESSAGE_FORMATS as FORMATS
from tasks.subscribe import SubscriptionSpec, handler_errors, name_errors, spec_errors
from tasks.subscriptions_api import create_subscriptions
from worker.cli_common import connection_id, print_json, runtime


def register(sub: Any) -> None:
    s = sub.add_parser("subscribe", help="subscribe a downstream target to a trigger")
    s.add_argument("connection")
    s.add_argument(
        "--event",
        action="append",
        required=True,
        # No `choices`: an unknown event is reported together with every other problem.
        help=f"repeat for several events: {', '.join(sorted(Event))}",
    )
    s.add_argument("--room", help="room name or id (room events)")
    s.add_argument("--filter", help="regex for room_message; its groups become `matches`")
    s.add_argument("--backfill", type=int, default=0, help="replay the last N items at priming")
    s.add_argument("--name", help="a name for the subscription (unique per connection)")
    target = s.add_mutually_exclusive_group(required=True)
    target.add_argument("--webhook", metavar="URL", help="POST each event as signed JSON")
    target.add_argument("--log", action="store_true", help="log each event (demo, debugging)")
    target.add_argument(
        "--reply", metavar="TEMPLATE", help="post a message, e.g. 'pong {matches[0]}'"
    )
    target.add_argument("--notify", metavar="TEMPLATE", help="send a notification")
    target.add_argument(
        "--handler", dest="handler_ref", metavar="MODULE:FUNCTION", help="a Python handler"
    )
    s.add_argument("--secret", help="HMAC secret for --webhook (or $HIPCHAT_POLLER_WEBHOOK_SECRET)")
    s.add_argument("--to-room", help="room the action posts to (default: the event's room)")
    s.add_argument("--color", help=f"for --notify: {', '.join(COLORS)} (default yellow)")
    s.add_argument("--format", choices=FORMATS, help="for --notify (default html)")
    s.add_argument("--from", dest="from_", metavar="TEMPLATE", help="for --notify: sender label")
    s.add_argument("--alert", action="store_true", help="for --notify: notify the room's users")
    s.set_defaults(handler=cmd_subscribe)

    ls = sub.add_parser("subscriptions", help="list subscriptions")
    ls.add_argument("connection", nargs="?")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(handler=cmd_subscriptions)
    un = sub.add_parser("unsubscribe", help="remove a subscription by id")
    un.add_argument("id", type=int)
    un.set_defaults(handler=cmd_unsubscribe)


# Options that belong to one kind of target: given with another, they would be ignored.
TARGET_OPTIONS = {
    "secret": ("--secret", ("webhook",)),
    "to_room": ("--to-room", ("reply", "notify")),
    "color": ("--color", ("notify",)),
    "format": ("--format", ("notify",)),
    "from_": ("--from", ("notify",)),
    "alert": ("--alert", ("notify",)),
}


def misplaced_options(args: argparse.Namespace) -> list[str]:
    """Options given for a target other than the one chosen (refused: silently ignoring
    ``--color`` without ``--notify`` would surprise)."""
    chosen = next(
        (kind for kind in ("webhook", "log", "reply", "notify", "handler_ref")
         if getattr(args, kind, None) not in (None, False)),
        None,
    )  # fmt: skip
    return [
        f"{flag} goes with {' or '.join('--' + k for k in kinds)}"
        for key, (flag, kinds) in TARGET_OPTIONS.items()
        if getattr(args, key, None) not in (None, False) and chosen not in kinds
    ]


def _target(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    if args.webhook:
        secret = args.secret
        if secret is None:  # an empty --secret is refused, never replaced by the variable
            secret = os.environ.get("HIPCHAT_POLLER_WEBHOOK_SECRET") or None
        return "webhook", {
            "url": args.webhook,
            **({"secret": secret} if secret is not None else {}),
        }
    if args.log:
        return "log", {}
    if args.handler_ref:
        return "handler", {"handler": args.handler_ref}
    room = {"room": args.to_room} if args.to_room else {}
    if args.reply is not None:
        return "action", {"action": "post_message", "message": args.reply, **room}
    return "action", {
        "action": "send_notification",
        "message": args.notify,
        "color": args.color or "yellow",
        "format": args.format or "html",
        "notify": args.alert,
        **({"from": args.from_} if args.from_ is not None else {}),
        **room,
    }


def cmd_subscribe(args: argparse.Namespace) -> int:
    kind, target = _target(args)
    specs = [
        SubscriptionSpec(
            connection=args.connection,
            event=event,
            target_kind=kind,
            target=dict(target),
            room=args.room,
            filter=args.filter,
            backfill=args.backfill,
            name=f"{args.name}-{event}" if args.name and len(args.event) > 1 else args.name,
        )
        for event in args.event
    ]
    # Checked before touching the database: bad input needs no runtime.
    errors = misplaced_options(args) + handler_errors(target)
    errors += [e for spec in specs for e in spec_errors(spec) + name_errors(spec.name)]
    if errors:
        raise ValidationError("invalid subscription", list(dict.fromkeys(errors)))
    with runtime() as rt:
        views = create_subscriptions(rt, specs)
    for view in views:
        room = f" room {view.room}" if view.room else ""
        print(f"subscription {view.id}: {view.event}{room} -> {view.target_kind}")
    return 0


def cmd_subscriptions(args: argparse.Namespace) -> int:
    with runtime() as rt, rt.db.session() as s:
        conn_id = connection_id(s, args.connection) if args.connection else None
        views = [subs_view(r) for r in subs.list_subscriptions(s, conn_id)]
    if args.json:
        return print_json(views)
    for v in views:
        extra = f" filter={v['filter']!r}" if v["filter"] else ""
        reason = f" ({v['state_reason']})" if v["state_reason"] else ""
        print(
            f"{v['id']:>4}  conn {v['connection_id']}  {v['event']:<18} "
            f"{v['room'] or '-':<16} -> {v['target_kind']}{extra}  {v['state']}{reason}"
        )
    return 0


def subs_view(row: Any) -> dict[str, Any]:
    """A subscription as shown to people: secrets are never shown."""
    target = {k: v for k, v in dict(row.target).items() if "secret" not in k}
    if isinstance(target.get("url"), str):
        target["url"] = shown_url(target["url"])
    return {
        "id": row.id,
        "connection_id": row.connection_id,
        "name": row.name,
        "event": row.event,
        "room": row.room,
        "room_id": row.room_id,
        "filter": row.filter,
        "target_kind": row.target_kind,
        "target": target,
        "state": row.state,
        "state_reason": row.state_reason,
        "primed": row.primed_at is not None,
    }


def shown_url(url: str) -> str:
    """A webhook URL for display: its userinfo and query string may hold a secret."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    netloc = f"***@{host}" if "@" in parts.netloc else host
    return urlunsplit(parts._replace(netloc=netloc, query="***" if parts.query else ""))


def cmd_unsubscribe(args: argparse.Namespace) -> int:
    with runtime() as rt, rt.db.session() as s:
        if not subs.remove_subscription(s, args.id):
            raise ValidationError(f"no subscription {args.id}")
    print(f"subscription {args.id} removed")
    return 0
