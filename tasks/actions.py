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

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from storage import connections as conns
from storage.errors import (
    BadRequest,
    BucketEmpty,
    NeedsAttention,
    NotFound,
    StorageUnavailable,
    ValidationError,
)
from tasks import posts
from tasks.client import HipChatClient
from tasks.client_inputs import (
    MESSAGE_MAX_CHARS,
    NOTIFICATION_MAX_CHARS,
    message_errors,
    normalise_color,
    notification_errors,
)
from tasks.client_inputs import ROOM_REF_MAX_CHARS as REF_MAX_CHARS
from tasks.hipchat_types import Message
from tasks.runtime import Runtime

log = logging.getLogger(__name__)

Room = int | str
User = int | str

# HipChat stamps a post with its own clock; an earlier attempt's post is looked for from this
# long before that attempt began (our clock) onwards.
EARLIER_POST_SKEW_SECONDS = 5.0


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
    """``Actions(rt, "ops").post_message("Factor", "pong hello")``.

    Each action takes from the connection's budget, up front, the calls it will make. When the
    budget is spent:

    * ``operation`` given (an action task, a delivery: something that can come back later):
      the calls are *reserved* and :class:`~tasks.budget.BudgetEmpty` carries the reservation
      and its wait; the caller comes back then with ``reservation``, and is not refused again.
    * ``wait_up_to`` seconds given (the command line): the action waits for its reservation,
      if it is due within that time (``on_wait`` is told how long).
    * neither (the Python API): :class:`~tasks.budget.BudgetEmpty` with the wait, nothing
      reserved.

    ``operation`` also keeps a post once in effect: before it posts, it records an intent
    (:mod:`tasks.posts`); a redelivered operation that finds one looks for its own earlier post
    in the room's history first.
    """

    def __init__(
        self,
        rt: Runtime,
        connection: int | str,
        *,
        operation: str | None = None,
        reservation: str | None = None,
        wait_up_to: float = 0.0,
        on_wait: Callable[[float], None] | None = None,
    ) -> None:
        self.rt = rt
        self.operation = operation
        self.reservation = reservation
        self.wait_up_to = wait_up_to
        self.on_wait = on_wait  # told each wait for the budget, in seconds
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
    def _client(self, calls: int, *, first_post: bool = False) -> Iterator[HipChatClient]:
        """A client with ``calls`` calls already taken from the budget (more pages take more).

        ``first_post``: this attempt has just recorded its operation's intent to post. If the
        budget makes it wait, it never called HipChat, so the intent is withdrawn: it comes
        back as a first attempt (the one call it reserved), not as one that may have posted
        (which looks at the room's history first, a call its reservation does not cover)."""
        try:
            self._take(calls)
        except BucketEmpty:
            if first_post:
                self._withdraw()
            raise
        with self.rt.client(self.connection_id, self._base_url, self._token, prepaid=calls) as c:
            yield c

    def _take(self, calls: int) -> None:
        budget, held = self.rt.budget, self.reservation
        self.reservation = None  # a reservation is used once
        reserve = self.operation is not None or self.wait_up_to > 0
        deadline = time.monotonic() + self.wait_up_to
        if self.operation is None and held is None and reserve:
            # A waiting caller that will not wait long enough reserves nothing: a reservation
            # it walked away from would hold calls nobody makes.
            probe = budget.peek(self.connection_id, calls)
            if not probe.granted and probe.wait > self.wait_up_to:
                raise budget.empty(self.connection_id, probe)
        while True:
            if reserve:
                grant = budget.reserve(self.connection_id, calls, held=held)
            else:
                grant = budget.take(self.connection_id, calls)
            if grant.granted:
                return
            if grant.reservation is None or time.monotonic() + grant.wait > deadline:
                raise budget.empty(self.connection_id, grant)
            # The command line waits for its slot (a reservation honoured from its moment).
            held = grant.reservation
            if self.on_wait is not None:
                self.on_wait(grant.wait)
            time.sleep(grant.wait)

    def list_room_users(self, room: Room) -> dict[str, Any]:
        """The users of a room: its **members** if the room is private, its **participants**
        (offline ones included) if it is public, since HipChat keeps members only for private
        rooms. ``source`` says which; two calls (the room, then its users)."""
        ref = _room_arg(room)
        with self._client(calls=2) as client:
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
        with self._client(calls=1) as client:
            return client.get_user(ref).raw

    def post_message(self, room: Room, message: str) -> dict[str, Any]:
        """Post a message (1..1000 characters) as the token's user: ``{id, timestamp}``, plus
        ``"repeated": true`` when a redelivered operation found its own earlier post."""
        _refuse(_ref_errors(room) + message_errors(message, MESSAGE_MAX_CHARS))
        ref = _room_arg(room)
        earlier = self._began()
        with self._client(calls=1 if earlier is None else 2, first_post=earlier is None) as client:
            if earlier is not None:
                found = _earlier_post(
                    self.rt, self.connection_id, client, ref, earlier, "message", message, None
                )
                if found is not None:
                    self.rt.posts.remember(self.connection_id, [posts.message_key(found.id)])
                    return {"id": found.id, "timestamp": found.raw.get("date"), "repeated": True}
            sent = client.send_message(ref, message)
        self._remember(posts.message_key(sent.id))
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
        ref = _room_arg(room)
        result = {"sent": True, "color": color, "message_format": message_format, "notify": notify}
        earlier = self._began()
        with self._client(calls=1 if earlier is None else 2, first_post=earlier is None) as client:
            if earlier is not None:
                found = _earlier_post(
                    self.rt,
                    self.connection_id,
                    client,
                    ref,
                    earlier,
                    "notification",
                    message,
                    from_,
                )
                if found is not None:
                    return result | {"repeated": True}
            client.send_notification(
                ref,
                message,
                color=color,
                message_format=message_format,
                notify=notify,
                from_=from_,
            )
        self._remember(posts.notification_key(message, from_))
        return result

    def add_member(self, room: Room, user: User) -> dict[str, Any]:
        """Add a user to a **private** room; a public room is refused with a ValidationError
        (HipChat has no members to add there). Adding a member again changes nothing."""
        _refuse(_ref_errors(room) + _ref_errors(user, _user_arg))
        ref = _user_arg(user)
        with self._client(calls=2) as client:
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

    def _began(self) -> float | None:
        """Record this operation's intent to post; when an earlier attempt of it began."""
        if self.operation is None:
            return None
        return self.rt.posts.begin(self.connection_id, self.operation)

    def _withdraw(self) -> None:
        if self.operation is None:
            return
        try:
            self.rt.posts.withdraw(self.connection_id, self.operation)
        except StorageUnavailable as exc:  # the next attempt looks at the history first
            log.warning("connection %s: post intent kept: %s", self.connection_id, exc)

    def _remember(self, key: str) -> None:
        # The post is made: a failure to remember it must not fail the action (the poll then
        # sees it as anyone's post, and a reply subscription may answer it once).
        try:
            self.rt.posts.remember(self.connection_id, [key])
        except StorageUnavailable as exc:
            log.warning("connection %s: own post not remembered: %s", self.connection_id, exc)


def _earlier_post(
    rt: Runtime,
    connection_id: int,
    client: HipChatClient,
    room: Room,
    began: float,
    kind: str,
    text: str,
    from_label: str | None,
) -> Message | None:
    """This operation's own post, if an earlier attempt of it made one: the newest item of
    ``kind`` with the same text posted after that attempt began, by this connection's user
    when the history shows which user that is (a message it remembers posting), and for a
    notification under the same sender label. One call: the room's latest history."""
    since = datetime.fromtimestamp(began - EARLIER_POST_SKEW_SECONDS, UTC)
    recent = client.latest_history(room, max_results=1000)
    candidates = [
        item
        for item in recent
        if item.date >= since
        and item.type == kind
        and item.text == text
        and (kind != "notification" or item.raw.get("from") == from_label)
    ]
    if not candidates:
        return None
    if kind == "message":
        keys = {posts.message_key(m.id): m for m in recent if m.type == "message"}
        ours = {_sender_id(keys[k]) for k in rt.posts.own(connection_id, keys)} - {None}
        if ours:
            candidates = [item for item in candidates if _sender_id(item) in ours]
    return candidates[-1] if candidates else None


def _sender_id(msg: Message) -> int | None:
    sender = msg.raw.get("from")
    return sender.get("id") if isinstance(sender, dict) else None


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
    operation: str | None = None,
    reservation: str | None = None,
    message: str | None = None,
    color: str | None = None,
    message_format: str | None = None,
    notify: bool | None = None,
    **extra: Any,
) -> str:
    """Run a trigger's action target; returns a one-line outcome for the outbox record.
    ``operation`` and ``reservation``: see :class:`Actions` (a delivery passes its event's
    idempotency key and the reservation its last drain was given)."""
    if action not in ACTIONS:
        raise ValidationError(f"unknown action {action!r}; expected one of {', '.join(ACTIONS)}")
    api = Actions(rt, connection, operation=operation, reservation=reservation)
    if action == "post_message":
        sent = api.post_message(room, message or "")
        again = " (already posted by an earlier attempt)" if sent.get("repeated") else ""
        return f"posted {_short(message)} (message {sent['id']}){again}"
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
