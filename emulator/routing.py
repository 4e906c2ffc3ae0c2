"""The ``/v2`` route table and the one dispatch path: route -> token -> scope -> handler.

Order of checks: unknown path 404 / wrong method 405, then 401 (bad or missing token),
403 (missing scope), ``auth_test=true`` 202, then the handler's own 404/400/429.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from emulator import api_history, api_rooms, api_send, api_users
from emulator.errors import (
    ApiError,
    ForbiddenError,
    MethodNotAllowedError,
    UnauthorizedError,
)
from emulator.wire import Ctx, Handler, Request, Response, Route, error_response, json_response
from emulator.wire import match as match_route

if TYPE_CHECKING:
    from emulator.state import EmulatorState

# Scope names per endpoint are UNCONFIRMED apart from send_message on share/file
# (reference §2); these follow the reference's suggestions and HipChat's scope list.
VIEW = ("view_group", "view_room")
MESSAGES = ("view_messages",)
MANAGE = ("manage_rooms",)
ADMIN = ("admin_room",)
SEND = ("send_message",)
NOTIFY = ("send_notification",)
USERS = ("view_group",)

ROUTES: tuple[Route[Handler], ...] = (
    Route.of("GET", "/v2/capabilities", api_users.capabilities),
    Route.of("GET", "/v2/room", api_rooms.list_rooms, VIEW),
    Route.of("POST", "/v2/room", api_rooms.create_room, MANAGE),
    Route.of("GET", "/v2/room/{room}", api_rooms.get_room, VIEW),
    Route.of("PUT", "/v2/room/{room}", api_rooms.update_room, ADMIN),
    Route.of("DELETE", "/v2/room/{room}", api_rooms.delete_room, MANAGE),
    Route.of("PUT", "/v2/room/{room}/topic", api_rooms.set_topic, ADMIN),
    Route.of("GET", "/v2/room/{room}/statistics", api_rooms.statistics, VIEW),
    Route.of("GET", "/v2/room/{room}/history/latest", api_history.latest, MESSAGES),
    Route.of("GET", "/v2/room/{room}/history", api_history.history, MESSAGES),
    Route.of("GET", "/v2/room/{room}/history/{message_id}", api_history.message, MESSAGES),
    Route.of("GET", "/v2/room/{room}/participant", api_rooms.participants, VIEW),
    Route.of("GET", "/v2/room/{room}/member", api_rooms.members, VIEW),
    Route.of("PUT", "/v2/room/{room}/member/{user}", api_rooms.add_member, ADMIN),
    Route.of("DELETE", "/v2/room/{room}/member/{user}", api_rooms.remove_member, ADMIN),
    Route.of("POST", "/v2/room/{room}/message", api_send.send_message, SEND),
    Route.of("POST", "/v2/room/{room}/notification", api_send.send_notification, NOTIFY),
    Route.of("POST", "/v2/room/{room}/share/file", api_send.share_file, SEND),
    Route.of("GET", "/v2/user", api_users.list_users, USERS),
    Route.of("GET", "/v2/user/{user}", api_users.get_user, USERS),
)

AUTH_TEST_BODY = {
    "success": {
        "code": 202,
        "message": "This auth_token has access to use this method.",
        "type": "Accepted",
    }
}


def scope_message(scopes: tuple[str, ...]) -> str:
    """HipChat printed the list as a Python 2 repr: ``[u'view_group', u'view_room']``."""
    return "This action requires one of the following scopes: [{}]".format(
        ", ".join(f"u'{s}'" for s in scopes)
    )


def _authenticate(ctx: Ctx, scopes: tuple[str, ...]) -> None:
    value = ctx.req.token
    with ctx.state.lock:
        token = ctx.state.find_token(value) if value else None
        user = ctx.state.users.get(token.user_id) if token else None
    if token is None or user is None or user.is_deleted:
        raise UnauthorizedError("Invalid OAuth session")
    if not token.scopes.intersection(scopes):
        raise ForbiddenError(scope_message(scopes))
    ctx.token, ctx.user = token, user


def dispatch(state: EmulatorState, req: Request, now: float) -> Response:
    ctx: Ctx | None = None
    try:
        route, params = match_route(ROUTES, req.method, req.segments)
        ctx = Ctx(state, req, params, now)
        if route.scopes:
            _authenticate(ctx, route.scopes)
            if req.query.get("auth_test", "").lower() == "true":
                return json_response(202, AUTH_TEST_BODY)
        response = route.handler(ctx)
    except MethodNotAllowedError as exc:
        response = error_response(405, exc.message, {"Allow": ", ".join(exc.allowed)})
    except ApiError as exc:
        response = error_response(exc.status, exc.message)
    if ctx is not None:
        response.headers.update(ctx.headers)
    return response
