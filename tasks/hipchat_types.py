"""Typed views of HipChat API v2 objects, parsed at the edge where JSON enters.

Every parser keeps the original JSON in ``raw`` so that event payloads can mirror HipChat's
own webhook shapes byte for byte, while code works with typed, validated fields:
aware datetimes, ``from`` in both of its shapes, ``card`` decoded from its JSON string.

A value that does not fit raises :class:`storage.errors.MalformedResponse`: a bad answer
from the network is refused where it enters, never half-used.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from storage.errors import MalformedResponse

MESSAGE_TYPES = frozenset({"message", "notification", "guest_access", "topic"})


def parse_datetime(value: Any) -> datetime:
    """HipChat dates: ISO-8601 with or without offset, or epoch seconds (int or digit string).

    A value without an offset is taken as UTC, which is what HipChat's servers used.
    """
    if isinstance(value, bool):
        raise MalformedResponse(f"not a date: {value!r}")
    if isinstance(value, int | float):
        return datetime.fromtimestamp(float(value), tz=UTC)
    if not isinstance(value, str) or not value:
        raise MalformedResponse(f"not a date: {value!r}")
    if value.isdigit():
        return datetime.fromtimestamp(int(value), tz=UTC)
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as exc:
        raise MalformedResponse(f"not an ISO-8601 date: {value!r}") from exc
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def format_datetime(value: datetime) -> str:
    """The form HipChat uses in history: microseconds and an explicit ``+00:00``."""
    return value.astimezone(UTC).isoformat(timespec="microseconds")


def _require(obj: Any, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(obj, dict) or key not in obj:
        raise MalformedResponse(f"{where}: missing {key!r}")
    value = obj[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise MalformedResponse(f"{where}: {key!r} has the wrong type")
    return value


@dataclass(frozen=True, slots=True)
class UserStub:
    id: int
    name: str
    mention_name: str
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def parse(cls, obj: Any, where: str = "user") -> UserStub:
        return cls(
            id=_require(obj, "id", int, where),
            name=str(obj.get("name") or ""),
            mention_name=str(obj.get("mention_name") or ""),
            raw=obj,
        )


@dataclass(frozen=True, slots=True)
class FileInfo:
    name: str
    size: int
    url: str
    thumb_url: str | None

    @classmethod
    def parse(cls, obj: Any) -> FileInfo:
        thumb = obj.get("thumb_url") if isinstance(obj, dict) else None
        return cls(
            name=_require(obj, "name", str, "file"),
            size=_require(obj, "size", int, "file"),
            url=_require(obj, "url", str, "file"),
            thumb_url=thumb if isinstance(thumb, str) else None,
        )


@dataclass(frozen=True, slots=True)
class Message:
    """One history item. ``sender`` is set when ``from`` is a user object, ``sender_label``
    when it is a string (notifications, old items); both are ``None`` when ``from`` is null."""

    id: str
    date: datetime
    type: str
    text: str
    sender: UserStub | None
    sender_label: str | None
    file: FileInfo | None
    color: str | None
    message_format: str | None
    card: dict[str, Any] | None
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def parse(cls, obj: Any) -> Message:
        msg_id = _require(obj, "id", str, "message")
        mtype = _require(obj, "type", str, f"message {msg_id}")
        if mtype not in MESSAGE_TYPES:
            raise MalformedResponse(f"message {msg_id}: unknown type {mtype!r}")
        raw_from = obj.get("from")
        sender = (
            UserStub.parse(raw_from, f"message {msg_id} from")
            if isinstance(raw_from, dict)
            else None
        )
        label = raw_from if isinstance(raw_from, str) else None
        raw_file = obj.get("file")
        card = obj.get("card")
        if isinstance(card, str):
            try:
                card = json.loads(card)
            except ValueError as exc:
                raise MalformedResponse(f"message {msg_id}: card is not JSON") from exc
        text = obj.get("message")
        return cls(
            id=msg_id,
            date=parse_datetime(_require(obj, "date", str, f"message {msg_id}")),
            type=mtype,
            text=text if isinstance(text, str) else "",
            sender=sender,
            sender_label=label,
            file=FileInfo.parse(raw_file) if isinstance(raw_file, dict) else None,
            color=obj.get("color") if isinstance(obj.get("color"), str) else None,
            message_format=obj.get("message_format")
            if isinstance(obj.get("message_format"), str)
            else None,
            card=card if isinstance(card, dict) else None,
            raw=obj,
        )


@dataclass(frozen=True, slots=True)
class Room:
    """A room as the room list gives it (the "room stub"); details add ``topic``."""

    id: int
    name: str
    privacy: str
    is_archived: bool
    topic: str | None
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def parse(cls, obj: Any) -> Room:
        room_id = _require(obj, "id", int, "room")
        topic = obj.get("topic")
        return cls(
            id=room_id,
            name=_require(obj, "name", str, f"room {room_id}"),
            privacy=str(obj.get("privacy") or "public"),
            is_archived=bool(obj.get("is_archived", False)),
            topic=topic if isinstance(topic, str) else None,
            raw=obj,
        )


@dataclass(frozen=True, slots=True)
class User:
    """A full user (``GET /v2/user/{user}``)."""

    id: int
    name: str
    mention_name: str
    email: str | None
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def parse(cls, obj: Any) -> User:
        user_id = _require(obj, "id", int, "user")
        email = obj.get("email")
        return cls(
            id=user_id,
            name=str(obj.get("name") or ""),
            mention_name=str(obj.get("mention_name") or ""),
            email=email if isinstance(email, str) else None,
            raw=obj,
        )


@dataclass(frozen=True, slots=True)
class SentMessage:
    """The 201 answer to ``POST /v2/room/{room}/message``."""

    id: str
    timestamp: str


@dataclass(frozen=True, slots=True)
class RateLimitInfo:
    """HipChat's ``X-Ratelimit-*`` headers of one response. ``reset_at`` is an epoch in
    seconds, already normalised from the "60 seconds" quirk."""

    limit: int | None
    remaining: int | None
    reset_at: float | None
