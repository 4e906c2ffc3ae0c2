"""Validating and creating subscriptions: one code path for the CLI, recipes and the API.

Everything a user typed is checked here before anything is stored: the event name, the
room (required for room events, refused for room-list events), the regex filter (linear
time engine), the downstream target and its templates. Every problem is reported at once.

Templates are checked against the event they will be rendered with: a field must start with
one of the event's top-level keys (:data:`EVENT_FIELDS`), no step may name a private
attribute (``{item.__class__}``), ``{matches[n]}`` needs a filter with ``n + 1`` groups, and
the whole path must exist in the event's payload schema (:mod:`tasks.event_schema`), so
``{item.mesage.message}``, or ``{item.message.message}`` on ``room_enter``, is refused. A
template that passes can still miss an optional key of one particular item at render time
(``item.file.thumb_url`` of a file that is no image); that is recorded on the event, never
sent as a wrong message.

A handler target names an importable function (:func:`handler_errors` imports it: a check
the command line runs, not ``@on``, whose function does not exist yet when it is checked).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import re2

from storage.errors import ValidationError
from storage.subscriptions import MAX_ROOM_CHARS, name_errors, subscription_errors
from storage.vocabulary import HISTORY_EVENTS, Event, TargetKind, is_one_of
from tasks.client_inputs import (
    FROM_MAX_CHARS,
    MESSAGE_MAX_CHARS,
    NOTIFICATION_MAX_CHARS,
    normalise_color,
    notification_errors,
)
from tasks.event_schema import field_problem
from tasks.filters import compile_filter
from tasks.templates import Template, compile_template

__all__ = [
    "SubscriptionSpec",
    "handler_errors",
    "name_errors",
    "spec_errors",
    "target_errors",
    "validate_spec",
]

# The top-level keys of every event payload (tasks.events); a template starts with one.
EVENT_FIELDS = (
    "event",
    "item",
    "connection",
    "subscription",
    "matches",
    "message",
    "idempotency_key",
)
# Actions a trigger can run, with the template fields each one takes and their HipChat limits.
ACTION_TEMPLATES = {
    "post_message": ("message",),
    "send_notification": ("message", "from"),
}
TEMPLATE_LIMITS = {
    ("post_message", "message"): MESSAGE_MAX_CHARS,
    ("send_notification", "message"): NOTIFICATION_MAX_CHARS,
    ("send_notification", "from"): FROM_MAX_CHARS,
}


@dataclass(frozen=True, slots=True)
class SubscriptionSpec:
    """What a user asks for, before validation. ``target`` is kind-specific, see README."""

    connection: str
    event: str
    target_kind: str
    target: dict[str, Any] = field(default_factory=dict)
    room: str | None = None
    filter: str | None = None
    backfill: int = 0
    name: str | None = None
    # Fire on the connection's own posts too (off by default: a reply never answers itself).
    include_own: bool = False


def spec_errors(spec: SubscriptionSpec) -> list[str]:
    """Every problem with ``spec``, as sentences; empty when it is valid."""
    errors = []
    if not isinstance(spec.connection, str) or not spec.connection.strip():
        errors.append("a connection name is required")
    errors += subscription_errors(
        spec.event, spec.room, spec.target_kind, spec.target, spec.backfill
    )
    if spec.include_own and is_one_of(Event, spec.event) and spec.event not in HISTORY_EVENTS:
        events = ", ".join(sorted(HISTORY_EVENTS))
        errors.append(f"include_own applies only to room history events ({events})")
    groups: int | None = 0  # capture groups the event's `matches` will hold
    if spec.filter is not None:
        if is_one_of(Event, spec.event) and spec.event != Event.ROOM_MESSAGE:
            errors.append("a filter applies only to room_message")
        filter_errors = _collect(compile_filter, spec.filter)
        errors.extend(filter_errors)
        groups = None if filter_errors else _group_count(spec.filter)
    if is_one_of(TargetKind, spec.target_kind):
        event = spec.event if is_one_of(Event, spec.event) else None
        errors.extend(target_errors(spec.target_kind, spec.target, groups=groups, event=event))
    return errors


def _group_count(pattern: str) -> int | None:
    try:
        return int(re2.compile(pattern).groups)
    except (re2.error, AttributeError, TypeError, ValueError):
        return None


def target_errors(
    kind: str, target: Any, *, groups: int | None = None, event: str | None = None
) -> list[str]:
    """Problems with the fields of a target of a known ``kind`` (the kind and the target's
    JSON shape are :func:`storage.subscriptions.subscription_errors`' rules). ``groups``: the
    filter's capture groups (``None``: unknown, so ``{matches[n]}`` is not checked);
    ``event``: the event the templates render (``None``: only the top-level keys are checked)."""
    if not isinstance(target, dict):
        return []  # reported by subscription_errors
    if kind == TargetKind.WEBHOOK:
        return _webhook_errors(target)
    if kind == TargetKind.ACTION:
        return _action_errors(target, groups, event)
    if kind == TargetKind.HANDLER:
        handler = target.get("handler")
        module, _, function = handler.partition(":") if isinstance(handler, str) else ("", "", "")
        if not module or not function:
            return ["handler target needs 'handler' as 'module:function'"]
    return []


def _webhook_errors(target: dict[str, Any]) -> list[str]:
    url = target.get("url")
    if not isinstance(url, str):
        return ["webhook target needs a url"]
    try:
        parts = urlsplit(url)
        host = parts.hostname
        _ = parts.port  # a bad port raises here
    except ValueError:
        host = None
    # No echo of the URL: its userinfo or query may hold a secret.
    if not url.startswith(("http://", "https://")) or not host:
        return ["webhook url must be http(s)://host/..."]
    if any(c.isspace() or ord(c) < 32 for c in url):
        return ["webhook url must not contain spaces or control characters"]
    secret = target.get("secret")
    if secret is not None and (not isinstance(secret, str) or not secret.strip()):
        return ["a webhook secret must not be empty (leave it out for unsigned deliveries)"]
    return []


def _action_errors(target: dict[str, Any], groups: int | None, event: str | None) -> list[str]:
    action = target.get("action")
    if action not in ACTION_TEMPLATES:
        return [f"action must be one of {', '.join(ACTION_TEMPLATES)}, not {action!r}"]
    errors: list[str] = []
    if not isinstance(target.get("message"), str) or not target["message"]:
        errors.append(f"{action} needs a message template")
    for key in ACTION_TEMPLATES[action]:
        value = target.get(key)
        if value is None:
            continue
        if not isinstance(value, str):
            errors.append(f"{key} template must be text")
            continue
        limit = TEMPLATE_LIMITS[(action, key)]
        problems = _template_errors(value, limit, groups, event)
        errors.extend(f"{key} template: {e}" for e in problems)
    if action == "send_notification":
        errors.extend(
            notification_errors(
                normalise_color(target.get("color", "yellow")),
                target.get("format", "html"),
                target.get("notify", False),
                format_field="format",
            )
        )
    room = target.get("room")
    if room is not None and not _room_ref_ok(room):
        errors.append(f"action room must be a room id or a name of 1..{MAX_ROOM_CHARS} characters")
    return errors


def _room_ref_ok(room: object) -> bool:
    if isinstance(room, bool):
        return False
    if isinstance(room, int):
        return room > 0
    return isinstance(room, str) and 1 <= len(room.strip()) <= MAX_ROOM_CHARS


def _template_errors(text: str, limit: int, groups: int | None, event: str | None) -> list[str]:
    try:
        template = compile_template(text)
    except ValidationError as exc:
        return list(exc.errors)
    errors = [
        _field_error(part, groups, event) for part in template.parts if not isinstance(part, str)
    ]
    literal = _literal_chars(template)
    if literal > limit:
        errors.append(f"its fixed text alone is {literal} characters; the limit is {limit}")
    return [e for e in errors if e]


def _literal_chars(template: Template) -> int:
    return sum(len(part) for part in template.parts if isinstance(part, str))


def _field_error(part: Any, groups: int | None, event: str | None) -> str | None:
    """What is wrong with one ``{field}`` of a compiled template, or None."""
    steps = [step.key for step in part.steps]
    where = f"field {part.text} at position {part.position}"
    private = next((key for key in steps if key.startswith("_")), None)
    if private is not None:
        return f"{where}: {private!r} is not an event field (names starting with '_' are refused)"
    if steps[0] not in EVENT_FIELDS:
        return f"{where}: the event has no {steps[0]!r}; it has {', '.join(EVENT_FIELDS)}"
    index = steps[1] if steps[0] == "matches" and len(steps) > 1 else ""
    if index.isdigit() and groups is not None and int(index) >= groups:
        have = f"{groups} group(s)" if groups else "no groups (or no filter)"
        return f"{where}: the filter has {have}, so matches[{index}] never exists"
    missing = field_problem(event, [(s.key, s.bracketed) for s in part.steps]) if event else None
    return f"{where}: in a {event} event, {missing}" if missing else None


def handler_errors(target: Any) -> list[str]:
    """Can the worker import the handler ``module:function``? It imports the module now (a
    handlers module registers its ``@on`` handlers when imported, nothing more)."""
    ref = target.get("handler") if isinstance(target, dict) else None
    if not isinstance(ref, str) or ":" not in ref:
        return []  # reported by target_errors
    module, _, qualname = ref.partition(":")
    try:
        found: Any = importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 (user code: ImportError, SyntaxError, anything)
        return [
            f"handler {ref!r}: cannot import {module!r} ({type(exc).__name__}: {exc}); "
            "is it on PYTHONPATH?"
        ]
    for part in qualname.split("."):
        found = getattr(found, part, None)
    if not callable(found):
        return [f"handler {ref!r}: {module!r} has no function {qualname!r}"]
    return []


def _collect(compile_fn: Callable[[str], object], text: str) -> list[str]:
    try:
        compile_fn(text)
    except ValidationError as exc:
        return list(exc.errors)
    return []


def validate_spec(spec: SubscriptionSpec) -> None:
    errors = spec_errors(spec)
    if errors:
        raise ValidationError("invalid subscription: " + "; ".join(errors), errors)
