"""A strict-enough ``multipart/related`` reader for ``share/file`` (reference §4.12).

Parts may carry ``Content-Transfer-Encoding: base64`` (what hipchat-go and hipchat-rb sent)
or raw bytes (the official example); both are decoded to the file's bytes.
"""

from __future__ import annotations

import base64
import binascii
import email
from dataclasses import dataclass
from email.message import Message as MimeHeaders

from emulator.errors import BadRequestError

MULTIPART_TYPES = ("multipart/related", "multipart/form-data", "multipart/mixed")


@dataclass(frozen=True)
class Part:
    headers: MimeHeaders
    content: bytes

    @property
    def name(self) -> str | None:
        return _text(self.headers.get_param("name", header="content-disposition"))

    @property
    def filename(self) -> str | None:
        name = self.headers.get_filename()
        return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace") if name else None

    @property
    def content_type(self) -> str:
        return self.headers.get_content_type()


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _headers(raw: bytes) -> MimeHeaders:
    return email.message_from_bytes(raw + b"\r\n\r\n")


def parse_multipart(content_type: str, body: bytes) -> list[Part]:
    outer = _headers(f"Content-Type: {content_type}".encode("latin-1", "replace"))
    boundary = _text(outer.get_param("boundary"))
    if outer.get_content_type() not in MULTIPART_TYPES or not boundary:
        raise BadRequestError("Expected a multipart/related body with a boundary")
    # Prefixing CRLF lets the first delimiter match like the others: CRLF "--" boundary.
    chunks = (b"\r\n" + body).split(b"\r\n--" + boundary.encode("latin-1"))
    parts: list[Part] = []
    for chunk in chunks[1:]:
        if chunk.startswith(b"--"):
            break
        _, newline, rest = chunk.partition(b"\r\n")  # the rest of the delimiter line
        if not newline:
            raise BadRequestError("Malformed multipart body")
        if rest.startswith(b"\r\n"):
            head, content = b"", rest[2:]
        else:
            head, sep, content = rest.partition(b"\r\n\r\n")
            if not sep:
                raise BadRequestError("Malformed multipart part headers")
        headers = _headers(head)
        if headers.get("content-transfer-encoding", "").strip().lower() == "base64":
            try:
                content = base64.b64decode(b"".join(content.split()), validate=True)
            except binascii.Error:
                raise BadRequestError("A base64 part is not valid base64") from None
        parts.append(Part(headers, content))
    if not parts:
        raise BadRequestError("The multipart body has no parts")
    return parts
