"""Users over real HTTP: the full user shape by id, email or @mention (§4.9) and the paged
user list with its guest/deleted filters (§11)."""

from __future__ import annotations

import re

import pytest

from emulator import EmulatorServer
from tests.fixtures_emulator import ENVELOPE_KEYS, USER_STUB_KEYS, EmulatorApi, assert_error

USER_KEYS = {
    "created",
    "email",
    "group",
    "id",
    "is_deleted",
    "is_group_admin",
    "is_guest",
    "last_active",
    "links",
    "mention_name",
    "name",
    "photo_url",
    "presence",
    "timezone",
    "title",
    "version",
    "xmpp_jid",
}


@pytest.mark.parametrize(
    "ref", ["{id}", "alicea@example.com", "ALICEA@example.com", "%40AliceA", "@AliceA"]
)
def test_user_by_id_email_or_mention(emulator: EmulatorServer, ref: str) -> None:
    alice_id = emulator.state.get_user("AliceA")["id"]
    body = EmulatorApi(emulator).get(f"/v2/user/{ref.format(id=alice_id)}").json()
    assert set(body) == USER_KEYS
    assert (body["id"], body["name"], body["mention_name"]) == (alice_id, "Alice Anders", "AliceA")
    assert re.fullmatch(r"\d+", body["last_active"])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", body["created"])
    assert body["links"] == {"self": f"{emulator.base_url}/v2/user/{alice_id}"}
    assert set(body["group"]) == {"id", "links", "name"}
    assert body["presence"] is None


def test_presence_follows_room_entry(emulator: EmulatorServer, emulator_api: EmulatorApi) -> None:
    emulator.state.enter_room("General", "bobb")
    presence = emulator_api.get("/v2/user/%40bobb").json()["presence"]
    assert presence["is_online"] is True
    assert set(presence) == {"client", "idle", "is_online", "show", "status"}


def test_unknown_user_is_404(emulator_api: EmulatorApi) -> None:
    for ref in ("999", "%40ghost", "ghost@example.com"):
        assert_error(emulator_api.get(f"/v2/user/{ref}"), 404, "User not found")


def test_user_list_paging_and_filters(emulator: EmulatorServer, emulator_api: EmulatorApi) -> None:
    emulator.state.create_user("Guest Gina", is_guest=True)
    emulator.state.create_user("Gone Gary")
    emulator.state.delete_user("GoneGary")
    body = emulator_api.get("/v2/user").json()
    assert set(body) == ENVELOPE_KEYS
    assert [set(u) for u in body["items"]] == [USER_STUB_KEYS] * 3
    assert [u["mention_name"] for u in body["items"]] == ["admin", "AliceA", "bobb"]

    def mentions(query: str) -> list[str]:
        return [u["mention_name"] for u in emulator_api.get(f"/v2/user?{query}").json()["items"]]

    assert mentions("include-guests=true")[-1] == "GuestGina"
    assert mentions("include-deleted=true")[-1] == "GoneGary"
    page = emulator_api.get("/v2/user?max-results=2").json()
    assert len(page["items"]) == 2
    assert "next" in page["links"]
    assert "next" not in emulator_api.get("/v2/user?max-results=2&start-index=2").json()["links"]
