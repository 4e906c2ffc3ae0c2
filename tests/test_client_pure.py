"""Pure helpers of the HipChat client: paging decisions, rate-limit headers, input encoding.

No HTTP here; tables in, values out.
"""

from __future__ import annotations

import base64
import email
import email.policy
import json
from datetime import UTC, datetime, timedelta, timezone
from email.message import EmailMessage

import pytest

from storage.errors import MalformedResponse, ValidationError
from tasks import client_inputs as inputs
from tasks.hipchat_types import RateLimitInfo
from tasks.pagination import Envelope, NextPage, next_page, parse_envelope, same_origin_url
from tasks.ratelimit_headers import (
    parse_rate_limit,
    reset_epoch,
    retry_after_seconds,
    too_many_requests,
)
from tests.hipchat_admin import multipart_related

NOW = 1_800_000_000.0

# -- pagination -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"items": []}, Envelope([], None)),
        ({"items": [1], "links": {"self": "x"}}, Envelope([1], None)),
        ({"items": [1], "links": {"next": "http://h/v2/room?start-index=1"}}, None),
        ({"items": [], "links": {"next": ""}}, Envelope([], None)),
    ],
)
def test_parse_envelope_accepts_envelopes(body: object, expected: Envelope | None) -> None:
    page = parse_envelope(body)
    if expected is None:
        assert page.next_url == "http://h/v2/room?start-index=1"
    else:
        assert page == expected


@pytest.mark.parametrize(
    "body",
    [
        None,
        [],
        "items",
        {"items": None},
        {"items": {}},
        {"items": [], "links": []},
        {"items": [], "links": {"next": 5}},
    ],
)
def test_parse_envelope_refuses_other_shapes(body: object) -> None:
    with pytest.raises(MalformedResponse):
        parse_envelope(body)


NEXT = "https://api.hipchat.com/v2/room?start-index=2&max-results=2"


@pytest.mark.parametrize(
    ("items", "next_url", "fetched", "new_items", "visited", "expected"),
    [
        # links.next is followed as given
        ([1, 2], NEXT, 2, 2, set(), NextPage(url=NEXT)),
        # a short page with next: still follow next (the server says there is more)
        ([1], NEXT, 1, 1, set(), NextPage(url=NEXT)),
        # a full page without next: maybe more, ask the next start-index
        ([1, 2], None, 4, 2, set(), NextPage(start_index=4)),
        # a short page without next: done
        ([1], None, 3, 1, set(), None),
        # an empty page: done, even with next
        ([], NEXT, 2, 0, set(), None),
        # a page of items all seen before: the server ignores paging, stop
        ([1, 2], NEXT, 4, 0, set(), None),
        # next already followed once (a loop): fall back to start-index on a full page
        ([1, 2], NEXT, 4, 2, {NEXT}, NextPage(start_index=4)),
        ([1], NEXT, 3, 1, {NEXT}, None),
    ],
)
def test_next_page(
    items: list[int],
    next_url: str | None,
    fetched: int,
    new_items: int,
    visited: set[str],
    expected: NextPage | None,
) -> None:
    page = Envelope(items, next_url)
    got = next_page(page, fetched=fetched, page_size=2, new_items=new_items, visited=visited)
    assert got == expected


@pytest.mark.parametrize(
    ("link", "base", "expected"),
    [
        (
            "http://127.0.0.1:8080/v2/room?start-index=5",
            "http://127.0.0.1:8080",
            "http://127.0.0.1:8080/v2/room?start-index=5",
        ),
        # another host: path and query kept, sent to our own origin
        (
            "https://api.hipchat.com/v2/room?start-index=5",
            "http://127.0.0.1:8080",
            "http://127.0.0.1:8080/v2/room?start-index=5",
        ),
        # another port or scheme counts as another origin
        ("http://h:81/v2/user?x=1", "http://h:80", "http://h:80/v2/user?x=1"),
        ("http://h/v2/user", "https://h", "https://h/v2/user"),
        # relative links resolve against the base
        ("/v2/room?start-index=5", "https://h", "https://h/v2/room?start-index=5"),
    ],
)
def test_same_origin_url(link: str, base: str, expected: str) -> None:
    assert same_origin_url(link, base) == expected


# -- rate-limit headers -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, None), (60.0, NOW + 60), (0.0, NOW), (1_366_037_820.0, 1_366_037_820.0)],
)
def test_reset_epoch_reads_seconds_and_epochs(value: float | None, expected: float | None) -> None:
    assert reset_epoch(value, NOW) == expected


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({}, None),
        ({"Content-Type": "application/json"}, None),
        (
            {"X-Ratelimit-Limit": "100", "X-Ratelimit-Remaining": "99", "X-Ratelimit-Reset": "60"},
            RateLimitInfo(limit=100, remaining=99, reset_at=NOW + 60),
        ),
        (
            {
                "X-Ratelimit-Limit": "500",
                "X-Ratelimit-Remaining": "0",
                "X-Ratelimit-Reset": "1900000000",
            },
            RateLimitInfo(limit=500, remaining=0, reset_at=1_900_000_000.0),
        ),
        # unreadable values count as absent, the rest is kept
        (
            {"X-Ratelimit-Limit": "lots", "X-Ratelimit-Remaining": "-3", "X-Ratelimit-Reset": "5"},
            RateLimitInfo(limit=None, remaining=None, reset_at=NOW + 5),
        ),
        ({"X-Ratelimit-Reset": "nan"}, None),
    ],
)
def test_parse_rate_limit(headers: dict[str, str], expected: RateLimitInfo | None) -> None:
    assert parse_rate_limit(headers, NOW) == expected


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        # the documented form: an epoch
        ({"X-Ratelimit-Remaining": "0", "X-Ratelimit-Reset": str(int(NOW) + 120)}, (120.0, False)),
        # the real-life quirk: "60" seconds
        ({"X-Ratelimit-Remaining": "0", "X-Ratelimit-Reset": "60"}, (60.0, False)),
        # an epoch in the past (clock skew) does not make a hot loop
        ({"X-Ratelimit-Remaining": "0", "X-Ratelimit-Reset": str(int(NOW) - 5)}, (1.0, False)),
        # flood control spent, API budget left: flood control
        (
            {
                "X-Ratelimit-Remaining": "40",
                "X-Ratelimit-Reset": str(int(NOW) + 250),
                "X-FloodControl-Remaining": "0",
                "X-FloodControl-Reset": str(int(NOW) + 30),
            },
            (30.0, True),
        ),
        # both spent: the longer wait, as the API limit
        (
            {
                "X-Ratelimit-Remaining": "0",
                "X-Ratelimit-Reset": str(int(NOW) + 250),
                "X-FloodControl-Remaining": "0",
                "X-FloodControl-Reset": str(int(NOW) + 30),
            },
            (250.0, False),
        ),
        # only flood headers
        ({"X-FloodControl-Reset": "20"}, (20.0, True)),
        # header names ignore case in requests; here a plain dict uses the documented case
        ({"Retry-After": "7"}, (7.0, False)),
        ({}, (60.0, False)),
    ],
)
def test_too_many_requests(headers: dict[str, str], expected: tuple[float, bool]) -> None:
    assert too_many_requests(headers, NOW) == expected


def test_retry_after_reads_seconds_and_http_dates() -> None:
    assert retry_after_seconds({}, NOW) is None
    assert retry_after_seconds({"Retry-After": "12"}, NOW) == 12.0
    when = datetime.fromtimestamp(NOW + 30, tz=UTC).strftime("%a, %d %b %Y %H:%M:%S GMT")
    assert retry_after_seconds({"Retry-After": when}, NOW) == pytest.approx(30.0)
    assert retry_after_seconds({"Retry-After": "soon"}, NOW) is None


# -- inputs -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("room", "segment"),
    [
        (42, "42"),
        ("Ops Room", "Ops%20Room"),
        ("a/b", "a%2Fb"),
        ("C++ & Go?", "C%2B%2B%20%26%20Go%3F"),
        ("Café ☕", "Caf%C3%A9%20%E2%98%95"),
        ("100%", "100%25"),
    ],
)
def test_room_segment(room: int | str, segment: str) -> None:
    assert inputs.room_segment(room) == segment


@pytest.mark.parametrize(
    ("user", "segment"), [(7, "7"), ("@FirstL", "%40FirstL"), ("a@b.example", "a%40b.example")]
)
def test_user_segment(user: int | str, segment: str) -> None:
    assert inputs.user_segment(user) == segment


@pytest.mark.parametrize("room", [0, -1, True, "", "x" * 101, None, 4.5])
def test_room_segment_refuses(room: object) -> None:
    with pytest.raises(ValidationError):
        inputs.room_segment(room)  # type: ignore[arg-type]


def test_date_param_needs_aware_datetimes() -> None:
    aware = datetime(2018, 1, 4, 10, 16, 2, 809766, tzinfo=timezone(timedelta(hours=2)))
    assert inputs.date_param(aware, "date") == "2018-01-04T08:16:02.809766+00:00"
    assert inputs.date_param("recent", "date") == "recent"
    assert inputs.date_param("1515060962", "date") == "1515060962"
    with pytest.raises(ValidationError, match="timezone-aware"):
        inputs.date_param(datetime(2018, 1, 4), "date")
    with pytest.raises(ValidationError):
        inputs.date_param("  ", "date")


def test_notification_body_lists_every_problem() -> None:
    with pytest.raises(ValidationError) as info:
        inputs.notification_body(
            "x" * 10_001,
            color="blue",
            message_format="markdown",
            notify="yes",  # type: ignore[arg-type]
            from_="f" * 65,
            card=["not", "a", "mapping"],  # type: ignore[arg-type]
            attach_to="a" * 37,
        )
    assert len(info.value.errors) == 7
    assert "x" * 20 not in str(info.value)  # the text itself is never echoed


def test_notification_body_defaults_and_optional_fields() -> None:
    assert inputs.notification_body(
        "hi",
        color="random",
        message_format="text",
        notify=True,
        from_=None,
        card=None,
        attach_to=None,
    ) == {"message": "hi", "color": "random", "message_format": "text", "notify": True}
    body = inputs.notification_body(
        "x" * 10_000,
        color="gray",
        message_format="html",
        notify=False,
        from_="",
        card={"style": "link"},
        attach_to="5f7586a8-b71c-423c-ab11-bb2329d00201",
    )
    assert body["from"] == ""
    assert body["card"] == {"style": "link"}
    assert body["attach_to"] == "5f7586a8-b71c-423c-ab11-bb2329d00201"


@pytest.mark.parametrize("text", ["", "x" * 1001])
def test_message_body_limits(text: str) -> None:
    with pytest.raises(ValidationError, match=r"1\.\.1000"):
        inputs.message_body(text)


def test_member_body() -> None:
    assert inputs.member_body(None) is None
    assert inputs.member_body(["room_admin", "room_member"]) == {
        "room_roles": ["room_admin", "room_member"]
    }
    for bad in (["owner"], "room_member"):
        with pytest.raises(ValidationError):
            inputs.member_body(bad)


def _parts(body: bytes, content_type: str) -> list[EmailMessage]:
    head = f"Content-Type: {content_type}\r\n\r\n".encode()
    parsed = email.message_from_bytes(head + body, policy=email.policy.HTTP)
    assert isinstance(parsed, EmailMessage)
    assert parsed.get_content_type() == "multipart/related"
    return [part for part in parsed.iter_parts() if isinstance(part, EmailMessage)]


def test_multipart_related_has_metadata_and_base64_file() -> None:
    content = bytes(range(256)) * 3
    body, kind = multipart_related('ré"port.png', content, None, "look")
    metadata, file_part = _parts(body, kind)
    assert metadata.get_content_type() == "application/json"
    assert metadata["Content-Disposition"].params["name"] == "metadata"
    assert json.loads(metadata.get_payload()) == {"message": "look"}
    assert file_part.get_content_type() == "image/png"
    assert file_part["Content-Transfer-Encoding"] == "base64"
    assert file_part["Content-Disposition"].params["name"] == "file"
    assert file_part.get_filename() == 'ré"port.png'
    assert base64.b64decode(file_part.get_payload()) == content


def test_multipart_related_defaults() -> None:
    body, kind = multipart_related("blob", b"", "text/plain", None)
    metadata, file_part = _parts(body, kind)
    assert json.loads(metadata.get_payload()) == {"message": ""}
    assert file_part.get_content_type() == "text/plain"
    body, kind = multipart_related("data.unknownext", b"x", None, None)
    assert _parts(body, kind)[1].get_content_type() == "application/octet-stream"


@pytest.mark.parametrize(
    ("filename", "content", "content_type", "message"),
    [
        ("", b"x", None, None),
        ("a\r\nb.txt", b"x", None, None),
        ("a.txt", "text", None, None),
        ("a.txt", b"x", "text/plain\r\nX-Evil: 1", None),
        ("a.txt", b"x", None, "m" * 1001),
    ],
)
def test_multipart_related_refuses(
    filename: str, content: object, content_type: str | None, message: str | None
) -> None:
    with pytest.raises(ValidationError):
        multipart_related(filename, content, content_type, message)  # type: ignore[arg-type]
