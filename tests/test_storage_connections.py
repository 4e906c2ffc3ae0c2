"""storage.connections on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from sqlalchemy import func, select, text

from storage import connections as conns
from storage import outbox, subscriptions, watermarks
from storage.crypto import TokenCipher, generate_key
from storage.db import Database
from storage.errors import ValidationError
from storage.models import Connection, OutboxEvent, Subscription, Watermark

TOKEN = "personal-access-token-0123456789"


def test_token_is_encrypted_at_rest_and_round_trips(db: Database, cipher: TokenCipher) -> None:
    with db.session() as s:
        added = conns.add_connection(s, "prod", "https://hipchat.example/", TOKEN, cipher)
    with db.session() as s:
        raw = s.execute(text("SELECT token_encrypted FROM connections")).scalar_one()
        assert TOKEN not in raw
        found = conns.get_connection(s, "prod")
        assert found is not None
        assert conns.decrypt_token(found, cipher) == TOKEN
        assert found.base_url == "https://hipchat.example"  # trailing slash dropped
    assert TOKEN not in repr(added)
    assert added.token_encrypted not in repr(added)


def test_wrong_key_cannot_read_the_token(db: Database, conn: Connection) -> None:
    with pytest.raises(ValidationError, match="wrong HIPCHAT_POLLER_SECRET_KEY"):
        conns.decrypt_token(conn, TokenCipher(generate_key()))


def test_duplicate_name_is_refused_and_the_session_stays_usable(
    db: Database, conn: Connection, cipher: TokenCipher
) -> None:
    with db.session() as s:
        with pytest.raises(ValidationError, match="a connection named 'main' already exists"):
            conns.add_connection(s, "main", "https://other.example", "t2", cipher)
        conns.add_connection(s, "second", "https://other.example", "t2", cipher)
    with db.session() as s:
        assert [c.name for c in conns.list_connections(s)] == ["main", "second"]


@pytest.mark.parametrize("name", ["", "a b", "x" * 65, "naïve", "slash/es", "new\nline"])
def test_bad_names_are_refused(db: Database, cipher: TokenCipher, name: str) -> None:
    with pytest.raises(ValidationError, match="bad connection name"), db.session() as s:
        conns.add_connection(s, name, "https://h.example", TOKEN, cipher)


@pytest.mark.parametrize("url", ["", "ftp://h.example", "h.example", "https://h.example/?q=1"])
def test_bad_base_urls_are_refused(db: Database, cipher: TokenCipher, url: str) -> None:
    with pytest.raises(ValidationError, match="bad base URL"), db.session() as s:
        conns.add_connection(s, "ok", url, TOKEN, cipher)


@pytest.mark.parametrize("token", ["", "   ", "two words"])
def test_bad_tokens_are_refused_without_echo(db: Database, cipher: TokenCipher, token: str) -> None:
    with pytest.raises(ValidationError, match="the token must be") as caught, db.session() as s:
        conns.add_connection(s, "ok", "https://h.example", token, cipher)
    assert "two words" not in str(caught.value)


def test_get_by_name_id_and_digit_string(db: Database, cipher: TokenCipher) -> None:
    with db.session() as s:
        first = conns.add_connection(s, "alpha", "https://h.example", TOKEN, cipher)
        digits = conns.add_connection(s, "12345", "https://h.example", TOKEN, cipher)
    with db.session() as s:
        assert conns.get_connection(s, first.id) is not None
        assert conns.get_connection(s, "alpha") is not None
        assert conns.require_connection(s, str(first.id)).name == "alpha"
        assert conns.require_connection(s, "12345").id == digits.id  # a name before an id
        assert conns.get_connection(s, "nope") is None
        with pytest.raises(ValidationError, match="no connection 'nope'"):
            conns.require_connection(s, "nope")


def test_poll_offset_is_stable_and_within_the_interval(db: Database, cipher: TokenCipher) -> None:
    # Literal values: a change of the derivation moves every stored connection's polls.
    assert conns.poll_offset_for("main") == 3.1478135924081876
    assert conns.poll_offset_for("main", 10.0) == 0.5246355987346979
    offsets = {conns.poll_offset_for(f"c{i}") for i in range(50)}
    assert len(offsets) == 50
    assert all(0 <= o < 60 for o in offsets)
    with db.session() as s:
        added = conns.add_connection(s, "main", "https://h.example", TOKEN, cipher)
    assert added.poll_offset_seconds == conns.poll_offset_for("main")


def test_states_and_due_connections(db: Database, cipher: TokenCipher) -> None:
    with db.session() as s:
        ids = {n: conns.add_connection(s, n, "https://h.example", TOKEN, cipher).id for n in "abcd"}
        conns.set_connection_state(s, ids["b"], "paused", "paused by an operator")
        conns.set_connection_state(s, ids["c"], "auth_failed", "401 from HipChat")
    with db.session() as s:
        due = conns.due_connections(s)
        assert {c.name for c in due} == {"a", "d"}
        assert [c.poll_offset_seconds for c in due] == sorted(c.poll_offset_seconds for c in due)
        paused = conns.require_connection(s, "b")
        assert (paused.state, paused.state_reason) == ("paused", "paused by an operator")
        resumed = conns.set_connection_state(s, ids["b"], "active")
        assert resumed.state_reason is None
        with pytest.raises(ValidationError, match="bad connection state"):
            conns.set_connection_state(s, ids["a"], "sleeping")


def test_update_connection_and_a_new_token_clears_auth_failed(
    db: Database, conn: Connection, cipher: TokenCipher
) -> None:
    with db.session() as s:
        conns.set_connection_state(s, conn.id, "auth_failed", "401")
        conns.update_connection(s, "main", cipher=cipher, base_url="http://new.example/api/")
        unchanged = conns.require_connection(s, "main")
        assert unchanged.state == "auth_failed"  # a new URL alone does not answer a 401
        updated = conns.update_connection(s, "main", cipher=cipher, token="fresh-token")
        assert (updated.state, updated.state_reason) == ("active", None)
    with db.session() as s:
        found = conns.require_connection(s, conn.id)
        assert found.base_url == "http://new.example/api"
        assert conns.decrypt_token(found, cipher) == "fresh-token"
        assert found.updated_at >= conn.updated_at


def test_remove_connection_cascades(db: Database, conn: Connection) -> None:
    with db.session() as s:
        sub = subscriptions.add_subscription(
            s, conn.id, "room_message", room="Dev", target_kind="log", target={}
        )
        watermarks.advance_watermark(s, conn.id, 1, "history", "m", datetime.now(UTC))
        outbox.add_events(s, [outbox.NewEvent(conn.id, sub.id, "k", "room_message", {})])
    with db.session() as s:
        assert conns.remove_connection(s, "main") is True
        assert conns.remove_connection(s, "main") is False
    with db.session() as s:
        for model in (Connection, Subscription, Watermark, OutboxEvent):
            assert s.scalar(select(func.count()).select_from(model)) == 0
