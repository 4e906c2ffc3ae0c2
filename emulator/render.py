"""JSON shapes of HipChat API v2 objects (reference §4), built from the model records.

``base`` is the absolute base URL (``http://host:port``, taken from the request's Host
header); every link is absolute. Call these with the state lock held.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import quote

from emulator.model import (
    GROUP_ID,
    GROUP_NAME,
    Message,
    Room,
    StoredFile,
    User,
    iso_seconds,
    iso_us,
)

JSON = dict[str, Any]
_PRESENCE_ONLINE: JSON = {
    "client": {"type": "http://hipchat.com/client/emulator", "version": "1"},
    "idle": None,
    "is_online": True,
    "show": "chat",
    "status": None,
}


def user_url(base: str, user_id: int) -> str:
    return f"{base}/v2/user/{user_id}"


def room_url(base: str, room_id: int) -> str:
    return f"{base}/v2/room/{room_id}"


def user_stub(base: str, user: User) -> JSON:
    return {
        "id": user.id,
        "links": {"self": user_url(base, user.id)},
        "mention_name": user.mention_name,
        "name": user.name,
        "version": user.version,
    }


def user_full(base: str, user: User, *, online: bool) -> JSON:
    return {
        "created": iso_seconds(user.created),
        "email": user.email,
        "group": {
            "id": GROUP_ID,
            "links": {"self": f"{base}/v2/group/{GROUP_ID}"},
            "name": GROUP_NAME,
        },
        "id": user.id,
        "is_deleted": user.is_deleted,
        "is_group_admin": user.is_group_admin,
        "is_guest": user.is_guest,
        "last_active": str(int(user.last_active)),
        "links": {"self": user_url(base, user.id)},
        "mention_name": user.mention_name,
        "name": user.name,
        "photo_url": f"{base}/_emulator/avatars/{user.id}.png",
        "presence": dict(_PRESENCE_ONLINE) if online else None,
        "timezone": user.timezone,
        "title": user.title,
        "version": user.version,
        "xmpp_jid": f"{GROUP_ID}_{user.id}@chat.hipchat.com",
    }


def member_item(base: str, user: User, roles: tuple[str, ...]) -> JSON:
    return {**user_stub(base, user), "room_roles": list(roles)}


def room_links(base: str, room: Room) -> JSON:
    url = room_url(base, room.id)
    links = {"self": url, "webhooks": f"{url}/webhook", "participants": f"{url}/participant"}
    if room.privacy == "private":
        links["members"] = f"{url}/member"
    return links


def room_stub(base: str, room: Room) -> JSON:
    return {
        "id": room.id,
        "is_archived": room.is_archived,
        "links": room_links(base, room),
        "name": room.name,
        "privacy": room.privacy,
        "version": room.version,
    }


def room_detail(base: str, room: Room, users: Mapping[int, User]) -> JSON:
    owner = users.get(room.owner_id) if room.owner_id is not None else None
    slug = "".join(c if c.isalnum() else "_" for c in room.name.lower())
    return {
        **room_stub(base, room),
        "avatar_url": None,
        "created": iso_seconds(room.created),
        "delegate_admin_visibility": None,
        "guest_access_url": f"{base}/g{room.guest_key}" if room.is_guest_accessible else None,
        "is_guest_accessible": room.is_guest_accessible,
        "owner": user_stub(base, owner) if owner else None,
        "participants": [user_stub(base, users[uid]) for uid in room.online],
        "statistics": {"links": {"self": f"{room_url(base, room.id)}/statistics"}},
        "topic": room.topic,
        "xmpp_jid": f"{GROUP_ID}_{slug}@conf.hipchat.com",
    }


def room_statistics(base: str, room: Room) -> JSON:
    return {
        "last_active": iso_us(room.dates_us[-1]) if room.dates_us else None,
        "links": {"self": f"{room_url(base, room.id)}/statistics"},
        "messages_sent": len(room.messages),
    }


def file_url(base: str, stored: StoredFile, *, thumb: bool = False) -> str:
    name = quote(stored.name, safe="")
    return f"{base}/_emulator/files/{stored.id}/{'thumb_' if thumb else ''}{name}"


def file_info(base: str, stored: StoredFile) -> JSON:
    info: JSON = {"name": stored.name, "size": len(stored.content), "url": file_url(base, stored)}
    if stored.is_image:
        info["thumb_url"] = file_url(base, stored, thumb=True)
    return info


def message_item(base: str, message: Message, users: Mapping[int, User]) -> JSON:
    """A history item. User messages and topic changes have a user object in ``from`` and
    no ``color``/``message_format``; notifications have a string (or null) ``from``."""
    item: JSON = {
        "date": iso_us(message.date_us),
        "id": message.id,
        "mentions": [user_stub(base, users[uid]) for uid in message.mention_ids if uid in users],
        "message": message.text,
        "type": message.type,
    }
    if message.type == "notification":
        item["from"] = message.from_label
        item["color"] = message.color
        item["message_format"] = message.message_format
        item["notification_sender"] = message.notification_sender
        if message.card is not None:
            item["card"] = message.card
        if message.attach_to is not None:
            item["attach_to"] = message.attach_to
    else:
        sender = users.get(message.sender_id) if message.sender_id is not None else None
        item["from"] = user_stub(base, sender) if sender else None
    if message.file is not None:
        item["file"] = file_info(base, message.file)
    return item


def message_json(
    base: str, message: Message, users: Mapping[int, User], cache: dict[tuple[str, str], str]
) -> str:
    key = (base, message.id)
    text = cache.get(key)
    if text is None:
        text = cache[key] = json.dumps(message_item(base, message, users), ensure_ascii=False)
    return text


def items_body(items_json: Sequence[str], rest: JSON) -> bytes:
    """``{"items": [...], **rest}`` from items already serialised."""
    tail = json.dumps(rest, ensure_ascii=False)
    return ('{"items": [' + ", ".join(items_json) + "], " + tail[1:]).encode("utf-8")
