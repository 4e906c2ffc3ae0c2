"""Python handlers registered in code, in the spirit of Factor's ``listen ... do ... run``::

    from tasks.handlers import on

    @on("room_message", connection="ops", room="Factor", filter=r"ping (.*)")
    def pong(event, hipchat):
        hipchat.post_message("Factor", f"pong {event['matches'][0]}")

Put handlers in a module and name it in ``HIPCHAT_POLLER_HANDLERS_MODULE``. Beat (and
``hipchat-poller handlers sync``) imports the module and keeps one subscription per handler
in the database, named ``handler:<module>:<function>``, so polls find the events; the worker
imports the function by name when it delivers one. A handler gets the event (a dict, the
webhook shape) and an :class:`tasks.actions.Actions` bound to the event's connection.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from storage import connections as conns
from storage import subscriptions as subs
from tasks.errors import HipChatPollerError, ServerError, ValidationError
from tasks.runtime import Runtime
from tasks.subscribe import SubscriptionSpec, validate_spec
from tasks.subscriptions_api import SubView, create_subscriptions

log = logging.getLogger(__name__)

HandlerFn = Callable[[dict[str, Any], Any], Any]


@dataclass(frozen=True, slots=True)
class Registration:
    function: str  # "module:qualname"
    spec: SubscriptionSpec


_REGISTRY: dict[str, Registration] = {}


def on(
    event: str,
    *,
    connection: str,
    room: str | None = None,
    filter: str | None = None,
    backfill: int = 0,
) -> Callable[[HandlerFn], HandlerFn]:
    """Register the decorated function for ``event``; the arguments are checked right away."""

    def register(fn: HandlerFn) -> HandlerFn:
        ref = f"{fn.__module__}:{fn.__qualname__}"
        spec = SubscriptionSpec(
            connection=connection,
            event=event,
            target_kind="handler",
            target={"handler": ref},
            room=room,
            filter=filter,
            backfill=backfill,
            name=f"handler:{ref}",
        )
        validate_spec(spec)
        _REGISTRY[ref] = Registration(ref, spec)
        return fn

    return register


def registered(module: str | None = None) -> list[Registration]:
    return [r for r in _REGISTRY.values() if module is None or r.function.startswith(module + ":")]


def load_module(module: str) -> list[Registration]:
    try:
        importlib.import_module(module)
    except ImportError as exc:
        raise ValidationError(f"cannot import handlers module {module!r}: {exc}") from exc
    return registered(module)


def sync_handlers(rt: Runtime, module: str) -> list[str]:
    """Make the stored handler subscriptions match the module's registrations."""
    wanted = {r.spec.name: r for r in load_module(module)}
    changes = []
    with rt.db.session() as s:
        existing = {
            row.name: (row.id, row.connection_id)
            for row in subs.list_subscriptions(s)
            if row.target_kind == "handler"
            and row.name
            and row.name.startswith(f"handler:{module}:")
        }
        known_conns = {row.name for row in conns.list_connections(s)}
    for name, (sub_id, _conn) in existing.items():
        if name not in wanted:
            with rt.db.session() as s:
                subs.remove_subscription(s, sub_id)
            changes.append(f"removed {name}")
    missing = [r.spec for n, r in wanted.items() if n not in existing]
    for spec in missing:
        if spec.connection not in known_conns:
            log.warning("handler %s: no connection %r yet; skipped", spec.name, spec.connection)
            continue
        create_subscriptions(rt, [spec])
        changes.append(f"added {spec.name}")
    return changes


def resolve(ref: str) -> HandlerFn:
    module, _, qualname = ref.partition(":")
    try:
        obj: Any = importlib.import_module(module)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise ValidationError(f"handler {ref!r} not found: {exc}") from exc
    if not callable(obj):
        raise ValidationError(f"handler {ref!r} is not callable")
    return obj  # type: ignore[no-any-return]


def call_handler(rt: Runtime, sub: SubView, event: dict[str, Any]) -> str:
    from tasks.actions import Actions

    fn = resolve(str(sub.target["handler"]))
    try:
        fn(event, Actions(rt, sub.connection_id))
    except HipChatPollerError:
        raise
    except Exception as exc:  # a bug in user code: retried with backoff, then dead-lettered
        raise ServerError(
            f"handler {sub.target['handler']} raised {type(exc).__name__}: {exc}", 500
        ) from exc
    return f"handler {sub.target['handler']} ran"
