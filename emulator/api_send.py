"""Sending: ``message`` (201), ``notification`` (204) and ``share/file`` (204), each under
per-(token, room) flood control with ``X-FloodControl-*`` headers (reference §4.10-4.12, §5).
"""

from __future__ import annotations

import json
import mimetypes
from typing import Any

from emulator.errors import BadRequestError, TooManyRequestsError
from emulator.model import Room, iso_us
from emulator.multipart import parse_multipart
from emulator.params import json_body, text_field
from emulator.wire import Ctx, Response, empty_response, json_response

FLOOD_MESSAGE = "Flood control limit exceeded"
CARD_STYLES = ("file", "image", "application", "link", "media")


def _room_under_flood_control(ctx: Ctx) -> Room:
    """Resolve the room and count this send against its flood window (every attempt
    counts, invalid ones too); the headers go on whatever the answer turns out to be."""
    assert ctx.token is not None
    with ctx.state.lock:
        room = ctx.state.find_room(ctx.params["room"])
        stats = ctx.state.flood.hit((ctx.token.value, room.id), ctx.now)
    ctx.headers.update(stats.headers("X-FloodControl"))
    if not stats.allowed:
        raise TooManyRequestsError(FLOOD_MESSAGE)
    return room


def send_message(ctx: Ctx) -> Response:
    room = _room_under_flood_control(ctx)
    text = text_field(json_body(ctx.req), "message", 1, 1000)
    with ctx.state.lock:
        item = ctx.state.append_message(room, kind="message", text=text, sender=ctx.user)
    return json_response(201, {"id": item.id, "timestamp": iso_us(item.date_us)})


def _optional_text(body: dict[str, Any], name: str, hi: int) -> str | None:
    return text_field(body, name, 0, hi) if body.get(name) is not None else None


def _card(body: dict[str, Any]) -> dict[str, Any] | None:
    card = body.get("card")
    if card is None:
        return None
    if not isinstance(card, dict) or card.get("style") not in CARD_STYLES:
        raise BadRequestError(f"card must be an object with style one of {', '.join(CARD_STYLES)}")
    return card


def send_notification(ctx: Ctx) -> Response:
    room = _room_under_flood_control(ctx)
    body = json_body(ctx.req)
    text = text_field(body, "message", 1, 10_000)
    if not isinstance(body.get("notify", False), bool):
        raise BadRequestError("notify must be a boolean")
    color, fmt = body.get("color", "yellow"), body.get("message_format", "html")
    if not isinstance(color, str) or not isinstance(fmt, str):
        raise BadRequestError("color and message_format must be strings")
    assert ctx.user is not None
    with ctx.state.lock:
        ctx.state.append_notification(
            room,
            text,
            from_label=_optional_text(body, "from", 64),
            color=color,
            message_format=fmt,
            card=_card(body),
            attach_to=_optional_text(body, "attach_to", 36),
            sender={"client_id": None, "id": str(ctx.user.id), "type": "user"},
        )
    return empty_response()


def share_file(ctx: Ctx) -> Response:
    room = _room_under_flood_control(ctx)
    parts = parse_multipart(ctx.req.content_type, ctx.req.body)
    caption = ""
    upload = None
    for part in parts:
        if part.filename is not None or part.name == "file":
            upload = upload or part
        elif part.name == "metadata" or part.content_type == "application/json":
            try:
                meta = json.loads(part.content) if part.content.strip() else {}
            except ValueError:
                raise BadRequestError("The metadata part is not valid JSON") from None
            if not isinstance(meta, dict):
                raise BadRequestError("The metadata part must be a JSON object")
            caption = text_field(meta, "message", 0, 1000, default="")
    if upload is None or not upload.filename:
        raise BadRequestError("A file part with a filename is required")
    kind = upload.content_type if "content-type" in upload.headers else None
    kind = kind or mimetypes.guess_type(upload.filename)[0] or "application/octet-stream"
    with ctx.state.lock:
        stored = ctx.state.store_file(upload.filename, upload.content, kind)
        ctx.state.append_message(room, kind="message", text=caption, sender=ctx.user, file=stored)
    return empty_response()
