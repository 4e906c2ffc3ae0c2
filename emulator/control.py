"""The control API over HTTP: ``/_emulator/...``, JSON in and JSON out, no auth.

It mirrors the Python control methods of :class:`emulator.state.EmulatorState` for
processes that cannot reach the object (the demo, a worker under test in another
process). Rooms and users in paths are ids or percent-encoded names/mentions/emails.
Errors use HipChat's envelope (400 bad input, 404 unknown room/user/path, 405 method).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from typing import Any

from emulator.errors import ApiError, BadRequestError, MethodNotAllowedError, NotFoundError
from emulator.params import json_body
from emulator.state import EmulatorState
from emulator.wire import Request, Response, Route, error_response, json_response, match

JSON = dict[str, Any]
ControlHandler = Callable[[EmulatorState, dict[str, str], Request], Response]


def _body(req: Request) -> JSON:
    return json_body(req, optional=True)


def _need(body: JSON, key: str) -> Any:
    if body.get(key) is None:
        raise BadRequestError(f"{key} is required")
    return body[key]


def _float(query: dict[str, str], key: str) -> float | None:
    try:
        return float(query[key]) if query.get(key) else None
    except ValueError:
        raise BadRequestError(f"{key} must be a number") from None


def _ok(payload: Any = None, status: int = 200) -> Response:
    return json_response(status, {"ok": True} if payload is None else payload)


# -- handlers: (state, path params, request) -> response ----------------------------------


def reset(state: EmulatorState, p: dict[str, str], req: Request) -> Response:
    state.reset()
    return _ok()


def list_users(state: EmulatorState, p: dict[str, str], req: Request) -> Response:
    return _ok({"items": state.users_list()})


def create_user(state: EmulatorState, p: dict[str, str], req: Request) -> Response:
    body = _body(req)
    user = state.create_user(
        _need(body, "name"),
        body.get("mention_name"),
        body.get("email"),
        title=body.get("title", ""),
        is_group_admin=bool(body.get("is_group_admin", False)),
        is_guest=bool(body.get("is_guest", False)),
    )
    return _ok(user, 201)


def get_user(state: EmulatorState, p: dict[str, str], req: Request) -> Response:
    return _ok(state.get_user(p["user"]))


def delete_user(state: EmulatorState, p: dict[str, str], req: Request) -> Response:
    state.delete_user(p["user"])
    return _ok()


def create_token(state: EmulatorState, p: dict[str, str], req: Request) -> Response:
    body = _body(req)
    scopes = body.get("scopes")
    token = state.create_token(_need(body, "user"), scopes, token=body.get("token"))
    return _ok({"token": token, "scopes": sorted(state.tokens[token].scopes)}, 201)


def revoke_token(state: EmulatorState, p: dict[str, str], req: Request) -> Response:
    state.revoke_token(p["token"])
    return _ok()


def list_rooms(state: EmulatorState, p: dict[str, str], req: Request) -> Response:
    return _ok({"items": state.rooms_list()})


def create_room(state: EmulatorState, p: dict[str, str], req: Request) -> Response:
    body = _body(req)
    room = state.create_room(
        _need(body, "name"),
        privacy=body.get("privacy", "public"),
        owner=body.get("owner"),
        topic=body.get("topic", ""),
    )
    return _ok(room, 201)


def get_room(state: EmulatorState, p: dict[str, str], req: Request) -> Response:
    return _ok(state.get_room(p["room"]))


def update_room(state: EmulatorState, p: dict[str, str], req: Request) -> Response:
    body = _body(req)
    return _ok(state.update_room(p["room"], name=body.get("name"), privacy=body.get("privacy")))


def delete_room(state: EmulatorState, p: dict[str, str], req: Request) -> Response:
    state.delete_room(p["room"])
    return _ok()


def history(state: EmulatorState, p: dict[str, str], req: Request) -> Response:
    return _ok({"items": state.history(p["room"])})


def post_message(state: EmulatorState, p: dict[str, str], req: Request) -> Response:
    body = _body(req)
    return _ok(state.post_message(p["room"], _need(body, "user"), _need(body, "message")), 201)


def upload_file(state: EmulatorState, p: dict[str, str], req: Request) -> Response:
    """``content_base64`` (bytes) or ``content`` (text, sent as UTF-8)."""
    body = _body(req)
    if body.get("content_base64") is not None:
        try:
            content = base64.b64decode(body["content_base64"], validate=True)
        except (binascii.Error, TypeError):
            raise BadRequestError("content_base64 is not valid base64") from None
    else:
        content = str(body.get("content", "")).encode("utf-8")
    item = state.upload_file(
        p["room"],
        _need(body, "user"),
        _need(body, "filename"),
        content,
        message=body.get("message", ""),
        content_type=body.get("content_type"),
    )
    return _ok(item, 201)


def send_notification(state: EmulatorState, p: dict[str, str], req: Request) -> Response:
    body = _body(req)
    item = state.send_notification(
        p["room"],
        _need(body, "message"),
        from_label=body.get("from"),
        color=body.get("color", "yellow"),
        message_format=body.get("message_format", "html"),
        card=body.get("card"),
        attach_to=body.get("attach_to"),
    )
    return _ok(item, 201)


def set_topic(state: EmulatorState, p: dict[str, str], req: Request) -> Response:
    body = _body(req)
    return _ok(state.set_topic(p["room"], _need(body, "user"), _need(body, "topic")), 201)


def enter_room(state: EmulatorState, p: dict[str, str], req: Request) -> Response:
    state.enter_room(p["room"], _need(_body(req), "user"))
    return _ok(state.get_room(p["room"]))


def leave_room(state: EmulatorState, p: dict[str, str], req: Request) -> Response:
    state.leave_room(p["room"], _need(_body(req), "user"))
    return _ok(state.get_room(p["room"]))


def archive_room(state: EmulatorState, p: dict[str, str], req: Request) -> Response:
    return _ok(state.archive_room(p["room"], bool(_body(req).get("archived", True))))


def add_member(state: EmulatorState, p: dict[str, str], req: Request) -> Response:
    body = _body(req)
    roles = body.get("room_roles", ["room_member"])
    state.add_member(p["room"], _need(body, "user"), roles)
    return _ok(state.get_room(p["room"]))


def remove_member(state: EmulatorState, p: dict[str, str], req: Request) -> Response:
    state.remove_member(p["room"], p["user"])
    return _ok(state.get_room(p["room"]))


def list_faults(state: EmulatorState, p: dict[str, str], req: Request) -> Response:
    return _ok({"items": state.pending_faults()})


def inject_fault(state: EmulatorState, p: dict[str, str], req: Request) -> Response:
    body = _body(req)
    fault = state.inject_fault(
        _need(body, "kind"),
        count=int(body.get("count", 1)),
        path_prefix=body.get("path_prefix"),
        method=body.get("method"),
        status=int(body.get("status", 503)),
        delay_seconds=float(body.get("delay_seconds", 0.0)),
        reset_seconds=int(body.get("reset_seconds", 60)),
    )
    return _ok(fault, 201)


def clear_faults(state: EmulatorState, p: dict[str, str], req: Request) -> Response:
    state.clear_faults()
    return _ok()


def list_calls(state: EmulatorState, p: dict[str, str], req: Request) -> Response:
    q = req.query
    records = state.calls(
        token=q.get("token") or None,
        since=_float(q, "since"),
        until=_float(q, "until"),
        path_prefix=q.get("path_prefix") or None,
        method=q.get("method") or None,
    )
    return _ok({"items": [r.as_dict() for r in records]})


def clear_calls(state: EmulatorState, p: dict[str, str], req: Request) -> Response:
    state.clear_calls()
    return _ok()


def get_file(state: EmulatorState, p: dict[str, str], req: Request) -> Response:
    with state.lock:
        stored = state.files.get(p["file_id"])
    if stored is None:
        raise NotFoundError("File not found")
    return Response(200, stored.content, content_type=stored.content_type)


ROUTES: tuple[Route[ControlHandler], ...] = tuple(
    Route.of(method, f"/_emulator{path}", handler)
    for method, path, handler in (
        ("POST", "/reset", reset),
        ("GET", "/users", list_users),
        ("POST", "/users", create_user),
        ("GET", "/users/{user}", get_user),
        ("DELETE", "/users/{user}", delete_user),
        ("POST", "/tokens", create_token),
        ("DELETE", "/tokens/{token}", revoke_token),
        ("GET", "/rooms", list_rooms),
        ("POST", "/rooms", create_room),
        ("GET", "/rooms/{room}", get_room),
        ("PATCH", "/rooms/{room}", update_room),
        ("DELETE", "/rooms/{room}", delete_room),
        ("GET", "/rooms/{room}/history", history),
        ("POST", "/rooms/{room}/messages", post_message),
        ("POST", "/rooms/{room}/files", upload_file),
        ("POST", "/rooms/{room}/notifications", send_notification),
        ("POST", "/rooms/{room}/topic", set_topic),
        ("POST", "/rooms/{room}/enter", enter_room),
        ("POST", "/rooms/{room}/leave", leave_room),
        ("POST", "/rooms/{room}/archive", archive_room),
        ("POST", "/rooms/{room}/members", add_member),
        ("DELETE", "/rooms/{room}/members/{user}", remove_member),
        ("GET", "/faults", list_faults),
        ("POST", "/faults", inject_fault),
        ("DELETE", "/faults", clear_faults),
        ("GET", "/calls", list_calls),
        ("DELETE", "/calls", clear_calls),
        ("GET", "/files/{file_id}/{name}", get_file),
    )
)


def handle(state: EmulatorState, req: Request) -> Response:
    try:
        route, params = match(ROUTES, req.method, req.segments)
        return route.handler(state, params, req)
    except MethodNotAllowedError as exc:
        return error_response(405, exc.message, {"Allow": ", ".join(exc.allowed)})
    except ApiError as exc:
        return error_response(exc.status, exc.message)
    except (TypeError, ValueError) as exc:  # a wrongly typed JSON field
        return error_response(400, str(exc) or "Invalid input")
