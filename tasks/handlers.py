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
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from storage import connections as conns
from storage import subscriptions as subs
from storage.errors import HipChatPollerError, ServerError, ValidationError
from tasks.actions import Actions
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
    """Register the decorated function for ``event``; the arguments are checked right away
    (a ValidationError listing every problem, when the module is imported)."""
    unbound = SubscriptionSpec(
        connection=connection,
        event=event,
        target_kind="handler",
        target={"handler": "module:function"},
        room=room,
        filter=filter,
        backfill=backfill,
    )
    validate_spec(unbound)

    def register(fn: HandlerFn) -> HandlerFn:
        ref = f"{fn.__module__}:{fn.__qualname__}"
        if "<" in fn.__qualname__:  # <locals>, <lambda>: a worker could never import it
            raise ValidationError(f"handler {ref}: @on needs a module-level function")
        spec = replace(unbound, target={"handler": ref}, name=f"handler:{ref}")
        _REGISTRY[ref] = Registration(ref, spec)
        return fn

    return register


def registered(module: str | None = None) -> list[Registration]:
    return [r for r in _REGISTRY.values() if module is None or r.function.startswith(module + ":")]


def load_module(module: str) -> list[Registration]:
    """Import (or re-import) ``module`` and return its registrations as the code is now:
    a handler deleted from the file since the last load is gone from the answer too."""
    previous = {ref: r for ref, r in _REGISTRY.items() if r.function.startswith(module + ":")}
    for ref in previous:
        del _REGISTRY[ref]
    try:
        loaded = sys.modules.get(module)
        if loaded is None:
            importlib.import_module(module)
        else:
            importlib.reload(loaded)
    except HipChatPollerError:  # an @on(...) with bad arguments: its own clear message
        _REGISTRY.update(previous)
        raise
    except Exception as exc:  # a broken user module: ImportError, SyntaxError, anything
        _REGISTRY.update(previous)
        raise ValidationError(
            f"cannot import handlers module {module!r}: {type(exc).__name__}: {exc}"
        ) from exc
    return registered(module)


def sync_handlers(rt: Runtime, module: str) -> list[str]:
    """Make the stored handler subscriptions match the module's registrations: one per
    handler, named ``handler:<module>:<function>``. Idempotent; a handler whose arguments
    changed is replaced, one that disappeared is removed, one whose connection does not
    exist yet is skipped (and added by a later sync). Returns one line per change."""
    wanted = {str(r.spec.name): r.spec for r in load_module(module)}
    with rt.db.session() as s:
        conn_ids = {row.name: row.id for row in conns.list_connections(s)}
        stored = [
            SubView.of(row)
            for row in subs.list_subscriptions(s)
            if row.target_kind == "handler" and (row.name or "").startswith(f"handler:{module}:")
        ]
    changes: list[str] = []
    kept: set[str] = set()
    for view in stored:
        name = str(view.name)
        spec = wanted.get(name)
        if spec is not None and name not in kept and _same(view, spec, conn_ids):
            kept.add(name)
            continue
        with rt.db.session() as s:
            subs.remove_subscription(s, view.id)
        changes.append(f"{'removed' if spec is None else 'replaced'} {name}")
    for name, spec in wanted.items():
        if name in kept:
            continue
        if spec.connection not in conn_ids:
            log.warning("handler %s: no connection %r yet; skipped", name, spec.connection)
            changes.append(f"skipped {name}: no connection {spec.connection!r}")
            continue
        create_subscriptions(rt, [spec])
        if f"replaced {name}" not in changes:
            changes.append(f"added {name}")
    return changes


def _same(view: SubView, spec: SubscriptionSpec, conn_ids: dict[str, int]) -> bool:
    """True if the stored subscription is what ``spec`` asks for."""
    return (
        view.connection_id == conn_ids.get(spec.connection)
        and view.event == spec.event
        and view.room == (spec.room.strip() if spec.room else None)
        and view.filter == spec.filter
        and view.backfill == spec.backfill
        and view.target == spec.target
    )


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
