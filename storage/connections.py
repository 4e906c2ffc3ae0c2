"""Connections: one HipChat base URL plus one encrypted personal access token."""

from __future__ import annotations

import hashlib
import re
from datetime import datetime
from typing import NamedTuple
from urllib.parse import urlsplit

from sqlalchemy import select
from sqlalchemy.orm import Session

from storage.crypto import TokenCipher
from storage.db import translated
from storage.errors import ValidationError
from storage.models import NAME_PATTERN, Connection
from storage.vocabulary import ConnectionState, is_one_of, one_of

DEFAULT_POLL_INTERVAL_SECONDS = 60.0
TOKEN_MAX_CHARS = 256
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


def normalise_base_url(base_url: object) -> str:
    """``http(s)://host[:port][/prefix]`` with no trailing ``/`` or ``/v2``: the one rule for
    a connection's base URL, applied when it is stored and when a client is built.

    The URL is never echoed in the error: a mistyped one may carry credentials."""
    try:
        parts = urlsplit(base_url.strip()) if isinstance(base_url, str) else None
        host = parts.hostname if parts is not None else None
        _ = parts.port if parts is not None else None  # a bad port raises here
    except ValueError:
        parts, host = None, None
    if parts is None or parts.scheme not in ("http", "https") or not host:
        raise ValidationError("bad base URL: expected http(s)://host[/path]")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ValidationError("bad base URL: it must not carry credentials, a query or a fragment")
    if any(c.isspace() or ord(c) < 32 for c in str(base_url).strip()):
        raise ValidationError("bad base URL: it must not contain spaces or control characters")
    path = parts.path.rstrip("/").removesuffix("/v2").rstrip("/")
    return f"{parts.scheme}://{parts.netloc}{path}"


def token_problem(token: object) -> str | None:
    """What is wrong with a personal access token, or None; never quotes the token.

    The one rule for tokens: whitespace or a control character would also make ``requests``
    refuse the header with an error that quotes it."""
    if (
        not isinstance(token, str)
        or not 1 <= len(token) <= TOKEN_MAX_CHARS
        or any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in token)
    ):
        return f"must be 1..{TOKEN_MAX_CHARS} characters without spaces or control characters"
    return None


def validate_token(token: object, what: str = "the token") -> str:
    problem = token_problem(token)
    if problem is not None:
        raise ValidationError(f"{what} {problem}")
    assert isinstance(token, str)
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
        base_url=normalise_base_url(base_url),
        token_encrypted=cipher.encrypt(validate_token(token)),
        state="active",
        poll_offset_seconds=poll_offset_for(name, poll_interval_seconds),
    )
    # The savepoint keeps the caller's transaction usable after a duplicate name.
    duplicate = f"a connection named {name!r} already exists (names are not case-sensitive)"
    with translated(duplicate), s.begin_nested():
        s.add(connection)
    return connection


def get_connection(s: Session, name_or_id: str | int) -> Connection | None:
    """By id (an int), else by name in any case; a string of digits that names nothing is
    tried as an id."""
    if isinstance(name_or_id, int):
        return s.get(Connection, name_or_id)
    query = select(Connection).where(Connection.name_key == name_or_id.lower())
    found = s.scalars(query).one_or_none()
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
    if not is_one_of(ConnectionState, state):
        raise ValidationError(f"bad connection state {state!r}: one of {one_of(ConnectionState)}")
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
        connection.base_url = normalise_base_url(base_url)
    if token is not None:
        connection.token_encrypted = cipher.encrypt(validate_token(token))
        if connection.state == "auth_failed":
            connection.state, connection.state_reason = "active", None
    s.flush()
    return connection


def due_connections(s: Session) -> list[Connection]:
    """Active connections in the order of their poll offsets; the scheduler decides timing."""
    query = select(Connection).where(Connection.state == "active")
    return list(s.scalars(query.order_by(Connection.poll_offset_seconds, Connection.id)))


# -- what beat reads: a few columns through Core, no ORM objects ----------------------------

_TABLE = Connection.__table__


class ConnectionChange(NamedTuple):
    """A connection row as beat's schedule sees it."""

    id: int
    state: str
    poll_offset_seconds: float
    updated_at: datetime


def active_poll_offsets(s: Session) -> dict[int, float]:
    """Every active connection's id and poll offset: beat's full scan, which also notices the
    deletions that ``updated_at`` cannot show."""
    query = select(_TABLE.c.id, _TABLE.c.poll_offset_seconds).where(_TABLE.c.state == "active")
    return dict(s.execute(query).all())


def connection_changes(s: Session, since: datetime) -> list[ConnectionChange]:
    """The connections whose ``updated_at`` is at or after ``since``, in any state."""
    columns = (_TABLE.c.id, _TABLE.c.state, _TABLE.c.poll_offset_seconds, _TABLE.c.updated_at)
    query = select(*columns).where(_TABLE.c.updated_at >= since)
    return [ConnectionChange(*row) for row in s.execute(query)]
