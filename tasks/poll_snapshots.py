"""The snapshot streams of a poll: a room's participant list and the connection's room list.

Each is diffed against the snapshot stored by the last poll that saw a change; a quiet poll
(the same list, every subscription primed) writes nothing. When something changed, the
generation (the stored snapshot's time, which makes the events' idempotency keys), the diff,
the new snapshot and the events go in one transaction, the generation read first
(:func:`_generation`).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Protocol

from sqlalchemy.orm import Session

from storage import rooms as room_store
from storage import watermarks
from storage.outbox import NewEvent
from storage.rooms import ParticipantSnapshot, RoomSnapshot
from storage.vocabulary import ROOM_LIST_ROOM_ID, Event, Stream
from tasks import events
from tasks.client import HipChatClient
from tasks.hipchat_types import Room, UserStub
from tasks.poll_plan import ConnView, PollState
from tasks.rooms_diff import diff_participants, diff_rooms
from tasks.runtime import Runtime
from tasks.subscriptions_api import SubView


class Poll(Protocol):
    """What a snapshot stream needs of the poll it is part of (:class:`tasks.poll.Poll`)."""

    rt: Runtime
    state: PollState
    client: HipChatClient
    now: datetime
    conn: ConnView

    def store(
        self, s: Session, found: list[NewEvent], priming: list[SubView]
    ) -> list[tuple[int, int]]: ...

    def committed(self, inserted: list[tuple[int, int]]) -> None: ...

    def new_event(self, sub: SubView, payload: dict[str, Any]) -> NewEvent: ...

    def room_stub(self, sub: SubView) -> dict[str, Any]: ...


def poll_participants(poll: Poll, room_id: int, room_subs: list[SubView]) -> None:
    """Diff the room's participant list against the stored one: room_enter / room_exit."""
    current = poll.client.participants(room_id)
    known = poll.state.participants.get(room_id, {})
    primed = (room_id, Stream.PARTICIPANTS) in poll.state.marks
    unchanged = {u.id: ParticipantSnapshot.of(u) for u in current} == known
    priming = [x for x in room_subs if not x.primed]
    if primed and unchanged and not priming:
        return  # the quiet path: read in the poll's one read, nothing to write
    # Baseline, diff, new baseline and events in one transaction, the generation read
    # first: a concurrent poll that commits meanwhile cannot pair our old generation
    # with its new baseline (see _generation).
    with poll.rt.db.session() as s:
        generation = _generation(s, poll.conn.id, room_id, Stream.PARTICIPANTS)
        stored = room_store.known_participants(s, poll.conn.id, room_id)
        found: list[NewEvent] = []
        if generation is not None:
            entered, exited = diff_participants(
                {
                    uid: {"id": uid, "name": p.name, "mention_name": p.mention_name}
                    for uid, p in stored.items()
                },
                current,
            )
            for sub in (x for x in room_subs if x.primed):
                people = entered if sub.event == Event.ROOM_ENTER else exited
                found += [_participant_event(poll, sub, user, generation) for user in people]
        room_store.replace_participants(
            s,
            poll.conn.id,
            room_id,
            [ParticipantSnapshot.of(u) for u in current],
            at=poll.now,
            known=stored,
        )
        inserted = poll.store(s, found, priming)
    poll.committed(inserted)


def _participant_event(
    poll: Poll, sub: SubView, user: UserStub | dict[str, Any], generation: str
) -> NewEvent:
    payload = events.participant_event(
        sub.event,
        user,
        poll.room_stub(sub),
        connection=poll.conn.summary(),
        subscription=sub.summary(),
        generation=generation,
    )
    return poll.new_event(sub, payload)


def poll_room_list(poll: Poll, room_subs: list[SubView]) -> None:
    """Diff the room list against the stored one: created, archived, unarchived, deleted."""
    current: list[Room] = poll.client.list_rooms(include_private=True, include_archived=True)
    primed = (ROOM_LIST_ROOM_ID, Stream.ROOMS) in poll.state.marks
    unchanged = {r.id: RoomSnapshot.of(r) for r in current} == (poll.state.rooms or {})
    priming = [x for x in room_subs if not x.primed]
    if primed and unchanged and not priming:
        return  # the quiet path
    with poll.rt.db.session() as s:  # one transaction, generation first: see above
        generation = _generation(s, poll.conn.id, ROOM_LIST_ROOM_ID, Stream.ROOMS)
        stored = room_store.known_rooms(s, poll.conn.id)
        known = {rid: room_store.room_snapshot(row) for rid, row in stored.items()}
        found: list[NewEvent] = []
        if generation is not None:
            for change in diff_rooms(known, current):
                for sub in room_subs:
                    if sub.event == change.event and sub.primed:
                        payload = events.room_event(
                            change,
                            connection=poll.conn.summary(),
                            subscription=sub.summary(),
                            generation=generation,
                            base_url=poll.conn.base_url,
                        )
                        found.append(poll.new_event(sub, payload))
        room_store.replace_known_rooms(
            s, poll.conn.id, [RoomSnapshot.of(r) for r in current], at=poll.now, known=stored
        )
        inserted = poll.store(s, found, priming)
    poll.committed(inserted)


def _generation(s: Session, conn_id: int, room_id: int, stream: str) -> str | None:
    """The stored snapshot's time: the same for every poll that diffs against it, so a
    redelivered or concurrent poll builds the same idempotency keys. None: not primed.

    Read it first, in the transaction that stores the new baseline: a poll committing in
    between can then at worst pair its newer baseline with the older generation, never the
    older baseline with its newer generation (which would fire its events again under new
    keys). The poll lease keeps polls of one connection from overlapping in the first place."""
    mark = watermarks.get_watermark(s, conn_id, room_id, stream)
    return mark.last_date.isoformat() if mark is not None else None
