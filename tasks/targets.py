"""Downstream targets: where an event goes once a poll found it.

* ``webhook``: POST of the event as signed JSON (:mod:`tasks.webhook`).
* ``log``: one log line per event (the demo and debugging).
* ``action``: a HipChat action with templates (``pong {matches[0]}``), through the
  connection's client and therefore its call budget.
* ``handler``: a Python function registered with :func:`tasks.handlers.on`.

A target raises :class:`RetryLater` for what may work later (the caller backs off),
:class:`InvalidInput` or :class:`NeedsAttention` for what will not (dead letter at once).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from storage.errors import ValidationError
from storage.vocabulary import TargetKind
from tasks.actions import run_action
from tasks.handlers import call_handler
from tasks.runtime import Runtime
from tasks.subscriptions_api import SubView
from tasks.templates import compile_template, render
from tasks.webhook import deliver_webhook

log = logging.getLogger(__name__)

Target = Callable[[Runtime, SubView, dict[str, Any]], str]


def deliver_log(rt: Runtime, sub: SubView, event: dict[str, Any]) -> str:
    item = event.get("item") or {}
    room = (item.get("room") or {}).get("name")
    message = (item.get("message") or {}).get("message")
    log.info(
        "event %s sub=%s room=%s key=%s%s",
        sub.event,
        sub.id,
        room,
        event.get("idempotency_key"),
        f" message={message!r}" if message else "",
    )
    return "logged"


def deliver_action(
    rt: Runtime, sub: SubView, event: dict[str, Any], reservation: str | None = None
) -> str:
    target = sub.target
    fields = {}
    for key in ("message", "from"):
        if isinstance(target.get(key), str):
            fields[key] = render(compile_template(target[key]), event)
    room = target.get("room") or ((event.get("item") or {}).get("room") or {}).get("id")
    if room is None:
        raise ValidationError("the action has no room and the event carries none")
    return run_action(
        rt,
        sub.connection_id,
        str(target["action"]),
        room=room,
        operation=f"event:{event.get('idempotency_key')}",
        reservation=reservation,
        **fields,
        color=target.get("color"),
        message_format=target.get("format"),
        notify=target.get("notify"),
    )


TARGETS: dict[str, Target] = {
    TargetKind.WEBHOOK: deliver_webhook,
    TargetKind.LOG: deliver_log,
    TargetKind.HANDLER: call_handler,
}


def deliver(
    rt: Runtime, sub: SubView, event: dict[str, Any], *, reservation: str | None = None
) -> str:
    """Send ``event`` to the subscription's target; a one-line outcome. ``reservation``: the
    call budget reserved for this delivery by an earlier attempt (HipChat actions only)."""
    if sub.target_kind == TargetKind.ACTION:
        return deliver_action(rt, sub, event, reservation)
    target = TARGETS.get(sub.target_kind)
    if target is None:
        raise ValidationError(f"unknown target kind {sub.target_kind!r}")
    return target(rt, sub, event)
