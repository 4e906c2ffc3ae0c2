"""Secrets at rest: Fernet encryption of tokens and webhook secrets, and the key file.

``HIPCHAT_POLLER_SECRET_KEY`` may list several keys separated by commas to rotate keys: the
first encrypts, any of them decrypts. No error message here ever contains a key, a token or
a ciphertext.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from storage.errors import ValidationError

KEY_FILENAME = "secret.key"
DECRYPT_FAILED = "cannot decrypt stored secret: wrong HIPCHAT_POLLER_SECRET_KEY?"


def generate_key() -> str:
    """A new random Fernet key (urlsafe base64 of 32 bytes)."""
    return Fernet.generate_key().decode("ascii")


class TokenCipher:
    """Encrypts and decrypts short secrets; text in, text out."""

    def __init__(self, key: str) -> None:
        keys = [part.strip() for part in key.split(",") if part.strip()]
        try:
            self._fernet = MultiFernet([Fernet(k.encode("ascii")) for k in keys])
        except (ValueError, TypeError, UnicodeEncodeError) as exc:
            raise ValidationError(
                "HIPCHAT_POLLER_SECRET_KEY is not a valid Fernet key "
                "(urlsafe base64 of 32 bytes; generate one with storage.crypto.generate_key())"
            ) from exc

    def __repr__(self) -> str:
        return "TokenCipher(<key hidden>)"

    def encrypt(self, plaintext: str) -> str:
        return self._fernet.encrypt(plaintext.encode("utf-8")).decode("ascii")

    def decrypt(self, ciphertext: str) -> str:
        try:
            return self._fernet.decrypt(ciphertext.encode("ascii")).decode("utf-8")
        except (InvalidToken, UnicodeError) as exc:
            raise ValidationError(DECRYPT_FAILED) from exc

    def rotate(self, ciphertext: str) -> str:
        """Re-encrypt with the first key (after adding a new key in front of the old ones)."""
        try:
            return self._fernet.rotate(ciphertext.encode("ascii")).decode("ascii")
        except (InvalidToken, UnicodeError) as exc:
            raise ValidationError(DECRYPT_FAILED) from exc


def load_or_create_key(data_dir: str | os.PathLike[str]) -> str:
    """The key in ``data_dir/secret.key``, created with mode 0600 if it does not exist yet.

    Creation is atomic and race-free: the key is written to a private temporary file and
    hard-linked into place, which fails if another process got there first; then everyone
    reads the one file that won.
    """
    directory = Path(data_dir).expanduser()
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = directory / KEY_FILENAME
    if not path.exists():
        _create_key_file(path)
    key = path.read_text(encoding="ascii").strip()
    if not key:
        raise ValidationError(f"the key file {path} is empty: restore it or remove it")
    return key


def _create_key_file(path: Path) -> None:
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="ascii") as handle:
            handle.write(generate_key() + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        with contextlib.suppress(FileExistsError):  # another process won the race: fine
            os.link(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
