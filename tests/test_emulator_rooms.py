"""Rooms over real HTTP: list envelope and paging, create/view/update/delete, addressing by
name (spaces, slashes, non-ASCII, case), topic, statistics, participants and members."""

from __future__ import annotations

import re
import socket
from collections.abc import Callable
from urllib.parse import parse_qs, quote, urlsplit

import pytest

from emulator import EmulatorServer
from tests.fixtures_emulator import (
    ENVELOPE_KEYS,
    USER_STUB_KEYS,
    VERSION_RE,
    EmulatorApi,
    assert_error,
)

STUB_KEYS = {"id", "is_archived", "links", "name", "privacy", "version"}
DETAIL_KEYS = STUB_KEYS | {
    "avatar_url",
    "created",
    "delegate_admin_visibility",
    "guest_access_url",
    "is_guest_accessible",
    "owner",
    "participants",
    "statistics",
    "topic",
    "xmpp_jid",
}


def test_list_envelope_and_room_stubs(emulator_api: EmulatorApi) -> None:
    response = emulator_api.get("/v2/room")
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "application/json"
    body = response.json()
    assert set(body) == ENVELOPE_KEYS
    assert body["startIndex"] == 0
    assert body["maxResults"] == 100
    base = emulator_api.base_url
    assert body["links"] == {"self": f"{base}/v2/room"}
    general, ops = body["items"]
    for stub in (general, ops):
        assert set(stub) == STUB_KEYS
        assert VERSION_RE.match(stub["version"])
        assert stub["is_archived"] is False
    url = f"{base}/v2/room/{general['id']}"
    assert general["name"] == "General"
    assert general["privacy"] == "public"
    assert general["links"] == {
        "self": url,
        "webhooks": f"{url}/webhook",
        "participants": f"{url}/participant",
    }
    assert ops["privacy"] == "private"
    assert ops["links"]["members"] == f"{base}/v2/room/{ops['id']}/member"


def test_links_are_built_from_the_host_header(emulator_api: EmulatorApi) -> None:
    body = emulator_api.get("/v2/room", headers={"Host": "hipchat.example:8443"}).json()
    assert body["links"]["self"] == "http://hipchat.example:8443/v2/room"
    assert body["items"][0]["links"]["self"].startswith("http://hipchat.example:8443/v2/room/")


def test_paging_over_more_than_1000_rooms(emulator: EmulatorServer) -> None:
    for n in range(2100):
        emulator.state.create_room(f"room-{n:04d}")
    api = EmulatorApi(emulator)
    first = api.get("/v2/room?max-results=1000").json()
    assert len(first["items"]) == 1000
    assert "prev" not in first["links"]
    query = parse_qs(urlsplit(first["links"]["next"]).query)
    assert query == {"start-index": ["1000"], "max-results": ["1000"]}

    seen, pages, url = [], [], f"{emulator.base_url}/v2/room?max-results=1000"
    while url:
        page = api.get(url).json()
        pages.append(page)
        seen.extend(item["id"] for item in page["items"])
        url = page["links"].get("next")
    assert [len(p["items"]) for p in pages] == [1000, 1000, 102]
    assert [p["startIndex"] for p in pages] == [0, 1000, 2000]
    assert all(p["maxResults"] == 1000 for p in pages)
    assert "next" not in pages[-1]["links"]
    assert "prev" in pages[1]["links"]
    assert parse_qs(urlsplit(pages[1]["links"]["prev"]).query)["start-index"] == ["0"]
    assert seen == sorted(seen)
    assert len(set(seen)) == 2102


def test_no_next_link_on_a_full_last_page(emulator: EmulatorServer) -> None:
    for n in range(8):
        emulator.state.create_room(f"r{n}")
    api = EmulatorApi(emulator)  # 10 rooms in all
    page = api.get("/v2/room?max-results=5&start-index=5").json()
    assert len(page["items"]) == 5
    assert "next" not in page["links"]
    assert "next" in api.get("/v2/room?max-results=5").json()["links"]
    empty = api.get("/v2/room?start-index=50").json()
    assert empty["items"] == []
    assert "next" not in empty["links"]


def test_next_link_keeps_filters_but_never_the_token(emulator: EmulatorServer) -> None:
    emulator.state.archive_room("General")
    api = EmulatorApi(emulator, token="")
    token = emulator.admin_token
    body = api.get(f"/v2/room?include-archived=true&max-results=1&auth_token={token}").json()
    next_url = body["links"]["next"]
    assert "auth_token" not in next_url
    assert parse_qs(urlsplit(next_url).query) == {
        "include-archived": ["true"],
        "start-index": ["1"],
        "max-results": ["1"],
    }
    assert body["links"]["self"] == f"{emulator.base_url}/v2/room"


@pytest.mark.parametrize(
    "query", ["max-results=-1", "max-results=1001", "max-results=ten", "start-index=-1"]
)
def test_paging_parameters_out_of_range_are_400(emulator_api: EmulatorApi, query: str) -> None:
    assert_error(emulator_api.get(f"/v2/room?{query}"), 400)


def test_max_results_bounds_are_inclusive(emulator_api: EmulatorApi) -> None:
    zero = emulator_api.get("/v2/room?max-results=0").json()
    assert zero["items"] == []
    assert zero["maxResults"] == 0
    assert "next" not in zero["links"]
    assert emulator_api.get("/v2/room?max-results=1000").status_code == 200


def test_private_and_archived_filters(emulator: EmulatorServer, emulator_api: EmulatorApi) -> None:
    emulator.state.create_room("Old", topic="gone")
    emulator.state.archive_room("Old")

    def names(query: str) -> list[str]:
        return [r["name"] for r in emulator_api.get(f"/v2/room{query}").json()["items"]]

    assert names("") == ["General", "Ops Room"]
    assert names("?include-private=false") == ["General"]
    assert names("?include-archived=true") == ["General", "Ops Room", "Old"]
    archived = emulator_api.get("/v2/room?include-archived=true").json()["items"][2]
    assert archived["is_archived"] is True
    assert_error(emulator_api.get("/v2/room?include-private=maybe"), 400)


def test_create_room(emulator_api: EmulatorApi) -> None:
    response = emulator_api.post("/v2/room", json={"name": "Deploys", "topic": "ship it"})
    assert response.status_code == 201
    body = response.json()
    assert set(body) == {"id", "links"}
    assert body["links"] == {"self": f"{emulator_api.base_url}/v2/room/{body['id']}"}
    detail = emulator_api.get(f"/v2/room/{body['id']}").json()
    assert detail["name"] == "Deploys"
    assert detail["topic"] == "ship it"
    assert detail["privacy"] == "public"
    assert detail["owner"]["mention_name"] == "admin"


@pytest.mark.parametrize(
    "body",
    [
        {"name": ""},
        {"name": "x" * 51},
        {"name": "General"},
        {"name": "Fine", "privacy": "secret"},
        {"name": 5},
        {},
    ],
)
def test_create_room_rejects_bad_input(emulator_api: EmulatorApi, body: dict[str, object]) -> None:
    assert_error(emulator_api.post("/v2/room", json=body), 400)


def test_create_room_rejects_a_body_that_is_not_json(emulator_api: EmulatorApi) -> None:
    assert_error(emulator_api.post("/v2/room", data={"name": "Form"}), 400)
    assert emulator_api.post("/v2/room", json={"name": "x" * 50}).status_code == 201


def test_room_detail_shape(emulator: EmulatorServer, emulator_api: EmulatorApi) -> None:
    emulator.state.enter_room("Ops Room", "AliceA")
    body = emulator_api.get("/v2/room/Ops%20Room").json()
    assert set(body) == DETAIL_KEYS
    base, room_id = emulator_api.base_url, body["id"]
    assert body["links"]["self"] == f"{base}/v2/room/{room_id}"
    assert body["statistics"] == {"links": {"self": f"{base}/v2/room/{room_id}/statistics"}}
    assert set(body["owner"]) == USER_STUB_KEYS
    assert [p["mention_name"] for p in body["participants"]] == ["AliceA"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", body["created"])
    assert body["topic"] == "On call"
    assert body["xmpp_jid"].endswith("@conf.hipchat.com")
    assert body["is_guest_accessible"] is False
    assert body["guest_access_url"] is None


@pytest.mark.parametrize(
    "name",
    ["Ops Room", "front/back", "Café ☕ 東京", "100% done", "a+b", "what?#&=", "@mention"],
)
def test_room_names_are_percent_decoded_path_segments(
    emulator: EmulatorServer, emulator_api: EmulatorApi, name: str
) -> None:
    if name != "Ops Room":
        emulator.state.create_room(name)
    encoded = quote(name, safe="")
    body = emulator_api.get(f"/v2/room/{encoded}").json()
    assert body["name"] == name
    history = emulator_api.get(f"/v2/room/{encoded}/history/latest").json()
    assert history["links"]["self"] == f"{emulator_api.base_url}/v2/room/{encoded}/history/latest"


def test_plus_is_not_a_space(emulator: EmulatorServer, emulator_api: EmulatorApi) -> None:
    assert_error(emulator_api.get("/v2/room/Ops+Room"), 404, "Room Ops+Room not found")
    emulator.state.create_room("Ops+Room")
    assert emulator_api.get("/v2/room/Ops+Room").json()["name"] == "Ops+Room"


def test_raw_space_in_the_path_is_400(emulator: EmulatorServer) -> None:
    request = (
        b"GET /v2/room/Ops Room HTTP/1.1\r\nHost: x\r\n"
        b"Authorization: Bearer " + emulator.admin_token.encode() + b"\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", emulator.port), timeout=5) as conn:
        conn.sendall(request)
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ")
    assert b'"type": "Bad Request"' in body
    assert b"Ops Room" not in body  # the request line (maybe with a token) is never echoed


def test_raw_utf8_in_the_path_is_accepted(emulator: EmulatorServer) -> None:
    emulator.state.create_room("Café")
    request = (
        "GET /v2/room/Café HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        f"Authorization: Bearer {emulator.admin_token}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", emulator.port), timeout=5) as conn:
        conn.sendall(request)
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 200 ")


def test_room_names_are_case_sensitive_by_default(emulator_api: EmulatorApi) -> None:
    assert_error(emulator_api.get("/v2/room/general"), 404, "Room general not found")
    assert emulator_api.get("/v2/room/General").status_code == 200
    assert emulator_api.post("/v2/room", json={"name": "GENERAL"}).status_code == 201


def test_case_insensitive_option(make_emulator: Callable[..., EmulatorServer]) -> None:
    api = EmulatorApi(make_emulator(case_insensitive_rooms=True))
    assert api.get("/v2/room/gEnErAl").json()["name"] == "General"
    assert_error(api.post("/v2/room", json={"name": "GENERAL"}), 400)


def test_an_all_digit_segment_is_an_id(emulator: EmulatorServer, emulator_api: EmulatorApi) -> None:
    room = emulator.state.create_room("424242")
    assert emulator_api.get(f"/v2/room/{room['id']}").json()["name"] == "424242"
    assert_error(emulator_api.get("/v2/room/424242"), 404, "Room 424242 not found")


def test_update_room_changes_version_without_a_history_item(
    emulator: EmulatorServer, emulator_api: EmulatorApi
) -> None:
    before = emulator_api.get("/v2/room/General").json()
    response = emulator_api.put(
        "/v2/room/General", json={"name": "Town Hall", "privacy": "private", "topic": "quiet"}
    )
    assert response.status_code == 204
    assert response.content == b""
    after = emulator_api.get(f"/v2/room/{before['id']}").json()
    assert (after["name"], after["privacy"], after["topic"]) == ("Town Hall", "private", "quiet")
    assert after["version"] != before["version"]
    assert emulator.state.history("Town Hall") == []
    assert_error(emulator_api.get("/v2/room/General"), 404)
    assert_error(emulator_api.put("/v2/room/Town%20Hall", json={"name": "Ops Room"}), 400)
    assert_error(emulator_api.put("/v2/room/Town%20Hall", json={"is_archived": "no"}), 400)


def test_delete_room(emulator_api: EmulatorApi) -> None:
    response = emulator_api.delete("/v2/room/General")
    assert response.status_code == 204
    assert "Content-Length" not in response.headers
    assert_error(emulator_api.get("/v2/room/General"), 404, "Room General not found")
    assert_error(emulator_api.delete("/v2/room/General"), 404)


def test_set_topic(emulator: EmulatorServer, emulator_api: EmulatorApi) -> None:
    before = emulator_api.get("/v2/room/General").json()
    response = emulator_api.put("/v2/room/General/topic", json={"topic": "Release day"})
    assert response.status_code == 204
    assert response.content == b""
    after = emulator_api.get("/v2/room/General").json()
    assert after["topic"] == "Release day"
    assert after["version"] != before["version"]
    (item,) = emulator.state.history("General")
    assert item["type"] == "topic"
    assert item["message"] == "Release day"
    assert item["from"]["mention_name"] == "admin"
    assert_error(emulator_api.put("/v2/room/General/topic", json={}), 400)
    assert_error(emulator_api.put("/v2/room/General/topic", json={"topic": 7}), 400)


def test_statistics(emulator: EmulatorServer, emulator_api: EmulatorApi) -> None:
    url = "/v2/room/General/statistics"
    empty = emulator_api.get(url).json()
    assert set(empty) == {"messages_sent", "last_active", "links"}
    assert (empty["messages_sent"], empty["last_active"]) == (0, None)
    item = emulator.state.post_message("General", "AliceA", "hi")
    stats = emulator_api.get(url).json()
    assert (stats["messages_sent"], stats["last_active"]) == (1, item["date"])


def test_participants_online_and_offline(
    emulator: EmulatorServer, emulator_api: EmulatorApi
) -> None:
    state = emulator.state
    state.enter_room("General", "AliceA")
    state.enter_room("General", "bobb")
    state.leave_room("General", "AliceA")
    online = emulator_api.get("/v2/room/General/participant").json()
    assert set(online) == ENVELOPE_KEYS
    assert [set(p) for p in online["items"]] == [USER_STUB_KEYS]
    assert [p["mention_name"] for p in online["items"]] == ["bobb"]
    every = emulator_api.get("/v2/room/General/participant?include-offline=true").json()
    assert sorted(p["mention_name"] for p in every["items"]) == ["AliceA", "bobb"]
    page = emulator_api.get("/v2/room/General/participant?include-offline=true&max-results=1")
    assert "next" in page.json()["links"]
    assert_error(emulator_api.get("/v2/room/Nope/participant"), 404, "Room Nope not found")


def test_members_of_a_private_room(emulator_api: EmulatorApi) -> None:
    body = emulator_api.get("/v2/room/Ops%20Room/member").json()
    assert set(body) == ENVELOPE_KEYS
    assert [set(m) for m in body["items"]] == [USER_STUB_KEYS | {"room_roles"}] * 3
    roles = {m["mention_name"]: m["room_roles"] for m in body["items"]}
    assert roles == {
        "admin": ["room_admin", "room_member"],
        "AliceA": ["room_member"],
        "bobb": ["room_member"],
    }


def test_members_of_a_public_room_are_400(emulator_api: EmulatorApi) -> None:
    assert_error(emulator_api.get("/v2/room/General/member"), 400)
    assert_error(emulator_api.put("/v2/room/General/member/bobb"), 400)


def test_add_and_remove_members(emulator: EmulatorServer, emulator_api: EmulatorApi) -> None:
    carol = emulator.state.create_user("Carol Chen", "carol", "carol@example.com")
    for ref in (str(carol["id"]), "carol@example.com", "%40carol"):  # all three forms, twice
        assert emulator_api.put(f"/v2/room/Ops%20Room/member/{ref}").status_code == 204
    admin_put = emulator_api.put(
        "/v2/room/Ops%20Room/member/%40carol", json={"room_roles": ["room_admin", "room_member"]}
    )
    assert admin_put.status_code == 204
    members = emulator_api.get("/v2/room/Ops%20Room/member").json()["items"]
    assert [m["room_roles"] for m in members if m["mention_name"] == "carol"] == [
        ["room_admin", "room_member"]
    ]
    assert emulator_api.delete("/v2/room/Ops%20Room/member/%40carol").status_code == 204
    assert emulator_api.delete("/v2/room/Ops%20Room/member/%40carol").status_code == 204
    members = emulator_api.get("/v2/room/Ops%20Room/member").json()["items"]
    assert "carol" not in [m["mention_name"] for m in members]
    assert_error(emulator_api.put("/v2/room/Ops%20Room/member/%40nobody"), 404, "User not found")
    bad_roles = emulator_api.put(
        "/v2/room/Ops%20Room/member/%40carol", json={"room_roles": ["owner"]}
    )
    assert_error(bad_roles, 400)
