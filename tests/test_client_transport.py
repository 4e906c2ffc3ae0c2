"""HipChatClient through an injected transport: canned answers for the edge cases.

A :class:`FakeTransport` (a ``requests`` adapter) records every prepared request and answers
from a handler, so every status, header and broken body can be produced exactly, fast and
without a socket. The same behaviour over real HTTP is in ``test_client_emulator.py``.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from requests.adapters import BaseAdapter, HTTPAdapter
from requests.structures import CaseInsensitiveDict

from storage.errors import (
    AuthFailed,
    BadRequest,
    BucketEmpty,
    Forbidden,
    HipChatPollerError,
    MalformedResponse,
    NeedsAttention,
    NotFound,
    RateLimited,
    ServerError,
    TransportError,
    ValidationError,
)
from tasks.client import HipChatClient
from tasks.client_http import environment_settings, new_session
from tasks.hipchat_types import RateLimitInfo
from tests.hipchat_admin import AdminClient

TOKEN = "tok-S3CRET-9f8e7d6c5b4a"
BASE = "https://hipchat.example"
Answer = tuple[int, Any, Mapping[str, str]] | BaseException
Handler = Callable[[requests.PreparedRequest], Answer]


class FakeTransport(BaseAdapter):
    """Answers each request with ``handler(request)``: ``(status, body, headers)`` or an
    exception to raise. ``body`` may be JSON-able, ``str`` or ``bytes``."""

    def __init__(self, handler: Handler) -> None:
        super().__init__()
        self.handler = handler
        self.requests: list[requests.PreparedRequest] = []
        self.timeouts: list[Any] = []

    def send(  # type: ignore[override]
        self, request: requests.PreparedRequest, **kwargs: Any
    ) -> requests.Response:
        self.requests.append(request)
        self.timeouts.append(kwargs.get("timeout"))
        answer = self.handler(request)
        if isinstance(answer, BaseException):
            raise answer
        status, body, headers = answer
        response = requests.Response()
        response.status_code = status
        response.reason = {200: "OK", 204: "No Content"}.get(status, "Whatever")
        response.headers = CaseInsensitiveDict(headers)
        if body is None:
            response._content = b""
        elif isinstance(body, bytes):
            response._content = body
        elif isinstance(body, str):
            response._content = body.encode()
        else:
            response._content = json.dumps(body).encode()
        response.url = request.url or ""
        response.request = request
        return response

    def close(self) -> None:
        pass

    @property
    def paths(self) -> list[str]:
        return [urlsplit(r.url or "").path for r in self.requests]

    def query(self, index: int = -1) -> dict[str, str]:
        parsed = parse_qs(urlsplit(self.requests[index].url or "").query)
        return {key: values[-1] for key, values in parsed.items()}


def reply(body: Any = None, status: int = 200, headers: Mapping[str, str] | None = None) -> Handler:
    return lambda _request: (status, body, dict(headers or {}))


def make(handler: Handler, **kwargs: Any) -> tuple[AdminClient, FakeTransport]:
    transport = FakeTransport(handler)
    session = requests.Session()
    session.mount("https://", transport)
    session.mount("http://", transport)
    return AdminClient(kwargs.pop("base_url", BASE), TOKEN, session=session, **kwargs), transport


def user(i: int) -> dict[str, Any]:
    return {"id": i, "name": f"User {i}", "mention_name": f"u{i}", "links": {"self": "x"}}


def room(i: int) -> dict[str, Any]:
    return {"id": i, "name": f"Room {i}", "privacy": "public", "is_archived": False}


def message(i: int, minute: int = 0) -> dict[str, Any]:
    return {
        "id": f"00000000-0000-0000-0000-{i:012d}",
        "date": f"2018-01-09T04:{minute:02d}:16.864014+00:00",
        "from": user(1),
        "mentions": [],
        "message": f"hello {i}",
        "type": "message",
    }


def envelope(items: list[Any], next_url: str | None = None) -> dict[str, Any]:
    links = {"self": f"{BASE}/v2/x"} | ({"next": next_url} if next_url else {})
    return {"items": items, "startIndex": 0, "maxResults": 100, "links": links}


# -- construction -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "normalised"),
    [
        ("https://api.hipchat.com", "https://api.hipchat.com"),
        ("https://api.hipchat.com/", "https://api.hipchat.com"),
        ("https://api.hipchat.com/v2", "https://api.hipchat.com"),
        ("https://api.hipchat.com/v2/", "https://api.hipchat.com"),
        ("http://127.0.0.1:8080/v2", "http://127.0.0.1:8080"),
        ("https://corp.example/hipchat/v2/", "https://corp.example/hipchat"),
    ],
)
def test_base_url_is_normalised(given: str, normalised: str) -> None:
    client, transport = make(reply(room(1)), base_url=given)
    assert client.base_url == normalised
    client.get_room(1)
    assert transport.requests[0].url == f"{normalised}/v2/room/1"


@pytest.mark.parametrize(
    "bad",
    [
        "ftp://api.hipchat.com",
        "api.hipchat.com",
        "",
        "https://",
        "file:///etc/passwd",
        "https://user:pw@api.hipchat.com",
        "https://api.hipchat.com/?auth_token=x",
    ],
)
def test_base_url_must_be_http(bad: str) -> None:
    with pytest.raises(ValidationError):
        AdminClient(bad, TOKEN)


@pytest.mark.parametrize("token", ["", "two words", "line\nbreak", "tab\t"])
def test_bad_tokens_are_refused_without_echo(token: str) -> None:
    with pytest.raises(ValidationError) as info:
        AdminClient(BASE, token)
    assert not token.strip() or token not in str(info.value)


@pytest.mark.parametrize(
    "kwargs", [{"timeout": (0, 1)}, {"timeout": (1,)}, {"page_size": 0}, {"page_size": 1001}]
)
def test_bad_settings_are_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        AdminClient(BASE, TOKEN, **kwargs)


def test_default_session_pools_and_never_retries() -> None:
    session = new_session()
    for prefix in ("http://", "https://"):
        adapter = session.get_adapter(prefix + "example.com")
        assert isinstance(adapter, HTTPAdapter)
        assert adapter._pool_maxsize >= 10  # type: ignore[attr-defined]
        assert adapter.max_retries.total == 0
    session.close()


def test_the_environment_is_read_once_per_origin_and_netrc_never_replaces_the_token(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Proxies and the CA bundle come from the environment as ``requests`` would take them,
    but read once per origin (not on each call), and a ``~/.netrc`` entry for the host can
    not replace the Bearer token."""
    (tmp_path / ".netrc").write_text("machine hipchat.example login someone password other\n")
    monkeypatch.setenv("NETRC", str(tmp_path / ".netrc"))
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    monkeypatch.setenv("NO_PROXY", "internal.example")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/etc/ssl/our-ca.pem")
    environment_settings.cache_clear()
    try:
        transport = FakeTransport(reply(room(5)))
        seen: list[dict[str, Any]] = []
        send = transport.send

        def recording(request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
            seen.append(kwargs)
            return send(request, **kwargs)

        transport.send = recording  # type: ignore[method-assign]
        session = new_session()
        session.mount("https://", transport)
        for base in (BASE, "https://internal.example"):
            AdminClient(base, TOKEN, session=session).get_room(5)
        AdminClient(BASE, TOKEN, session=session).get_room(5)
        assert [kw["proxies"].get("https") for kw in seen] == [
            "http://proxy.example:3128", None, "http://proxy.example:3128",
        ]  # fmt: skip
        assert {kw["verify"] for kw in seen} == {"/etc/ssl/our-ca.pem"}
        assert all(r.headers["Authorization"] == f"Bearer {TOKEN}" for r in transport.requests)
        assert environment_settings.cache_info().hits == 1  # the third call read nothing
    finally:
        environment_settings.cache_clear()


def test_close_closes_only_an_owned_session() -> None:
    client = AdminClient(BASE, TOKEN)
    closed: list[bool] = []
    client._http._session.close = lambda: closed.append(True)  # type: ignore[method-assign]
    with client:
        pass
    assert closed == [True]
    injected, _ = make(reply(None))
    injected._http._session.close = lambda: closed.append(False)  # type: ignore[method-assign]
    injected.close()
    assert closed == [True]
    assert TOKEN not in repr(client)


def test_every_request_carries_bearer_header_timeout_and_user_agent() -> None:
    client, transport = make(reply(room(5)), timeout=(1.5, 2.5))
    client.get_room(5)
    sent = transport.requests[0]
    assert sent.headers["Authorization"] == f"Bearer {TOKEN}"
    assert TOKEN not in (sent.url or "")
    assert sent.headers["Accept"] == "application/json"
    assert re.fullmatch(r"hipchat-poller/\S+ \(\+python-requests\)", sent.headers["User-Agent"])
    assert transport.timeouts == [(1.5, 2.5)]
    other, transport = make(reply(room(5)), user_agent="mine/1.0")
    other.get_room(5)
    assert transport.requests[0].headers["User-Agent"] == "mine/1.0"


# -- addressing -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ref", "path"),
    [
        (42, "/v2/room/42"),
        ("Ops Room", "/v2/room/Ops%20Room"),
        ("a/b", "/v2/room/a%2Fb"),
        ("Café ☕", "/v2/room/Caf%C3%A9%20%E2%98%95"),
        ("C++", "/v2/room/C%2B%2B"),
    ],
)
def test_room_refs_are_one_encoded_segment(ref: int | str, path: str) -> None:
    client, transport = make(reply(room(1)))
    client.get_room(ref)
    assert transport.paths == [path]


@pytest.mark.parametrize(
    ("ref", "path"),
    [(7, "/v2/user/7"), ("@FirstL", "/v2/user/%40FirstL"), ("a@b.io", "/v2/user/a%40b.io")],
)
def test_user_refs_are_encoded(ref: int | str, path: str) -> None:
    client, transport = make(reply(user(7)))
    assert client.get_user(ref).id == 7
    assert transport.paths == [path]


# -- hooks ------------------------------------------------------------------------------------


def test_before_request_runs_before_every_request_including_pages() -> None:
    events: list[str] = []
    pages = iter([envelope([room(1), room(2)], f"{BASE}/v2/room?start-index=2"), envelope([])])

    def handler(_request: requests.PreparedRequest) -> Answer:
        events.append("http")
        return 200, next(pages), {}

    client, _ = make(handler, before_request=lambda: events.append("bucket"), page_size=2)
    assert [r.id for r in client.list_rooms()] == [1, 2]
    assert events == ["bucket", "http", "bucket", "http"]


def test_bucket_empty_propagates_untouched_and_nothing_is_sent() -> None:
    empty = BucketEmpty("bucket empty", retry_after=3.5)

    def take() -> None:
        raise empty

    client, transport = make(reply(room(1)), before_request=take)
    with pytest.raises(BucketEmpty) as info:
        client.get_room(1)
    assert info.value is empty
    assert transport.requests == []


def test_rate_limit_headers_reach_the_hook_and_last_rate_limit() -> None:
    seen: list[RateLimitInfo] = []
    reset = str(int(time.time()) + 200)
    headers = {
        "X-Ratelimit-Limit": "100",
        "X-Ratelimit-Remaining": "42",
        "X-Ratelimit-Reset": reset,
    }
    client, _ = make(reply(room(1), headers=headers), on_rate_limit=seen.append)
    assert client.last_rate_limit is None
    client.get_room(1)
    assert seen == [RateLimitInfo(limit=100, remaining=42, reset_at=float(reset))]
    assert client.last_rate_limit == seen[0]


def test_rate_limit_reset_as_seconds_is_normalised_and_reported_on_429() -> None:
    seen: list[RateLimitInfo] = []
    headers = {"X-Ratelimit-Limit": "100", "X-Ratelimit-Remaining": "0", "X-Ratelimit-Reset": "60"}
    client, _ = make(reply({"error": {"code": 429}}, 429, headers), on_rate_limit=seen.append)
    before = time.time()
    with pytest.raises(RateLimited) as info:
        client.get_room(1)
    assert info.value.retry_after == pytest.approx(60.0, abs=0.01)
    assert not info.value.flood_control
    assert len(seen) == 1
    assert seen[0].remaining == 0
    assert seen[0].reset_at is not None
    assert before + 60 <= seen[0].reset_at <= time.time() + 60


def test_no_rate_limit_headers_no_hook_call() -> None:
    seen: list[RateLimitInfo] = []
    client, _ = make(reply(room(1)), on_rate_limit=seen.append)
    client.get_room(1)
    assert seen == []
    assert client.last_rate_limit is None


# -- pagination -------------------------------------------------------------------------------


def paged(pages: list[dict[str, Any]]) -> Handler:
    answers = iter(pages)
    return lambda _request: (200, next(answers), {})


def test_links_next_is_followed_as_given() -> None:
    next_url = f"{BASE}/v2/room?start-index=2&max-results=2&include-private=true&opaque=abc"
    client, transport = make(
        paged([envelope([room(1), room(2)], next_url), envelope([room(3)])]), page_size=2
    )
    assert [r.id for r in client.iter_rooms()] == [1, 2, 3]
    assert transport.requests[1].url == next_url
    first = transport.query(0)
    assert first == {
        "include-private": "true",
        "include-archived": "false",
        "start-index": "0",
        "max-results": "2",
    }


def test_full_page_without_next_asks_the_next_start_index() -> None:
    client, transport = make(
        paged([envelope([room(1), room(2)]), envelope([room(3), room(4)]), envelope([room(5)])]),
        page_size=2,
    )
    rooms = client.list_rooms(include_private=False, include_archived=True)
    assert [r.id for r in rooms] == [1, 2, 3, 4, 5]
    assert [transport.query(i)["start-index"] for i in range(3)] == ["0", "2", "4"]
    assert transport.query(1)["include-archived"] == "true"
    assert transport.query(1)["include-private"] == "false"


def test_full_last_page_ends_on_an_empty_page() -> None:
    client, transport = make(paged([envelope([room(1), room(2)]), envelope([])]), page_size=2)
    assert len(client.list_rooms()) == 2
    assert len(transport.requests) == 2


def test_next_link_to_another_host_is_sent_to_our_host() -> None:
    client, transport = make(
        paged([envelope([room(1)], "https://evil.example/v2/room?start-index=1"), envelope([])]),
        page_size=1,
    )
    client.list_rooms()
    assert transport.requests[1].url == f"{BASE}/v2/room?start-index=1"


def test_a_looping_or_ignored_offset_stops() -> None:
    same = f"{BASE}/v2/room?start-index=0"
    client, transport = make(lambda _r: (200, envelope([room(1), room(2)], same), {}), page_size=2)
    assert [r.id for r in client.list_rooms()] == [1, 2]
    assert len(transport.requests) <= 3


def test_items_shifted_between_pages_are_yielded_once() -> None:
    client, _ = make(
        paged([envelope([room(1), room(2)]), envelope([room(2), room(3)]), envelope([])]),
        page_size=2,
    )
    assert [r.id for r in client.list_rooms()] == [1, 2, 3]


def test_members_participants_and_users_follow_pages() -> None:
    for call, path, query in [
        (lambda c: c.members("R"), "/v2/room/R/member", {}),
        (
            lambda c: c.participants(9, include_offline=True),
            "/v2/room/9/participant",
            {"include-offline": "true"},
        ),
        (
            lambda c: c.list_users(include_guests=True),
            "/v2/user",
            {"include-guests": "true", "include-deleted": "false"},
        ),
    ]:
        client, transport = make(
            paged(
                [envelope([user(1), user(2)], f"{BASE}{path}?start-index=2"), envelope([user(3)])]
            ),
            page_size=2,
        )
        assert [u.id for u in call(client)] == [1, 2, 3]
        assert transport.paths[0] == path
        assert transport.query(0) == query | {"start-index": "0", "max-results": "2"}


# -- history ----------------------------------------------------------------------------------


def test_history_params_and_has_more() -> None:
    newest = datetime(2018, 1, 31, tzinfo=UTC)
    oldest = datetime(2018, 1, 1, tzinfo=UTC)
    client, transport = make(reply(envelope([message(1), message(2)])))
    page = client.history(
        "Ops", date=newest, end_date=oldest, reverse=False, start_index=5, max_results=2
    )
    assert [m.id[-1] for m in page.items] == ["1", "2"]
    assert page.has_more  # full page
    assert transport.paths == ["/v2/room/Ops/history"]
    assert transport.query() == {
        "date": "2018-01-31T00:00:00.000000+00:00",
        "end-date": "2018-01-01T00:00:00.000000+00:00",
        "reverse": "false",
        "start-index": "5",
        "max-results": "2",
    }
    client, _ = make(reply(envelope([message(1)])))
    assert not client.history(1).has_more
    # date="recent" ignores paging: a page longer than max_results is not "more"
    client, _ = make(reply(envelope([message(1), message(2), message(3)])))
    assert not client.history(1, max_results=2).has_more
    client, transport = make(reply(envelope([message(1)], f"{BASE}/v2/room/1/history?x=1")))
    assert client.history(1).has_more
    assert transport.query() == {
        "date": "recent",
        "reverse": "true",
        "start-index": "0",
        "max-results": "100",
    }


@pytest.mark.parametrize(
    "kwargs",
    [
        {"date": datetime(2018, 1, 1)},
        {"end_date": datetime(2018, 1, 1, tzinfo=UTC)},  # with date="recent"
        {"date": "2018-01-02", "end_date": datetime(2018, 1, 1)},
        {"max_results": 1001},
        {"start_index": -1},
    ],
)
def test_history_refuses_bad_arguments_before_calling(kwargs: dict[str, Any]) -> None:
    client, transport = make(reply(envelope([])))
    with pytest.raises(ValidationError):
        client.history(1, **kwargs)
    assert transport.requests == []


def test_iter_history_pages_back_newest_page_first() -> None:
    client, transport = make(
        paged(
            [
                envelope([message(4, 4), message(3, 3)]),
                envelope([message(3, 3), message(2, 2)]),  # boundary repeats
                envelope([message(1, 1)]),
            ]
        ),
        page_size=2,
    )
    newest = datetime(2018, 1, 9, 5, tzinfo=UTC)
    pages = list(client.iter_history(7, date=newest, end_date=datetime(2018, 1, 1, tzinfo=UTC)))
    assert [[m.text for m in page] for page in pages] == [
        ["hello 3", "hello 4"],
        ["hello 2"],
        ["hello 1"],
    ]
    assert {transport.query(i)["date"] for i in range(3)} == {"2018-01-09T05:00:00.000000+00:00"}
    assert [transport.query(i)["start-index"] for i in range(3)] == ["0", "2", "4"]
    assert transport.query(0)["reverse"] == "false"


def test_latest_history_is_oldest_first_and_passes_not_before() -> None:
    client, transport = make(reply(envelope([message(2, 5), message(1, 4)])))
    items = client.latest_history("Ops Room", not_before="abc", max_results=1000)
    assert [m.text for m in items] == ["hello 1", "hello 2"]
    assert transport.paths == ["/v2/room/Ops%20Room/history/latest"]
    assert transport.query() == {"max-results": "1000", "not-before": "abc"}
    client.latest_history(3)
    assert transport.query() == {"max-results": "75"}


def test_both_shapes_of_from_and_the_card_string() -> None:
    note = {
        "id": "434be041-dd36-4b6d-b26d-9839ea0651fd",
        "date": "2018-01-10T09:35:50.702319+00:00",
        "from": "Link",
        "type": "notification",
        "message": "<b>x</b>",
        "message_format": "html",
        "color": "gray",
        "card": json.dumps({"style": "link", "title": "T"}),
        "mentions": [],
    }
    client, _ = make(reply(envelope([message(1), note])))
    first, second = client.latest_history(1)
    assert first.sender is not None
    assert first.sender.id == 1
    assert first.sender_label is None
    assert second.sender is None
    assert second.sender_label == "Link"
    assert second.card == {"style": "link", "title": "T"}
    assert second.date.tzinfo is not None
    assert first.date.utcoffset() is not None


# -- writes -----------------------------------------------------------------------------------


def body_of(transport: FakeTransport, index: int = -1) -> Any:
    raw = transport.requests[index].body
    return json.loads(raw) if raw else None


def test_write_calls_send_the_documented_requests() -> None:
    client, transport = make(reply(None, 204))
    client.set_topic("Ops", "new topic")
    client.delete_room(4)
    client.add_member("Private", "@bob", roles=["room_admin", "room_member"])
    client.add_member("Private", 12)
    client.remove_member("Private", "bob@example.com")
    client.send_notification(
        "Ops", "hi", color="red", message_format="text", notify=True, from_="CI", card={"a": 1}
    )
    assert [(r.method, urlsplit(r.url or "").path) for r in transport.requests] == [
        ("PUT", "/v2/room/Ops/topic"),
        ("DELETE", "/v2/room/4"),
        ("PUT", "/v2/room/Private/member/%40bob"),
        ("PUT", "/v2/room/Private/member/12"),
        ("DELETE", "/v2/room/Private/member/bob%40example.com"),
        ("POST", "/v2/room/Ops/notification"),
    ]
    assert body_of(transport, 0) == {"topic": "new topic"}
    assert body_of(transport, 2) == {"room_roles": ["room_admin", "room_member"]}
    assert body_of(transport, 3) is None
    assert body_of(transport, 5) == {
        "message": "hi",
        "color": "red",
        "message_format": "text",
        "notify": True,
        "from": "CI",
        "card": {"a": 1},
    }
    assert transport.requests[0].headers["Content-Type"] == "application/json"


def test_send_message_and_create_room_parse_their_answers() -> None:
    client, transport = make(
        reply({"id": "d340ecf0", "timestamp": "2018-01-09T04:29:16+00:00"}, 201)
    )
    sent = client.send_message(3, "hello")
    assert (sent.id, sent.timestamp) == ("d340ecf0", "2018-01-09T04:29:16+00:00")
    assert body_of(transport) == {"message": "hello"}
    client, transport = make(reply({"id": 77, "links": {"self": "x"}}, 201))
    assert client.create_room("New", privacy="private", topic="t") == 77
    assert body_of(transport) == {"name": "New", "privacy": "private", "topic": "t"}


@pytest.mark.parametrize(
    "call",
    [
        lambda c: c.send_message(1, ""),
        lambda c: c.send_message(1, "x" * 1001),
        lambda c: c.send_notification(1, "x" * 10_001),
        lambda c: c.send_notification(1, "hi", color="blue"),
        lambda c: c.send_notification(1, "hi", message_format="md"),
        lambda c: c.send_notification(1, "hi", from_="f" * 65),
        lambda c: c.create_room("n" * 51),
        lambda c: c.create_room("ok", privacy="secret"),
        lambda c: c.add_member(1, 2, roles=["owner"]),
        lambda c: c.share_file(1, "", b"x"),
        lambda c: c.latest_history(1, not_before=""),
        lambda c: c.get_room(""),
    ],
)
def test_invalid_input_is_refused_before_any_call(call: Callable[[HipChatClient], Any]) -> None:
    taken: list[int] = []
    client, transport = make(reply(None, 204), before_request=lambda: taken.append(1))
    with pytest.raises(ValidationError):
        call(client)
    assert transport.requests == []
    assert taken == []


def test_share_file_sends_multipart_related() -> None:
    client, transport = make(reply(None, 204))
    client.share_file("Ops", "a.txt", b"hello", message="see")
    sent = transport.requests[0]
    assert sent.method == "POST"
    assert urlsplit(sent.url or "").path == "/v2/room/Ops/share/file"
    assert sent.headers["Content-Type"].startswith("multipart/related; boundary=")
    assert sent.headers["Authorization"] == f"Bearer {TOKEN}"
    assert isinstance(sent.body, bytes)
    assert b"aGVsbG8=" in sent.body


def test_auth_test() -> None:
    client, transport = make(reply({"success": "ok"}, 202))
    assert client.auth_test() is True
    assert transport.query() == {"auth_test": "true"}
    client, _ = make(reply({"error": {"code": 401, "message": "Invalid OAuth session"}}, 401))
    assert client.auth_test() is False
    client, _ = make(reply({"error": {"code": 403, "message": "scopes"}}, 403))
    with pytest.raises(Forbidden):
        client.auth_test()


# -- error mapping and secrets ----------------------------------------------------------------


def error_body(status: int, message: str) -> dict[str, Any]:
    return {"error": {"code": status, "message": message, "type": "Whatever"}}


LEAKY = f"server echoed {TOKEN}"
RL = {"X-Ratelimit-Limit": "100", "X-Ratelimit-Remaining": "0", "X-Ratelimit-Reset": "60"}

ERROR_CASES: list[tuple[str, Answer, type[HipChatPollerError], dict[str, Any]]] = [
    ("400", (400, error_body(400, "Message too long"), {}), BadRequest, {"status": 400}),
    ("405", (405, error_body(405, "Method Not Allowed"), {}), BadRequest, {"status": 405}),
    ("409", (409, "", {}), BadRequest, {"status": 409}),
    ("401", (401, error_body(401, "Invalid OAuth session"), {}), AuthFailed, {"status": 401}),
    ("403", (403, error_body(403, "scopes"), {}), Forbidden, {"status": 403}),
    ("404", (404, error_body(404, "Room Ops not found"), {}), NotFound, {"status": 404}),
    ("429", (429, error_body(429, LEAKY), RL), RateLimited, {"flood_control": False}),
    (
        "429-flood",
        (
            429,
            error_body(429, "flood"),
            {"X-FloodControl-Remaining": "0", "X-FloodControl-Reset": "30"},
        ),
        RateLimited,
        {"flood_control": True, "retry_after": 30.0},
    ),
    ("429-bare", (429, "", {}), RateLimited, {"retry_after": 60.0}),
    ("500", (500, "<html>oops</html>", {}), ServerError, {"status": 500, "retry_after": 5.0}),
    (
        "503-retry-after",
        (503, error_body(503, LEAKY), {"Retry-After": "17"}),
        ServerError,
        {"status": 503, "retry_after": 17.0},
    ),
    ("302", (302, "", {"Location": "/elsewhere"}), NeedsAttention, {"status": 302}),
    ("bad-json", (200, b"{not json", {}), MalformedResponse, {}),
    ("truncated-json", (200, b'{"id": 1, "name": "Ops', {}), MalformedResponse, {}),
    ("bad-utf8", (200, b'{"id": "\xff"}', {}), MalformedResponse, {}),
    ("wrong-shape", (200, {"name": "no id"}, {}), MalformedResponse, {}),
    ("empty-200", (200, b"", {}), MalformedResponse, {}),
    (
        "timeout",
        requests.ReadTimeout(f"Read timed out: {BASE}/?auth_token={TOKEN}"),
        TransportError,
        {},
    ),
    ("connect-timeout", requests.ConnectTimeout(f"{TOKEN}"), TransportError, {}),
    ("refused", requests.ConnectionError(f"refused {TOKEN}"), TransportError, {}),
    ("reset", requests.exceptions.ChunkedEncodingError(f"broken {TOKEN}"), TransportError, {}),
    ("bad-header", requests.exceptions.InvalidHeader(f"bad value {TOKEN!r}"), ValidationError, {}),
]


@pytest.mark.parametrize(
    ("answer", "kind", "attrs"),
    [case[1:] for case in ERROR_CASES],
    ids=[case[0] for case in ERROR_CASES],
)
def test_errors_are_mapped_and_never_show_the_token(
    answer: Answer,
    kind: type[HipChatPollerError],
    attrs: dict[str, Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    client, _ = make(lambda _request: answer)
    caplog.set_level(logging.DEBUG)
    with pytest.raises(HipChatPollerError) as info:
        client.get_room("Ops Room")
    exc = info.value
    assert type(exc) is kind
    for name, value in attrs.items():
        got = getattr(exc, name)
        assert got == (pytest.approx(value, abs=0.5) if isinstance(value, float) else value)
    assert str(exc).startswith("GET /v2/room/Ops%20Room")
    assert "?" not in str(exc)
    assert TOKEN not in str(exc)
    assert TOKEN not in repr(exc)
    assert caplog.records, "one DEBUG line per call"
    for record in caplog.records:
        assert TOKEN not in record.getMessage()
        assert TOKEN not in repr(record.args)


def test_error_message_quotes_the_envelope_message() -> None:
    client, _ = make(reply(error_body(404, "Room Ops not found"), 404))
    with pytest.raises(NotFound, match=r"^GET /v2/room/Ops: HTTP 404: Room Ops not found$"):
        client.get_room("Ops")


def test_server_text_is_scrubbed_of_the_token() -> None:
    client, _ = make(reply(error_body(400, LEAKY), 400))
    with pytest.raises(BadRequest) as info:
        client.get_room(1)
    assert "[token]" in str(info.value)
    assert TOKEN not in str(info.value)


def test_wrong_shapes_name_the_call() -> None:
    client, _ = make(reply(envelope([{"id": "x"}])))
    with pytest.raises(MalformedResponse, match=r"^GET /v2/room/1/history/latest: message x"):
        client.latest_history(1)
    client, _ = make(reply({"items": "nope"}))
    with pytest.raises(MalformedResponse, match=r"^GET /v2/room: "):
        client.list_rooms()
    client, _ = make(reply({"id": 5}, 201))
    with pytest.raises(MalformedResponse, match="timestamp"):
        client.send_message(1, "hi")


def test_one_debug_line_per_call_with_method_path_status_and_time(
    caplog: pytest.LogCaptureFixture,
) -> None:
    client, _ = make(reply(envelope([message(1)])))
    caplog.set_level(logging.DEBUG, logger="tasks.client")
    client.latest_history(9, not_before="secret-cursor")
    lines = [r.getMessage() for r in caplog.records if r.name == "tasks.client"]
    assert len(lines) == 1
    assert re.fullmatch(r"hipchat GET /v2/room/9/history/latest -> 200 in \d+\.\d ms", lines[0])


@pytest.fixture
def token_free_logs(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    caplog.set_level(logging.DEBUG)
    yield
    assert all(TOKEN not in r.getMessage() for r in caplog.records)


@pytest.mark.usefixtures("token_free_logs")
def test_success_path_logs_no_token() -> None:
    client, _ = make(reply(room(1)))
    client.get_room(1)
