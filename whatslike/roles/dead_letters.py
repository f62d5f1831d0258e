"""Dead letters, for operators and the watchdog: what each one holds, whether its status
still waits to be applied, and how it is handed on again.

A dead letter is an event set aside as poison (whatslike/bus/retry.py; outages never
make one). The status worker keeps each in the store before it lets the event go, so
nothing set aside is unseen: `whatslike dlq list` shows them, the watchdog counts the
statuses among them that would still change their message
(`whatslike_dead_letters_unapplied`), and `whatslike dlq replay <id>` hands such a
status to the outbox again, from where the relay publishes it and the status worker
applies it (or, if it is poison still, sets it aside again). A dead-lettered send is not
replayed: its message was made FAILED `send_failed` when it was set aside, which the
agent sees, and a send is never made twice; the agent sends the message again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import Enum

from whatslike.errors import MalformedEvent, WhatslikeError
from whatslike.events import TOPIC_STATUS, StatusEvent
from whatslike.status.rules import Effect, apply
from whatslike.store.base import DeadLetter, Message, OutboxEntry, Store
from whatslike.store.common import observation_of, status_entry


class Kind(Enum):
    """What a dead letter is now."""

    UNAPPLIED = "unapplied"  # a status that would still change its message: replay it
    APPLIED = "applied"  # a status its message already shows (a later event brought it)
    UNKNOWN_MESSAGE = "unknown_message"  # a status of a message this store does not have
    SEND = "send"  # a message never handed to the provider: it was made FAILED
    UNREADABLE = "unreadable"  # an event that cannot be decoded


@dataclass(frozen=True)
class Review:
    """One dead letter, read."""

    dead: DeadLetter
    #: The topic its event came from, as the record says ("unknown" if it does not).
    source: str
    kind: Kind
    status: StatusEvent | None = None
    message: Message | None = None


class NotReplayable(WhatslikeError):
    """This dead letter cannot be handed on again; the message says why and what to do."""


def source_and_event(dead: DeadLetter) -> tuple[str, bytes | None]:
    """The topic and the original event of a dead-letter record (None if not text)."""
    try:
        record = json.loads(dead.payload)
        source = str(record["topic"])
    except (ValueError, KeyError, TypeError):
        return "unknown", None
    event = record.get("event")
    return source, event.encode() if isinstance(event, str) else None


def status_of(dead: DeadLetter) -> StatusEvent | None:
    """The status event a dead letter holds, if it holds one that can be decoded."""
    source, event = source_and_event(dead)
    if source != TOPIC_STATUS or event is None:
        return None
    try:
        return StatusEvent.from_json(event)
    except MalformedEvent:
        return None


def kind_of(dead: DeadLetter, status: StatusEvent | None, message: Message | None) -> Kind:
    """Pure: a status is unapplied when the status rules would still change its message
    (a new status, or a failure recorded after delivery); mere timestamps do not count."""
    source, _ = source_and_event(dead)
    if status is None:
        return Kind.UNREADABLE if source in (TOPIC_STATUS, "unknown") else Kind.SEND
    if message is None:
        return Kind.UNKNOWN_MESSAGE
    effect = apply(message.state, observation_of(status)).effect
    return Kind.UNAPPLIED if effect in (Effect.CHANGED, Effect.ANOMALY) else Kind.APPLIED


async def review(store: Store, limit: int) -> list[Review]:
    """The newest `limit` dead letters, newest first, each with what it is now (one read
    of the dead letters and one of their messages)."""
    letters = await store.dead_letters(limit)
    statuses = [status_of(dead) for dead in letters]
    ids = sorted({status.message_id for status in statuses if status is not None})
    messages = {message.id: message for message in await store.get_messages(ids)}
    reviews = []
    for dead, status in zip(letters, statuses, strict=True):
        message = messages.get(status.message_id) if status is not None else None
        source, _ = source_and_event(dead)
        reviews.append(Review(dead, source, kind_of(dead, status, message), status, message))
    return reviews


def replay_entry(reviewed: Review) -> OutboxEntry:
    """The hand-off that replays a dead letter, or NotReplayable saying why not."""
    where = f"dead letter {reviewed.dead.id}"
    if reviewed.kind is Kind.SEND:
        raise NotReplayable(
            f"{where} is a send ({reviewed.source}): its message was made FAILED send_failed"
            " and is never sent twice; the agent sends it again"
        )
    if reviewed.status is None:
        raise NotReplayable(f"{where} holds no status event that can be decoded")
    if reviewed.kind is Kind.UNKNOWN_MESSAGE:
        raise NotReplayable(f"{where}: no message {reviewed.status.message_id!r} in this store")
    return status_entry(reviewed.status)


async def replay(store: Store, dead_letter_id: str) -> Review:
    """Hand a dead-lettered status to the outbox again; answers the dead letter."""
    dead = await store.dead_letter(dead_letter_id)
    if dead is None:
        raise NotReplayable(f"no dead letter {dead_letter_id!r}")
    status = status_of(dead)
    messages = await store.get_messages([status.message_id]) if status is not None else []
    reviewed = Review(
        dead,
        source_and_event(dead)[0],
        kind_of(dead, status, messages[0] if messages else None),
        status,
        messages[0] if messages else None,
    )
    await store.handoff([replay_entry(reviewed)])
    return reviewed
