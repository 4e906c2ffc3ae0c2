"""The project's vocabularies, each defined once: events, streams, targets and states.

Every layer imports these (imports flow worker -> tasks -> storage, so they live at the
bottom). Each is a :class:`~enum.StrEnum`: a member *is* its string, so it is stored, sent
in JSON and compared with what a user typed without conversion.
"""

from __future__ import annotations

from enum import StrEnum


class Event(StrEnum):
    """A trigger: what a subscription fires on (HipChat's own webhook event names)."""

    ROOM_MESSAGE = "room_message"
    ROOM_FILE_UPLOAD = "room_file_upload"
    ROOM_NOTIFICATION = "room_notification"
    ROOM_TOPIC_CHANGE = "room_topic_change"
    ROOM_ENTER = "room_enter"
    ROOM_EXIT = "room_exit"
    ROOM_CREATED = "room_created"
    ROOM_ARCHIVED = "room_archived"
    ROOM_UNARCHIVED = "room_unarchived"
    ROOM_DELETED = "room_deleted"


# Which stream of a connection each event is read from.
HISTORY_EVENTS = frozenset(
    {Event.ROOM_MESSAGE, Event.ROOM_FILE_UPLOAD, Event.ROOM_NOTIFICATION, Event.ROOM_TOPIC_CHANGE}
)
PARTICIPANT_EVENTS = frozenset({Event.ROOM_ENTER, Event.ROOM_EXIT})
ROOM_LIST_EVENTS = frozenset(
    {Event.ROOM_CREATED, Event.ROOM_ARCHIVED, Event.ROOM_UNARCHIVED, Event.ROOM_DELETED}
)
# Events about one room: a subscription to one of these names its room.
ROOM_SCOPED_EVENTS = HISTORY_EVENTS | PARTICIPANT_EVENTS


class Stream(StrEnum):
    """What one poll reads once per room (or once per connection, for the room list)."""

    HISTORY = "history"
    ROOMS = "rooms"
    PARTICIPANTS = "participants"


# The room_id of the per-connection room-list stream, which belongs to no room.
ROOM_LIST_ROOM_ID = 0


def stream_of(event: str) -> Stream:
    """The stream an event is read from."""
    if event in HISTORY_EVENTS:
        return Stream.HISTORY
    if event in PARTICIPANT_EVENTS:
        return Stream.PARTICIPANTS
    if event in ROOM_LIST_EVENTS:
        return Stream.ROOMS
    raise ValueError(f"unknown event {event!r}")


class TargetKind(StrEnum):
    """Where a subscription sends its events."""

    WEBHOOK = "webhook"
    LOG = "log"
    ACTION = "action"
    HANDLER = "handler"


class ConnectionState(StrEnum):
    ACTIVE = "active"
    PAUSED = "paused"
    AUTH_FAILED = "auth_failed"


class SubscriptionState(StrEnum):
    ACTIVE = "active"
    PAUSED = "paused"
    ERROR = "error"


class OutboxState(StrEnum):
    PENDING = "pending"
    DISPATCHED = "dispatched"
    DELIVERED = "delivered"
    DEAD = "dead"


OPEN_OUTBOX_STATES = (OutboxState.PENDING, OutboxState.DISPATCHED)


def is_one_of(vocabulary: type[StrEnum], value: object) -> bool:
    """True if ``value`` is one of the vocabulary's strings (a member or its plain value)."""
    return isinstance(value, str) and value in {member.value for member in vocabulary}


def one_of(vocabulary: type[StrEnum]) -> str:
    """``a, b, c``: the values of a vocabulary, for error messages."""
    return ", ".join(member.value for member in vocabulary)
