"""Users, rooms, tokens and history with their indexes: the data half of the emulator state.

Every method here assumes the caller holds ``self.lock`` (an RLock, so nesting is fine).
:class:`emulator.state.EmulatorState` adds the locked, dict-returning control methods.

Addressing rule, shared by the HTTP API and the Python control methods: an ``int``, or a
string of digits, is an id; any other string is a room name (matched exactly unless
``case_insensitive_rooms``), a ``@mention`` (case-insensitive), or an email (contains ``@``,
case-insensitive). A bare mention name without ``@`` is also accepted for users.
"""

from __future__ import annotations

import random
import re
import secrets
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any

from emulator.errors import BadRequestError, NotFoundError
from emulator.model import (
    ALL_SCOPES,
    FIRST_ROOM_ID,
    Message,
    Room,
    StoredFile,
    Token,
    User,
    new_version,
    to_us,
)

_MENTION = re.compile(r"(?<![\w@])@(\w+)")
_GROUP_MENTIONS = frozenset({"all", "here"})
ROOM_NAME_MAX = 50
PRIVACIES = ("public", "private")


class Store:
    def __init__(
        self, *, case_insensitive_rooms: bool = False, clock: Callable[[], float] | None = None
    ) -> None:
        self.lock = threading.RLock()
        self.clock: Callable[[], float] = clock or time.time
        self.case_insensitive_rooms = case_insensitive_rooms
        self.rng = random.Random()
        self.clear_data()

    def clear_data(self) -> None:
        self.users: dict[int, User] = {}
        self.rooms: dict[int, Room] = {}  # insertion order == id order
        self.tokens: dict[str, Token] = {}
        self.files: dict[str, StoredFile] = {}
        # (base URL, message id) -> the item's JSON text. Items never change and neither do
        # the user stubs inside them, so a poll re-serialises nothing it has sent before.
        self.item_json: dict[tuple[str, str], str] = {}
        self._mentions: dict[str, User] = {}
        self._emails: dict[str, User] = {}
        self._room_names: dict[str, Room] = {}
        self._next_user_id = 1
        self._next_room_id = FIRST_ROOM_ID

    def now(self) -> float:
        return float(self.clock())

    # -- lookups ---------------------------------------------------------------------------

    def _room_key(self, name: str) -> str:
        return name.casefold() if self.case_insensitive_rooms else name

    def find_room(self, ref: int | str) -> Room:
        room: Room | None
        if isinstance(ref, int) or ref.isdigit():
            room = self.rooms.get(int(ref))
        else:
            room = self._room_names.get(self._room_key(ref))
        if room is None:
            raise NotFoundError(f"Room {ref} not found")
        return room

    def find_user(self, ref: int | str) -> User:
        user: User | None
        if isinstance(ref, int) or ref.isdigit():
            user = self.users.get(int(ref))
        elif ref.startswith("@"):
            user = self._mentions.get(ref[1:].casefold())
        elif "@" in ref:
            user = self._emails.get(ref.casefold())
        else:
            user = self._mentions.get(ref.casefold())
        if user is None:
            raise NotFoundError("User not found")
        return user

    def find_token(self, value: str) -> Token | None:
        return self.tokens.get(value)

    # -- users and tokens ------------------------------------------------------------------

    def add_user(
        self,
        name: str,
        mention_name: str | None = None,
        email: str | None = None,
        *,
        title: str = "",
        is_group_admin: bool = False,
        is_guest: bool = False,
    ) -> User:
        if not isinstance(name, str) or not 1 <= len(name) <= 50:
            raise BadRequestError("User name must be between 1 and 50 characters")
        mention = mention_name if mention_name is not None else self._free_mention(name)
        if not re.fullmatch(r"\w{1,50}", mention):
            raise BadRequestError(f"Invalid mention name {mention!r}")
        if mention.casefold() in self._mentions:
            raise BadRequestError(f"Mention name {mention!r} is already taken")
        address = email if email is not None else f"{mention.lower()}@example.com"
        if "@" not in address[1:] or address.casefold() in self._emails:
            raise BadRequestError(f"Email {address!r} is invalid or already taken")
        now = self.now()
        user = User(
            id=self._next_user_id,
            name=name,
            mention_name=mention,
            email=address,
            title=title,
            created=now,
            last_active=now,
            version=new_version(self.rng),
            is_group_admin=is_group_admin,
            is_guest=is_guest,
        )
        self._next_user_id += 1
        self.users[user.id] = user
        self._mentions[mention.casefold()] = user
        self._emails[address.casefold()] = user
        return user

    def _free_mention(self, name: str) -> str:
        base = re.sub(r"\W", "", name) or "user"
        candidate, n = base, 1
        while candidate.casefold() in self._mentions:
            n += 1
            candidate = f"{base}{n}"
        return candidate

    def add_token(
        self, user: User, scopes: Iterable[str] | None = None, value: str | None = None
    ) -> Token:
        chosen = ALL_SCOPES if scopes is None else frozenset(scopes)
        unknown = chosen - ALL_SCOPES
        if unknown:
            raise BadRequestError(f"Unknown scopes: {sorted(unknown)}")
        token = Token(value or secrets.token_hex(20), user.id, chosen)
        self.tokens[token.value] = token
        return token

    # -- rooms -----------------------------------------------------------------------------

    def _check_room_name(self, name: Any, room: Room | None = None) -> str:
        if not isinstance(name, str) or not 1 <= len(name) <= ROOM_NAME_MAX:
            raise BadRequestError(f"Room name must be between 1 and {ROOM_NAME_MAX} characters")
        existing = self._room_names.get(self._room_key(name))
        if existing is not None and existing is not room:
            raise BadRequestError(f"Another room with the name {name} already exists")
        return name

    def add_room(
        self, name: str, *, privacy: str = "public", owner: User | None = None, topic: str = ""
    ) -> Room:
        self._check_room_name(name)
        if privacy not in PRIVACIES:
            raise BadRequestError("privacy must be 'public' or 'private'")
        room = Room(
            id=self._next_room_id,
            name=name,
            privacy=privacy,
            owner_id=owner.id if owner else None,
            topic=topic,
            created=self.now(),
            version=new_version(self.rng),
            guest_key=secrets.token_hex(8),
        )
        self._next_room_id += 1
        if owner is not None:
            room.members[owner.id] = ("room_admin", "room_member")
        self.rooms[room.id] = room
        self._room_names[self._room_key(name)] = room
        return room

    def rename_room(self, room: Room, name: str) -> None:
        self._check_room_name(name, room)
        del self._room_names[self._room_key(room.name)]
        room.name = name
        self._room_names[self._room_key(name)] = room

    def touch(self, room: Room) -> None:
        """The room changed: give it a new version (it works like an etag)."""
        room.version = new_version(self.rng)

    def remove_room(self, room: Room) -> None:
        del self.rooms[room.id]
        del self._room_names[self._room_key(room.name)]

    def enter(self, room: Room, user: User) -> None:
        room.online[user.id] = None
        room.visitors[user.id] = None
        user.last_active = self.now()

    def leave(self, room: Room, user: User) -> None:
        room.online.pop(user.id, None)

    def is_online(self, user: User) -> bool:
        return any(user.id in room.online for room in self.rooms.values())

    # -- history ---------------------------------------------------------------------------

    def mentions_in(self, text: str) -> tuple[int, ...]:
        found: dict[int, None] = {}
        for name in _MENTION.findall(text):
            user = self._mentions.get(name.casefold())
            if user is not None and name.casefold() not in _GROUP_MENTIONS:
                found[user.id] = None
        return tuple(found)

    def append_message(
        self,
        room: Room,
        *,
        kind: str,
        text: str,
        sender: User | None = None,
        parse_mentions: bool = True,
        **fields: Any,
    ) -> Message:
        """Add one history item dated now (or 1 µs after the room's newest item)."""
        now = self.now()
        message = Message(
            id=str(uuid.uuid4()),
            date_us=room.next_date_us(to_us(now)),
            type=kind,
            text=text,
            sender_id=sender.id if sender else None,
            mention_ids=self.mentions_in(text) if parse_mentions else (),
            **fields,
        )
        room.append(message)
        if sender is not None:
            sender.last_active = now
        return message

    def store_file(self, name: str, content: bytes, content_type: str) -> StoredFile:
        stored = StoredFile(uuid.uuid4().hex, name, content, content_type)
        self.files[stored.id] = stored
        return stored
