"""The control API over HTTP (``/_emulator``), the Python control API's shapes, server
lifecycle, the command line, and concurrent use."""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import requests

from emulator import EmulatorServer, running_emulator
from tests.fixtures_emulator import EmulatorApi, assert_error

REPO = Path(__file__).resolve().parent.parent


def test_users_and_tokens(emulator: EmulatorServer) -> None:
    control = EmulatorApi(emulator, token="")
    created = control.post("/_emulator/users", json={"name": "Carol Chen", "title": "QA"})
    assert created.status_code == 201
    carol = created.json()
    assert (carol["mention_name"], carol["email"], carol["title"]) == (
        "CarolChen",
        "carolchen@example.com",
        "QA",
    )
    assert control.get("/_emulator/users/%40CarolChen").json()["id"] == carol["id"]
    assert "CarolChen" in [
        u["mention_name"] for u in control.get("/_emulator/users").json()["items"]
    ]
    issued = control.post("/_emulator/tokens", json={"user": "@CarolChen", "scopes": ["view_room"]})
    assert issued.status_code == 201
    token = issued.json()["token"]
    assert issued.json()["scopes"] == ["view_room"]
    assert EmulatorApi(emulator, token).get("/v2/room").status_code == 200
    assert EmulatorApi(emulator, token).get("/v2/user").status_code == 403
    assert control.delete(f"/_emulator/tokens/{token}").status_code == 200
    assert EmulatorApi(emulator, token).get("/v2/room").status_code == 401
    assert_error(
        control.post("/_emulator/users", json={"name": "Dup", "mention_name": "bobb"}), 400
    )
    assert_error(control.post("/_emulator/tokens", json={"user": "ghost"}), 404)
    assert_error(control.post("/_emulator/tokens", json={"user": "bobb", "scopes": ["root"]}), 400)
    assert control.delete("/_emulator/users/bobb").status_code == 200
    assert control.get("/_emulator/users/bobb").json()["is_deleted"] is True


def test_rooms_and_history(emulator: EmulatorServer) -> None:
    control = EmulatorApi(emulator, token="")
    room = control.post("/_emulator/rooms", json={"name": "Lab/2", "privacy": "private"})
    assert room.status_code == 201
    assert room.json()["privacy"] == "private"
    path = "/_emulator/rooms/Lab%2F2"
    message = control.post(f"{path}/messages", json={"user": "AliceA", "message": "hi @bobb"})
    assert message.status_code == 201
    assert message.json()["mentions"][0]["mention_name"] == "bobb"
    upload = {
        "user": "bobb",
        "filename": "x.jpg",
        "content_base64": base64.b64encode(b"JPEG").decode(),
        "message": "pic",
    }
    file_item = control.post(f"{path}/files", json=upload).json()
    assert (file_item["file"]["size"], file_item["message"]) == (4, "pic")
    assert "thumb_url" in file_item["file"]
    text_file = control.post(
        f"{path}/files", json={"user": "bobb", "filename": "t.txt", "content": "héllo"}
    ).json()
    assert text_file["file"]["size"] == len("héllo".encode())
    note = control.post(
        f"{path}/notifications", json={"message": "n", "from": "CI", "color": "red"}
    ).json()
    assert (note["type"], note["from"], note["color"]) == ("notification", "CI", "red")
    topic = control.post(f"{path}/topic", json={"user": "admin", "topic": "T"}).json()
    assert topic["type"] == "topic"
    history = control.get(f"{path}/history").json()["items"]
    assert [i["id"] for i in history] == [
        message.json()["id"],
        file_item["id"],
        text_file["id"],
        note["id"],
        topic["id"],
    ]
    api_history = EmulatorApi(emulator).get("/v2/room/Lab%2F2/history").json()["items"]
    assert api_history == history


def test_presence_membership_archive_and_delete(emulator: EmulatorServer) -> None:
    control = EmulatorApi(emulator, token="")
    entered = control.post("/_emulator/rooms/General/enter", json={"user": "bobb"}).json()
    assert [p["mention_name"] for p in entered["participants"]] == ["bobb"]
    left = control.post("/_emulator/rooms/General/leave", json={"user": "bobb"}).json()
    assert left["participants"] == []
    control.post("/_emulator/rooms", json={"name": "Secret", "privacy": "private"})
    assert control.post("/_emulator/rooms/Secret/members", json={"user": "AliceA"}).ok
    members = EmulatorApi(emulator).get("/v2/room/Secret/member").json()["items"]
    assert [m["mention_name"] for m in members] == ["AliceA"]
    assert control.delete("/_emulator/rooms/Secret/members/AliceA").ok
    assert_error(control.post("/_emulator/rooms/General/members", json={"user": "bobb"}), 400)
    archived = control.post("/_emulator/rooms/General/archive", json={}).json()
    assert archived["is_archived"] is True
    assert (
        control.post("/_emulator/rooms/General/archive", json={"archived": False}).json()[
            "is_archived"
        ]
        is False
    )
    renamed = control.request("PATCH", "/_emulator/rooms/General", json={"name": "Hall"})
    assert renamed.json()["name"] == "Hall"
    assert control.delete("/_emulator/rooms/Hall").status_code == 200
    assert_error(control.get("/_emulator/rooms/Hall"), 404, "Room Hall not found")
    remaining = control.get("/_emulator/rooms").json()["items"]
    assert [r["name"] for r in remaining] == ["Ops Room", "Secret"]


def test_faults_calls_and_reset(emulator: EmulatorServer) -> None:
    control, api = EmulatorApi(emulator, token=""), EmulatorApi(emulator)
    fault = control.post(
        "/_emulator/faults", json={"kind": "status", "status": 502, "count": 2, "method": "GET"}
    )
    assert fault.status_code == 201
    assert fault.json()["remaining"] == 2
    assert len(control.get("/_emulator/faults").json()["items"]) == 1
    assert api.get("/v2/room").status_code == 502
    assert control.delete("/_emulator/faults").ok
    assert api.get("/v2/room?max-results=1").status_code == 200
    assert_error(control.post("/_emulator/faults", json={"kind": "meteor"}), 400)

    calls = control.get("/_emulator/calls").json()["items"]
    assert [(c["path"], c["status"]) for c in calls] == [("/v2/room", 502), ("/v2/room", 200)]
    assert calls[1]["query"] == {"max-results": "1"}
    assert calls[1]["token"] == emulator.admin_token
    since = calls[1]["time"]
    query = f"?since={since}&path_prefix=/v2/room&token={emulator.admin_token}"
    assert len(control.get(f"/_emulator/calls{query}").json()["items"]) >= 1
    assert_error(control.get("/_emulator/calls?since=yesterday"), 400)
    assert control.delete("/_emulator/calls").ok
    assert control.get("/_emulator/calls").json()["items"] == []

    control.post("/_emulator/rooms", json={"name": "Temp"})
    control.post("/_emulator/faults", json={"kind": "reset"})
    assert control.post("/_emulator/reset").ok
    assert [r["name"] for r in control.get("/_emulator/rooms").json()["items"]] == [
        "General",
        "Ops Room",
    ]
    assert api.get("/v2/room").status_code == 200  # the reset fault is gone too


def test_control_errors(emulator: EmulatorServer) -> None:
    control = EmulatorApi(emulator, token="")
    assert_error(control.get("/_emulator/nothing"), 404)
    assert_error(control.put("/_emulator/rooms"), 405)
    assert_error(control.post("/_emulator/rooms", data=b"{not json"), 400)
    assert_error(control.post("/_emulator/rooms", json={}), 400, "name is required")
    assert_error(
        control.post("/_emulator/rooms/Nope/messages", json={"user": "bobb", "message": "x"}), 404
    )
    assert_error(control.post("/_emulator/rooms/General/messages", json={"user": "bobb"}), 400)
    assert_error(
        control.post(
            "/_emulator/rooms/General/files",
            json={"user": "bobb", "filename": "a", "content_base64": "!"},
        ),
        400,
    )
    assert_error(control.get("/_emulator/files/none/a.txt"), 404)
    assert_error(control.get("/elsewhere"), 404)


def test_python_control_shapes(emulator: EmulatorServer) -> None:
    state = emulator.state
    user = state.create_user("Dana Diaz", "dana", "dana@corp.example", is_group_admin=True)
    assert user["is_group_admin"] is True
    assert state.get_user("DANA@corp.example")["id"] == user["id"]
    room = state.create_room("Dana's", privacy="private", owner="dana", topic="t")
    assert room["owner"]["mention_name"] == "dana"
    assert state.get_room(room["id"]) == room
    with pytest.raises(LookupError, match="Room Nope not found"):
        state.post_message("Nope", "dana", "x")
    with pytest.raises(LookupError, match="User not found"):
        state.post_message("General", "ghost", "x")
    with pytest.raises(ValueError, match="color"):
        state.send_notification("General", "x", color="blue")
    random_note = state.send_notification("General", "x", color="random")
    assert random_note["color"] in {"yellow", "green", "red", "purple", "gray"}
    assert state.history(room["id"]) == []


def test_lifecycle_and_running_emulator() -> None:
    with running_emulator(admin_token="t0k", seed=False) as server:
        assert server.port > 0
        assert server.base_url == f"http://127.0.0.1:{server.port}"
        api = EmulatorApi(server)
        assert api.get("/v2/room").json()["items"] == []  # no seeded rooms
        assert [u["mention_name"] for u in api.get("/v2/user").json()["items"]] == ["admin"]
        session = requests.Session()
        assert session.get(f"{server.base_url}/v2/capabilities", timeout=5).ok
    with pytest.raises(requests.ConnectionError):  # the kept-alive connection is closed too
        session.get(f"{server.base_url}/v2/capabilities", timeout=5)
    server.stop()  # idempotent
    session.close()


def test_concurrent_senders_get_distinct_ordered_items(
    make_emulator: Callable[..., EmulatorServer],
) -> None:
    server = make_emulator(rate_limit=10_000, flood_limit=10_000)
    errors: list[BaseException] = []

    def send(n: int) -> None:
        api = EmulatorApi(server)
        try:
            for i in range(25):
                response = api.post("/v2/room/General/message", json={"message": f"{n}-{i}"})
                assert response.status_code == 201
        except BaseException as exc:  # collected and re-raised in the main thread
            errors.append(exc)
        finally:
            api.close()

    threads = [threading.Thread(target=send, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    items = server.state.history("General")
    assert len(items) == 200
    assert len({i["id"] for i in items}) == 200
    dates = [i["date"] for i in items]
    assert dates == sorted(dates)
    assert len(set(dates)) == 200
    assert len(server.state.calls()) == 200


def test_cli_serves_until_sigterm() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "emulator", "--port", "0", "--token", "cli-token"]
    with subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as proc:
        assert proc.stdout is not None
        first = proc.stdout.readline().strip()
        assert first.startswith("HipChat API v2 emulator at http://127.0.0.1:")
        base = first.rsplit(" ", 1)[-1].removesuffix("/v2/")
        lines = [proc.stdout.readline().strip() for _ in range(6)]
        assert lines[0] == "admin token: the one given with --token"
        assert all("cli-token" not in line for line in [first, *lines])
        assert any(line.endswith("General (public)") for line in lines)
        response = requests.get(
            f"{base}/v2/room", headers={"Authorization": "Bearer cli-token"}, timeout=5
        )
        assert response.status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert proc.stdout.read().strip() == "stopped"
