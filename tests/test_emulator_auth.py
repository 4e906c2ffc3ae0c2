"""Authentication, scopes, ``auth_test``, capabilities and the error envelope for every
error status (§2, §3.1)."""

from __future__ import annotations

import http.client

import pytest

from emulator import EmulatorServer
from tests.fixtures_emulator import EmulatorApi, assert_error


def test_bearer_header_and_auth_token_query_both_work(emulator: EmulatorServer) -> None:
    api = EmulatorApi(emulator)
    assert api.get("/v2/room").status_code == 200
    assert api.get(f"/v2/room?auth_token={emulator.admin_token}", token=None).status_code == 200


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic YWRtaW46eA=="}],
)
def test_missing_or_bad_token_is_401(emulator_api: EmulatorApi, headers: dict[str, str]) -> None:
    response = emulator_api.get("/v2/room", token=None, headers=headers)
    assert_error(response, 401, "Invalid OAuth session")
    assert response.json() == {
        "error": {"code": 401, "message": "Invalid OAuth session", "type": "Unauthorized"}
    }


def test_revoked_token_and_deleted_user_are_401(emulator: EmulatorServer) -> None:
    token = emulator.state.create_token("AliceA")
    api = EmulatorApi(emulator, token)
    assert api.get("/v2/room").status_code == 200
    emulator.state.revoke_token(token)
    assert_error(api.get("/v2/room"), 401)
    bob = EmulatorApi(emulator, emulator.state.create_token("bobb"))
    emulator.state.delete_user("bobb")
    assert_error(bob.get("/v2/room"), 401)


def test_missing_scope_is_403_with_the_python_repr_message(emulator: EmulatorServer) -> None:
    api = EmulatorApi(emulator, emulator.state.create_token("AliceA", ["send_message"]))
    assert_error(
        api.get("/v2/room"),
        403,
        "This action requires one of the following scopes: [u'view_group', u'view_room']",
    )
    assert_error(
        api.post("/v2/room/General/notification", json={"message": "x"}),
        403,
        "This action requires one of the following scopes: [u'send_notification']",
    )
    assert api.post("/v2/room/General/message", json={"message": "ok"}).status_code == 201


def test_auth_test_answers_202_and_does_nothing(
    emulator: EmulatorServer, emulator_api: EmulatorApi
) -> None:
    response = emulator_api.post(
        "/v2/room/General/message?auth_test=true", json={"message": "not sent"}
    )
    assert response.status_code == 202
    assert response.json() == {
        "success": {
            "code": 202,
            "message": "This auth_token has access to use this method.",
            "type": "Accepted",
        }
    }
    assert emulator.state.history("General") == []
    assert_error(emulator_api.get("/v2/room?auth_test=true", token="bad"), 401)
    reader = EmulatorApi(emulator, emulator.state.create_token("AliceA", ["view_room"]))
    assert_error(reader.post("/v2/room/General/message?auth_test=true", json={}), 403)


def test_capabilities_need_no_token(emulator_api: EmulatorApi) -> None:
    response = emulator_api.get("/v2/capabilities", token=None)
    assert response.status_code == 200
    body = response.json()
    assert body["links"]["self"] == f"{emulator_api.base_url}/v2/capabilities"
    assert "view_messages" in body["capabilities"]["hipchatApiProvider"]["availableScopes"]


def test_unknown_paths_are_404(emulator_api: EmulatorApi) -> None:
    assert_error(emulator_api.get("/v2/nothing"), 404)
    assert_error(emulator_api.get("/v1/rooms/list"), 404)
    assert_error(emulator_api.get("/v2/room/General/history/latest/extra"), 404)


def test_wrong_method_on_a_known_path_is_405(emulator_api: EmulatorApi) -> None:
    response = emulator_api.delete("/v2/room")
    assert_error(response, 405)
    assert response.headers["Allow"] == "GET, POST"
    assert_error(emulator_api.get("/v2/room/General/message"), 405)
    assert_error(emulator_api.request("PATCH", "/v2/room/General"), 405)


def test_error_statuses_and_types(emulator: EmulatorServer) -> None:
    """One of each, with the reason phrase as ``type`` and rate headers on all of them."""
    api = EmulatorApi(emulator)
    limited = EmulatorApi(emulator, emulator.state.create_token("bobb", ["view_room"]))
    responses = {
        400: api.get("/v2/room?max-results=5000"),
        401: api.get("/v2/room", token="nope"),
        403: limited.get("/v2/user"),
        404: api.get("/v2/room/Missing"),
        405: api.put("/v2/room"),
    }
    for status, response in responses.items():
        assert_error(response, status)
        assert "X-Ratelimit-Remaining" in response.headers


def test_keep_alive_on_one_connection(emulator: EmulatorServer) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", emulator.port, timeout=5)
    headers = {"Authorization": f"Bearer {emulator.admin_token}"}
    for path in ("/v2/room", "/v2/room/Nope", "/v2/room/General/topic", "/v2/capabilities"):
        conn.request("GET", path, headers=headers)
        response = conn.getresponse()
        assert response.getheader("Content-Length") is not None
        assert response.getheader("Connection") is None
        response.read()
    conn.request("DELETE", "/v2/room/General", headers=headers)
    deleted = conn.getresponse()
    assert (deleted.status, deleted.read()) == (204, b"")
    conn.request("GET", "/v2/room", headers=headers)
    assert conn.getresponse().status == 200
    conn.close()


def test_head_and_options_are_405_on_known_paths(emulator_api: EmulatorApi) -> None:
    head = emulator_api.request("HEAD", "/v2/room")
    assert head.status_code == 405
    assert head.content == b""
    assert_error(emulator_api.request("OPTIONS", "/v2/room/General"), 405)


def test_bad_content_length_is_400(emulator: EmulatorServer) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", emulator.port, timeout=5)
    conn.putrequest("POST", "/v2/room/General/message")
    conn.putheader("Content-Length", "-5")
    conn.endheaders()
    response = conn.getresponse()
    assert response.status == 400
    assert response.getheader("Connection") == "close"
    conn.close()
