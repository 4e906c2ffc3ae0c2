"""HipChatClient against the project's HipChat emulator over a real socket.

Every endpoint, every error status, paging past 1,000 rooms, awkward room names, both
shapes of ``from``, ``card`` decoded, aware datetimes, and each fault the emulator can inject.
No sleeps: the only waits are the emulator's own ``delay`` fault against a 50 ms read timeout.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import requests

from emulator import EmulatorServer
from storage.errors import (
    AuthFailed,
    BadRequest,
    Forbidden,
    HipChatPollerError,
    MalformedResponse,
    NotFound,
    RateLimited,
    ServerError,
    TransportError,
)
from tasks.client import HipChatClient
from tasks.hipchat_types import RateLimitInfo
from tests.hipchat_admin import AdminClient

Factory = Callable[..., HipChatClient]


class Recorder:
    """Counts ``before_request`` calls and remembers every URL actually sent on the wire."""

    def __init__(self) -> None:
        self.before = 0
        self.urls: list[str] = []
        self.limits: list[RateLimitInfo] = []

    def take(self) -> None:
        self.before += 1

    def hook(self, response: requests.Response, *args: Any, **kwargs: Any) -> None:
        self.urls.append(response.request.url or "")


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def alice(emulator: EmulatorServer) -> dict[str, Any]:
    return emulator.state.create_user("Alice Client", "alicec", "alice.client@example.com")


@pytest.fixture
def token(emulator: EmulatorServer, alice: dict[str, Any]) -> str:
    return emulator.state.create_token(alice["id"])


@pytest.fixture
def make_client(emulator: EmulatorServer, token: str, recorder: Recorder) -> Iterator[Factory]:
    made: list[HipChatClient] = []

    def factory(server: EmulatorServer | None = None, **kwargs: Any) -> AdminClient:
        session = requests.Session()
        session.hooks["response"].append(recorder.hook)
        kwargs.setdefault("before_request", recorder.take)
        kwargs.setdefault("on_rate_limit", recorder.limits.append)
        client = AdminClient(
            (server or emulator).base_url, kwargs.pop("token", token), session=session, **kwargs
        )
        made.append(client)
        return client

    yield factory
    for client in made:
        client.close()


@pytest.fixture
def client(make_client: Factory) -> AdminClient:
    return make_client()


# -- every endpoint ---------------------------------------------------------------------------


def test_rooms_round_trip(client: AdminClient, emulator: EmulatorServer) -> None:
    room_id = client.create_room("Round Trip", privacy="private", topic="first")
    room = client.get_room(room_id)
    assert (room.id, room.name, room.privacy, room.topic) == (
        room_id,
        "Round Trip",
        "private",
        "first",
    )
    assert client.get_room("Round Trip").id == room_id
    client.set_topic(room_id, "second")
    assert client.get_room(room_id).topic == "second"
    assert room_id in {r.id for r in client.list_rooms()}
    assert room_id not in {r.id for r in client.list_rooms(include_private=False)}
    emulator.state.archive_room(room_id)
    assert room_id not in {r.id for r in client.list_rooms()}
    assert room_id in {r.id for r in client.list_rooms(include_archived=True)}
    client.delete_room(room_id)
    with pytest.raises(NotFound, match=r"Room .* not found"):
        client.get_room(room_id)


def test_history_round_trip_with_both_shapes_of_from(
    client: AdminClient, emulator: EmulatorServer, alice: dict[str, Any]
) -> None:
    room_id = client.create_room("History Room")
    sent = client.send_message(room_id, "hello @alicec")
    client.send_notification(
        room_id,
        "<b>deployed</b>",
        color="green",
        from_="CI",
        card={"style": "link", "title": "Build 7", "url": "https://ci.example/7"},
        attach_to=sent.id,
    )
    client.share_file(room_id, "notes.txt", b"line one\n", message="the notes")
    items = client.latest_history(room_id)
    assert [m.type for m in items] == ["message", "notification", "message"]
    message, note, upload = items
    assert message.id == sent.id
    assert message.sender is not None
    assert message.sender.id == alice["id"]
    assert message.sender_label is None
    assert message.color is None
    assert note.sender is None
    assert note.sender_label == "CI"
    assert note.color == "green"
    assert note.message_format == "html"
    assert note.card == {"style": "link", "title": "Build 7", "url": "https://ci.example/7"}
    assert note.raw["attach_to"] == sent.id
    assert upload.file is not None
    assert upload.file.name == "notes.txt"
    assert upload.file.size == len(b"line one\n")
    assert upload.text == "the notes"
    for item in items:
        assert item.date.tzinfo is not None
        assert item.date.utcoffset() == timedelta(0)
    assert [m.id for m in client.latest_history(room_id, not_before=note.id)] == [
        note.id,
        upload.id,
    ]


def test_history_pages_and_dates(client: AdminClient, emulator: EmulatorServer, token: str) -> None:
    room_id = client.create_room("Paged History")
    user = emulator.state.create_user("Poster", "poster")
    for i in range(7):
        emulator.state.post_message(room_id, user["id"], f"m{i}")
    everything = client.latest_history(room_id, max_results=1000)
    newest, oldest = everything[-1].date, everything[0].date
    page = client.history(room_id, date=newest, end_date=oldest, max_results=3)
    assert [m.text for m in page.items] == ["m4", "m5", "m6"]
    assert page.has_more
    last = client.history(room_id, date=newest, end_date=oldest, start_index=6, max_results=3)
    assert [m.text for m in last.items] == ["m0"]
    assert not last.has_more
    paged = small_pages(emulator.base_url, token, room_id, newest, oldest)
    assert paged == [["m4", "m5", "m6"], ["m1", "m2", "m3"], ["m0"]]
    recent = client.history(room_id, max_results=3)  # "recent" ignores paging
    assert [m.text for m in recent.items] == [f"m{i}" for i in range(7)]
    assert not recent.has_more


def small_pages(
    base_url: str, token: str, room_id: int, newest: datetime, oldest: datetime
) -> list[list[str]]:
    with AdminClient(base_url, token, page_size=3) as small:
        pages = small.iter_history(room_id, date=newest, end_date=oldest)
        return [[m.text for m in page] for page in pages]


def test_people_round_trip(
    client: AdminClient, emulator: EmulatorServer, alice: dict[str, Any]
) -> None:
    room_id = client.create_room("People", privacy="private")
    bob = emulator.state.create_user("Bob Client", "bobc", "bob.client@example.com")
    client.add_member(room_id, "@bobc", roles=["room_admin", "room_member"])
    client.add_member(room_id, "alice.client@example.com")
    assert {u.id for u in client.members(room_id)} >= {alice["id"], bob["id"]}
    client.remove_member(room_id, bob["id"])
    assert bob["id"] not in {u.id for u in client.members(room_id)}
    emulator.state.enter_room(room_id, alice["id"])
    assert [u.id for u in client.participants(room_id)] == [alice["id"]]
    emulator.state.leave_room(room_id, alice["id"])
    assert client.participants(room_id) == []
    assert alice["id"] in {u.id for u in client.participants(room_id, include_offline=True)}
    assert {bob["id"], alice["id"]} <= {u.id for u in client.list_users()}
    for ref in (bob["id"], "bob.client@example.com", "@bobc"):
        found = client.get_user(ref)
        assert (found.id, found.mention_name, found.email) == (
            bob["id"],
            "bobc",
            "bob.client@example.com",
        )


def test_auth_test(make_client: Factory, client: AdminClient) -> None:
    assert client.auth_test() is True
    assert make_client(token="not-a-token").auth_test() is False


# -- addressing -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["Ops Room 2", "a/b/c", "Été ☕ café", "C++ & 100% + more?", "#hash;semi"]
)
def test_awkward_room_names_work_everywhere(client: AdminClient, name: str) -> None:
    room_id = client.create_room(name)
    assert client.get_room(name).id == room_id
    client.send_message(name, "by name")
    client.set_topic(name, "topic by name")
    assert [m.text for m in client.latest_history(name)] == ["by name", "topic by name"]
    assert client.history(name).items[0].text == "by name"
    client.delete_room(name)
    with pytest.raises(NotFound):
        client.get_room(name)


def test_room_names_are_case_sensitive(client: AdminClient) -> None:
    client.create_room("CaseRoom")
    with pytest.raises(NotFound):
        client.get_room("caseroom")


# -- pagination -------------------------------------------------------------------------------


def test_list_rooms_pages_past_1000(
    client: AdminClient, emulator: EmulatorServer, recorder: Recorder, token: str
) -> None:
    before = {r.id for r in client.list_rooms()}
    created = {emulator.state.create_room(f"bulk {i:04d}")["id"] for i in range(1050)}
    since = time.time()
    recorder.before = 0
    rooms = client.list_rooms()
    assert {r.id for r in rooms} == before | created
    assert len(rooms) == len(before) + 1050
    calls = emulator.state.calls(token=token, since=since, path_prefix="/v2/room", method="GET")
    assert len(calls) == 2
    assert [c.query.get("start-index") for c in calls] == ["0", "1000"]
    assert recorder.before == 2


def test_full_page_without_next_is_still_followed(
    make_client: Factory, emulator: EmulatorServer, token: str
) -> None:
    small = make_client(page_size=2)
    total = len(small.list_rooms())
    for i in range(4 - total % 2):  # make the total even: the last page is full
        emulator.state.create_room(f"even {i}")
    total = len(small.list_rooms())
    assert total % 2 == 0
    since = time.time()
    assert len(small.list_rooms()) == total
    calls = emulator.state.calls(token=token, since=since, path_prefix="/v2/room")
    assert len(calls) == total // 2 + 1  # the last ask finds an empty page


# -- errors over HTTP -------------------------------------------------------------------------


def test_each_status_maps_to_its_error(
    client: AdminClient,
    make_client: Factory,
    emulator: EmulatorServer,
    alice: dict[str, Any],
) -> None:
    room_id = client.create_room("Errors")
    with pytest.raises(BadRequest) as bad:
        client.set_topic(room_id, "t" * 251)  # the server's limit, not ours
    assert bad.value.status == 400
    with pytest.raises(BadRequest) as wrong_method:
        client._http.request("PATCH", f"/room/{room_id}")
    assert wrong_method.value.status == 405
    with pytest.raises(AuthFailed):
        make_client(token="not-a-token").get_room(room_id)
    weak = emulator.state.create_token(alice["id"], scopes=["view_room"])
    with pytest.raises(Forbidden):
        make_client(token=weak).send_message(room_id, "no scope")
    with pytest.raises(NotFound, match="HTTP 404"):
        client.get_room("no such room")
    emulator.state.inject_fault("status", status=502, path_prefix=f"/v2/room/{room_id}")
    with pytest.raises(ServerError) as server:
        client.get_room(room_id)
    assert server.value.status == 502


def test_api_rate_limit_is_a_429(
    make_emulator: Callable[..., EmulatorServer], make_client: Factory
) -> None:
    server = make_emulator(rate_limit=3, rate_window_seconds=300.0)
    small = make_client(server, token="admin-token")
    for _ in range(3):
        small.list_rooms()
    assert small.last_rate_limit is not None
    assert small.last_rate_limit.remaining == 0
    with pytest.raises(RateLimited) as info:
        small.list_rooms()
    assert not info.value.flood_control
    assert 250 <= info.value.retry_after <= 301


def test_flood_control_is_a_429_with_flood_control(
    make_emulator: Callable[..., EmulatorServer], make_client: Factory
) -> None:
    server = make_emulator(flood_limit=2)
    sender = make_client(server, token="admin-token")
    room_id = sender.create_room("Flood")
    sender.send_message(room_id, "one")
    sender.send_notification(room_id, "two")
    with pytest.raises(RateLimited) as info:
        sender.send_message(room_id, "three")
    assert info.value.flood_control
    assert 1 <= info.value.retry_after <= 61
    other_room = sender.create_room("Not flooded")
    sender.send_message(other_room, "fine")


def test_every_call_takes_a_bucket_token_and_sends_no_token_in_urls(
    client: AdminClient, emulator: EmulatorServer, recorder: Recorder, token: str
) -> None:
    room_id = client.create_room("Counted")
    client.send_message(room_id, "x")
    client.latest_history(room_id)
    client.list_rooms()
    with pytest.raises(NotFound):
        client.get_room("missing")
    assert recorder.before == len(emulator.state.calls(token=token)) == 5
    assert recorder.urls
    assert all(token not in url and "auth_token" not in url for url in recorder.urls)
    assert recorder.limits
    assert recorder.limits[-1] == client.last_rate_limit
    assert client.last_rate_limit is not None
    assert client.last_rate_limit.reset_at is not None
    assert client.last_rate_limit.reset_at > time.time()


# -- faults -----------------------------------------------------------------------------------


def _provoke(
    client: AdminClient, emulator: EmulatorServer, kind: str, **fault: Any
) -> HipChatPollerError:
    room_id = client.create_room(f"fault {kind}")
    emulator.state.inject_fault(kind, path_prefix=f"/v2/room/{room_id}", **fault)
    with pytest.raises(HipChatPollerError) as info:
        client.latest_history(room_id)
    client.latest_history(room_id)  # one fault, one failed call: the next one works
    return info.value


@pytest.mark.parametrize(
    ("kind", "fault", "expected"),
    [
        ("status", {"status": 503}, ServerError),
        ("status", {"status": 500}, ServerError),
        ("reset", {}, TransportError),
        ("malformed_json", {}, MalformedResponse),
        ("truncated_json", {}, MalformedResponse),
        ("rate_limit", {}, RateLimited),
    ],
)
def test_injected_faults(
    client: AdminClient,
    emulator: EmulatorServer,
    kind: str,
    fault: dict[str, Any],
    expected: type[HipChatPollerError],
    token: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    exc = _provoke(client, emulator, kind, **fault)
    assert type(exc) is expected
    assert str(exc).startswith("GET /v2/room/")
    assert "?" not in str(exc)
    assert token not in str(exc)
    assert token not in repr(exc)
    assert all(token not in r.getMessage() for r in caplog.records)


def test_delay_beyond_the_read_timeout_is_a_transport_error(
    make_client: Factory, emulator: EmulatorServer
) -> None:
    impatient = make_client(timeout=(1.0, 0.05))
    exc = _provoke(impatient, emulator, "delay", delay_seconds=0.3)
    assert isinstance(exc, TransportError)
    assert "timed out" in str(exc)


def test_reset_quirk_reads_sixty_as_seconds(client: AdminClient, emulator: EmulatorServer) -> None:
    emulator.state.inject_fault("reset_quirk")
    emulator.state.inject_fault("rate_limit")
    started = time.time()
    with pytest.raises(RateLimited) as info:
        client.list_rooms()
    assert info.value.retry_after == pytest.approx(60.0, abs=1.0)
    assert client.last_rate_limit is not None
    assert client.last_rate_limit.reset_at is not None
    assert started + 59 <= client.last_rate_limit.reset_at <= time.time() + 61


def test_connection_refused_is_a_transport_error(
    make_emulator: Callable[..., EmulatorServer],
) -> None:
    server = make_emulator()
    base_url = server.base_url
    server.stop()
    gone = AdminClient(base_url, "admin-token", timeout=(0.5, 0.5))
    with gone, pytest.raises(TransportError, match=r"^GET /v2/room/1: connection failed"):
        gone.get_room(1)


def test_history_dates_are_aware_and_round_trip(
    client: AdminClient, emulator: EmulatorServer
) -> None:
    room_id = client.create_room("Dates")
    client.send_message(room_id, "x")
    (item,) = client.latest_history(room_id)
    assert item.date.tzinfo is not None
    assert abs(item.date - datetime.now(UTC)) < timedelta(minutes=5)
    same = client.history(room_id, date=item.date, end_date=item.date)
    assert [m.id for m in same.items] == [item.id]
