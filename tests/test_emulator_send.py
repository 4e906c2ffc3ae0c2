"""Sending over real HTTP: ``message`` (201), ``notification`` (204) and multipart
``share/file`` (204, base64 or raw parts), with validation (§4.10-4.12)."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from emulator import EmulatorServer
from tests.fixtures_emulator import DATE_RE, EmulatorApi, assert_error


def test_send_message(emulator: EmulatorServer, emulator_api: EmulatorApi) -> None:
    alice = EmulatorApi(emulator, emulator.state.create_token("AliceA"))
    response = alice.post("/v2/room/General/message", json={"message": "hi @bobb"})
    assert response.status_code == 201
    body = response.json()
    assert set(body) == {"id", "timestamp"}
    assert DATE_RE.match(body["timestamp"])
    (item,) = emulator_api.get("/v2/room/General/history").json()["items"]
    assert (item["id"], item["date"], item["type"]) == (body["id"], body["timestamp"], "message")
    assert item["from"]["mention_name"] == "AliceA"
    assert [m["mention_name"] for m in item["mentions"]] == ["bobb"]
    assert "message_format" not in item


@pytest.mark.parametrize(
    "payload", [{"message": ""}, {"message": "x" * 1001}, {}, {"message": 42}, ["hi"]]
)
def test_send_message_validation(emulator_api: EmulatorApi, payload: Any) -> None:
    assert_error(emulator_api.post("/v2/room/General/message", json=payload), 400)


def test_send_message_length_limit_is_inclusive(emulator_api: EmulatorApi) -> None:
    assert emulator_api.post("/v2/room/General/message", json={"message": "x" * 1000}).ok
    assert_error(emulator_api.post("/v2/room/Nope/message", json={"message": "x"}), 404)


def test_send_notification(emulator: EmulatorServer, emulator_api: EmulatorApi) -> None:
    payload = {
        "message": "Deployed <b>v2</b>",
        "color": "purple",
        "notify": True,
        "from": "Deploy bot",
        "card": {"style": "application", "title": "v2", "id": "c1"},
        "attach_to": "5f7586a8-b71c-423c-ab11-bb2329d00201",
    }
    response = emulator_api.post("/v2/room/General/notification", json=payload)
    assert response.status_code == 204
    assert response.content == b""
    (item,) = emulator.state.history("General")
    assert item["type"] == "notification"
    assert (item["from"], item["color"], item["message_format"]) == ("Deploy bot", "purple", "html")
    assert json.loads(item["card"]) == payload["card"]
    assert item["attach_to"] == payload["attach_to"]
    assert item["notification_sender"]["type"] == "user"


def test_notification_defaults_and_random_colour(
    emulator: EmulatorServer, emulator_api: EmulatorApi
) -> None:
    emulator_api.post("/v2/room/General/notification", json={"message": "a"})
    for _ in range(5):
        emulator_api.post("/v2/room/General/notification", json={"message": "b", "color": "random"})
    emulator_api.post(
        "/v2/room/General/notification", json={"message": "@bobb", "message_format": "text"}
    )
    first, *randoms, text = emulator.state.history("General")
    assert (first["color"], first["message_format"], first["from"]) == ("yellow", "html", None)
    assert {r["color"] for r in randoms} <= {"yellow", "green", "red", "purple", "gray"}
    assert [m["mention_name"] for m in text["mentions"]] == ["bobb"]
    assert first["mentions"] == []


@pytest.mark.parametrize(
    "payload",
    [
        {},
        {"message": ""},
        {"message": "x" * 10_001},
        {"message": "x", "color": "blue"},
        {"message": "x", "message_format": "markdown"},
        {"message": "x", "notify": "yes"},
        {"message": "x", "from": "f" * 65},
        {"message": "x", "attach_to": "a" * 37},
        {"message": "x", "card": "{}"},
        {"message": "x", "card": {"style": "poster"}},
    ],
)
def test_notification_validation(emulator_api: EmulatorApi, payload: dict[str, Any]) -> None:
    assert_error(emulator_api.post("/v2/room/General/notification", json=payload), 400)


def test_notification_limits_are_inclusive(emulator_api: EmulatorApi) -> None:
    payload = {"message": "x" * 10_000, "from": "f" * 64}
    assert emulator_api.post("/v2/room/General/notification", json=payload).status_code == 204


def multipart(*parts: tuple[dict[str, str], bytes], boundary: str = "b0undary") -> bytes:
    out = b""
    for headers, content in parts:
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        out += f"--{boundary}\r\n{head}\r\n".encode() + content + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


METADATA = {
    "Content-Type": "application/json; charset=UTF-8",
    "Content-Disposition": 'attachment; name="metadata"',
}
RELATED = {"Content-Type": "multipart/related; boundary=b0undary"}


def test_share_file_base64(emulator: EmulatorServer, emulator_api: EmulatorApi) -> None:
    png = b"\x89PNG\r\n\x1a\n" + bytes(range(256))
    body = multipart(
        (METADATA, json.dumps({"message": "the graph"}).encode()),
        (
            {
                "Content-Type": "image/png",
                "Content-Disposition": 'attachment; name="file"; filename="graph.png"',
                "Content-Transfer-Encoding": "base64",
            },
            base64.encodebytes(png),
        ),
    )
    response = emulator_api.post("/v2/room/General/share/file", data=body, headers=RELATED)
    assert response.status_code == 204
    (item,) = emulator.state.history("General")
    assert (item["type"], item["message"]) == ("message", "the graph")
    assert item["from"]["mention_name"] == "admin"
    assert (item["file"]["name"], item["file"]["size"]) == ("graph.png", len(png))
    assert "thumb_url" in item["file"]
    assert emulator_api.get(item["file"]["url"]).content == png


def test_share_file_raw_bytes_without_metadata(
    emulator: EmulatorServer, emulator_api: EmulatorApi
) -> None:
    raw = b"line one\r\n--not-a-boundary\r\n\x00\xff"
    body = multipart(
        (
            {
                "Content-Type": "text/plain",
                "Content-Disposition": 'attachment; name="file"; filename="notes.txt"',
            },
            raw,
        )
    )
    response = emulator_api.post("/v2/room/General/share/file", data=body, headers=RELATED)
    assert response.status_code == 204
    (item,) = emulator.state.history("General")
    assert item["message"] == ""
    assert set(item["file"]) == {"name", "size", "url"}
    assert item["file"]["size"] == len(raw)
    assert emulator_api.get(item["file"]["url"]).content == raw


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("application/json", b'{"message": "no file"}'),
        ("multipart/related", b"--x--"),
        ("multipart/related; boundary=b0undary", multipart((METADATA, b'{"message": "x"}'))),
        (
            "multipart/related; boundary=b0undary",
            multipart(
                (
                    {
                        "Content-Disposition": 'attachment; name="file"; filename="a.bin"',
                        "Content-Transfer-Encoding": "base64",
                    },
                    b"!!not base64!!",
                )
            ),
        ),
    ],
)
def test_share_file_validation(emulator_api: EmulatorApi, content_type: str, body: bytes) -> None:
    response = emulator_api.post(
        "/v2/room/General/share/file", data=body, headers={"Content-Type": content_type}
    )
    assert_error(response, 400)
