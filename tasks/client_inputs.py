"""Checking and encoding what callers pass to :class:`tasks.client.HipChatClient`.

Everything here runs before any request is made and raises
:class:`storage.errors.ValidationError` listing every problem. Messages name the field and the
limit, never the value: a message body may be private and a token is never an argument here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any
from urllib.parse import quote

from storage.errors import ValidationError
from tasks.hipchat_types import format_datetime

MESSAGE_MAX_CHARS = 1000
NOTIFICATION_MAX_CHARS = 10_000
FROM_MAX_CHARS = 64
ATTACH_TO_MAX_CHARS = 36
ROOM_REF_MAX_CHARS = 100
# HipChat's vocabularies, in the order people read them (the one place they are written).
COLORS = ("yellow", "green", "red", "purple", "gray", "random")
# Factor's documentation spells it "grey"; HipChat only knows "gray".
COLOR_ALIASES = {"grey": "gray"}
MESSAGE_FORMATS = ("text", "html")
ROOM_ROLES = frozenset({"room_member", "room_admin"})

RoomRef = int | str
UserRef = int | str


def _fail(what: str, errors: list[str]) -> None:
    if errors:
        raise ValidationError(f"{what}: " + "; ".join(errors), errors)


def _is_mapping(value: object) -> bool:
    """Callers are typed, but templates and the command line pass what users typed."""
    return isinstance(value, Mapping)


def _length_error(field: str, value: object, low: int, high: int) -> str | None:
    if not isinstance(value, str):
        return f"{field} must be a string"
    if not low <= len(value) <= high:
        return f"{field} must be {low}..{high} characters, got {len(value)}"
    return None


def _id_or_text(value: object, what: str, max_chars: int) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 1:
            raise ValidationError(f"{what} id must be a positive integer")
        return str(value)
    error = _length_error(f"{what} name", value, 1, max_chars)
    _fail(what, [error] if error else [])
    # safe="" so that "/" becomes %2F and " " becomes %20: "+" is answered 404 (§7).
    return quote(str(value), safe="")


def room_ref(room: str) -> RoomRef:
    """What a person typed for a room: digits are an id, anything else a name."""
    text = room.strip()
    return int(text) if text.isdigit() else room


def room_segment(room: RoomRef) -> str:
    """A room id or name as one percent-encoded path segment."""
    return _id_or_text(room, "room", ROOM_REF_MAX_CHARS)


def user_segment(user: UserRef) -> str:
    """A user id, email or ``@mention`` as one path segment (``@`` becomes ``%40``)."""
    return _id_or_text(user, "user", ROOM_REF_MAX_CHARS)


def check_max_results(value: int, low: int = 0, high: int = 1000) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValidationError(f"max_results must be an integer within {low}..{high}")
    return value


def date_param(value: datetime | str, field: str) -> str:
    """A history bound: an aware datetime, ``"recent"``, an ISO-8601 string or epoch digits."""
    if isinstance(value, datetime):
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValidationError(f"{field} must be a timezone-aware datetime")
        return format_datetime(value)
    if not isinstance(value, str) or not value.strip():
        raise ValidationError(f"{field} must be a datetime or a non-empty string")
    return value


def normalise_color(color: str) -> str:
    """``grey`` -> ``gray``; anything else unchanged (validation reports it)."""
    return COLOR_ALIASES.get(color, color) if isinstance(color, str) else color


def message_errors(message: object, limit: int) -> list[str]:
    """A message or notification text: 1..``limit`` characters."""
    if not isinstance(message, str):
        return ["message must be text"]
    if not 1 <= len(message) <= limit:
        return [f"message must be 1..{limit} characters (got {len(message)})"]
    return []


def notification_errors(
    color: object,
    message_format: object,
    notify: object,
    from_: object = None,
    *,
    format_field: str = "message_format",
) -> list[str]:
    """Every problem with a notification's fields other than its text (``color`` already
    normalised). ``format_field`` is what the caller's user calls the format."""
    errors = []
    if color not in COLORS:
        errors.append(f"color must be one of {', '.join(COLORS)}, not {color!r}")
    if message_format not in MESSAGE_FORMATS:
        errors.append(f"{format_field} must be text or html, not {message_format!r}")
    if not isinstance(notify, bool):
        errors.append("notify must be true or false")
    if from_ is not None and (not isinstance(from_, str) or len(from_) > FROM_MAX_CHARS):
        errors.append(f"from must be text of at most {FROM_MAX_CHARS} characters")
    return errors


def message_body(text: str) -> dict[str, Any]:
    _fail("send_message", message_errors(text, MESSAGE_MAX_CHARS))
    return {"message": text}


def notification_body(
    message: str,
    *,
    color: str,
    message_format: str,
    notify: bool,
    from_: str | None,
    card: Mapping[str, Any] | None,
    attach_to: str | None,
) -> dict[str, Any]:
    errors = message_errors(message, NOTIFICATION_MAX_CHARS)
    errors += notification_errors(color, message_format, notify, from_)
    if card is not None and not _is_mapping(card):
        errors.append("card must be a mapping")
    attach_error = attach_to and _length_error("attach_to", attach_to, 1, ATTACH_TO_MAX_CHARS)
    if attach_error:
        errors.append(attach_error)
    _fail("send_notification", errors)
    body: dict[str, Any] = {
        "message": message,
        "color": color,
        "message_format": message_format,
        "notify": notify,
    }
    if from_ is not None:
        body["from"] = from_
    if card is not None:
        body["card"] = dict(card)
    if attach_to is not None:
        body["attach_to"] = attach_to
    return body


def member_body(roles: Sequence[str] | None) -> dict[str, Any] | None:
    if roles is None:
        return None
    if isinstance(roles, str) or not all(role in ROOM_ROLES for role in roles):
        raise ValidationError("add_member: roles must be a list of room_member / room_admin")
    return {"room_roles": list(roles)}
