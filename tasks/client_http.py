"""The one choke point every HipChat request passes through (used by :mod:`tasks.client`).

:meth:`HttpCore.request` calls the ``before_request`` hook (the shared call budget), sends
the request with timeouts through one pooled :class:`requests.Session`, reads the rate-limit
headers, logs one DEBUG line, and translates every failure into :mod:`storage.errors`, here and
nowhere else::

    requests.Timeout / ConnectionError / ChunkedEncodingError  -> TransportError
    other requests errors (bad URL or header)                   -> ValidationError
    400, 405 and any other 4xx                                  -> BadRequest
    401 -> AuthFailed      403 -> Forbidden      404 -> NotFound
    429 (X-Ratelimit-Reset / X-FloodControl-Reset, else 60 s)   -> RateLimited
    5xx (Retry-After honoured, else 5 s)                        -> ServerError
    2xx whose body is not the JSON we expect                    -> MalformedResponse
    3xx (redirects are not followed: wrong base URL)            -> NeedsAttention

Every message names the method and the path without its query string. The token travels
only in the ``Authorization: Bearer`` header, never in a URL, and the text of ``requests``
exceptions (which quotes URLs and header values) is never echoed. The transport is injected
through ``session``: tests mount a fake :class:`requests.adapters.BaseAdapter`.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cache, lru_cache
from http.cookiejar import DefaultCookiePolicy
from importlib.metadata import PackageNotFoundError, version
from typing import Any, TypeVar
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter
from requests.utils import get_environ_proxies

from storage.connections import normalise_base_url, validate_token
from storage.errors import (
    AuthFailed,
    BadRequest,
    Forbidden,
    HipChatPollerError,
    MalformedResponse,
    NeedsAttention,
    NotFound,
    RateLimited,
    ServerError,
    TransportError,
    ValidationError,
)
from tasks import metrics
from tasks.hipchat_types import RateLimitInfo
from tasks.pagination import same_origin_url
from tasks.ratelimit_headers import parse_rate_limit, retry_after_seconds, too_many_requests

log = logging.getLogger("tasks.client")
T = TypeVar("T")

# Connections kept open per host: at least the threads of a `-P threads` worker that may call
# one HipChat server at once (a connection beyond it is opened, used and closed).
POOL_MAXSIZE = 32
DEFAULT_SERVER_RETRY_SECONDS = 5.0
DEFAULT_TRANSPORT_RETRY_SECONDS = 5.0
_SERVER_TEXT_MAX_CHARS = 200
_TRANSPORT_ERRORS = (
    requests.Timeout,
    requests.ConnectionError,
    requests.exceptions.ChunkedEncodingError,
    requests.exceptions.ContentDecodingError,
)
_STATUS_ERRORS: dict[int, type[AuthFailed | Forbidden | NotFound]] = {
    401: AuthFailed,
    403: Forbidden,
    404: NotFound,
}


@cache
def default_user_agent() -> str:
    try:
        release = version("hipchat-poller")
    except PackageNotFoundError:  # a source tree that was never pip-installed
        release = "0+unknown"
    return f"hipchat-poller/{release} (+python-requests)"


@dataclass(frozen=True, slots=True)
class Reply:
    """A 2xx response: its decoded JSON body (``None`` when empty) and ``where`` it came from,
    as ``"GET /v2/room"``, for error messages."""

    status: int
    body: Any
    where: str


def _check_timeout(timeout: tuple[float, float]) -> tuple[float, float]:
    try:
        connect, read = (float(part) for part in timeout)
    except (TypeError, ValueError):
        raise ValidationError("timeout must be a (connect, read) pair of seconds") from None
    if not (connect > 0 and read > 0):
        raise ValidationError("timeout seconds must be > 0")
    return connect, read


def new_session(pool_maxsize: int = POOL_MAXSIZE) -> requests.Session:
    """A pooled session that keeps no cookies: one session serves every connection of a
    worker process (keep-alive across polls), and one token's cookies must never ride along
    with another's request.

    It does not read the environment on each request (``trust_env``): that walks every
    environment variable twice per call (a tenth of a quiet poll's CPU) and would let a
    ``~/.netrc`` entry replace the Bearer token. :func:`send` applies the environment's
    proxies and CA bundle instead, read once per origin (:func:`environment_settings`)."""
    session = requests.Session()
    session.trust_env = False
    session.cookies.set_policy(DefaultCookiePolicy(allowed_domains=[]))
    # max_retries=0: a hidden retry would spend another call of the shared budget behind
    # the caller's back; every RetryLater carries retry_after so the caller decides.
    adapter = HTTPAdapter(pool_connections=16, pool_maxsize=pool_maxsize, max_retries=0)
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    return session


class HttpCore:
    """Sends requests for one base URL and one token. Safe to share between threads."""

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        timeout: tuple[float, float],
        session: requests.Session | None,
        user_agent: str | None,
        before_request: Callable[[], None] | None,
        on_rate_limit: Callable[[RateLimitInfo], None] | None,
        on_refused: Callable[[float], None] | None = None,
    ) -> None:
        self.base_url = normalise_base_url(base_url)
        self.api_url = self.base_url + "/v2"
        self._token = validate_token(token)
        self._timeout = _check_timeout(timeout)
        self._before_request = before_request
        self._on_rate_limit = on_rate_limit
        self._on_refused = on_refused
        self.last_rate_limit: RateLimitInfo | None = None
        self._owns_session = session is None
        self._session = session if session is not None else new_session()
        self._headers = {
            "Authorization": f"Bearer {self._token}",
            "Accept": "application/json",
            "User-Agent": user_agent or default_user_agent(),
        }

    def __repr__(self) -> str:
        return f"HttpCore({self.base_url!r})"

    def close(self) -> None:
        """Close the session if we created it; an injected session belongs to the caller."""
        if self._owns_session:
            self._session.close()

    def request(
        self,
        method: str,
        target: str,
        *,
        params: Mapping[str, str | int] | None = None,
        json_body: Any = None,
        data: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Reply:
        """Send one request. ``target`` is an API path (``/room``) or a ``links.next`` URL."""
        url = same_origin_url(target, self.base_url) if "://" in target else self.api_url + target
        where = f"{method} {urlsplit(url).path}"
        if self._before_request is not None:
            self._before_request()  # may raise BucketEmpty: it reaches the caller untouched
        response = send(
            self._session,
            method,
            url,
            where=where,
            params=params,
            json=json_body,
            data=data,
            headers={**self._headers, **headers} if headers else self._headers,
            timeout=self._timeout,
        )
        self._note_rate_limit(response)
        if not 200 <= response.status_code < 300:
            raise self._status_error(response, where)
        return Reply(response.status_code, _decode(response, where), where)

    @staticmethod
    def parse(reply: Reply, parse: Callable[[Any], T], *value: Any) -> T:
        """Run a :mod:`tasks.hipchat_types` parser on ``value`` (default: the whole body),
        prefixing its :class:`MalformedResponse` with the call."""
        try:
            return parse(value[0] if value else reply.body)
        except MalformedResponse as exc:
            raise MalformedResponse(f"{reply.where}: {exc}") from exc

    def _note_rate_limit(self, response: requests.Response) -> None:
        info = parse_rate_limit(response.headers, time.time())
        if info is None:
            return
        self.last_rate_limit = info
        if self._on_rate_limit is not None:
            self._on_rate_limit(info)

    def _server_text(self, response: requests.Response) -> str:
        """The envelope's ``error.message``, trimmed and scrubbed of the token, just in case."""
        try:
            error = json.loads(response.content).get("error")
            text = error.get("message") if isinstance(error, dict) else None
        except (ValueError, AttributeError):
            text = None
        if not isinstance(text, str) or not text:
            text = response.reason or "no error message"
        text = " ".join(text.replace(self._token, "[token]").split())
        return text[:_SERVER_TEXT_MAX_CHARS]

    def _status_error(self, response: requests.Response, where: str) -> HipChatPollerError:
        status, now = response.status_code, time.time()
        text = f"{where}: HTTP {status}: {self._server_text(response)}"
        if status == 429:
            wait, flood = too_many_requests(response.headers, now)
            metrics.rate_limited(flood)
            if not flood and self._on_refused is not None:
                # HipChat's word wins: no call of this connection until its reset, from any
                # worker (flood control is one room's send limit: the caller waits alone).
                self._on_refused(now + wait)
            kind = "flood control" if flood else "rate limit"
            return RateLimited(f"{text} ({kind}, retry in {wait:.0f} s)", wait, flood_control=flood)
        if status >= 500:
            after = retry_after_seconds(response.headers, now)
            return ServerError(
                text, status, DEFAULT_SERVER_RETRY_SECONDS if after is None else after
            )
        if status in _STATUS_ERRORS:
            return _STATUS_ERRORS[status](text, status)
        if 400 <= status < 500:
            return BadRequest(text, status)
        return NeedsAttention(f"{text} (redirected or unexpected: check the base URL)", status)


def send(
    session: requests.Session,
    method: str,
    url: str,
    *,
    where: str,
    peer: str = "hipchat",
    transport_retry_after: float = DEFAULT_TRANSPORT_RETRY_SECONDS,
    **options: Any,
) -> requests.Response:
    """One request through ``requests``, never following a redirect: the one place where
    ``requests``' errors are translated (HipChat calls and webhook deliveries both pass here).

    A redirect hop would be a request that skipped the caller's checks (the call budget, a
    webhook's signature on the right URL); a 3xx is the caller's to judge. ``where`` names the
    request in messages (method and path, never a query string: it may hold a secret);
    ``peer`` starts its DEBUG line."""
    started = time.perf_counter()
    if not session.trust_env:
        proxies, verify = environment_settings(*urlsplit(url)[:2])
        options.setdefault("proxies", proxies)
        options.setdefault("verify", verify)
    try:
        response = session.request(method, url, allow_redirects=False, **options)
    except _TRANSPORT_ERRORS as exc:
        _log(peer, where, type(exc).__name__, started)
        raise TransportError(f"{where}: {_describe(exc)}", transport_retry_after) from exc
    except requests.RequestException as exc:
        _log(peer, where, type(exc).__name__, started)
        # Their text may quote a URL or a header value: name only the kind, drop the cause.
        raise ValidationError(
            f"{where}: request refused by requests ({type(exc).__name__})"
        ) from None
    _log(peer, where, response.status_code, started)
    return response


@lru_cache(maxsize=1024)
def environment_settings(scheme: str, netloc: str) -> tuple[dict[str, str], bool | str]:
    """What ``requests`` would take from the environment for this origin, read once per
    process: the proxies (``HTTPS_PROXY``, ``NO_PROXY``...) and the CA bundle
    (``REQUESTS_CA_BUNDLE``, ``CURL_CA_BUNDLE``)."""
    proxies = get_environ_proxies(f"{scheme}://{netloc}/")
    bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
    return proxies, bundle or True


def _log(peer: str, where: str, outcome: int | str, started: float) -> None:
    elapsed_ms = (time.perf_counter() - started) * 1000.0
    metrics.http_call(peer, outcome, elapsed_ms / 1000.0)
    log.debug("%s %s -> %s in %.1f ms", peer, where, outcome, elapsed_ms)


def _describe(exc: requests.RequestException) -> str:
    if isinstance(exc, requests.ConnectTimeout):
        kind = "connect timed out"
    elif isinstance(exc, requests.Timeout):
        kind = "read timed out"
    elif isinstance(exc, requests.ConnectionError):
        kind = "connection failed"
    else:
        kind = "response body broken off"
    return f"{kind} ({type(exc).__name__})"


def _decode(response: requests.Response, where: str) -> Any:
    if not response.content:
        return None
    try:
        return json.loads(response.content)
    except ValueError as exc:  # bad or truncated JSON, bad UTF-8
        raise MalformedResponse(f"{where}: HTTP {response.status_code}: body is not JSON") from exc
