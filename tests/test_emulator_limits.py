"""Rate limiting (per token, fixed window) and flood control (per token and room) with
their headers and 429s (§5). Time is a :class:`ManualClock`, never slept through."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest

from emulator import EmulatorServer, ManualClock
from tests.fixtures_emulator import EmulatorApi, assert_error

T0 = 1_600_000_000.25


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(T0)


def test_rate_limit_headers_count_down_then_429(
    make_emulator: Callable[..., EmulatorServer], clock: ManualClock
) -> None:
    server = make_emulator(rate_limit=3, rate_window_seconds=300, clock=clock)
    api = EmulatorApi(server)
    reset = str(math.ceil(T0 + 300))
    seen = []
    for path in ("/v2/room", "/v2/room/Missing", "/v2/room"):  # a 404 counts too
        response = api.get(path)
        seen.append(response.headers["X-Ratelimit-Remaining"])
        assert response.headers["X-Ratelimit-Limit"] == "3"
        assert response.headers["X-Ratelimit-Reset"] == reset
    assert seen == ["2", "1", "0"]
    limited = api.get("/v2/room")
    assert_error(limited, 429, "Rate Limit exceeded")
    assert limited.json()["error"]["type"] == "Too Many Requests"
    assert limited.headers["X-Ratelimit-Remaining"] == "0"
    assert limited.headers["X-Ratelimit-Reset"] == reset

    clock.advance(299)
    assert api.get("/v2/room").status_code == 429
    clock.advance(1)  # the window ends: a new one opens with this call
    fresh = api.get("/v2/room")
    assert fresh.status_code == 200
    assert fresh.headers["X-Ratelimit-Remaining"] == "2"
    assert fresh.headers["X-Ratelimit-Reset"] == str(math.ceil(T0 + 600))


def test_rate_limit_is_per_token(
    make_emulator: Callable[..., EmulatorServer], clock: ManualClock
) -> None:
    server = make_emulator(rate_limit=1, clock=clock)
    admin, alice = EmulatorApi(server), EmulatorApi(server, server.state.create_token("AliceA"))
    assert admin.get("/v2/room").status_code == 200
    assert admin.get("/v2/room").status_code == 429
    assert alice.get("/v2/room").headers["X-Ratelimit-Remaining"] == "0"
    assert alice.get("/v2/room").status_code == 429
    # the same token in the query string shares the header's window
    assert admin.get(f"/v2/room?auth_token={server.admin_token}", token=None).status_code == 429


def test_every_v2_response_has_rate_headers(emulator_api: EmulatorApi) -> None:
    for response in (
        emulator_api.get("/v2/capabilities", token=None),
        emulator_api.get("/v2/room", token="bad"),
        emulator_api.get("/v2/whatever"),
        emulator_api.post("/v2/room/General/message", json={"message": "x"}),
    ):
        assert {"X-Ratelimit-Limit", "X-Ratelimit-Remaining", "X-Ratelimit-Reset"} <= set(
            response.headers
        )


def test_control_api_is_not_rate_limited(make_emulator: Callable[..., EmulatorServer]) -> None:
    server = make_emulator(rate_limit=1)
    api = EmulatorApi(server)
    for _ in range(3):
        response = api.get("/_emulator/rooms")
        assert response.status_code == 200
        assert "X-Ratelimit-Limit" not in response.headers


def test_flood_control_per_token_and_room(
    make_emulator: Callable[..., EmulatorServer], clock: ManualClock
) -> None:
    server = make_emulator(flood_limit=2, flood_window_seconds=60, clock=clock)
    api = EmulatorApi(server)
    first = api.post("/v2/room/General/message", json={"message": "1"})
    assert first.status_code == 201
    assert first.headers["X-FloodControl-Limit"] == "2"
    assert first.headers["X-FloodControl-Remaining"] == "1"
    assert first.headers["X-FloodControl-Reset"] == str(math.ceil(T0 + 60))
    second = api.post("/v2/room/General/notification", json={"message": "2"})
    assert second.status_code == 204
    assert second.headers["X-FloodControl-Remaining"] == "0"
    flooded = api.post("/v2/room/General/message", json={"message": "3"})
    assert_error(flooded, 429)
    assert flooded.headers["X-FloodControl-Remaining"] == "0"
    assert flooded.headers["X-Ratelimit-Remaining"] != "0"  # the API limit is not the cause
    assert len(server.state.history("General")) == 2

    other_room = api.post("/v2/room/Ops%20Room/message", json={"message": "elsewhere"})
    assert other_room.status_code == 201
    alice = EmulatorApi(server, server.state.create_token("AliceA"))
    assert alice.post("/v2/room/General/message", json={"message": "alice"}).status_code == 201
    clock.advance(60)
    assert api.post("/v2/room/General/message", json={"message": "4"}).status_code == 201


def test_flood_control_counts_share_file_and_only_sends(
    make_emulator: Callable[..., EmulatorServer],
) -> None:
    server = make_emulator(flood_limit=1)
    api = EmulatorApi(server)
    listing = api.get("/v2/room/General/history")
    assert "X-FloodControl-Limit" not in listing.headers
    bad = api.post("/v2/room/General/message", json={"message": ""})  # invalid still counts
    assert_error(bad, 400)
    assert bad.headers["X-FloodControl-Remaining"] == "0"
    body = (
        b"--b\r\nContent-Disposition: attachment; name=file; filename=a.txt\r\n\r\nx\r\n--b--\r\n"
    )
    shared = api.post(
        "/v2/room/General/share/file",
        data=body,
        headers={"Content-Type": "multipart/related; boundary=b"},
    )
    assert_error(shared, 429)
