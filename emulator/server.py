"""The HTTP front door: a stdlib ``ThreadingHTTPServer`` speaking HTTP/1.1 keep-alive.

Every ``/v2`` request runs one pipeline (:meth:`_Handler._v2`): take any injected fault,
count the call against the token's rate window, answer (fault, 429 or the real handler),
mangle the body if a fault says so, add ``X-Ratelimit-*``, log the call. ``/_emulator``
requests go to :mod:`emulator.control` and are neither rate-limited nor logged.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import sys
import threading
import time
import traceback
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, quote, unquote

from emulator import control
from emulator.calllog import CallRecord
from emulator.errors import error_envelope, reason_phrase
from emulator.faults import MALFORMED_BODY, truncate
from emulator.routing import dispatch
from emulator.state import EmulatorState
from emulator.wire import Request, Response, error_response, json_response

RATE_MESSAGE = "Rate Limit exceeded"
_PATH_SAFE = "/%:@!$&'()*+,;=-._~"  # keep what was sent; only raw non-ASCII gets encoded


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "HipChatEmulator/1.0"
    sys_version = ""
    disable_nagle_algorithm = True  # headers and body go out in two writes
    server: _HTTPServer

    def version_string(self) -> str:
        return self.server_version

    def log_message(self, format: str, *args: Any) -> None:
        """Silent: per-request logging would cost more than answering."""

    def do_GET(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        self._serve()

    def do_PUT(self) -> None:
        self._serve()

    def do_DELETE(self) -> None:
        self._serve()

    def do_PATCH(self) -> None:
        self._serve()

    def do_HEAD(self) -> None:  # no route takes HEAD: a 405 (headers only) on known paths
        self._serve()

    def do_OPTIONS(self) -> None:
        self._serve()

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Used by http.server for requests it cannot parse (a raw space in the path gives
        400 here, as HipChat did). Answers with the JSON envelope and closes; never echoes
        the request line, which may carry a token."""
        text = (message or reason_phrase(code)).split(" (")[0]
        body = json_response(code, error_envelope(code, text)).body
        self.close_connection = True
        self.send_response(code)
        self.send_header("Connection", "close")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    # -- request and response --------------------------------------------------------------

    def _serve(self) -> None:
        try:
            req = self._request()
        except ValueError:
            self.send_error(400, "Bad request body framing")
            return
        head = req.segments[0] if req.segments else ""
        if head == "v2":
            response = self._v2(req)
        elif head == "_emulator":
            response = self._guarded(lambda: control.handle(self.server.state, req))
        else:
            response = error_response(404, "Resource not found")
        if response is None:
            self._reset()
        else:
            self._write(response)

    def _request(self) -> Request:
        raw_path, _, raw_query = self.path.partition("?")
        with contextlib.suppress(UnicodeError):  # http.server decoded it as latin-1
            raw_path = raw_path.encode("latin-1").decode("utf-8")
        parts = raw_path.split("/")[1:]
        if parts and not parts[-1]:
            parts.pop()  # a trailing slash
        query: dict[str, str] = {}
        for key, value in parse_qsl(raw_query, keep_blank_values=True):
            query.setdefault(key, value)
        host = self.headers.get("Host")
        return Request(
            method=self.command,
            raw_path=quote(raw_path, safe=_PATH_SAFE),
            segments=tuple(unquote(p) for p in parts),
            query=query,
            body=self._body(),
            content_type=self.headers.get("Content-Type", ""),
            authorization=self.headers.get("Authorization"),
            base=f"http://{host}" if host else self.server.base_url,
        )

    def _body(self) -> bytes:
        length = self.headers.get("Content-Length")
        if length is not None:
            size = int(length)
            if size < 0:
                raise ValueError("negative Content-Length")
            return self.rfile.read(size)
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline().strip():  # trailers
                pass
            return b"".join(chunks)
        return b""

    def _write(self, response: Response) -> None:
        """Status line, headers and body in one write: one segment, one syscall."""
        status = response.status
        lines = [
            f"{self.protocol_version} {status} {reason_phrase(status)}",
            f"Server: {self.server_version}",
            f"Date: {self.date_time_string()}",
            *(f"{name}: {value}" for name, value in response.headers.items()),
        ]
        body = b""
        if status != 204:  # a 204 has no body and, per RFC 9110, no Content-Length
            if response.body:
                lines.append(f"Content-Type: {response.content_type}")
            lines.append(f"Content-Length: {len(response.body)}")
            body = b"" if self.command == "HEAD" else response.body
        if self.close_connection:
            lines.append("Connection: close")
        self.wfile.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)

    def _reset(self) -> None:
        """Drop the connection with a TCP RST and no answer."""
        self.close_connection = True
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.connection.close()

    def _guarded(self, answer: Callable[[], Response]) -> Response:
        try:
            return answer()
        except Exception:  # noqa: BLE001 - a bug in the emulator must still answer, loudly
            traceback.print_exc(file=sys.stderr)
            return error_response(500, "Internal emulator error")

    # -- the /v2 pipeline ------------------------------------------------------------------

    def _v2(self, req: Request) -> Response | None:
        state = self.server.state
        now = state.now()
        token = req.token
        fault, reset_seconds = state.take_fault(req.method, req.raw_path)
        kind = fault.kind if fault else None
        if fault and kind == "reset":
            self._log(req, token, 0, now, None)
            return None
        if fault and kind == "delay":
            time.sleep(fault.delay_seconds)
        with state.lock:
            window = state.rate.hit(token or "", now)
        if fault and kind == "status":
            response = error_response(fault.status, reason_phrase(fault.status))
        elif kind == "rate_limit" or not window.allowed:
            window = window.exhausted()
            response = error_response(429, RATE_MESSAGE)
        else:
            response = self._guarded(lambda: dispatch(state, req, now))
        if kind == "malformed_json":
            response.status, response.body = 200, MALFORMED_BODY
        elif kind == "truncated_json":
            response.status, response.body = 200, truncate(response.body)
        rate_headers = window.headers("X-Ratelimit", reset_seconds=reset_seconds)
        response.headers.update(rate_headers)
        self._log(req, token, response.status, now, rate_headers["X-Ratelimit-Reset"])
        return response

    def _log(
        self, req: Request, token: str | None, status: int, now: float, reset: str | None
    ) -> None:
        query = {k: v for k, v in req.query.items() if k != "auth_token"}
        record = CallRecord(token, req.method, req.raw_path, query, status, now, reset)
        self.server.state.record_call(record)


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # idle keep-alive connections must not hold up stop()
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], state: EmulatorState) -> None:
        self.state = state
        self.base_url = ""
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls socket.getfqdn(), a reverse DNS lookup that can take
        # seconds; the emulator never needs the name.
        self.socket.bind(self.server_address)
        self.server_address = self.socket.getsockname()
        host, port = self.socket.getsockname()[:2]
        self.server_name, self.server_port = str(host), int(port)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that went away (a timeout during a delay fault, a stop()) is normal.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)

    def get_request(self) -> tuple[socket.socket, Any]:
        conn, address = super().get_request()
        with self._open_lock:
            self._open.add(conn)
        return conn, address

    def shutdown_request(self, request: Any) -> None:
        with self._open_lock:
            self._open.discard(request)
        super().shutdown_request(request)

    def drop_connections(self) -> None:
        with self._open_lock:
            conns = list(self._open)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)


class EmulatorServer:
    """A HipChat API v2 emulator on ``host:port`` (``port=0`` picks a free port).

    ``clock`` returns epoch seconds (default :func:`time.time`); it dates messages, drives
    the rate and flood windows and stamps the call log, so tests can control time.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        admin_token: str = "admin-token",  # noqa: S107 - a fixture value, not a secret
        seed: bool = True,
        rate_limit: int = 100,
        rate_window_seconds: float = 300.0,
        flood_limit: int = 30,
        flood_window_seconds: float = 60.0,
        case_insensitive_rooms: bool = False,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.host, self._port = host, port
        self.state = EmulatorState(
            admin_token=admin_token,
            seed=seed,
            rate_limit=rate_limit,
            rate_window_seconds=rate_window_seconds,
            flood_limit=flood_limit,
            flood_window_seconds=flood_window_seconds,
            case_insensitive_rooms=case_insensitive_rooms,
            clock=clock,
        )
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def admin_token(self) -> str:
        return self.state.admin_token

    @property
    def port(self) -> int:
        """The bound port once started (``port=0`` resolved); stays the same after stop()."""
        return self._port

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> EmulatorServer:
        if self._httpd is not None:
            return self
        self._httpd = _HTTPServer((self.host, self._port), self.state)
        self._port = self._httpd.server_port
        self._httpd.base_url = self.state.base_url = self.base_url
        # A short poll interval keeps stop() fast; the idle wake-ups cost nothing measurable.
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.01},
            name=f"hipchat-emulator-{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.drop_connections()
        httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> EmulatorServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
