"""History diffing and classification: pure functions over realistic HipChat JSON."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from storage.errors import ValidationError
from tasks.diff import (
    HistoryMark,
    LatestDiff,
    backfill_items,
    classify,
    diff_latest,
    merge_gap,
    next_watermark,
    prime_watermark,
)
from tasks.hipchat_types import Message, format_datetime

T0 = datetime(2018, 1, 9, 4, 29, 16, 864014, tzinfo=UTC)
ALICE = {
    "id": 768992,
    "links": {"self": "https://api.hipchat.com/v2/user/768992"},
    "mention_name": "AliceA",
    "name": "Alice Anders",
    "version": "F93F44D4",
}


def mid(n: int) -> str:
    """A 36-character message id whose order follows ``n``."""
    return f"{n:08x}-3069-4936-8df4-73ccb6560feb"


def at(n: int) -> datetime:
    return T0 + timedelta(seconds=n)


def user_message(n: int, text: str = "hello", **extra: Any) -> dict[str, Any]:
    body = {"date": format_datetime(at(n)), "from": ALICE, "id": mid(n), "mentions": []}
    return body | {"message": text, "type": "message"} | extra


def msg(n: int) -> Message:
    return Message.parse(user_message(n, f"message {n}"))


def page(*ns: int) -> list[Message]:
    return [msg(n) for n in ns]


def ids(items: list[Message]) -> list[str]:
    return [m.id for m in items]


def same_date(block: str) -> Message:
    """A message with the date of ``msg(5)`` whose id sorts before (``block="0000"``) or
    after (``"ffff"``) ``mid(5)``: a tie on date."""
    return Message.parse(user_message(5) | {"id": f"00000005-{block}-4936-8df4-73ccb6560feb"})


# --- classify ------------------------------------------------------------------------------

CARD = {"style": "link", "title": "Build #42", "url": "https://ci.example.com/42"}
NOTIFICATION = {
    "attach_to": "2cf2309a-5471-4c02-87bb-f9680deeb3aa",
    "card": json.dumps(CARD),
    "color": "gray",
    "date": "2018-01-10T09:35:50.702319+00:00",
    "from": "Link",
    "id": "434be041-dd36-4b6d-b26d-9839ea0651fd",
    "mentions": [],
    "message": "<p><b><a href='https://ci.example.com/42'>Build #42</a></b></p>",
    "message_format": "html",
    "notification_sender": {"client_id": "b0ac0d4e", "id": "hipchat-clinky", "type": "addon"},
    "type": "notification",
}
IMAGE = {
    "name": "upload.png",
    "size": 41330,
    "thumb_url": "https://uploads-ap.hipchat.com/1/2/abc/upload_thumb.png",
    "url": "https://uploads-ap.hipchat.com/1/2/abc/upload.png",
}
PDF = {
    "name": "report.pdf",
    "size": 90210,
    "url": "https://uploads-ap.hipchat.com/1/2/d/report.pdf",
}
LINKS = [
    {"image": {"image": "https://i.example.com/a.png", "name": ""}, "type": "image", "url": "u"}
]

CLASSIFY_CASES = [
    pytest.param(user_message(1, "ping foo"), "room_message", id="user-message"),
    pytest.param(
        user_message(1, "hi @bobb", mentions=[ALICE | {"mention_name": "bobb"}]),
        "room_message",
        id="user-message-with-mention",
    ),
    pytest.param(user_message(1, message_links=LINKS), "room_message", id="message-links"),
    pytest.param(user_message(1, "", file=IMAGE), "room_file_upload", id="file-with-thumb"),
    pytest.param(user_message(1, "the report", file=PDF), "room_file_upload", id="file-no-thumb"),
    pytest.param(NOTIFICATION, "room_notification", id="notification-html-card"),
    pytest.param(
        NOTIFICATION | {"from": None, "message": "done", "message_format": "text"},
        "room_notification",
        id="notification-null-from",
    ),
    pytest.param(
        {k: v for k, v in NOTIFICATION.items() if k not in ("card", "attach_to")},
        "room_notification",
        id="notification-no-card",
    ),
    pytest.param(
        user_message(1, "Release day", type="topic"), "room_topic_change", id="topic-user"
    ),
    pytest.param(
        user_message(1, "New topic", type="topic", **{"from": "Integration"}),
        "room_topic_change",
        id="topic-string-from",
    ),
    pytest.param(
        user_message(1, "Guest joined", type="guest_access", **{"from": "Bob (guest)"}),
        None,
        id="guest-access-string-from",
    ),
    pytest.param(user_message(1, "", type="guest_access"), None, id="guest-access-object-from"),
    pytest.param(NOTIFICATION | {"file": PDF}, "room_notification", id="file-on-notification"),
]


@pytest.mark.parametrize(("raw", "expected"), CLASSIFY_CASES)
def test_classify(raw: dict[str, Any], expected: str | None) -> None:
    assert classify(Message.parse(raw)) == expected


# --- diff_latest ---------------------------------------------------------------------------

LATEST_CASES = [
    # (page, watermark n, page_size, new, found, gap)
    pytest.param([1, 2, 3], None, 1000, [1, 2, 3], False, False, id="no-watermark-all-new"),
    pytest.param([1, 2, 3], None, 3, [1, 2, 3], False, False, id="no-watermark-full-no-gap"),
    pytest.param([5, 6, 7], 5, 1000, [6, 7], True, False, id="not-before-inclusive"),
    pytest.param([5], 5, 1000, [], True, False, id="only-the-watermark"),
    pytest.param([], 5, 1000, [], False, False, id="empty-page"),
    pytest.param([5, 5, 6, 6, 7], 5, 1000, [6, 7], True, False, id="repeated-items"),
    pytest.param([7, 5, 6], 5, 1000, [6, 7], True, False, id="unordered-page"),
    pytest.param([3, 4, 5, 6], 5, 1000, [6], True, False, id="not-before-ignored"),
    pytest.param([5, 6, 7], 5, 3, [6, 7], True, False, id="full-page-with-watermark"),
    pytest.param([6, 7, 8], 5, 3, [6, 7, 8], False, True, id="full-page-gap"),
    pytest.param([6, 7, 7, 8], 5, 4, [6, 7, 8], False, True, id="full-page-gap-repeats"),
    pytest.param([6, 7], 5, 3, [6, 7], False, False, id="short-page-watermark-cut"),
]


@pytest.mark.parametrize(("ns", "wm", "size", "new", "found", "gap"), LATEST_CASES)
def test_diff_latest(
    ns: list[int], wm: int | None, size: int, new: list[int], found: bool, gap: bool
) -> None:
    result = diff_latest(page(*ns), None if wm is None else mid(wm), page_size=size)
    assert result == LatestDiff(new=page(*new), watermark_found=found, gap=gap)
    assert ids(result.new) == ids(page(*new))


@pytest.mark.parametrize(
    ("ns", "new"),
    [
        pytest.param([3, 4, 6, 7], [6, 7], id="older-items-dropped"),
        pytest.param([5, 6], [6], id="watermark-present"),
        pytest.param([1, 2], [], id="all-older"),
    ],
)
def test_diff_latest_with_watermark_date_drops_items_at_or_before(
    ns: list[int], new: list[int]
) -> None:
    # The watermark message is gone (deleted) and the server ignored not-before.
    result = diff_latest(page(*ns), mid(5), page_size=1000, watermark_date=at(5))
    assert ids(result.new) == ids(page(*new))
    assert not result.gap


@pytest.mark.parametrize(
    ("block", "is_new"),
    [
        pytest.param("ffff", True, id="same-date-larger-id-is-new"),
        pytest.param("0000", False, id="same-date-smaller-id-was-seen"),
    ],
)
def test_diff_latest_orders_date_ties_by_id(block: str, is_new: bool) -> None:
    tie = same_date(block)
    result = diff_latest([msg(5), tie, msg(6)], mid(5), page_size=1000)
    assert ids(result.new) == ([tie.id] if is_new else []) + [mid(6)]


# --- merge_gap -----------------------------------------------------------------------------


def test_merge_gap_larger_than_one_page() -> None:
    # Watermark 10; 30 new items; /history/latest gives the newest 10 (31..40, full page).
    latest = page(*range(31, 41))
    assert diff_latest(latest, mid(10), page_size=10).gap
    # /history pages walking back, each repeating its inclusive boundary item.
    backfill = [page(*range(21, 32)), page(*range(11, 22)), page(8, 9, 10, 11)]
    merged = merge_gap(backfill, latest, mid(10), at(10))
    assert ids(merged) == ids(page(*range(11, 41)))


MERGE_CASES = [
    pytest.param([[5, 6, 7]], [7, 8], [6, 7, 8], id="overlap-with-latest"),
    pytest.param([[6, 7], [6, 7]], [7, 8], [6, 7, 8], id="duplicate-pages"),
    pytest.param([[8, 9], [5, 6]], [9, 10], [6, 8, 9, 10], id="pages-out-of-order"),
    pytest.param([], [6, 7], [6, 7], id="no-backfill-pages"),
    pytest.param([[]], [], [], id="all-empty"),
    pytest.param([[1, 2, 3]], [4, 5], [], id="nothing-after-watermark"),
    pytest.param([[3, 4]], [6, 7], [6, 7], id="watermark-deleted"),
]


@pytest.mark.parametrize(("pages", "latest", "expected"), MERGE_CASES)
def test_merge_gap(pages: list[list[int]], latest: list[int], expected: list[int]) -> None:
    merged = merge_gap((page(*p) for p in pages), page(*latest), mid(5), at(5))
    assert ids(merged) == ids(page(*expected))


def test_merge_gap_same_date_as_watermark() -> None:
    before, after = same_date("0000"), same_date("ffff")
    merged = merge_gap([[before, msg(5), after]], page(6), mid(5), at(5))
    assert ids(merged) == [after.id, mid(6)]


# --- the whole poll loop against a model of the two endpoints -------------------------------


class RoomHistory:
    """A model of HipChat's two history endpoints as reference §4.3/§4.4 describes them."""

    def __init__(self) -> None:
        self.items: list[Message] = []

    def post(self, count: int) -> None:
        start = len(self.items) + 1
        self.items += page(*range(start, start + count))

    def latest(self, not_before: str | None, max_results: int) -> list[Message]:
        newest = self.items[-max_results:]
        cut = next((i for i, m in enumerate(newest) if m.id == not_before), 0)
        return newest[cut:]

    def history(self, date: datetime, end_date: datetime, max_results: int) -> list[Message]:
        window = [m for m in self.items if end_date <= m.date <= date]
        return window[-max_results:]


def poll(room: RoomHistory, wm: HistoryMark, size: int) -> tuple[list[Message], HistoryMark]:
    latest = room.latest(wm.id, size)
    result = diff_latest(latest, wm.id, page_size=size, watermark_date=wm.date)
    new = merge_gap(backfill(room, latest, wm, size), latest, *wm) if result.gap else result.new
    moved = next_watermark(wm, new)
    assert moved is not None
    return new, moved


def backfill(
    room: RoomHistory, latest: list[Message], wm: HistoryMark, size: int
) -> Iterator[list[Message]]:
    oldest = latest[0].date
    while oldest > wm.date:
        chunk = room.history(oldest, wm.date, size)
        yield chunk
        oldest = chunk[0].date


@pytest.mark.parametrize(
    "bursts",
    [
        pytest.param([0, 3, 0, 1], id="quiet-room"),
        pytest.param([9, 10, 11], id="around-one-page"),
        pytest.param([25, 2, 47], id="gaps-of-several-pages"),
    ],
)
def test_poll_loop_delivers_every_item_exactly_once(bursts: list[int]) -> None:
    room = RoomHistory()
    room.post(4)
    wm = prime_watermark(room.latest(None, 10))
    assert wm is not None
    delivered: list[str] = []
    for count in bursts:
        room.post(count)
        new, wm = poll(room, wm, size=10)
        delivered += ids(new)
    assert delivered == ids(room.items[4:])


# --- watermarks ----------------------------------------------------------------------------

WATERMARK_CASES = [
    pytest.param(None, [], None, id="nothing-yet"),
    pytest.param(None, [1, 2], 2, id="first-items"),
    pytest.param(5, [6, 7], 7, id="advances"),
    pytest.param(5, [], 5, id="no-new-items"),
    pytest.param(7, [5, 6], 7, id="never-backwards"),
    pytest.param(7, [7], 7, id="same-item"),
    pytest.param(5, [7, 6, 7], 7, id="unordered-repeated"),
]


@pytest.mark.parametrize(("current", "items", "expected"), WATERMARK_CASES)
def test_next_watermark(current: int | None, items: list[int], expected: int | None) -> None:
    cur = None if current is None else HistoryMark(mid(current), at(current))
    want = None if expected is None else HistoryMark(mid(expected), at(expected))
    assert next_watermark(cur, page(*items)) == want


def test_next_watermark_of_an_empty_room_takes_every_item_of_its_date() -> None:
    empty = HistoryMark(None, at(5))
    assert next_watermark(empty, []) is empty
    first = page(5)[0]
    assert next_watermark(empty, [first]) == HistoryMark(first.id, at(5))


@pytest.mark.parametrize(
    ("block", "moves"),
    [
        pytest.param("ffff", True, id="tie-larger-id"),
        pytest.param("0000", False, id="tie-smaller-id"),
    ],
)
def test_next_watermark_date_ties(block: str, moves: bool) -> None:
    tie = same_date(block)
    moved = next_watermark(HistoryMark(mid(5), at(5)), [tie])
    assert moved == (HistoryMark(tie.id, at(5)) if moves else HistoryMark(mid(5), at(5)))


@pytest.mark.parametrize(
    ("items", "expected"),
    [
        pytest.param([], None, id="empty-room"),
        pytest.param([1, 2, 3], 3, id="newest"),
        pytest.param([3, 1, 2, 3], 3, id="unordered-repeated"),
    ],
)
def test_prime_watermark(items: list[int], expected: int | None) -> None:
    want = None if expected is None else HistoryMark(mid(expected), at(expected))
    assert prime_watermark(page(*items)) == want


# --- backfill ------------------------------------------------------------------------------

BACKFILL_CASES = [
    pytest.param([1, 2, 3, 4, 5], 2, [4, 5], id="last-two"),
    pytest.param([1, 2, 3], 0, [], id="zero"),
    pytest.param([1, 2, 3], 10, [1, 2, 3], id="more-than-available"),
    pytest.param([], 3, [], id="empty-room"),
    pytest.param([3, 1, 2, 3, 2], 2, [2, 3], id="unordered-repeated"),
]


@pytest.mark.parametrize(("items", "n", "expected"), BACKFILL_CASES)
def test_backfill_items(items: list[int], n: int, expected: list[int]) -> None:
    assert ids(backfill_items(page(*items), n)) == ids(page(*expected))


def test_backfill_items_refuses_a_negative_count() -> None:
    with pytest.raises(ValidationError, match="backfill count"):
        backfill_items(page(1), -1)
