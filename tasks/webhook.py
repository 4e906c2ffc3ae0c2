"""The webhook target: the event POSTed as JSON, signed, with its idempotency key.

* ``Idempotency-Key``: the event's stable key; a receiver drops a repeat with it
  (deliveries are at-least-once: a crash after the POST and before the outbox records it
  sends it again).
* ``X-HipChat-Poller-Signature: sha256=<hex>``: HMAC-SHA256 over the exact body bytes,
  keyed by the subscription's secret (stored encrypted, like tokens).
* ``X-HipChat-Poller-Event``: the event name.

2xx is delivered. 400, 401, 403, 404, 405, 410, 413, 422 and redirects need a person
(:class:`NeedsAttention`: dead at once); 404 and 410 say the receiver is gone, so the
subscription goes to ``error`` too (:func:`stop_if_gone`). Anything else (5xx, 408, 429, a
transport failure) is retried by the delivery's backoff, never sooner than a ``Retry-After``
the receiver sent.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
from typing import Any
from urllib.parse import urlsplit

from storage import subscriptions as subs
from storage.errors import NeedsAttention, ServerError
from storage.vocabulary import SubscriptionState, TargetKind
from tasks.client_http import send
from tasks.ratelimit_headers import retry_after_seconds
from tasks.runtime import Runtime
from tasks.subscriptions_api import SubView

SIGNATURE_HEADER = "X-HipChat-Poller-Signature"
EVENT_HEADER = "X-HipChat-Poller-Event"
USER_AGENT = "hipchat-poller-webhook/0.1"
PERMANENT_STATUSES = frozenset({400, 401, 403, 404, 405, 410, 413, 422})
GONE_STATUSES = frozenset({404, 410})

log = logging.getLogger(__name__)


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
    # Redirects are not followed (requests would turn the POST into a GET on 301/302/303 and
    # count the GET's 2xx as a delivery): a moved receiver needs a person. A transport
    # failure states no wait: the delivery's exponential backoff decides (tasks.delivery).
    response = send(
        rt.http,
        "POST",
        url,
        where=f"webhook {_safe_url(url)}",
        peer="POST",
        transport_retry_after=0.0,
        data=body,
        headers=headers,
        timeout=rt.settings.webhook_timeout_seconds,
    )
    status = response.status_code
    if 200 <= status < 300:
        return f"webhook {status}"
    if status in PERMANENT_STATUSES or 300 <= status < 400:
        raise NeedsAttention(f"webhook {_safe_url(url)} answered {status}", status)
    # 5xx, 408, 429, ...: retried; a Retry-After the receiver sent is a floor on the wait.
    stated = retry_after_seconds(response.headers, time.time())
    raise ServerError(f"webhook {_safe_url(url)} answered {status}", status, stated or 0.0)


def stop_if_gone(rt: Runtime, sub: SubView, exc: Exception) -> bool:
    """After a failed delivery: a webhook that answered 404 or 410 is gone, so its
    subscription goes to ``error`` with the reason (``subscription resume`` clears it) and its
    later events wait for a person instead of dying one by one. True if it did."""
    status = getattr(exc, "status", None)
    if sub.target_kind != TargetKind.WEBHOOK or status not in GONE_STATUSES:
        return False
    with rt.db.session() as s:
        subs.set_subscription_state(s, sub.id, SubscriptionState.ERROR, str(exc))
    log.error("sub=%s in error: %s", sub.id, exc)
    return True


def _safe_url(url: str) -> str:
    """Scheme, host and path only: query strings and userinfo may hold secrets."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"
