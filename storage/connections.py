"""Connections: one HipChat base URL plus one encrypted personal access token."""

from __future__ import annotations

import hashlib
import re
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from storage.crypto import TokenCipher
from storage.db import translated
from storage.models import CONNECTION_STATES, NAME_PATTERN, Connection
from tasks.errors import ValidationError

DEFAULT_POLL_INTERVAL_SECONDS = 60.0
MAX_REASON_LENGTH = 1000

_NAME = re.compile(NAME_PATTERN)


def validate_name(name: str, what: str = "connection") -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValidationError(
            f"bad {what} name {name!r}: use 1 to 64 of the characters A-Z a-z 0-9 _ . -"
        )
    return name


def poll_offset_for(name: str, interval_seconds: float = DEFAULT_POLL_INTERVAL_SECONDS) -> float:
    """A stable point in ``[0, interval_seconds)`` derived from the name's hash."""
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 * interval_seconds


def _validate_base_url(base_url: str) -> str:
    url = base_url.strip().rstrip("/")
    if not re.fullmatch(r"https?://[^\s/?#]+(/[^\s?#]*)?", url):
        raise ValidationError(f"bad base URL {base_url!r}: expected http(s)://host[/path]")
    return url


def _validate_token(token: str) -> str:
    if not isinstance(token, str) or not token.strip() or any(c.isspace() for c in token):
        raise ValidationError("bad token: it must be non-empty and contain no spaces")
    return token


def add_connection(
    s: Session,
    name: str,
    base_url: str,
    token: str,
    cipher: TokenCipher,
    *,
    poll_interval_seconds: float = DEFAULT_POLL_INTERVAL_SECONDS,
) -> Connection:
    connection = Connection(
        name=validate_name(name),
        base_url=_validate_base_url(base_url),
        token_encrypted=cipher.encrypt(_validate_token(token)),
        state="active",
        poll_offset_seconds=poll_offset_for(name, poll_interval_seconds),
    )
    # The savepoint keeps the caller's transaction usable after a duplicate name.
    with translated(f"a connection named {name!r} already exists"), s.begin_nested():
        s.add(connection)
    return connection


def get_connection(s: Session, name_or_id: str | int) -> Connection | None:
    """By id (an int), else by name; a string of digits that names nothing is tried as an id."""
    if isinstance(name_or_id, int):
        return s.get(Connection, name_or_id)
    found = s.scalars(select(Connection).where(Connection.name == name_or_id)).one_or_none()
    if found is None and name_or_id.isdigit():
        return s.get(Connection, int(name_or_id))
    return found


def require_connection(s: Session, name_or_id: str | int) -> Connection:
    connection = get_connection(s, name_or_id)
    if connection is None:
        raise ValidationError(f"no connection {name_or_id!r}")
    return connection


def list_connections(s: Session) -> list[Connection]:
    return list(s.scalars(select(Connection).order_by(Connection.name)))


def remove_connection(s: Session, name_or_id: str | int) -> bool:
    """Remove a connection with its subscriptions, watermarks and events; False if unknown."""
    connection = get_connection(s, name_or_id)
    if connection is None:
        return False
    s.delete(connection)
    s.flush()
    return True


def set_connection_state(
    s: Session, conn_id: int, state: str, reason: str | None = None
) -> Connection:
    if state not in CONNECTION_STATES:
        raise ValidationError(f"bad connection state {state!r}: one of {CONNECTION_STATES}")
    connection = require_connection(s, conn_id)
    connection.state = state
    connection.state_reason = reason[:MAX_REASON_LENGTH] if reason else None
    s.flush()
    return connection


def decrypt_token(conn: Connection, cipher: TokenCipher) -> str:
    return cipher.decrypt(conn.token_encrypted)


def update_connection(
    s: Session,
    name: str | int,
    *,
    cipher: TokenCipher,
    base_url: str | None = None,
    token: str | None = None,
) -> Connection:
    """Change the URL and/or the token. A new token re-activates an ``auth_failed`` connection:
    replacing the token is how a person answers that state."""
    connection = require_connection(s, name)
    if base_url is not None:
        connection.base_url = _validate_base_url(base_url)
    if token is not None:
        connection.token_encrypted = cipher.encrypt(_validate_token(token))
        if connection.state == "auth_failed":
            connection.state, connection.state_reason = "active", None
    s.flush()
    return connection


def record_poll(s: Session, conn_id: int, at: datetime, status: str) -> None:
    connection = require_connection(s, conn_id)
    connection.last_poll_at = at
    connection.last_poll_status = status[:MAX_REASON_LENGTH]
    s.flush()


def due_connections(s: Session) -> list[Connection]:
    """Active connections in the order of their poll offsets; the scheduler decides timing."""
    query = select(Connection).where(Connection.state == "active")
    return list(s.scalars(query.order_by(Connection.poll_offset_seconds, Connection.id)))
