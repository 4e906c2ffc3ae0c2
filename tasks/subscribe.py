"""Validating and creating subscriptions: one code path for the CLI, recipes and the API.

Everything a user typed is checked here before anything is stored: the event name, the
room (required for room events, refused for room-list events), the regex filter (linear
time engine), the downstream target and its templates. Every problem is reported at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from tasks.errors import ValidationError
from tasks.filters import compile_filter
from tasks.templates import compile_template

HISTORY_EVENTS = frozenset(
    {"room_message", "room_file_upload", "room_notification", "room_topic_change"}
)
PARTICIPANT_EVENTS = frozenset({"room_enter", "room_exit"})
ROOM_LIST_EVENTS = frozenset({"room_created", "room_archived", "room_unarchived", "room_deleted"})
EVENTS = HISTORY_EVENTS | PARTICIPANT_EVENTS | ROOM_LIST_EVENTS

TARGET_KINDS = ("webhook", "log", "action", "handler")
COLORS = ("yellow", "green", "red", "purple", "gray", "random")
FORMATS = ("text", "html")
# Actions a trigger can run, with the template fields each one takes.
ACTION_TEMPLATES = {
    "post_message": ("message",),
    "send_notification": ("message", "from"),
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


def spec_errors(spec: SubscriptionSpec) -> list[str]:
    """Every problem with ``spec``, as sentences; empty when it is valid."""
    errors: list[str] = []
    if spec.event not in EVENTS:
        errors.append(f"unknown event {spec.event!r}; expected one of {', '.join(sorted(EVENTS))}")
    elif spec.event in ROOM_LIST_EVENTS and spec.room:
        errors.append(f"{spec.event} watches the room list and takes no room")
    elif spec.event not in ROOM_LIST_EVENTS and not spec.room:
        errors.append(f"{spec.event} needs a room (name or id)")
    if spec.room is not None and not 1 <= len(spec.room) <= 100:
        errors.append("room must be 1..100 characters")
    if spec.filter is not None:
        if spec.event != "room_message":
            errors.append("a filter applies only to room_message")
        errors.extend(_collect(compile_filter, spec.filter))
    if not 0 <= spec.backfill <= 1000:
        errors.append("backfill must be within 0..1000")
    errors.extend(target_errors(spec.target_kind, spec.target))
    return errors


def target_errors(kind: str, target: dict[str, Any]) -> list[str]:
    if kind not in TARGET_KINDS:
        return [f"unknown target {kind!r}; expected one of {', '.join(TARGET_KINDS)}"]
    if kind == "webhook":
        return _webhook_errors(target)
    if kind == "action":
        return _action_errors(target)
    if kind == "handler":
        handler = target.get("handler")
        if not isinstance(handler, str) or ":" not in handler:
            return ["handler target needs 'handler' as 'module:function'"]
    return []


def _webhook_errors(target: dict[str, Any]) -> list[str]:
    url = target.get("url")
    if not isinstance(url, str):
        return ["webhook target needs a url"]
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return [f"webhook url must be http(s)://host/...: {url!r}"]
    return []


def _action_errors(target: dict[str, Any]) -> list[str]:
    action = target.get("action")
    if action not in ACTION_TEMPLATES:
        return [f"action must be one of {', '.join(ACTION_TEMPLATES)}, not {action!r}"]
    errors: list[str] = []
    if not isinstance(target.get("message"), str) or not target["message"]:
        errors.append(f"{action} needs a message template")
    for key in ACTION_TEMPLATES[action]:
        if isinstance(target.get(key), str):
            errors.extend(f"{key} template: {e}" for e in _collect(compile_template, target[key]))
    if action == "send_notification":
        if target.get("color", "yellow") not in COLORS:
            errors.append(f"color must be one of {', '.join(COLORS)}")
        if target.get("format", "html") not in FORMATS:
            errors.append("format must be text or html")
    room = target.get("room")
    if room is not None and not (isinstance(room, str) and 1 <= len(room) <= 100):
        errors.append("action room must be 1..100 characters")
    return errors


def _collect(compile_fn: Any, text: str) -> list[str]:
    try:
        compile_fn(text)
    except ValidationError as exc:
        return list(exc.errors)
    return []


def validate_spec(spec: SubscriptionSpec) -> None:
    errors = spec_errors(spec)
    if errors:
        raise ValidationError("invalid subscription: " + "; ".join(errors), errors)
