"""The emulator's whole in-memory state and its Python control API.

One re-entrant lock (``state.lock``) guards everything: the data in
:class:`emulator.store.Store`, the rate-limit and flood windows, the fault plan and the
call log. Every public method below takes it, so the state is safe to drive from test code
while server threads answer requests. Methods return plain dicts in HipChat's JSON shapes,
with links built from ``base_url`` (set by :class:`emulator.server.EmulatorServer`).
"""

from __future__ import annotations

import json
import mimetypes
import random
from collections.abc import Callable, Iterable
from typing import Any

from emulator import render
from emulator.calllog import CallLog, CallRecord
from emulator.errors import BadRequestError
from emulator.faults import Fault, FaultPlan
from emulator.limits import FixedWindow
from emulator.model import Message, Room
from emulator.store import Store

JSON = dict[str, Any]
COLORS = ("yellow", "green", "red", "purple", "gray")
FORMATS = ("html", "text")
CONTROL_SENDER: JSON = {"client_id": None, "id": "hipchat-emulator", "type": "addon"}


class EmulatorState(Store):
    def __init__(
        self,
        *,
        admin_token: str = "admin-token",  # noqa: S107 - a fixture value, not a secret
        seed: bool = True,
        rate_limit: int = 100,
        rate_window_seconds: float = 300.0,
        flood_limit: int = 30,
        flood_window_seconds: float = 60.0,
        case_insensitive_rooms: bool = False,
        clock: Callable[[], float] | None = None,
    ) -> None:
        super().__init__(case_insensitive_rooms=case_insensitive_rooms, clock=clock)
        self.admin_token = admin_token
        self.seed = seed
        self.base_url = "http://127.0.0.1"
        self.rate = FixedWindow(rate_limit, rate_window_seconds)
        self.flood = FixedWindow(flood_limit, flood_window_seconds)
        self.faults = FaultPlan()
        self.call_log = CallLog()
        self.reset()

    def reset(self) -> None:
        """Back to the state just after construction: seed data, no faults, no calls."""
        with self.lock:
            self.clear_data()
            self.rate.clear()
            self.flood.clear()
            self.faults.clear()
            self.call_log.clear()
            admin = self.add_user(
                "Emulator Admin", "admin", "admin@example.com", title="Admin", is_group_admin=True
            )
            self.add_token(admin, value=self.admin_token)
            if self.seed:
                alice = self.add_user("Alice Anders", "AliceA", title="Engineer")
                bob = self.add_user("Bob Brown", "bobb", title="Operator")
                self.add_room("General", owner=admin, topic="Company-wide chatter")
                ops = self.add_room("Ops Room", privacy="private", owner=admin, topic="On call")
                ops.members[alice.id] = ("room_member",)
                ops.members[bob.id] = ("room_member",)

    # -- users and tokens ------------------------------------------------------------------

    def create_user(
        self,
        name: str,
        mention_name: str | None = None,
        email: str | None = None,
        *,
        title: str = "",
        is_group_admin: bool = False,
        is_guest: bool = False,
    ) -> JSON:
        with self.lock:
            user = self.add_user(
                name,
                mention_name,
                email,
                title=title,
                is_group_admin=is_group_admin,
                is_guest=is_guest,
            )
            return render.user_full(self.base_url, user, online=False)

    def get_user(self, user: int | str) -> JSON:
        with self.lock:
            found = self.find_user(user)
            return render.user_full(self.base_url, found, online=self.is_online(found))

    def users_list(self) -> list[JSON]:
        with self.lock:
            return [render.user_stub(self.base_url, u) for u in self.users.values()]

    def delete_user(self, user: int | str) -> None:
        """Mark the user deleted: its tokens stop working, history keeps its items."""
        with self.lock:
            found = self.find_user(user)
            found.is_deleted = True
            for room in self.rooms.values():
                room.online.pop(found.id, None)

    def create_token(
        self, user: int | str, scopes: Iterable[str] | None = None, *, token: str | None = None
    ) -> str:
        """A personal access token for ``user``; ``scopes=None`` grants every scope."""
        with self.lock:
            return self.add_token(self.find_user(user), scopes, token).value

    def revoke_token(self, token: str) -> None:
        with self.lock:
            self.tokens.pop(token, None)

    # -- rooms -----------------------------------------------------------------------------

    def create_room(
        self,
        name: str,
        *,
        privacy: str = "public",
        owner: int | str | None = None,
        topic: str = "",
    ) -> JSON:
        with self.lock:
            owner_user = self.find_user(owner) if owner is not None else None
            room = self.add_room(name, privacy=privacy, owner=owner_user, topic=topic)
            return render.room_detail(self.base_url, room, self.users)

    def get_room(self, room: int | str) -> JSON:
        with self.lock:
            return render.room_detail(self.base_url, self.find_room(room), self.users)

    def rooms_list(self) -> list[JSON]:
        with self.lock:
            return [render.room_stub(self.base_url, r) for r in self.rooms.values()]

    def update_room(
        self, room: int | str, *, name: str | None = None, privacy: str | None = None
    ) -> JSON:
        """Rename a room or change its privacy (no history item; the version changes)."""
        with self.lock:
            found = self.find_room(room)
            if privacy is not None and privacy not in ("public", "private"):
                raise BadRequestError("privacy must be 'public' or 'private'")
            if name is not None and name != found.name:
                self.rename_room(found, name)
            if privacy is not None:
                found.privacy = privacy
            self.touch(found)
            return render.room_detail(self.base_url, found, self.users)

    def archive_room(self, room: int | str, archived: bool = True) -> JSON:
        with self.lock:
            found = self.find_room(room)
            if found.is_archived != archived:
                found.is_archived = archived
                self.touch(found)
            return render.room_detail(self.base_url, found, self.users)

    def delete_room(self, room: int | str) -> None:
        with self.lock:
            self.remove_room(self.find_room(room))

    def enter_room(self, room: int | str, user: int | str) -> None:
        with self.lock:
            self.enter(self.find_room(room), self.find_user(user))

    def leave_room(self, room: int | str, user: int | str) -> None:
        with self.lock:
            self.leave(self.find_room(room), self.find_user(user))

    def add_member(
        self, room: int | str, user: int | str, roles: Iterable[str] = ("room_member",)
    ) -> None:
        with self.lock:
            found = self.find_room(room)
            if found.privacy != "private":
                raise BadRequestError("Only private rooms have members")
            chosen = tuple(dict.fromkeys(roles))
            if not chosen or not set(chosen) <= {"room_admin", "room_member"}:
                raise BadRequestError("room_roles must be room_admin and/or room_member")
            found.members[self.find_user(user).id] = chosen

    def remove_member(self, room: int | str, user: int | str) -> None:
        with self.lock:
            found, who = self.find_room(room), self.find_user(user)
            found.members.pop(who.id, None)
            found.online.pop(who.id, None)

    # -- history ---------------------------------------------------------------------------

    def history(self, room: int | str) -> list[JSON]:
        """Every item of the room, oldest first."""
        with self.lock:
            found = self.find_room(room)
            return [render.message_item(self.base_url, m, self.users) for m in found.messages]

    def _item(self, room: Room, index: int = -1) -> JSON:
        return render.message_item(self.base_url, room.messages[index], self.users)

    def post_message(self, room: int | str, user: int | str, text: str) -> JSON:
        with self.lock:
            found = self.find_room(room)
            self.append_message(found, kind="message", text=text, sender=self.find_user(user))
            return self._item(found)

    def upload_file(
        self,
        room: int | str,
        user: int | str,
        filename: str,
        content: bytes,
        message: str = "",
        content_type: str | None = None,
    ) -> JSON:
        kind = content_type or mimetypes.guess_type(filename)[0] or "application/octet-stream"
        with self.lock:
            found, sender = self.find_room(room), self.find_user(user)
            stored = self.store_file(filename, content, kind)
            self.append_message(found, kind="message", text=message, sender=sender, file=stored)
            return self._item(found)

    def send_notification(
        self,
        room: int | str,
        text: str,
        *,
        from_label: str | None = None,
        color: str = "yellow",
        message_format: str = "html",
        card: dict[str, Any] | None = None,
        attach_to: str | None = None,
        sender: dict[str, Any] | None = None,
    ) -> JSON:
        """Add a notification item. ``color="random"`` is resolved to one of the five."""
        with self.lock:
            found = self.find_room(room)
            self.append_notification(
                found,
                text,
                from_label=from_label,
                color=color,
                message_format=message_format,
                card=card,
                attach_to=attach_to,
                sender=sender or CONTROL_SENDER,
            )
            return self._item(found)

    def append_notification(
        self,
        room: Room,
        text: str,
        *,
        from_label: str | None,
        color: str,
        message_format: str,
        card: dict[str, Any] | None,
        attach_to: str | None,
        sender: dict[str, Any],
    ) -> Message:
        if color == "random":
            color = random.choice(COLORS)
        if color not in COLORS:
            raise BadRequestError(f"color must be one of {', '.join(COLORS)} or random")
        if message_format not in FORMATS:
            raise BadRequestError("message_format must be html or text")
        with self.lock:
            return self.append_message(
                room,
                kind="notification",
                text=text,
                parse_mentions=message_format == "text",
                from_label=from_label,
                color=color,
                message_format=message_format,
                card=json.dumps(card) if card is not None else None,
                attach_to=attach_to,
                notification_sender=dict(sender),
            )

    def set_topic(self, room: int | str, user: int | str, topic: str) -> JSON:
        """Change the room's topic and add the ``type: "topic"`` history item."""
        with self.lock:
            found = self.find_room(room)
            sender = self.find_user(user)
            found.topic = topic
            self.touch(found)
            self.append_message(
                found, kind="topic", text=topic, sender=sender, parse_mentions=False
            )
            return self._item(found)

    # -- faults and the call log -----------------------------------------------------------

    def inject_fault(
        self,
        kind: str,
        *,
        count: int = 1,
        path_prefix: str | None = None,
        method: str | None = None,
        status: int = 503,
        delay_seconds: float = 0.0,
        reset_seconds: int = 60,
    ) -> JSON:
        with self.lock:
            fault = self.faults.add(
                kind,
                count=count,
                path_prefix=path_prefix,
                method=method,
                status=status,
                delay_seconds=delay_seconds,
                reset_seconds=reset_seconds,
            )
            return fault.as_dict()

    def take_fault(self, method: str, path: str) -> tuple[Fault | None, int | None]:
        with self.lock:
            return self.faults.take(method, path)

    def pending_faults(self) -> list[JSON]:
        with self.lock:
            return [f.as_dict() for f in self.faults.pending()]

    def clear_faults(self) -> None:
        with self.lock:
            self.faults.clear()

    def record_call(self, record: CallRecord) -> None:
        with self.lock:
            self.call_log.append(record)

    def calls(
        self,
        *,
        token: str | None = None,
        since: float | None = None,
        until: float | None = None,
        path_prefix: str | None = None,
        method: str | None = None,
    ) -> list[CallRecord]:
        with self.lock:
            return self.call_log.select(
                token=token, since=since, until=until, path_prefix=path_prefix, method=method
            )

    def clear_calls(self) -> None:
        with self.lock:
            self.call_log.clear()
