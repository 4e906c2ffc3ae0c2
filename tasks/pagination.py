"""HipChat's collection envelope and the decision of which page to ask for next.

Pure functions, no HTTP: :class:`tasks.client.HipChatClient` fetches, this module decides.

The envelope (reference §3.2) is ``{"items": [...], "startIndex", "maxResults", "links":
{"self", "next"?, "prev"?}}``; ``links.next`` is left out when the server thinks there is no
next page. One report (S19) says ``next`` went missing on full pages although more existed,
so a *full* page without ``next`` means "maybe more": ask the next ``start-index`` and stop
on an empty or short page.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generic, TypeVar
from urllib.parse import urljoin, urlsplit, urlunsplit

from storage.errors import MalformedResponse

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Envelope:
    """One page as the server sent it; ``items`` are still raw JSON."""

    items: list[Any]
    next_url: str | None


@dataclass(frozen=True, slots=True)
class HistoryPage(Generic[T]):
    """One page of ``/history``. ``has_more``: ``links.next`` was present or the page was full."""

    items: list[T]
    has_more: bool


@dataclass(frozen=True, slots=True)
class NextPage:
    """Where to go next: a ``links.next`` URL to GET as it is, or a ``start-index`` to ask."""

    url: str | None = None
    start_index: int | None = None


def parse_envelope(body: Any) -> Envelope:
    """Check the envelope's shape; raise :class:`MalformedResponse` if it is not one."""
    if not isinstance(body, dict):
        raise MalformedResponse("collection body is not a JSON object")
    items = body.get("items")
    if not isinstance(items, list):
        raise MalformedResponse("collection body has no 'items' list")
    links = body.get("links")
    if links is not None and not isinstance(links, dict):
        raise MalformedResponse("collection 'links' is not an object")
    next_url = links.get("next") if links else None
    if next_url is not None and not isinstance(next_url, str):
        raise MalformedResponse("collection 'links.next' is not a string")
    return Envelope(items=items, next_url=next_url or None)


def page_is_full(count: int, max_results: int) -> bool:
    return max_results > 0 and count >= max_results


def next_page(
    page: Envelope, *, fetched: int, page_size: int, new_items: int, visited: set[str]
) -> NextPage | None:
    """Decide what follows ``page``; ``None`` means stop.

    ``fetched`` counts items on all pages so far (this one included), the offset of the next
    page when paging by ``start-index``. ``new_items`` counts items on this page not seen
    before: a page that brings nothing new means the server ignores paging (``date=recent``)
    or loops, so we stop rather than spin. ``visited`` holds the ``next`` URLs followed so far.
    """
    if not page.items or new_items == 0:
        return None
    if page.next_url is not None and page.next_url not in visited:
        return NextPage(url=page.next_url)
    if page_is_full(len(page.items), page_size):
        return NextPage(start_index=fetched)
    return None


def same_origin_url(link: str, base_url: str) -> str:
    """``link`` resolved against ``base_url``, moved onto ``base_url``'s origin if needed.

    ``links.next`` is absolute and normally points at the server we called. If it names
    another scheme, host or port (a proxy, a misconfigured Server base URL), we keep its path
    and query but send the request to our own origin: the Bearer token never leaves for a
    host the operator did not configure.
    """
    absolute = urljoin(base_url + "/", link)
    target, base = urlsplit(absolute), urlsplit(base_url)
    if (target.scheme, target.netloc) == (base.scheme, base.netloc):
        return absolute
    return urlunsplit((base.scheme, base.netloc, target.path, target.query, ""))
