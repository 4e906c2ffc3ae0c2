"""A webhook receiver that can hold a request, for the fault suite (``tests/test_faults.py``).

:class:`HoldingReceiver` is the e2e receiver (:class:`tests.e2e_support.WebhookReceiver`:
every POST recorded, signatures checked) plus ``hold(path)``: a POST to that path waits,
unanswered, until ``release(path)``; one whose sender goes away meanwhile (a worker killed
mid-delivery) is recorded as abandoned (:data:`ABANDONED`), never as accepted: the receiver had
not acted on it, so its redelivery is not a second acceptance of its idempotency key.
"""

from __future__ import annotations

import io
import select
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler

from tests.e2e_support import Delivery, WebhookReceiver

ABANDONED = 499  # what the receiver records for a held POST whose sender went away


class HoldingReceiver(WebhookReceiver):
    """``receiver.hold("/c2")``: POSTs to ``/c2`` wait until ``receiver.release("/c2")``."""

    def __init__(self) -> None:
        super().__init__()
        self._held: dict[str, threading.Event] = {}
        self._waiting: set[str] = set()  # held paths with a POST waiting now
        self._server.RequestHandlerClass = self._handler()
        # A sender killed while we held its request: nothing to answer, nothing to report.
        self._server.handle_error = lambda request, address: None  # type: ignore[method-assign]

    def hold(self, path: str) -> None:
        """POSTs to ``path`` wait (unanswered) from now until :meth:`release`."""
        with self._lock:
            self._held[path] = threading.Event()

    def release(self, path: str) -> None:
        with self._lock:
            gate = self._held.pop(path, None)
        if gate is not None:
            gate.set()

    def holding(self, path: str) -> bool:
        """True while a POST to ``path`` waits (it has arrived and is held)."""
        with self._lock:
            return path in self._waiting

    def _wait(self, path: str, peer: socket.socket) -> bool:
        """Hold the request while ``path`` is held: True to answer it, False if the sender
        went away meanwhile."""
        with self._lock:
            gate = self._held.get(path)
            if gate is None:
                return True
            self._waiting.add(path)
        try:
            while not gate.wait(0.05):
                if _closed(peer):
                    return False
            return not _closed(peer)
        finally:
            with self._lock:
                self._waiting.discard(path)

    def _abandoned(self, path: str, headers: dict[str, str], body: bytes) -> None:
        with self._lock:
            self._deliveries.append(Delivery(path, headers, body, None, time.time(), ABANDONED))

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        """The e2e receiver's handler, which first waits while the path is held."""
        receiver, base = self, self._server.RequestHandlerClass

        class Holding(base):  # type: ignore[valid-type,misc]
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if not receiver._wait(self.path, self.connection):
                    headers = {k.lower(): v for k, v in self.headers.items()}
                    receiver._abandoned(self.path, headers, body)
                    self.close_connection = True
                    return
                rfile, self.rfile = self.rfile, io.BytesIO(body)  # the body, read again
                try:
                    super().do_POST()
                finally:
                    self.rfile = rfile  # the connection's next request (keep-alive)

        return Holding


def _closed(peer: socket.socket) -> bool:
    """True when the other end closed the connection (the request body is already read)."""
    try:
        readable, _, _ = select.select([peer], [], [], 0)
        return bool(readable) and peer.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True
