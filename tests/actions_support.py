"""Helpers shared by the action, CLI, handler and subscription tests (plain functions, no
fixtures): a Runtime on SQLite + the embedded fakeredis with its own key prefix, a connection
to an emulator, and a spy on the JSON bodies the client sends."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
import requests
from cryptography.fernet import Fernet

from tasks import connections_api
from tasks.runtime import Runtime
from tasks.settings import Settings


def make_settings(tmp_path: Path, **overrides: Any) -> Settings:
    """Embedded settings (SQLite in tmp_path, fakeredis) with a key prefix of their own: the
    embedded fakeredis server is shared by the whole test process."""
    return Settings(
        data_dir=str(tmp_path),
        secret_key=Fernet.generate_key().decode(),
        redis_key_prefix=f"hp-test-{uuid.uuid4().hex[:12]}",
        **overrides,
    )


def make_runtime(tmp_path: Path, **overrides: Any) -> Runtime:
    rt = Runtime(make_settings(tmp_path, **overrides))
    rt.db.upgrade()
    return rt


def add_connection(rt: Runtime, name: str, base_url: str, token: str) -> int:
    return connections_api.add_connection(rt, name, base_url, token).id


class BodySpy:
    """Records ``(method, path, json body)`` of every request made through requests."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[tuple[str, str, Any]] = []
        original = requests.Session.request
        spy = self

        def request(self: requests.Session, method: str, url: str, **kwargs: Any) -> Any:
            spy.calls.append((method, url.split("?")[0], kwargs.get("json")))
            return original(self, method, url, **kwargs)

        monkeypatch.setattr(requests.Session, "request", request)

    def bodies(self, suffix: str) -> list[Any]:
        return [body for _method, url, body in self.calls if url.endswith(suffix)]
