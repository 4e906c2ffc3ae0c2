"""The HipChat actions of the seeds, as one Python API used by tasks, the CLI and triggers.

Every call goes through the connection's client, so it takes a token from the connection's
shared bucket first. Actions take a connection *name or id*, never a token.

``list_room_users`` answers with the room's **members** for a private room and its
**participants** (offline ones included) for a public room: HipChat v2 only documents
members for private rooms.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from storage import connections as conns
from tasks.client import HipChatClient
from tasks.errors import BadRequest, NeedsAttention, ValidationError
from tasks.runtime import Runtime
from tasks.subscribe import COLORS, FORMATS

Room = int | str


def _room_arg(room: Room) -> Room:
    if isinstance(room, str) and room.isdigit():
        return int(room)
    if isinstance(room, str) and not 1 <= len(room) <= 100:
        raise ValidationError("room must be an id or a name of 1..100 characters")
    return room


def validate_message(message: str, limit: int) -> None:
    if not isinstance(message, str) or not 1 <= len(message) <= limit:
        raise ValidationError(f"message must be 1..{limit} characters (got {len(message or '')})")


def validate_notification(color: str, message_format: str, from_: str | None) -> None:
    errors = []
    if color not in COLORS:
        errors.append(f"color must be one of {', '.join(COLORS)}, not {color!r}")
    if message_format not in FORMATS:
        errors.append(f"message_format must be text or html, not {message_format!r}")
    if from_ is not None and len(from_) > 64:
        errors.append("from must be at most 64 characters")
    if errors:
        raise ValidationError("; ".join(errors), errors)


class Actions:
    """``Actions(rt, "ops").post_message("Factor", "pong hello")``."""

    def __init__(self, rt: Runtime, connection: int | str) -> None:
        self.rt = rt
        with rt.db.session() as s:
            row = conns.get_connection(s, connection)
            if row is None:
                raise ValidationError(f"no connection {connection!r}")
            if row.state == "auth_failed":
                raise NeedsAttention(f"connection {row.name} needs a new token: {row.state_reason}")
            self.connection_id, self.name, self._base_url = row.id, row.name, row.base_url
            self._token = conns.decrypt_token(row, rt.cipher)

    def __repr__(self) -> str:  # never show the token
        return f"Actions(connection={self.name!r})"

    @contextmanager
    def _client(self) -> Iterator[HipChatClient]:
        with self.rt.client(self.connection_id, self._base_url, self._token) as client:
            yield client

    def list_room_users(self, room: Room) -> dict[str, Any]:
        with self._client() as client:
            found = client.get_room(_room_arg(room))
            if found.privacy == "private":
                users, source = client.members(found.id), "members"
            else:
                users, source = client.participants(found.id, include_offline=True), "participants"
        return {
            "room": {"id": found.id, "name": found.name, "privacy": found.privacy},
            "source": source,
            "items": [u.raw for u in users],
        }

    def get_user(self, user: int | str) -> dict[str, Any]:
        if isinstance(user, str) and not user.strip():
            raise ValidationError("user must be an id, an email or an @mention name")
        with self._client() as client:
            return client.get_user(
                int(user) if isinstance(user, str) and user.isdigit() else user
            ).raw

    def post_message(self, room: Room, message: str) -> dict[str, Any]:
        validate_message(message, 1000)
        with self._client() as client:
            sent = client.send_message(_room_arg(room), message)
        return {"id": sent.id, "timestamp": sent.timestamp}

    def send_notification(
        self,
        room: Room,
        message: str,
        *,
        color: str = "yellow",
        message_format: str = "html",
        notify: bool = False,
        from_: str | None = None,
    ) -> dict[str, Any]:
        validate_message(message, 10000)
        validate_notification(color, message_format, from_)
        with self._client() as client:
            client.send_notification(
                _room_arg(room),
                message,
                color=color,
                message_format=message_format,
                notify=notify,
                from_=from_,
            )
        return {"sent": True, "color": color, "message_format": message_format}

    def add_member(self, room: Room, user: int | str) -> dict[str, Any]:
        with self._client() as client:
            found = client.get_room(_room_arg(room))
            if found.privacy != "private":
                raise ValidationError(
                    f"room {found.name!r} is public; only private rooms have members to add"
                )
            try:
                client.add_member(
                    found.id, int(user) if isinstance(user, str) and user.isdigit() else user
                )
            except BadRequest as exc:
                raise ValidationError(f"HipChat refused to add {user!r}: {exc}") from exc
        return {"added": True, "room": found.id, "user": user}


def run_action(
    rt: Runtime,
    connection: int | str,
    action: str,
    *,
    room: Room,
    message: str | None = None,
    color: str | None = None,
    message_format: str | None = None,
    notify: bool | None = None,
    **extra: Any,
) -> str:
    """Run a trigger's action target; returns a one-line outcome for the outbox record."""
    api = Actions(rt, connection)
    if action == "post_message":
        sent = api.post_message(room, message or "")
        return f"posted {_short(message)} (message {sent['id']})"
    if action == "send_notification":
        api.send_notification(
            room,
            message or "",
            color=color or "yellow",
            message_format=message_format or "html",
            notify=bool(notify),
            from_=extra.get("from"),
        )
        return f"sent {_short(message)} as a {color or 'yellow'} notification"
    raise ValidationError(f"unknown action {action!r}")


def _short(text: str | None, limit: int = 60) -> str:
    text = text or ""
    return repr(text if len(text) <= limit else text[: limit - 1] + "…")
