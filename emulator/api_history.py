"""Room history: ``/history``, ``/history/latest`` and ``/history/{id}`` (reference §4.3-4.5).

Selection model of ``/history`` (MED in the reference): keep items with
``end-date <= date <= date-param`` (both inclusive), count from the newest end, skip
``start-index``, take ``max-results``, then output oldest first when ``reverse`` is true.
"""

from __future__ import annotations

from collections.abc import Sequence

from emulator import render
from emulator.errors import BadRequestError, NotFoundError
from emulator.model import Message
from emulator.params import (
    MAX_RESULTS_CAP,
    bool_param,
    collection,
    date_param_us,
    int_param,
    paging,
)
from emulator.wire import Ctx, Response, json_response

RECENT_COUNT = 75  # date=recent: the latest 75, paging ignored
LATEST_DEFAULT = 75


def _items_json(ctx: Ctx, messages: Sequence[Message]) -> list[str]:
    state = ctx.state
    return [render.message_json(ctx.req.base, m, state.users, state.item_json) for m in messages]


def history(ctx: Ctx) -> Response:
    query = ctx.req.query
    start, limit = paging(query)
    reverse = bool_param(query, "reverse", True)
    bool_param(query, "include_deleted", True)  # validated only: nothing is ever deleted
    raw_date = query.get("date", "recent")
    recent = raw_date == "recent"
    newest = None if recent else date_param_us(raw_date, "date")
    # end-date only applies to a real date (reference §4.3); with "recent" it is ignored.
    raw_end = query.get("end-date")
    oldest = date_param_us(raw_end, "end-date") if raw_end and not recent else None
    with ctx.state.lock:
        room = ctx.state.find_room(ctx.params["room"])
        if newest is None:
            chosen, more, start = room.messages[-RECENT_COUNT:], False, 0
        else:
            lo, hi = room.span(oldest if oldest is not None else 0, newest)
            top = hi - start
            bottom = max(lo, top - limit)
            chosen = room.messages[bottom:top] if top > lo else []
            more = top - limit > lo
        ordered = chosen if reverse else chosen[::-1]
        items = _items_json(ctx, ordered)
    envelope = collection(ctx.req, items, start, limit, has_more=more)
    return Response(200, render.items_body(envelope.pop("items"), envelope))


def latest(ctx: Ctx) -> Response:
    """The newest ``max-results`` items, trimmed at ``not-before`` (that item included),
    oldest first. A ``not-before`` older than the window leaves a gap (reference §4.4)."""
    query = ctx.req.query
    limit = int_param(query, "max-results", LATEST_DEFAULT, 0, MAX_RESULTS_CAP)
    bool_param(query, "include_deleted", True)
    not_before = query.get("not-before") or None
    with ctx.state.lock:
        room = ctx.state.find_room(ctx.params["room"])
        first = len(room.messages) - limit
        if not_before is not None:
            position = room.positions.get(not_before)
            if position is None:
                raise BadRequestError(f"not-before {not_before} is not a message in this room")
            first = max(first, position)
        items = _items_json(ctx, room.messages[max(0, first) :])
    self_url = ctx.req.base + ctx.req.raw_path.rstrip("/")
    rest = {"startIndex": 0, "maxResults": limit, "links": {"self": self_url}}
    return Response(200, render.items_body(items, rest))


def message(ctx: Ctx) -> Response:
    bool_param(ctx.req.query, "include_deleted", True)
    with ctx.state.lock:
        room = ctx.state.find_room(ctx.params["room"])
        position = room.positions.get(ctx.params["message_id"])
        if position is None:
            raise NotFoundError("Message not found")
        item = render.message_item(ctx.req.base, room.messages[position], ctx.state.users)
    return json_response(200, item)
