"""Commands: ``subscribe``, ``subscriptions``, ``unsubscribe``. Secrets are never shown.

The target options are shared with ``subscription update`` (:mod:`worker.cli_subscription_edit`):
:func:`add_target_options`, :func:`target_of`, :func:`misplaced_options`."""

from __future__ import annotations

import argparse
import os
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from storage import connections as conns
from storage import subscriptions as subs
from storage.errors import ValidationError
from storage.vocabulary import Event
from tasks.client_inputs import COLORS
from tasks.client_inputs import MESSAGE_FORMATS as FORMATS
from tasks.subscribe import SubscriptionSpec, handler_errors, name_errors, spec_errors
from tasks.subscriptions_api import create_subscriptions
from worker.cli_common import connection_id, print_json, runtime
from worker.cli_format import one_line, table


def add_target_options(parser: argparse.ArgumentParser, *, required: bool) -> None:
    """The target (one of five) and the options of each kind."""
    target = parser.add_mutually_exclusive_group(required=required)
    target.add_argument("--webhook", metavar="URL", help="POST each event as signed JSON")
    target.add_argument("--log", action="store_true", help="log each event (demo, debugging)")
    target.add_argument(
        "--reply", metavar="TEMPLATE", help="post a message, e.g. 'pong {matches[0]}'"
    )
    target.add_argument("--notify", metavar="TEMPLATE", help="send a notification")
    target.add_argument(
        "--handler", dest="handler_ref", metavar="MODULE:FUNCTION", help="a Python handler"
    )
    parser.add_argument(
        "--secret", help="HMAC secret for --webhook (or $HIPCHAT_POLLER_WEBHOOK_SECRET)"
    )
    parser.add_argument("--to-room", help="room the action posts to (default: the event's room)")
    parser.add_argument("--color", help=f"for --notify: {', '.join(COLORS)} (default yellow)")
    parser.add_argument("--format", choices=FORMATS, help="for --notify (default html)")
    parser.add_argument(
        "--from", dest="from_", metavar="TEMPLATE", help="for --notify: sender label"
    )
    parser.add_argument(
        "--alert", action="store_true", default=None, help="for --notify: notify the room's users"
    )


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
    s.add_argument(
        "--include-own",
        action="store_true",
        help="history events: fire on this connection's own posts too (off: a reply never "
        "answers itself)",
    )
    add_target_options(s, required=True)
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


TARGET_KINDS = ("webhook", "log", "reply", "notify", "handler_ref")


def chosen_target(args: argparse.Namespace) -> str | None:
    """Which of the five target options was given, if any."""
    return next((k for k in TARGET_KINDS if getattr(args, k, None) not in (None, False)), None)


def misplaced_options(args: argparse.Namespace, chosen: str | None = None) -> list[str]:
    """Options given for a target other than ``chosen`` (default: the one given); refused,
    since silently ignoring ``--color`` without ``--notify`` would surprise."""
    chosen = chosen or chosen_target(args)
    return [
        f"{flag} goes with {' or '.join('--' + k for k in kinds)}"
        for key, (flag, kinds) in TARGET_OPTIONS.items()
        if getattr(args, key, None) not in (None, False) and chosen not in kinds
    ]


def target_of(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """The target kind and JSON that the target options describe."""
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
        "notify": bool(args.alert),
        **({"from": args.from_} if args.from_ is not None else {}),
        **room,
    }


def cmd_subscribe(args: argparse.Namespace) -> int:
    kind, target = target_of(args)
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
            include_own=args.include_own,
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
        names = {c.id: c.name for c in conns.list_connections(s)}
        views = [
            subs_view(r, names.get(r.connection_id)) for r in subs.list_subscriptions(s, conn_id)
        ]
    if args.json:
        return print_json(views)
    if not views:
        print("no subscriptions; add one with `hipchat-poller subscribe`")
        return 0
    rows = [
        [v["id"], v["name"] or "-", v["connection"]["name"], v["event"], v["room"] or "-",
         one_line(v["filter"], 30), describe_target(v["target_kind"], v["target"]),
         v["state"] + (f" ({one_line(v['state_reason'], 50)})" if v["state_reason"] else "")]
        for v in views
    ]  # fmt: skip
    heads = ["ID", "NAME", "CONNECTION", "EVENT", "ROOM", "FILTER", "TARGET", "STATE"]
    print(table(heads, rows))
    return 0


def subs_view(row: Any, connection: str | None = None) -> dict[str, Any]:
    """A subscription as shown to people: secrets are never shown."""
    return {
        "id": row.id,
        "connection_id": row.connection_id,
        "connection": {"id": row.connection_id, "name": connection},
        "name": row.name,
        "event": row.event,
        "room": row.room,
        "room_id": row.room_id,
        "filter": row.filter,
        "target_kind": row.target_kind,
        "target": shown_target(row.target_kind, row.target),
        "state": row.state,
        "state_reason": row.state_reason,
        "primed": row.primed_at is not None,
        "include_own": bool(row.include_own),
    }


def shown_target(kind: str, stored: dict[str, Any]) -> dict[str, Any]:
    """A stored target without its secrets; a webhook says whether it is ``signed``."""
    target = {k: v for k, v in dict(stored).items() if "secret" not in k}
    if isinstance(target.get("url"), str):
        target["url"] = shown_url(target["url"])
    if kind == "webhook":
        target["signed"] = "secret_encrypted" in stored
    return target


def describe_target(kind: str, target: dict[str, Any]) -> str:
    """One line: ``webhook https://ci.example/hook (signed)``, ``notify 'pong {x}' green``."""
    if kind == "webhook":
        return f"webhook {target.get('url')}" + (" (signed)" if target.get("signed") else "")
    if kind == "handler":
        return f"handler {target.get('handler')}"
    if kind != "action":
        return kind
    words = ["reply" if target.get("action") == "post_message" else "notify"]
    words.append(repr(one_line(target.get("message"), 40)))
    if words[0] == "notify":
        words.append(str(target.get("color", "yellow")))
        words += [] if target.get("format", "html") == "html" else [str(target["format"])]
        words += ["alert"] if target.get("notify") else []
        words += [f"from {target['from']!r}"] if target.get("from") else []
    words += [f"in {target['room']}"] if target.get("room") else []
    return " ".join(words)


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
