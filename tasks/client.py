"""The HipChat REST API v2 client that the tasks, the command line and the benchmarks use.

Each method checks its input (:class:`storage.errors.ValidationError` before any call), builds
one request, and parses the answer into :mod:`tasks.hipchat_types`. Sending, timing, logging,
rate-limit headers and the translation of every failure into :mod:`storage.errors` happen in one
choke point, :class:`tasks.client_http.HttpCore`, whose docstring draws the error mapping::

    HipChatClient.<method>    checks input (tasks.client_inputs), builds the request
      -> HttpCore.request     before_request() (the call budget), Session.request with timeouts,
                              X-Ratelimit-* (tasks.ratelimit_headers), errors mapped, DEBUG line
      -> _pages               which page next (tasks.pagination), each item once

Rooms are an ``int`` id or a ``str`` name, users an ``int`` id, an email or ``"@mention"``;
names are percent-encoded as one path segment (``" "`` -> ``%20``, ``"/"`` -> ``%2F``).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from datetime import datetime
from types import TracebackType
from typing import Any, TypeVar

import requests

from storage.errors import AuthFailed, MalformedResponse, ValidationError
from tasks import client_inputs as inputs
from tasks.client_http import HttpCore
from tasks.client_inputs import RoomRef, UserRef
from tasks.hipchat_types import Message, RateLimitInfo, Room, SentMessage, User, UserStub
from tasks.pagination import HistoryPage, next_page, parse_envelope

__all__ = ["HipChatClient", "HistoryPage"]

T = TypeVar("T")


def _bool(value: bool) -> str:
    return "true" if value else "false"


class HipChatClient:
    """A synchronous client for one HipChat base URL and one token. Safe to share between
    threads; use it as a context manager or call :meth:`close`."""

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        timeout: tuple[float, float] = (5.0, 30.0),
        session: requests.Session | None = None,
        user_agent: str | None = None,
        before_request: Callable[[], None] | None = None,
        on_rate_limit: Callable[[RateLimitInfo], None] | None = None,
        on_refused: Callable[[float], None] | None = None,
        page_size: int = 1000,
    ) -> None:
        self._page_size = inputs.check_max_results(page_size, low=1)
        self._http = HttpCore(
            base_url,
            token,
            timeout=timeout,
            session=session,
            user_agent=user_agent,
            before_request=before_request,
            on_rate_limit=on_rate_limit,
            on_refused=on_refused,
        )
        self.base_url = self._http.base_url

    def __repr__(self) -> str:
        return f"HipChatClient({self.base_url!r})"

    @property
    def last_rate_limit(self) -> RateLimitInfo | None:
        """The ``X-Ratelimit-*`` headers of the latest response that carried them."""
        return self._http.last_rate_limit

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> HipChatClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _pages(
        self,
        path: str,
        params: Mapping[str, str | int],
        parse: Callable[[Any], T],
        key: Callable[[T], Hashable],
    ) -> Iterator[list[T]]:
        """A collection page after page, as the server orders each; an item already yielded
        on an earlier page (offsets shift when things change meanwhile) is left out."""
        target: str = path
        query: Mapping[str, str | int] | None = {
            **params,
            "start-index": 0,
            "max-results": self._page_size,
        }
        seen: set[Hashable] = set()
        visited: set[str] = set()
        fetched = 0
        while True:
            reply = self._http.request("GET", target, params=query)
            page = self._http.parse(reply, parse_envelope)
            fetched += len(page.items)
            fresh: list[T] = []
            for raw in page.items:
                item = self._http.parse(reply, parse, raw)
                if key(item) not in seen:
                    seen.add(key(item))
                    fresh.append(item)
            if fresh:
                yield fresh
            step = next_page(
                page,
                fetched=fetched,
                page_size=self._page_size,
                new_items=len(fresh),
                visited=visited,
            )
            if step is None:
                return
            if step.url is not None:
                visited.add(step.url)
                target, query = step.url, None
            else:
                query = {**params, "start-index": fetched, "max-results": self._page_size}
                target = path

    def _all(
        self,
        path: str,
        params: Mapping[str, str | int],
        parse: Callable[[Any], T],
        key: Callable[[T], Hashable],
    ) -> Iterator[T]:
        for page in self._pages(path, params, parse, key):
            yield from page

    # -- rooms ------------------------------------------------------------------------------

    def iter_rooms(
        self, *, include_private: bool = True, include_archived: bool = False
    ) -> Iterator[Room]:
        params = {
            "include-private": _bool(include_private),
            "include-archived": _bool(include_archived),
        }
        return self._all("/room", params, Room.parse, lambda room: room.id)

    def list_rooms(
        self, *, include_private: bool = True, include_archived: bool = False
    ) -> list[Room]:
        return list(
            self.iter_rooms(include_private=include_private, include_archived=include_archived)
        )

    def get_room(self, room: RoomRef) -> Room:
        reply = self._http.request("GET", f"/room/{inputs.room_segment(room)}")
        return self._http.parse(reply, Room.parse)

    def find_room(self, room: str) -> Room:
        """A room as a person names it: a string of digits is its id, anything else its name."""
        return self.get_room(inputs.room_ref(room))

    # -- history ----------------------------------------------------------------------------

    def latest_history(
        self, room: RoomRef, *, not_before: str | None = None, max_results: int = 75
    ) -> list[Message]:
        """The newest ``max_results`` messages, oldest first. The ``not_before`` message itself
        is included when the server still has it in the window (§4.4): drop it yourself."""
        params: dict[str, str | int] = {"max-results": inputs.check_max_results(max_results)}
        if not_before is not None:
            if not isinstance(not_before, str) or not not_before:
                raise ValidationError("not_before must be a message id")
            params["not-before"] = not_before
        path = f"/room/{inputs.room_segment(room)}/history/latest"
        reply = self._http.request("GET", path, params=params)
        page = self._http.parse(reply, parse_envelope)
        messages = [self._http.parse(reply, Message.parse, raw) for raw in page.items]
        # The reference says "oldest first" with MED confidence; a stable sort makes it true.
        return sorted(messages, key=lambda message: message.date)

    def _history_params(
        self, date: datetime | str, end_date: datetime | None, reverse: bool
    ) -> dict[str, str | int]:
        params: dict[str, str | int] = {
            "date": inputs.date_param(date, "date"),
            "reverse": _bool(reverse),
        }
        if end_date is not None:
            if params["date"] == "recent":
                raise ValidationError("end_date needs a real date, not date='recent'")
            params["end-date"] = inputs.date_param(end_date, "end_date")
        return params

    def iter_history(
        self, room: RoomRef, *, date: datetime | str, end_date: datetime | None = None
    ) -> Iterator[list[Message]]:
        """``/history`` from ``date`` (newest bound) back to ``end_date`` (oldest bound), one
        list per page: the newest page first, each page oldest first, each id only once.

        Both bounds are inclusive, so the messages at ``date`` and ``end_date`` come back too.
        Pages by ``start-index`` under a fixed ``date`` with ``reverse=false`` (the docs'
        advice for stable paging): messages arriving meanwhile do not shift the offsets.
        """
        params = self._history_params(date, end_date, reverse=False)
        path = f"/room/{inputs.room_segment(room)}/history"
        pages = self._pages(path, params, Message.parse, lambda message: message.id)
        return (sorted(page, key=lambda message: message.date) for page in pages)

    # -- people -----------------------------------------------------------------------------

    def participants(self, room: RoomRef, *, include_offline: bool = False) -> list[UserStub]:
        path = f"/room/{inputs.room_segment(room)}/participant"
        params = {"include-offline": _bool(include_offline)}
        return list(self._all(path, params, UserStub.parse, lambda user: user.id))

    def members(self, room: RoomRef) -> list[UserStub]:
        path = f"/room/{inputs.room_segment(room)}/member"
        return list(self._all(path, {}, UserStub.parse, lambda user: user.id))

    def add_member(
        self, room: RoomRef, user: UserRef, *, roles: Sequence[str] | None = None
    ) -> None:
        path = f"/room/{inputs.room_segment(room)}/member/{inputs.user_segment(user)}"
        self._http.request("PUT", path, json_body=inputs.member_body(roles))

    def get_user(self, user: UserRef) -> User:
        reply = self._http.request("GET", f"/user/{inputs.user_segment(user)}")
        return self._http.parse(reply, User.parse)

    # -- sending ----------------------------------------------------------------------------

    def send_message(self, room: RoomRef, text: str) -> SentMessage:
        body = inputs.message_body(text)
        reply = self._http.request(
            "POST", f"/room/{inputs.room_segment(room)}/message", json_body=body
        )
        return self._http.parse(reply, _sent_message)

    def send_notification(
        self,
        room: RoomRef,
        message: str,
        *,
        color: str = "yellow",
        message_format: str = "html",
        notify: bool = False,
        from_: str | None = None,
        card: Mapping[str, Any] | None = None,
        attach_to: str | None = None,
    ) -> None:
        body = inputs.notification_body(
            message,
            color=color,
            message_format=message_format,
            notify=notify,
            from_=from_,
            card=card,
            attach_to=attach_to,
        )
        path = f"/room/{inputs.room_segment(room)}/notification"
        self._http.request("POST", path, json_body=body)

    def auth_test(self) -> bool:
        """True if the server accepts the token (202 to ``auth_test=true``), False on 401.

        A 403 (token valid, scope ``view_group`` missing) is raised as Forbidden, so the caller
        can tell a bad token from a weak one.
        """
        try:
            self._http.request("GET", "/room", params={"auth_test": "true"})
        except AuthFailed:
            return False
        return True


def _sent_message(body: Any) -> SentMessage:
    if not isinstance(body, dict):
        raise MalformedResponse("send answer is not a JSON object")
    message_id, stamp = body.get("id"), body.get("timestamp")
    if not isinstance(message_id, str) or not message_id or not isinstance(stamp, str):
        raise MalformedResponse("send answer lacks string 'id' and 'timestamp'")
    return SentMessage(id=message_id, timestamp=stamp)
