"""History diffing against a per-room watermark, and classification of history items.

Pure functions: no I/O, no clock. The poll task fetches, calls these, and commits the new
items together with :func:`next_watermark` in one transaction.

Ordering. HipChat orders history by ``date``; how it orders items with the same date is
UNCONFIRMED (reference §3.3). We therefore use one total order everywhere, ``(date, id)``,
and the watermark is always the largest item handled in that order. "After the watermark"
means strictly greater in that order. Everything ever handled is at or before the watermark,
so "strictly after" is exactly "not seen yet": no seen-set has to be stored. (An item that
arrives later but carries the very same microsecond as the watermark and a smaller id would
be missed; HipChat dates have microseconds, so this is accepted.)

Polling flow (reference §4.4, §9)::

    latest = GET /history/latest?max-results=N&not-before=<watermark id>
    d = diff_latest(latest, wm.id, page_size=N, watermark_date=wm.date)
    new = merge_gap(backfill_pages, latest, wm.id, wm.date) if d.gap else d.new
    wm = next_watermark(wm, new)
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import NamedTuple

from storage.errors import ValidationError
from storage.vocabulary import Event
from tasks.hipchat_types import Message

_EVENT_BY_TYPE = {
    "message": Event.ROOM_MESSAGE,
    "notification": Event.ROOM_NOTIFICATION,
    "topic": Event.ROOM_TOPIC_CHANGE,
}


class HistoryMark(NamedTuple):
    """The newest history item handled in a room (the ``history`` row of
    :class:`storage.models.Watermark`). ``id`` is None only for a room that was empty when
    it was primed: then ``date`` is :data:`storage.watermarks.EMPTY_DATE`."""

    id: str | None
    date: datetime


def classify(msg: Message) -> Event | None:
    """The trigger event a history item fires, or ``None`` if it fires none.

    * ``type=message`` with ``file`` -> ``room_file_upload`` **only**. Whether HipChat also
      fired ``room_message`` for uploads is UNCONFIRMED (reference §6); firing one event per
      item keeps "one item, one event" true and lets a ``room_message`` filter never see an
      empty caption. A user who wants both subscribes to both.
    * ``type=message`` without ``file`` -> ``room_message``.
    * ``notification`` -> ``room_notification``; ``topic`` -> ``room_topic_change``.
    * ``guest_access`` -> ``None``: no trigger watches it.

    HipChat only attaches ``file`` to ``type=message`` items (reference §4.5); a ``file`` on
    any other type is not a documented shape, so the type decides.
    """
    if msg.type == "message" and msg.file is not None:
        return Event.ROOM_FILE_UPLOAD
    return _EVENT_BY_TYPE.get(msg.type)


def _order_key(msg: Message) -> tuple[datetime, str]:
    return (msg.date, msg.id)


def ordered_unique(items: Iterable[Message]) -> list[Message]:
    """Items deduplicated by id (first occurrence wins) and sorted by ``(date, id)``.

    History pages repeat boundary items (inclusive bounds, reference §4.3, §4.4).
    """
    by_id: dict[str, Message] = {}
    for msg in items:
        by_id.setdefault(msg.id, msg)
    return sorted(by_id.values(), key=_order_key)


def _after(items: list[Message], mark: tuple[datetime, str]) -> list[Message]:
    return [msg for msg in items if _order_key(msg) > mark]


@dataclass(frozen=True)
class LatestDiff:
    """What one ``/history/latest`` page says. ``new`` is ascending; ``gap`` means more new
    items exist before the page and must be fetched through ``/history`` (:func:`merge_gap`)
    before anything is committed."""

    new: list[Message]
    watermark_found: bool
    gap: bool


def diff_latest(
    items: list[Message],
    watermark_id: str | None,
    *,
    page_size: int,
    watermark_date: datetime | None = None,
) -> LatestDiff:
    """Diff a ``/history/latest`` page (requested with ``not-before=watermark_id`` and
    ``max-results=page_size``) against the watermark.

    Found watermark: new = everything strictly after it. Missing watermark and a full page:
    ``gap``. Missing watermark and a short page: the server cut at ``not-before``, so every
    item is new, except that with ``watermark_date`` items at or before the watermark are
    dropped too (defence against a server that ignores an unknown ``not-before``, whose
    behaviour is UNCONFIRMED, reference §4.4). No watermark at all: everything is new;
    callers prime with :func:`prime_watermark` instead of firing.
    """
    ordered = ordered_unique(items)
    found = next((msg for msg in ordered if msg.id == watermark_id), None)
    if found is not None:
        new = _after(ordered, _order_key(found))
    elif watermark_id is not None and watermark_date is not None:
        new = _after(ordered, (watermark_date, watermark_id))
    else:
        new = ordered
    gap = found is None and watermark_id is not None and len(items) >= page_size
    return LatestDiff(new=new, watermark_found=found is not None, gap=gap)


def merge_gap(
    backfill_pages: Iterable[list[Message]],
    latest: list[Message],
    watermark_id: str,
    watermark_date: datetime,
) -> list[Message]:
    """Every item strictly after the watermark from the ``/history`` pages that fill a gap
    plus the ``/history/latest`` page: deduplicated by id, ascending.

    Pages may overlap and repeat their boundary items (``date`` and ``end-date`` are
    inclusive); the watermark itself and items before it come back too and are dropped.
    Same date as the watermark counts as after only with a larger id (see module docstring).
    """
    pages = [*backfill_pages, latest]
    merged = ordered_unique(msg for page in pages for msg in page)
    return _after(merged, (watermark_date, watermark_id))


def _as_watermark(msg: Message) -> HistoryMark:
    return HistoryMark(msg.id, msg.date)


def next_watermark(current: HistoryMark | None, new_items: Iterable[Message]) -> HistoryMark | None:
    """The newest of ``current`` and ``new_items`` in ``(date, id)`` order. Never moves
    backwards, whatever order or content ``new_items`` has. A ``current`` without an id
    (an empty room) orders before every item of its date."""
    newest = max(new_items, key=_order_key, default=None)
    if current is None:
        return None if newest is None else _as_watermark(newest)
    if newest is None or _order_key(newest) <= (current.date, current.id or ""):
        return current
    return _as_watermark(newest)


def prime_watermark(items: Iterable[Message]) -> HistoryMark | None:
    """Where a new subscription starts: the newest item of a priming fetch, ``None`` for an
    empty room (then the next poll sees every item as new, which is right: they came after
    the subscription was created)."""
    return next_watermark(None, items)


def backfill_items(items: Iterable[Message], n: int) -> list[Message]:
    """The newest ``n`` items, ascending, for an explicit "replay the last N" backfill."""
    if n < 0:
        raise ValidationError(f"backfill count must be 0 or more, got {n}")
    ordered = ordered_unique(items)
    return ordered[-n:] if n else []
