"""Client calls that only the tests need: administration of the emulated HipChat (create,
rename and delete rooms, share files, page history by hand, list users, remove members).

The product's :class:`tasks.client.HipChatClient` keeps only the calls a feature uses; these
build on the same choke point (:class:`tasks.client_http.HttpCore`), so the tests exercise
the emulator's endpoints through the very transport, budget hook and error mapping the
product uses.
"""

from __future__ import annotations

import base64
import json
import mimetypes
import uuid
from datetime import datetime
from typing import Any

from storage.errors import MalformedResponse, ValidationError
from tasks import client_inputs as inputs
from tasks.client import HipChatClient
from tasks.client_inputs import MESSAGE_MAX_CHARS, RoomRef, UserRef
from tasks.hipchat_types import Message, UserStub
from tasks.pagination import HistoryPage, page_is_full, parse_envelope

ROOM_NAME_MAX_CHARS = 50
PRIVACIES = frozenset({"public", "private"})


def _bool(value: bool) -> str:
    return "true" if value else "false"


def _fail(what: str, errors: list[str | None]) -> None:
    found = [e for e in errors if e]
    if found:
        raise ValidationError(f"{what}: " + "; ".join(found), found)


def _length_error(field: str, value: object, low: int, high: int) -> str | None:
    if not isinstance(value, str):
        return f"{field} must be a string"
    if not low <= len(value) <= high:
        return f"{field} must be {low}..{high} characters, got {len(value)}"
    return None


class AdminClient(HipChatClient):
    """:class:`HipChatClient` plus the administration calls of the tests."""

    def create_room(self, name: str, *, privacy: str = "public", topic: str | None = None) -> int:
        body = create_room_body(name, privacy, topic)
        reply = self._http.request("POST", "/room", json_body=body)
        return self._http.parse(reply, _created_id)

    def set_topic(self, room: RoomRef, topic: str) -> None:
        body = topic_body(topic)
        self._http.request("PUT", f"/room/{inputs.room_segment(room)}/topic", json_body=body)

    def delete_room(self, room: RoomRef) -> None:
        self._http.request("DELETE", f"/room/{inputs.room_segment(room)}")

    def history(
        self,
        room: RoomRef,
        *,
        date: datetime | str = "recent",
        end_date: datetime | None = None,
        reverse: bool = True,
        start_index: int = 0,
        max_results: int = 100,
    ) -> HistoryPage[Message]:
        """One page of ``/history``. ``date`` is the NEWEST bound, ``end_date`` the oldest.

        ``has_more``: ``links.next`` was sent, or the page is full. ``date="recent"`` (the
        latest 75, real time) ignores paging, so there only ``links.next`` counts.
        """
        params = self._history_params(date, end_date, reverse)
        if isinstance(start_index, bool) or not isinstance(start_index, int) or start_index < 0:
            raise ValidationError("start_index must be an integer >= 0")
        params["start-index"] = start_index
        params["max-results"] = inputs.check_max_results(max_results)
        reply = self._http.request(
            "GET", f"/room/{inputs.room_segment(room)}/history", params=params
        )
        page = self._http.parse(reply, parse_envelope)
        items = [self._http.parse(reply, Message.parse, raw) for raw in page.items]
        full = params["date"] != "recent" and page_is_full(len(items), max_results)
        return HistoryPage(items, page.next_url is not None or full)

    def remove_member(self, room: RoomRef, user: UserRef) -> None:
        path = f"/room/{inputs.room_segment(room)}/member/{inputs.user_segment(user)}"
        self._http.request("DELETE", path)

    def list_users(
        self, *, include_guests: bool = False, include_deleted: bool = False
    ) -> list[UserStub]:
        params = {
            "include-guests": _bool(include_guests),
            "include-deleted": _bool(include_deleted),
        }
        return list(self._all("/user", params, UserStub.parse, lambda user: user.id))

    def share_file(
        self,
        room: RoomRef,
        filename: str,
        content: bytes,
        *,
        content_type: str | None = None,
        message: str | None = None,
    ) -> None:
        body, kind = multipart_related(filename, content, content_type, message)
        path = f"/room/{inputs.room_segment(room)}/share/file"
        self._http.request("POST", path, data=body, headers={"Content-Type": kind})


def _created_id(body: Any) -> int:
    room_id = body.get("id") if isinstance(body, dict) else None
    if isinstance(room_id, bool) or not isinstance(room_id, int):
        raise MalformedResponse("create answer has no integer 'id'")
    return room_id


def create_room_body(name: str, privacy: str, topic: str | None) -> dict[str, Any]:
    errors = [_length_error("name", name, 1, ROOM_NAME_MAX_CHARS)]
    if privacy not in PRIVACIES:
        errors.append("privacy must be public or private")
    if topic is not None and not isinstance(topic, str):
        errors.append("topic must be a string")
    _fail("create_room", [e for e in errors if e])
    body: dict[str, Any] = {"name": name, "privacy": privacy}
    if topic is not None:
        body["topic"] = topic
    return body


def topic_body(topic: str) -> dict[str, Any]:
    if not isinstance(topic, str):
        raise ValidationError("set_topic: topic must be a string")
    return {"topic": topic}


def _has_control(value: object) -> bool:
    return isinstance(value, str) and any(ord(ch) < 32 or ord(ch) == 127 for ch in value)


def _quoted(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')


def multipart_related(
    filename: str, content: bytes, content_type: str | None, message: str | None
) -> tuple[bytes, str]:
    """``(body, Content-Type header)`` for ``share/file`` (§4.12): a JSON metadata part and
    the file as base64, the way hipchat-go and hipchat-rb sent it."""
    errors = [_length_error("filename", filename, 1, 255)]
    if isinstance(filename, str) and _has_control(filename):
        errors.append("filename must not contain control characters")
    if not isinstance(content, (bytes, bytearray)):
        errors.append("content must be bytes")
    if message is not None:
        errors.append(_length_error("message", message, 0, MESSAGE_MAX_CHARS))
    if content_type is not None and (not content_type or _has_control(content_type)):
        errors.append("content_type must be a single non-empty line")
    _fail("share_file", [e for e in errors if e])
    kind = content_type or mimetypes.guess_type(filename)[0] or "application/octet-stream"
    boundary = uuid.uuid4().hex
    metadata = json.dumps({"message": message or ""})
    head = (
        f"--{boundary}\r\n"
        "Content-Type: application/json; charset=UTF-8\r\n"
        'Content-Disposition: attachment; name="metadata"\r\n\r\n'
        f"{metadata}\r\n"
        f"--{boundary}\r\n"
        f"Content-Type: {kind}\r\n"
        "Content-Transfer-Encoding: base64\r\n"
        f'Content-Disposition: attachment; name="file"; filename="{_quoted(filename)}"\r\n\r\n'
    ).encode()
    body = head + base64.b64encode(bytes(content)) + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/related; boundary={boundary}"
