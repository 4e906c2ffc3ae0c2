"""storage.crypto: Fernet round trips, clear errors that leak nothing, the key file."""

from __future__ import annotations

import stat
import threading
from pathlib import Path

import pytest

from storage.crypto import (
    DECRYPT_FAILED,
    KEY_FILENAME,
    TokenCipher,
    generate_key,
    load_or_create_key,
)
from storage.errors import ValidationError

TOKEN = "s3cr3t-personal-access-token"


def test_round_trip_and_ciphertext_hides_the_token() -> None:
    cipher = TokenCipher(generate_key())
    encrypted = cipher.encrypt(TOKEN)
    assert TOKEN not in encrypted
    assert encrypted != cipher.encrypt(TOKEN)  # random IV: equal tokens do not look equal
    assert cipher.decrypt(encrypted) == TOKEN
    assert cipher.decrypt(cipher.encrypt("ünïcødé")) == "ünïcødé"


@pytest.mark.parametrize("ciphertext", ["garbage", "", "gAAAAA" + "A" * 80, "ü"])
def test_wrong_key_or_bad_ciphertext_is_a_clear_error(ciphertext: str) -> None:
    with pytest.raises(ValidationError) as caught:
        TokenCipher(generate_key()).decrypt(ciphertext)
    assert str(caught.value) == DECRYPT_FAILED


def test_a_different_key_cannot_decrypt_and_the_message_leaks_nothing() -> None:
    key, other = generate_key(), generate_key()
    encrypted = TokenCipher(key).encrypt(TOKEN)
    with pytest.raises(ValidationError) as caught:
        TokenCipher(other).decrypt(encrypted)
    text = str(caught.value)
    assert text == "cannot decrypt stored secret: wrong HIPCHAT_POLLER_SECRET_KEY?"
    for secret in (TOKEN, key, other, encrypted):
        assert secret not in text


@pytest.mark.parametrize("key", ["", "short", "x" * 44, "not base64 at all!"])
def test_an_invalid_key_is_refused_without_echoing_it(key: str) -> None:
    with pytest.raises(ValidationError, match="not a valid Fernet key") as caught:
        TokenCipher(key)
    if key:
        assert key not in str(caught.value)


def test_rotation_with_several_keys() -> None:
    old, new = generate_key(), generate_key()
    legacy = TokenCipher(old).encrypt(TOKEN)
    both = TokenCipher(f"{new}, {old}")
    assert both.decrypt(legacy) == TOKEN
    rotated = both.rotate(legacy)
    assert TokenCipher(new).decrypt(rotated) == TOKEN
    assert TokenCipher(new).decrypt(both.encrypt(TOKEN)) == TOKEN


def test_repr_hides_the_key() -> None:
    key = generate_key()
    assert key not in repr(TokenCipher(key))


def test_load_or_create_key_creates_a_private_file_once(tmp_path: Path) -> None:
    data_dir = tmp_path / "state" / "nested"
    key = load_or_create_key(data_dir)
    path = data_dir / KEY_FILENAME
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_key(data_dir) == key
    assert TokenCipher(key).decrypt(TokenCipher(key).encrypt("x")) == "x"
    assert [p.name for p in data_dir.iterdir()] == [KEY_FILENAME]  # no temporary left over


def test_load_or_create_key_keeps_an_existing_key(tmp_path: Path) -> None:
    key = generate_key()
    (tmp_path / KEY_FILENAME).write_text(key + "\n")
    assert load_or_create_key(tmp_path) == key


def test_load_or_create_key_refuses_an_empty_file(tmp_path: Path) -> None:
    (tmp_path / KEY_FILENAME).write_text("\n")
    with pytest.raises(ValidationError, match="empty"):
        load_or_create_key(tmp_path)


def test_concurrent_creators_agree_on_one_key(tmp_path: Path) -> None:
    barrier = threading.Barrier(8)
    keys: list[str] = []

    def create() -> None:
        barrier.wait()
        keys.append(load_or_create_key(tmp_path))

    threads = [threading.Thread(target=create) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(keys) == 8
    assert len(set(keys)) == 1
    assert [p.name for p in tmp_path.iterdir()] == [KEY_FILENAME]
