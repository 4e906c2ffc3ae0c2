"""History over real HTTP: item shapes (§4.5), ``/history`` date/end-date/reverse/paging
(§4.3), ``/history/latest`` newest-N and inclusive ``not-before`` (§4.4), single items."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from emulator import EmulatorServer, ManualClock
from tests.fixtures_emulator import (
    DATE_RE,
    ENVELOPE_KEYS,
    USER_STUB_KEYS,
    EmulatorApi,
    assert_error,
)

T0 = 1_500_000_000.0  # 2017-07-14T02:40:00Z


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(T0)


@pytest.fixture
def timed(make_emulator: Callable[..., EmulatorServer], clock: ManualClock) -> EmulatorServer:
    """An emulator whose messages are dated by ``clock``."""
    return make_emulator(clock=clock, rate_limit=10_000)


def post_series(server: EmulatorServer, clock: ManualClock, count: int) -> list[dict[str, Any]]:
    """``count`` messages "m0".. one second apart, the first at T0 + 1 s."""
    items = []
    for n in range(count):
        clock.advance(1)
        items.append(server.state.post_message("General", "AliceA", f"m{n}"))
    return items


def texts(body: dict[str, Any]) -> list[str]:
    return [item["message"] for item in body["items"]]


def test_user_message_shape(emulator: EmulatorServer, emulator_api: EmulatorApi) -> None:
    emulator.state.post_message("General", "AliceA", "ping @bobb and @BOBB, not @nobody or @all")
    (item,) = emulator_api.get("/v2/room/General/history").json()["items"]
    assert set(item) == {"date", "from", "id", "mentions", "message", "type"}
    assert item["type"] == "message"
    assert DATE_RE.match(item["date"])
    assert len(item["id"]) == 36
    assert set(item["from"]) == USER_STUB_KEYS
    assert item["from"]["mention_name"] == "AliceA"
    assert item["from"]["links"]["self"] == f"{emulator.base_url}/v2/user/{item['from']['id']}"
    assert [m["mention_name"] for m in item["mentions"]] == ["bobb"]
    assert set(item["mentions"][0]) == USER_STUB_KEYS


def test_file_item_shape(emulator: EmulatorServer, emulator_api: EmulatorApi) -> None:
    state = emulator.state
    state.upload_file("General", "bobb", "shot.png", b"\x89PNG-bytes")
    state.upload_file("General", "bobb", "notes.txt", b"plain", message="read me")
    image, text = emulator_api.get("/v2/room/General/history").json()["items"]
    assert set(image) == {"date", "from", "id", "mentions", "message", "type", "file"}
    assert image["type"] == "message"
    assert image["message"] == ""
    assert set(image["file"]) == {"name", "size", "url", "thumb_url"}
    assert (image["file"]["name"], image["file"]["size"]) == ("shot.png", 10)
    assert set(text["file"]) == {"name", "size", "url"}
    assert text["message"] == "read me"
    download = emulator_api.get(image["file"]["url"])
    assert (download.content, download.headers["Content-Type"]) == (b"\x89PNG-bytes", "image/png")


def test_notification_item_shape(emulator: EmulatorServer, emulator_api: EmulatorApi) -> None:
    card = {"style": "link", "title": "Build 42", "url": "https://ci.example/42"}
    emulator.state.send_notification(
        "General", "<b>green</b>", from_label="CI", color="green", card=card, attach_to="x" * 36
    )
    emulator.state.send_notification("General", "plain", message_format="text")
    full, bare = emulator_api.get("/v2/room/General/history").json()["items"]
    assert set(full) == {
        "attach_to",
        "card",
        "color",
        "date",
        "from",
        "id",
        "mentions",
        "message",
        "message_format",
        "notification_sender",
        "type",
    }
    assert full["type"] == "notification"
    assert (full["from"], full["color"], full["message_format"]) == ("CI", "green", "html")
    assert isinstance(full["card"], str)
    assert json.loads(full["card"]) == card
    assert set(full["notification_sender"]) == {"client_id", "id", "type"}
    assert set(bare) == set(full) - {"attach_to", "card"}
    assert bare["from"] is None
    assert bare["message_format"] == "text"


def test_topic_item_shape(emulator: EmulatorServer, emulator_api: EmulatorApi) -> None:
    emulator.state.set_topic("General", "bobb", "New @AliceA topic")
    (item,) = emulator_api.get("/v2/room/General/history").json()["items"]
    assert set(item) == {"date", "from", "id", "mentions", "message", "type"}
    assert (item["type"], item["message"]) == ("topic", "New @AliceA topic")
    assert item["from"]["mention_name"] == "bobb"
    assert emulator_api.get("/v2/room/General").json()["topic"] == "New @AliceA topic"


def test_dates_are_strictly_increasing_when_the_clock_stands_still(
    timed: EmulatorServer,
) -> None:
    items = [timed.state.post_message("General", "AliceA", str(n)) for n in range(3)]
    dates = [item["date"] for item in items]
    assert dates == [
        "2017-07-14T02:40:00.000000+00:00",
        "2017-07-14T02:40:00.000001+00:00",
        "2017-07-14T02:40:00.000002+00:00",
    ]


def test_default_is_recent_latest_75_oldest_first_ignoring_paging(
    timed: EmulatorServer, clock: ManualClock
) -> None:
    post_series(timed, clock, 100)
    api = EmulatorApi(timed)
    body = api.get("/v2/room/General/history").json()
    assert set(body) == ENVELOPE_KEYS
    assert texts(body) == [f"m{n}" for n in range(25, 100)]
    paged = api.get("/v2/room/General/history?date=recent&start-index=10&max-results=5").json()
    assert texts(paged) == texts(body)
    assert "next" not in paged["links"]
    newest_first = api.get("/v2/room/General/history?reverse=false").json()
    assert texts(newest_first) == texts(body)[::-1]


def test_date_is_the_newest_bound_and_end_date_the_oldest_both_inclusive(
    timed: EmulatorServer, clock: ManualClock
) -> None:
    items = post_series(timed, clock, 10)
    api = EmulatorApi(timed)
    params = {"date": items[6]["date"], "end-date": items[2]["date"]}
    assert texts(api.get("/v2/room/General/history", params=params).json()) == [
        "m2",
        "m3",
        "m4",
        "m5",
        "m6",
    ]
    # epoch seconds, and ISO without a zone (taken as UTC): m3 is at T0 + 4 s.
    by_epoch = {"date": str(int(T0 + 4)), "end-date": str(int(T0 + 3))}
    assert texts(api.get("/v2/room/General/history", params=by_epoch).json()) == ["m2", "m3"]
    naive = (datetime.fromtimestamp(T0, UTC) + timedelta(seconds=2)).replace(tzinfo=None)
    by_naive = {"date": naive.isoformat()}
    assert texts(api.get("/v2/room/General/history", params=by_naive).json()) == ["m0", "m1"]
    zulu = {"date": "2017-07-14T02:40:01Z"}
    assert texts(api.get("/v2/room/General/history", params=zulu).json()) == ["m0"]
    inverted = {"date": items[2]["date"], "end-date": items[6]["date"]}
    assert api.get("/v2/room/General/history", params=inverted).json()["items"] == []


def test_end_date_is_ignored_with_date_recent(timed: EmulatorServer, clock: ManualClock) -> None:
    items = post_series(timed, clock, 5)
    body = EmulatorApi(timed).get("/v2/room/General/history", params={"end-date": items[3]["date"]})
    assert len(body.json()["items"]) == 5


def test_paging_counts_from_the_newest_end(timed: EmulatorServer, clock: ManualClock) -> None:
    items = post_series(timed, clock, 10)
    api = EmulatorApi(timed)
    base = {"date": items[-1]["date"], "max-results": 3}
    first = api.get("/v2/room/General/history", params=base).json()
    assert texts(first) == ["m7", "m8", "m9"]
    assert (first["startIndex"], first["maxResults"]) == (0, 3)
    assert "prev" not in first["links"]
    second = api.get(first["links"]["next"]).json()
    assert texts(second) == ["m4", "m5", "m6"]
    assert second["startIndex"] == 3
    assert "prev" in second["links"]
    newest_first = api.get(
        "/v2/room/General/history", params={**base, "reverse": "false", "start-index": 3}
    ).json()
    assert texts(newest_first) == ["m6", "m5", "m4"]
    last = api.get("/v2/room/General/history", params={**base, "start-index": 9}).json()
    assert texts(last) == ["m0"]
    assert "next" not in last["links"]


def test_following_next_links_yields_every_item_once(
    timed: EmulatorServer, clock: ManualClock
) -> None:
    items = post_series(timed, clock, 23)
    api = EmulatorApi(timed)
    url: str | None = None
    seen: list[str] = []
    params: dict[str, Any] | None = {
        "date": items[-1]["date"],
        "max-results": 5,
        "reverse": "false",
    }
    while True:
        body = api.get(url or "/v2/room/General/history", params=params).json()
        seen.extend(texts(body))
        url, params = body["links"].get("next"), None
        if url is None:
            break
        assert "reverse=false" in url
        assert "date=" in url
    assert seen == [f"m{n}" for n in range(22, -1, -1)]


def test_a_page_that_is_exactly_full_at_the_end_has_no_next(
    timed: EmulatorServer, clock: ManualClock
) -> None:
    items = post_series(timed, clock, 6)
    api = EmulatorApi(timed)
    params = {"date": items[-1]["date"], "max-results": 3, "start-index": 3}
    body = api.get("/v2/room/General/history", params=params).json()
    assert texts(body) == ["m0", "m1", "m2"]
    assert "next" not in body["links"]


@pytest.mark.parametrize(
    "query",
    [
        "date=yesterday",
        "date=inf",
        "date=nan",
        "end-date=soon&date=1500000000",
        "reverse=maybe",
        "max-results=1001",
    ],
)
def test_bad_history_parameters_are_400(emulator_api: EmulatorApi, query: str) -> None:
    assert_error(emulator_api.get(f"/v2/room/General/history?{query}"), 400)


def test_history_of_an_unknown_room_is_404(emulator_api: EmulatorApi) -> None:
    assert_error(emulator_api.get("/v2/room/Nowhere/history"), 404, "Room Nowhere not found")
    assert_error(emulator_api.get("/v2/room/Nowhere/history/latest"), 404)


def test_latest_defaults_to_the_newest_75_oldest_first(
    timed: EmulatorServer, clock: ManualClock
) -> None:
    post_series(timed, clock, 80)
    body = EmulatorApi(timed).get("/v2/room/General/history/latest").json()
    assert set(body) == ENVELOPE_KEYS
    assert (body["startIndex"], body["maxResults"]) == (0, 75)
    assert body["links"] == {"self": f"{timed.base_url}/v2/room/General/history/latest"}
    assert texts(body) == [f"m{n}" for n in range(5, 80)]


def test_latest_not_before_is_inclusive(timed: EmulatorServer, clock: ManualClock) -> None:
    items = post_series(timed, clock, 10)
    api = EmulatorApi(timed)
    body = api.get(f"/v2/room/General/history/latest?not-before={items[5]['id']}").json()
    assert texts(body) == ["m5", "m6", "m7", "m8", "m9"]
    newest = api.get(f"/v2/room/General/history/latest?not-before={items[9]['id']}").json()
    assert texts(newest) == ["m9"]


def test_latest_takes_the_newest_n_before_trimming(
    timed: EmulatorServer, clock: ManualClock
) -> None:
    items = post_series(timed, clock, 10)
    query = f"max-results=3&not-before={items[2]['id']}"
    body = EmulatorApi(timed).get(f"/v2/room/General/history/latest?{query}").json()
    assert texts(body) == ["m7", "m8", "m9"]  # a gap: m3..m6 are missing, as documented
    assert body["maxResults"] == 3


def test_latest_rejects_unknown_and_foreign_not_before(emulator: EmulatorServer) -> None:
    other = emulator.state.post_message("Ops Room", "AliceA", "elsewhere")
    api = EmulatorApi(emulator)
    unknown = "00000000-0000-0000-0000-000000000000"
    assert_error(api.get(f"/v2/room/General/history/latest?not-before={unknown}"), 400)
    assert_error(api.get(f"/v2/room/General/history/latest?not-before={other['id']}"), 400)


def test_latest_max_results_bounds(timed: EmulatorServer, clock: ManualClock) -> None:
    post_series(timed, clock, 3)
    api = EmulatorApi(timed)
    assert api.get("/v2/room/General/history/latest?max-results=0").json()["items"] == []
    assert texts(api.get("/v2/room/General/history/latest?max-results=1000").json()) == [
        "m0",
        "m1",
        "m2",
    ]
    assert_error(api.get("/v2/room/General/history/latest?max-results=1001"), 400)
    assert_error(api.get("/v2/room/General/history/latest?max-results=-1"), 400)


def test_single_message(emulator: EmulatorServer, emulator_api: EmulatorApi) -> None:
    item = emulator.state.post_message("General", "AliceA", "one")
    body = emulator_api.get(f"/v2/room/General/history/{item['id']}").json()
    assert body == item
    assert_error(emulator_api.get("/v2/room/General/history/nope"), 404, "Message not found")


def test_python_history_matches_the_api(
    emulator: EmulatorServer, emulator_api: EmulatorApi
) -> None:
    emulator.state.post_message("General", "AliceA", "hello @bobb")
    emulator.state.send_notification("General", "note", card={"style": "media"})
    emulator.state.upload_file("General", "bobb", "a.gif", b"GIF89a")
    api_items = emulator_api.get("/v2/room/General/history").json()["items"]
    assert emulator.state.history("General") == api_items
