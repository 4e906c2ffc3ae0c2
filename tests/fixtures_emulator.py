"""Pytest plugin: the HipChat emulator over a real socket, one per test.

* ``emulator``: a started :class:`emulator.EmulatorServer` (seeded, default limits),
  stopped after the test.
* ``emulator_token``: its admin user's personal access token (every scope).
* ``emulator_api``: a :class:`EmulatorApi` (a ``requests`` session with the Bearer token
  whose methods take paths relative to the base URL).
* ``make_emulator``: a factory for servers with other settings (small rate limits, a
  :class:`emulator.ManualClock`); every server it made is stopped after the test.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from http import HTTPStatus
from typing import Any

import pytest
import requests

from emulator import EmulatorServer

VERSION_RE = re.compile(r"^[A-Z0-9]{8}$")
DATE_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}\+00:00$")
ENVELOPE_KEYS = {"items", "startIndex", "maxResults", "links"}
USER_STUB_KEYS = {"id", "links", "mention_name", "name", "version"}


def assert_error(response: requests.Response, status: int, message: str | None = None) -> None:
    """The response is HipChat's error envelope for ``status`` (and ``message``, if given)."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message", "type"}
    assert body["error"]["code"] == status
    assert body["error"]["type"] == HTTPStatus(status).phrase
    if message is not None:
        assert body["error"]["message"] == message


class EmulatorApi:
    """``api.get("/v2/room")``: paths are joined to the base URL, the token is sent as
    ``Authorization: Bearer`` unless ``token=`` overrides it (``None`` or ``""`` sends none)."""

    _DEFAULT: Any = object()

    def __init__(self, server: EmulatorServer, token: str | None = None) -> None:
        self.server = server
        self.base_url = server.base_url
        self.token = token if token is not None else server.admin_token
        self.session = requests.Session()

    def request(
        self, method: str, path: str, *, token: Any = _DEFAULT, **kwargs: Any
    ) -> requests.Response:
        chosen = self.token if token is self._DEFAULT else token
        headers = dict(kwargs.pop("headers", None) or {})
        if chosen:
            headers.setdefault("Authorization", f"Bearer {chosen}")
        url = path if path.startswith("http") else self.base_url + path
        return self.session.request(method, url, headers=headers, timeout=10, **kwargs)

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> requests.Response:
        return self.request("POST", path, **kwargs)

    def put(self, path: str, **kwargs: Any) -> requests.Response:
        return self.request("PUT", path, **kwargs)

    def delete(self, path: str, **kwargs: Any) -> requests.Response:
        return self.request("DELETE", path, **kwargs)

    def close(self) -> None:
        self.session.close()


@pytest.fixture
def make_emulator() -> Iterator[Callable[..., EmulatorServer]]:
    servers: list[EmulatorServer] = []

    def make(**kwargs: Any) -> EmulatorServer:
        server = EmulatorServer(**kwargs).start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def emulator() -> Iterator[EmulatorServer]:
    server = EmulatorServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def emulator_token(emulator: EmulatorServer) -> str:
    return emulator.admin_token


@pytest.fixture
def emulator_api(emulator: EmulatorServer) -> Iterator[EmulatorApi]:
    api = EmulatorApi(emulator)
    yield api
    api.close()
