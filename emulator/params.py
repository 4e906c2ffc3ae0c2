"""Parsing and validating query parameters and JSON bodies, and the collection envelope.

Every bad value raises :class:`emulator.errors.BadRequestError` (400 with the envelope).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

from emulator.errors import BadRequestError
from emulator.model import to_us
from emulator.wire import Request

MAX_RESULTS_CAP = 1000
# Never echoed into links: paging is recomputed, and a token never goes into a URL we build.
_NOT_ECHOED = frozenset({"start-index", "max-results", "auth_token", "auth_test"})


def int_param(query: dict[str, str], name: str, default: int, lo: int, hi: int | None) -> int:
    raw = query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadRequestError(f"Invalid value for {name}: {raw!r} is not an integer") from None
    if value < lo or (hi is not None and value > hi):
        upper = "" if hi is None else f" and {hi}"
        raise BadRequestError(f"Invalid value for {name}: must be between {lo}{upper}")
    return value


def bool_param(query: dict[str, str], name: str, default: bool) -> bool:
    raw = query.get(name)
    if raw is None:
        return default
    lowered = raw.lower()
    if lowered in ("true", "1"):
        return True
    if lowered in ("false", "0"):
        return False
    raise BadRequestError(f"Invalid value for {name}: {raw!r} is not a boolean")


def paging(query: dict[str, str], default_max: int = 100) -> tuple[int, int]:
    start = int_param(query, "start-index", 0, 0, None)
    return start, int_param(query, "max-results", default_max, 0, MAX_RESULTS_CAP)


def date_param_us(raw: str, name: str) -> int:
    """ISO-8601 with or without an offset (no offset = UTC), or epoch seconds."""
    try:
        seconds = float(raw)
    except ValueError:
        seconds = None
    if seconds is not None:
        if not math.isfinite(seconds):
            raise BadRequestError(f"Invalid value for {name}: {raw!r} is not a date")
        return to_us(seconds)
    try:
        parsed = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        raise BadRequestError(f"Invalid value for {name}: {raw!r} is not a date") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    delta = parsed - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def collection(
    req: Request,
    items: Sequence[Any],
    start: int,
    max_results: int,
    *,
    has_more: bool,
) -> dict[str, Any]:
    """The camelCase envelope. ``next`` only when the page is full and more exist; ``prev``
    only when ``startIndex > 0``; ``self`` is the bare path; ``maxResults`` echoes the limit."""
    self_url = req.base + req.raw_path.rstrip("/")
    links = {"self": self_url}
    filters = [(k, v) for k, v in req.query.items() if k not in _NOT_ECHOED]

    def page_url(index: int) -> str:
        paging = [("start-index", str(index)), ("max-results", str(max_results))]
        return f"{self_url}?{urlencode([*filters, *paging])}"

    if has_more and max_results > 0 and len(items) == max_results:
        links["next"] = page_url(start + max_results)
    if start > 0:
        links["prev"] = page_url(max(0, start - max_results))
    return {"items": list(items), "startIndex": start, "maxResults": max_results, "links": links}


def json_body(req: Request, *, optional: bool = False) -> dict[str, Any]:
    """The body as a JSON object. Content type is not checked; a body that is not a JSON
    object (form encoding included) is a 400."""
    if not req.body.strip():
        if optional:
            return {}
        raise BadRequestError("A JSON request body is required")
    try:
        body = json.loads(req.body)
    except ValueError:
        raise BadRequestError("The request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise BadRequestError("The request body must be a JSON object")
    return body


def text_field(
    body: dict[str, Any], name: str, lo: int, hi: int, *, default: str | None = None
) -> str:
    """A string field of length ``lo..hi``; missing uses ``default`` (or is a 400)."""
    value = body.get(name, default)
    if value is None:
        raise BadRequestError(f"{name} is required")
    if not isinstance(value, str):
        raise BadRequestError(f"{name} must be a string")
    if not lo <= len(value) <= hi:
        raise BadRequestError(f"{name} must be between {lo} and {hi} characters")
    return value
