"""The HipChat actions of the seeds, as one Python API used by tasks, the CLI and triggers.

Every call goes through the connection's client, so it takes a token from the connection's
shared call budget first. Actions take a connection *name or id*, never a token.

Input is checked before the first call, and every problem is reported at once
(:class:`~storage.errors.ValidationError`); what HipChat refuses comes back as the exception
tree of :mod:`storage.errors` (an unknown room or user is :class:`~storage.errors.NotFound`).

Rooms are an id (``10001`` or ``"10001"``) or a name. Users are an id, an email, or a mention
name with or without its ``@`` (``"@bobb"`` or ``"bobb"``: HipChat itself wants the ``@``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from storage import connections as conns
from storage.errors import BadRequest, NeedsAttention, NotFound, ValidationError
from tasks.client import HipChatClient
from tasks.client_inputs import (
    MESSAGE_MAX_CHARS,
    NOTIFICATION_MAX_CHARS,
    message_errors,
    normalise_color,
    notification_errors,
)
from tasks.client_inputs import ROOM_REF_MAX_CHARS as REF_MAX_CHARS
from tasks.runtime import Runtime

Room = int | str
User = int | str


def _room_arg(room: Room) -> Room:
    if isinstance(room, int) and not isinstance(room, bool) and room > 0:
        return room
    if isinstance(room, str) and room.strip().isdigit():
        return int(room)
    if isinstance(room, str) and 1 <= len(room) <= REF_MAX_CHARS and room.strip():
        return room
    raise ValidationError(f"room must be an id or a name of 1..{REF_MAX_CHARS} characters")


def _user_arg(user: User) -> User:
    """An id as int; an email or ``@mention`` as given; a bare mention name gets its ``@``."""
    if isinstance(user, int) and not isinstance(user, bool) and user > 0:
        return user
    if not isinstance(user, str) or not user.strip() or len(user.strip()) > REF_MAX_CHARS:
        raise ValidationError("user must be an id, an email or an @mention name")
    user = user.strip()
    if user.isdigit():
        return int(user)
    return user if "@" in user else "@" + user


def _refuse(errors: list[str]) -> None:
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
        """The users of a room: its **members** if the room is private, its **participants**
        (offline ones included) if it is public, since HipChat keeps members only for private
        rooms. ``source`` says which; two calls (the room, then its users)."""
        ref = _room_arg(room)
        with self._client() as client:
            found = client.get_room(ref)
            if found.privacy == "private":
                users, source = client.members(found.id), "members"
            else:
                users, source = client.participants(found.id, include_offline=True), "participants"
        return {
            "room": {"id": found.id, "name": found.name, "privacy": found.privacy},
            "source": source,
            "items": [u.raw for u in users],
        }

    def get_user(self, user: User) -> dict[str, Any]:
        """A user's details by id, email or @mention name (HipChat's full user object)."""
        ref = _user_arg(user)
        with self._client() as client:
            return client.get_user(ref).raw

    def post_message(self, room: Room, message: str) -> dict[str, Any]:
        """Post a message (1..1000 characters) as the token's user: ``{id, timestamp}``."""
        _refuse(_ref_errors(room) + message_errors(message, MESSAGE_MAX_CHARS))
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
        """Send a room notification (1..10000 characters). ``color="random"`` is resolved by
        HipChat into one of the five colours; ``"grey"`` is taken for ``"gray"``."""
        color = normalise_color(color)
        problems = message_errors(message, NOTIFICATION_MAX_CHARS) + notification_errors(
            color, message_format, notify, from_
        )
        _refuse(_ref_errors(room) + problems)
        with self._client() as client:
            client.send_notification(
                _room_arg(room),
                message,
                color=color,
                message_format=message_format,
                notify=notify,
                from_=from_,
            )
        return {"sent": True, "color": color, "message_format": message_format, "notify": notify}

    def add_member(self, room: Room, user: User) -> dict[str, Any]:
        """Add a user to a **private** room; a public room is refused with a ValidationError
        (HipChat has no members to add there). Adding a member again changes nothing."""
        _refuse(_ref_errors(room) + _ref_errors(user, _user_arg))
        ref = _user_arg(user)
        with self._client() as client:
            found = client.get_room(_room_arg(room))
            if found.privacy != "private":
                raise ValidationError(
                    f"room {found.name!r} is public; only private rooms have members to add"
                )
            try:
                client.add_member(found.id, ref)
            except NotFound as exc:
                raise NotFound(f"user {ref!r} not found: {exc}", exc.status) from exc
            except BadRequest as exc:
                raise ValidationError(f"HipChat refused to add {ref!r}: {exc}") from exc
        return {"added": True, "room": found.id, "user": ref}


def _ref_errors(value: Any, check: Any = _room_arg) -> list[str]:
    try:
        check(value)
    except ValidationError as exc:
        return list(exc.errors)
    return []


ACTIONS = ("post_message", "send_notification")


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
    if action not in ACTIONS:
        raise ValidationError(f"unknown action {action!r}; expected one of {', '.join(ACTIONS)}")
    api = Actions(rt, connection)
    if action == "post_message":
        sent = api.post_message(room, message or "")
        return f"posted {_short(message)} (message {sent['id']})"
    result = api.send_notification(
        room,
        message or "",
        color=color or "yellow",
        message_format=message_format or "html",
        notify=bool(notify),
        from_=extra.get("from"),
    )
    return f"sent {_short(message)} as a {result['color']} notification"


def _short(text: str | None, limit: int = 60) -> str:
    text = text or ""
    return repr(text if len(text) <= limit else text[: limit - 1] + "…")
