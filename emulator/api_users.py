"""``/v2/user`` endpoints (reference §4.9, §11) and ``/v2/capabilities`` (§1)."""

from __future__ import annotations

from emulator import render
from emulator.model import ALL_SCOPES
from emulator.params import bool_param, collection, paging
from emulator.wire import Ctx, Response, json_response


def list_users(ctx: Ctx) -> Response:
    query = ctx.req.query
    start, limit = paging(query)
    guests = bool_param(query, "include-guests", False)
    deleted = bool_param(query, "include-deleted", False)
    with ctx.state.lock:
        users = [
            u
            for u in ctx.state.users.values()
            if (guests or not u.is_guest) and (deleted or not u.is_deleted)
        ]
        page = [render.user_stub(ctx.req.base, u) for u in users[start : start + limit]]
    more = len(users) > start + limit
    return json_response(200, collection(ctx.req, page, start, limit, has_more=more))


def get_user(ctx: Ctx) -> Response:
    with ctx.state.lock:
        user = ctx.state.find_user(ctx.params["user"])
        body = render.user_full(ctx.req.base, user, online=ctx.state.is_online(user))
    return json_response(200, body)


def capabilities(ctx: Ctx) -> Response:
    """The one call that needs no token. The shape follows HipChat's capabilities
    descriptor loosely; nothing in the reference pins it."""
    base = ctx.req.base
    scopes = {s: {"id": s, "name": s.replace("_", " ").title()} for s in sorted(ALL_SCOPES)}
    return json_response(
        200,
        {
            "capabilities": {
                "hipchatApiProvider": {"availableScopes": scopes, "url": f"{base}/v2/"},
                "oauth2Provider": {
                    "authorizationUrl": f"{base}/users/authorize",
                    "tokenUrl": f"{base}/v2/oauth/token",
                },
            },
            "description": "HipChat API v2 emulator",
            "key": "hipchat",
            "links": {"api": f"{base}/v2", "homepage": base, "self": f"{base}/v2/capabilities"},
            "name": "HipChat",
            "vendor": {"name": "hipchat-poller", "url": base},
        },
    )
