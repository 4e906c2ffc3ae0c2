"""Injected faults (each kind, matching, counting) and the call log (§8; the brief)."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
import requests

from emulator import CallRecord, EmulatorServer, ManualClock
from emulator.faults import MALFORMED_BODY
from tests.fixtures_emulator import EmulatorApi, assert_error


@pytest.mark.parametrize("status", [500, 502, 503])
def test_status_fault(emulator: EmulatorServer, emulator_api: EmulatorApi, status: int) -> None:
    emulator.state.inject_fault("status", status=status, count=2)
    for _ in range(2):
        response = emulator_api.get("/v2/room")
        assert_error(response, status)
        assert "X-Ratelimit-Remaining" in response.headers
    assert emulator_api.get("/v2/room").status_code == 200


def test_faults_match_path_prefix_and_method(
    emulator: EmulatorServer, emulator_api: EmulatorApi
) -> None:
    emulator.state.inject_fault("status", path_prefix="/v2/room/General/history", method="get")
    assert emulator_api.get("/v2/room/General").status_code == 200
    assert emulator_api.post("/v2/room/General/message", json={"message": "x"}).status_code == 201
    assert emulator_api.get("/_emulator/rooms").status_code == 200  # never the control API
    assert emulator_api.get("/v2/room/General/history/latest").status_code == 503
    assert emulator_api.get("/v2/room/General/history/latest").status_code == 200
    assert emulator.state.pending_faults() == []


def test_delay_fault(emulator: EmulatorServer, emulator_api: EmulatorApi) -> None:
    emulator.state.inject_fault("delay", delay_seconds=0.3)
    started = time.monotonic()
    assert emulator_api.get("/v2/room").status_code == 200
    assert time.monotonic() - started >= 0.3
    emulator.state.inject_fault("delay", delay_seconds=1.0)
    with pytest.raises(requests.Timeout):
        emulator_api.session.get(f"{emulator.base_url}/v2/capabilities", timeout=0.2)


def test_reset_fault_drops_the_connection(
    emulator: EmulatorServer, emulator_api: EmulatorApi
) -> None:
    assert emulator_api.get("/v2/room").status_code == 200  # a pooled keep-alive connection
    emulator.state.inject_fault("reset")
    with pytest.raises(requests.ConnectionError):
        emulator_api.get("/v2/room")
    assert emulator_api.get("/v2/room").status_code == 200
    assert [c.status for c in emulator.state.calls()] == [200, 0, 200]


def test_malformed_json_fault(emulator: EmulatorServer, emulator_api: EmulatorApi) -> None:
    emulator.state.inject_fault("malformed_json")
    response = emulator_api.get("/v2/room")
    assert response.status_code == 200
    assert response.content == MALFORMED_BODY
    with pytest.raises(ValueError, match="Expecting value"):
        response.json()


def test_truncated_json_fault(emulator: EmulatorServer, emulator_api: EmulatorApi) -> None:
    whole = emulator_api.get("/v2/room").content
    emulator.state.inject_fault("truncated_json")
    response = emulator_api.get("/v2/room")
    assert response.status_code == 200
    assert response.content == whole[: len(whole) // 2]
    assert response.headers["Content-Length"] == str(len(whole) // 2)
    with pytest.raises(ValueError, match=r"Unterminated|Expecting"):
        response.json()
    assert emulator_api.get("/v2/room").content == whole  # the connection is still usable


def test_rate_limit_fault(emulator: EmulatorServer, emulator_api: EmulatorApi) -> None:
    emulator.state.inject_fault("rate_limit", count=2)
    for _ in range(2):
        response = emulator_api.get("/v2/room")
        assert_error(response, 429, "Rate Limit exceeded")
        assert response.headers["X-Ratelimit-Remaining"] == "0"
        assert int(response.headers["X-Ratelimit-Reset"]) > 1_000_000_000
    assert emulator_api.get("/v2/room").status_code == 200


def test_reset_quirk_with_rate_limit(emulator: EmulatorServer, emulator_api: EmulatorApi) -> None:
    emulator.state.inject_fault("rate_limit")
    emulator.state.inject_fault("reset_quirk")
    limited = emulator_api.get("/v2/room")
    assert limited.status_code == 429
    assert limited.headers["X-Ratelimit-Reset"] == "60"
    normal = emulator_api.get("/v2/room")
    assert normal.status_code == 200
    assert int(normal.headers["X-Ratelimit-Reset"]) > 1_000_000_000


def test_reset_quirk_sends_the_seconds_it_is_given(
    emulator: EmulatorServer, emulator_api: EmulatorApi
) -> None:
    emulator.state.inject_fault("rate_limit")
    emulator.state.inject_fault("reset_quirk", reset_seconds=4)
    limited = emulator_api.get("/v2/room")
    assert limited.status_code == 429
    assert limited.headers["X-Ratelimit-Reset"] == "4"
    with pytest.raises(ValueError, match="reset_seconds"):
        emulator.state.inject_fault("reset_quirk", reset_seconds=1_000_000_000)  # an epoch
    created = emulator_api.post(
        "/_emulator/faults", json={"kind": "reset_quirk", "reset_seconds": 7}
    )
    assert created.status_code == 201
    assert created.json()["reset_seconds"] == 7
    assert emulator_api.get("/v2/room").headers["X-Ratelimit-Reset"] == "7"


def test_the_call_log_keeps_the_reset_each_answer_stated(
    emulator: EmulatorServer, emulator_api: EmulatorApi
) -> None:
    emulator_api.get("/v2/room")
    emulator.state.inject_fault("rate_limit")
    emulator.state.inject_fault("reset_quirk", reset_seconds=3)
    emulator_api.get("/v2/room")
    emulator.state.inject_fault("reset")
    with pytest.raises(requests.ConnectionError):
        emulator_api.get("/v2/room")
    epoch, quirk, dropped = emulator.state.calls()
    assert epoch.ratelimit_reset is not None
    assert int(epoch.ratelimit_reset) >= epoch.time
    assert (quirk.status, quirk.ratelimit_reset) == (429, "3")
    assert (dropped.status, dropped.ratelimit_reset) == (0, None)
    logged = emulator_api.get("/_emulator/calls").json()["items"]
    assert [c["ratelimit_reset"] for c in logged] == [epoch.ratelimit_reset, "3", None]


def test_clear_and_validate_faults(emulator: EmulatorServer, emulator_api: EmulatorApi) -> None:
    emulator.state.inject_fault("status", count=5)
    emulator.state.clear_faults()
    assert emulator_api.get("/v2/room").status_code == 200
    with pytest.raises(ValueError, match="unknown fault kind"):
        emulator.state.inject_fault("explode")
    with pytest.raises(ValueError, match="count"):
        emulator.state.inject_fault("status", count=0)


def test_call_log_records_and_filters(make_emulator: Callable[..., EmulatorServer]) -> None:
    clock = ManualClock(1_000.0)
    server = make_emulator(clock=clock)
    api = EmulatorApi(server)
    alice_token = server.state.create_token("AliceA")
    api.get("/v2/room?max-results=5")
    clock.advance(10)
    api.get(f"/v2/room/General/history/latest?auth_token={alice_token}", token=None)
    clock.advance(10)
    api.post("/v2/room/General/message", json={"message": "x"})
    api.get("/v2/room/Nope", token=None)
    api.get("/_emulator/calls")  # the control API is not logged

    calls = server.state.calls()
    assert calls[0] == CallRecord(
        token=server.admin_token,
        method="GET",
        path="/v2/room",
        query={"max-results": "5"},
        status=200,
        time=1_000.0,
        ratelimit_reset=str(1_000 + 300),  # the window opened with this call: 300 s
    )
    assert calls[1].token == alice_token
    assert calls[1].query == {}  # auth_token is never copied into the query
    assert [c.status for c in calls] == [200, 200, 201, 401]
    assert calls[3].token is None
    assert len(server.state.calls(token=alice_token)) == 1
    assert [c.time for c in server.state.calls(since=1_010.0)] == [1_010.0, 1_020.0, 1_020.0]
    assert [c.time for c in server.state.calls(until=1_010.0)] == [1_000.0, 1_010.0]
    assert [c.path for c in server.state.calls(path_prefix="/v2/room/General")] == [
        "/v2/room/General/history/latest",
        "/v2/room/General/message",
    ]
    assert len(server.state.calls(method="post")) == 1
    server.state.clear_calls()
    assert server.state.calls() == []


def test_call_records_are_frozen(emulator: EmulatorServer, emulator_api: EmulatorApi) -> None:
    emulator_api.get("/v2/room")
    (record,) = emulator.state.calls()
    with pytest.raises(AttributeError):
        record.status = 500  # type: ignore[misc]
