"""The emulator's in-memory records.

Plain mutable dataclasses with no locking of their own: :class:`emulator.state.EmulatorState`
guards every record with its one lock. Times are epoch seconds (floats); message dates are
integer epoch *microseconds*, strictly increasing per room, so ordering is total and exact.
"""

from __future__ import annotations

import random
import string
from bisect import bisect_left, bisect_right
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

# Scope names seen in HipChat's docs and error messages (reference §2).
ALL_SCOPES = frozenset(
    {
        "admin_group",
        "admin_room",
        "manage_rooms",
        "send_message",
        "send_notification",
        "view_group",
        "view_messages",
        "view_room",
    }
)
GROUP_ID = 1
GROUP_NAME = "Emulated Group"
FIRST_ROOM_ID = 10001  # distinct from user ids, so a room id used as a user id is caught

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_VERSION_CHARS = string.ascii_uppercase + string.digits


def new_version(rng: random.Random) -> str:
    """An etag-like version: 8 upper-case letters and digits, e.g. ``"UDY9AI3A"``."""
    return "".join(rng.choices(_VERSION_CHARS, k=8))


def to_us(seconds: float) -> int:
    return round(seconds * 1_000_000)


def iso_us(us: int) -> str:
    """History date form: ``2018-01-09T04:29:16.864014+00:00`` (reference §4.3).

    Written here rather than borrowed from the client's parser, so that the emulator stays
    an independent oracle: a mistake in the client's date handling cannot hide in both."""
    return (_EPOCH + timedelta(microseconds=us)).isoformat(timespec="microseconds")


def iso_seconds(seconds: float) -> str:
    """Room/user ``created`` form: ``2013-11-07T17:57:11+00:00``."""
    return (_EPOCH + timedelta(seconds=int(seconds))).isoformat()


@dataclass(eq=False)
class User:
    id: int
    name: str
    mention_name: str
    email: str
    title: str
    created: float
    last_active: float
    version: str
    is_group_admin: bool = False
    is_guest: bool = False
    is_deleted: bool = False
    timezone: str = "UTC"


@dataclass(frozen=True, eq=False)
class StoredFile:
    id: str
    name: str
    content: bytes
    content_type: str

    @property
    def is_image(self) -> bool:
        return self.content_type.startswith("image/")


@dataclass(frozen=True, eq=False)
class Message:
    """One history item. ``type`` is ``message`` (user text or file), ``notification`` or
    ``topic``; the fields that do not apply to a type stay ``None``."""

    id: str
    date_us: int
    type: str
    text: str
    sender_id: int | None = None
    from_label: str | None = None
    mention_ids: tuple[int, ...] = ()
    file: StoredFile | None = None
    color: str | None = None
    message_format: str | None = None
    card: str | None = None  # JSON text: HipChat history carries cards as strings
    attach_to: str | None = None
    notification_sender: dict[str, Any] | None = None


@dataclass(eq=False)
class Room:
    id: int
    name: str
    privacy: str
    owner_id: int | None
    topic: str
    created: float
    version: str
    is_archived: bool = False
    is_guest_accessible: bool = False
    guest_key: str = ""
    messages: list[Message] = field(default_factory=list)
    dates_us: list[int] = field(default_factory=list)  # parallel to messages, for bisect
    positions: dict[str, int] = field(default_factory=dict)  # message id -> index
    online: dict[int, None] = field(default_factory=dict)  # ordered set of user ids in the room
    visitors: dict[int, None] = field(default_factory=dict)  # everyone who ever entered
    members: dict[int, tuple[str, ...]] = field(default_factory=dict)  # user id -> room_roles

    def next_date_us(self, now_us: int) -> int:
        """``now`` unless that would not be after the newest item; then 1 µs after it."""
        if self.dates_us and now_us <= self.dates_us[-1]:
            return self.dates_us[-1] + 1
        return now_us

    def append(self, message: Message) -> None:
        self.positions[message.id] = len(self.messages)
        self.messages.append(message)
        self.dates_us.append(message.date_us)

    def span(self, oldest_us: int, newest_us: int) -> tuple[int, int]:
        """Index range ``[lo, hi)`` of the items dated within both bounds, inclusive."""
        return bisect_left(self.dates_us, oldest_us), bisect_right(self.dates_us, newest_us)


@dataclass(frozen=True)
class Token:
    value: str
    user_id: int
    scopes: frozenset[str]
