"""``/v2/room`` endpoints: list, create, view, update, delete, topic, statistics,
participants and members (reference §4.1, §4.2, §4.6-4.8, §11)."""

from __future__ import annotations

from typing import Any

from emulator import render
from emulator.errors import BadRequestError, NotFoundError
from emulator.model import Room
from emulator.params import bool_param, collection, json_body, paging, text_field
from emulator.wire import Ctx, Response, empty_response, json_response

ROOM_ROLES = ("room_admin", "room_member")
TOPIC_MAX = 250


def _room(ctx: Ctx) -> Room:
    return ctx.state.find_room(ctx.params["room"])


def list_rooms(ctx: Ctx) -> Response:
    query = ctx.req.query
    start, limit = paging(query)
    private = bool_param(query, "include-private", True)
    archived = bool_param(query, "include-archived", False)
    with ctx.state.lock:
        rooms = [
            r
            for r in ctx.state.rooms.values()
            if (private or r.privacy == "public") and (archived or not r.is_archived)
        ]
        page = [render.room_stub(ctx.req.base, r) for r in rooms[start : start + limit]]
    more = len(rooms) > start + limit
    return json_response(200, collection(ctx.req, page, start, limit, has_more=more))


def _flag(body: dict[str, Any], name: str, default: bool) -> bool:
    value = body.get(name, default)
    if not isinstance(value, bool):
        raise BadRequestError(f"{name} must be a boolean")
    return value


def create_room(ctx: Ctx) -> Response:
    body = json_body(ctx.req)
    guest = _flag(body, "guest_access", False)
    owner_ref = body.get("owner_user_id")
    with ctx.state.lock:
        owner = ctx.user
        if owner_ref is not None:
            try:
                owner = ctx.state.find_user(str(owner_ref))
            except NotFoundError:
                raise BadRequestError("owner_user_id is not a known user") from None
        room = ctx.state.add_room(
            body.get("name", ""),  # validated by add_room
            privacy=body.get("privacy", "public"),
            owner=owner,
            topic=text_field(body, "topic", 0, TOPIC_MAX, default=""),
        )
        room.is_guest_accessible = guest
    url = render.room_url(ctx.req.base, room.id)
    return json_response(201, {"id": room.id, "links": {"self": url}})


def get_room(ctx: Ctx) -> Response:
    with ctx.state.lock:
        detail = render.room_detail(ctx.req.base, _room(ctx), ctx.state.users)
    return json_response(200, detail)


def update_room(ctx: Ctx) -> Response:
    """Every field is optional here (HipChat required them all); the topic changes without
    a history item, unlike ``PUT .../topic``."""
    body = json_body(ctx.req)
    state = ctx.state
    with state.lock:
        room = _room(ctx)
        privacy = body.get("privacy", room.privacy)
        if privacy not in ("public", "private"):
            raise BadRequestError("privacy must be 'public' or 'private'")
        archived = _flag(body, "is_archived", room.is_archived)
        guest = _flag(body, "is_guest_accessible", room.is_guest_accessible)
        topic = text_field(body, "topic", 0, TOPIC_MAX, default=room.topic)
        owner = room.owner_id
        if "owner" in body:
            ref = body["owner"].get("id") if isinstance(body["owner"], dict) else None
            try:
                owner = state.find_user(str(ref)).id
            except NotFoundError:
                raise BadRequestError("owner.id is not a known user") from None
        if "name" in body and body["name"] != room.name:
            state.rename_room(room, body["name"])
        room.privacy, room.is_archived, room.is_guest_accessible = privacy, archived, guest
        room.topic, room.owner_id = topic, owner
        state.touch(room)
    return empty_response()


def delete_room(ctx: Ctx) -> Response:
    with ctx.state.lock:
        ctx.state.remove_room(_room(ctx))
    return empty_response()


def set_topic(ctx: Ctx) -> Response:
    body = json_body(ctx.req)
    with ctx.state.lock:
        room = _room(ctx)
        topic = text_field(body, "topic", 0, TOPIC_MAX)
        room.topic = topic
        ctx.state.touch(room)
        ctx.state.append_message(
            room, kind="topic", text=topic, sender=ctx.user, parse_mentions=False
        )
    return empty_response()


def statistics(ctx: Ctx) -> Response:
    with ctx.state.lock:
        stats = render.room_statistics(ctx.req.base, _room(ctx))
    return json_response(200, stats)


def participants(ctx: Ctx) -> Response:
    """Online = entered and not left. ``include-offline`` adds everyone who ever entered
    and, for private rooms, every member."""
    start, limit = paging(ctx.req.query)
    offline = bool_param(ctx.req.query, "include-offline", False)
    with ctx.state.lock:
        room = _room(ctx)
        ids = dict(room.online)
        if offline:
            ids.update(room.visitors)
            if room.privacy == "private":
                ids.update(dict.fromkeys(room.members))
        users = ctx.state.users
        page = [render.user_stub(ctx.req.base, users[uid]) for uid in list(ids)[start:][:limit]]
    more = len(ids) > start + limit
    return json_response(200, collection(ctx.req, page, start, limit, has_more=more))


def _private(room: Room) -> Room:
    if room.privacy != "private":
        raise BadRequestError(f"Room {room.name} is public; only private rooms have members")
    return room


def members(ctx: Ctx) -> Response:
    start, limit = paging(ctx.req.query)
    with ctx.state.lock:
        room = _private(_room(ctx))
        users = ctx.state.users
        chosen = list(room.members.items())[start : start + limit]
        page = [render.member_item(ctx.req.base, users[uid], roles) for uid, roles in chosen]
        more = len(room.members) > start + limit
    return json_response(200, collection(ctx.req, page, start, limit, has_more=more))


def add_member(ctx: Ctx) -> Response:
    """Idempotent: adding a member again only replaces their ``room_roles``."""
    body = json_body(ctx.req, optional=True)
    roles = body.get("room_roles", ["room_member"])
    if not isinstance(roles, list) or not roles or any(r not in ROOM_ROLES for r in roles):
        raise BadRequestError(f"room_roles must be a non-empty list of {', '.join(ROOM_ROLES)}")
    with ctx.state.lock:
        room = _private(_room(ctx))
        user = ctx.state.find_user(ctx.params["user"])
        room.members[user.id] = tuple(dict.fromkeys(roles))
    return empty_response()


def remove_member(ctx: Ctx) -> Response:
    """Idempotent: removing a non-member is also a 204."""
    with ctx.state.lock:
        room = _private(_room(ctx))
        user = ctx.state.find_user(ctx.params["user"])
        room.members.pop(user.id, None)
        room.online.pop(user.id, None)
    return empty_response()
