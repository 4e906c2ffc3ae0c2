"""Downstream targets: where an event goes once a poll found it.

* ``webhook``: POST of the event as JSON with ``Idempotency-Key`` and an HMAC-SHA256
  signature header over the exact body bytes, keyed by the subscription's secret.
* ``log``: one log line per event (the demo and debugging).
* ``action``: a HipChat action with templates (``pong {matches[0]}``), through the
  connection's client and therefore its call budget.
* ``handler``: a Python function registered with :func:`tasks.handlers.on`.

A target raises :class:`RetryLater` for what may work later (the caller backs off),
:class:`InvalidInput` or :class:`NeedsAttention` for what will not (dead letter at once).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import requests

from storage.errors import (
    NeedsAttention,
    ServerError,
    TransportError,
    ValidationError,
)
from tasks.ratelimit_headers import retry_after_seconds
from tasks.runtime import Runtime
from tasks.subscriptions_api import SubView
from tasks.templates import compile_template, render

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-HipChat-Poller-Signature"
EVENT_HEADER = "X-HipChat-Poller-Event"
USER_AGENT = "hipchat-poller-webhook/0.1"
PERMANENT_STATUSES = frozenset({400, 401, 403, 404, 405, 410, 413, 422})

Target = Callable[[Runtime, SubView, dict[str, Any]], str]


class _RedactQueries(logging.Filter):
    """urllib3 logs each request line at DEBUG with its query string (``"POST
    /hook?token=..."``), and a webhook URL's query may carry a credential: cut it there, as
    :func:`_safe_url` does in our own messages."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(
                arg.split("?", 1)[0] + "?[redacted]" if isinstance(arg, str) and "?" in arg else arg
                for arg in record.args
            )
        return True


# A filter on the emitting logger: it applies whatever handlers the process configures.
logging.getLogger("urllib3.connectionpool").addFilter(_RedactQueries())


def canonical_body(event: dict[str, Any]) -> bytes:
    return json.dumps(event, separators=(",", ":"), sort_keys=True, ensure_ascii=False).encode()


def sign(secret: str, body: bytes) -> str:
    """``sha256=<hex>``: what a receiver recomputes over the raw body to verify."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def deliver_webhook(rt: Runtime, sub: SubView, event: dict[str, Any]) -> str:
    url = sub.target["url"]
    body = canonical_body(event)
    headers = {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        "Idempotency-Key": str(event.get("idempotency_key", "")),
        EVENT_HEADER: sub.event,
    }
    encrypted = sub.target.get("secret_encrypted")
    if encrypted:
        headers[SIGNATURE_HEADER] = sign(rt.cipher.decrypt(encrypted), body)
    try:
        response = rt.http.post(
            url,
            data=body,
            headers=headers,
            timeout=rt.settings.webhook_timeout_seconds,
            # requests would turn a POST into a GET on 301/302/303 and count the GET's 2xx
            # as a delivery: the event would be lost. A moved receiver needs a person.
            allow_redirects=False,
        )
    except requests.RequestException as exc:
        # No stated wait: the delivery's exponential backoff decides (see tasks.delivery).
        raise TransportError(f"webhook {_safe_url(url)}: {type(exc).__name__}", 0.0) from exc
    status = response.status_code
    if 200 <= status < 300:
        return f"webhook {status}"
    if status in PERMANENT_STATUSES or 300 <= status < 400:
        raise NeedsAttention(f"webhook {_safe_url(url)} answered {status}", status)
    # 5xx, 408, 429, ...: retried; a Retry-After the receiver sent is a floor on the wait.
    stated = retry_after_seconds(response.headers, time.time())
    raise ServerError(f"webhook {_safe_url(url)} answered {status}", status, stated or 0.0)


def _safe_url(url: str) -> str:
    """Scheme, host and path only: query strings and userinfo may hold secrets."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


def deliver_log(rt: Runtime, sub: SubView, event: dict[str, Any]) -> str:
    item = event.get("item") or {}
    room = (item.get("room") or {}).get("name")
    message = (item.get("message") or {}).get("message")
    log.info(
        "event %s sub=%s room=%s key=%s%s",
        sub.event,
        sub.id,
        room,
        event.get("idempotency_key"),
        f" message={message!r}" if message else "",
    )
    return "logged"


def deliver_action(rt: Runtime, sub: SubView, event: dict[str, Any]) -> str:
    from tasks.actions import run_action

    target = sub.target
    fields = {}
    for key in ("message", "from"):
        if isinstance(target.get(key), str):
            fields[key] = render(compile_template(target[key]), event)
    room = target.get("room") or ((event.get("item") or {}).get("room") or {}).get("id")
    if room is None:
        raise ValidationError("the action has no room and the event carries none")
    return run_action(
        rt,
        sub.connection_id,
        str(target["action"]),
        room=room,
        **fields,
        color=target.get("color"),
        message_format=target.get("format"),
        notify=target.get("notify"),
    )


def deliver_handler(rt: Runtime, sub: SubView, event: dict[str, Any]) -> str:
    from tasks.handlers import call_handler

    return call_handler(rt, sub, event)


TARGETS: dict[str, Target] = {
    "webhook": deliver_webhook,
    "log": deliver_log,
    "action": deliver_action,
    "handler": deliver_handler,
}


def deliver(rt: Runtime, sub: SubView, event: dict[str, Any]) -> str:
    target = TARGETS.get(sub.target_kind)
    if target is None:
        raise ValidationError(f"unknown target kind {sub.target_kind!r}")
    return target(rt, sub, event)


__all__ = ["TARGETS", "canonical_body", "deliver", "sign"]
