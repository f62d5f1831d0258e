"""What the store adapters share: the rules around their SQL, as pure functions.
Each adapter keeps only its queries and transactions, and builds its answers here."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from datetime import datetime
from typing import Any, Protocol

from whatslike import campaigns
from whatslike.clock import new_id, utcnow
from whatslike.errors import ConfigError
from whatslike.events import (
    TOPIC_MESSAGES,
    TOPIC_STATUS,
    OutboundMessage,
    ReadReceipt,
    StatusEvent,
    receipt_topic,
)
from whatslike.status.frame import IN, OUT, message_frame, status_frame
from whatslike.status.rules import (
    Effect,
    MessageState,
    Observation,
    ProviderError,
    Status,
    Transition,
)
from whatslike.store.base import (
    ApplyResult,
    Campaign,
    Changes,
    Conversation,
    InboundMedia,
    InboundMessage,
    Message,
    NewCampaign,
    OutboxEntry,
    OutboxItem,
    ParkedStatus,
    SendClaim,
)


class Row(Protocol):
    """A result row by column name: a `sqlite3.Row` or an `asyncpg.Record`."""

    def __getitem__(self, key: str, /) -> Any: ...


#: The columns `message_of` reads, from a query that names the messages table `m`.
MESSAGE_COLUMNS = """m.id, m.conversation_id, m.org_id, m.channel, m.text, m.client_message_id,
    m.created_at, m.status, m.seq, m.sent_at, m.delivered_at, m.read_at, m.failed_at,
    m.error_code, m.error_title, m.provider_message_id, m.send_started_at, m.updated_at,
    m.direction, m.media_id, m.template, m.message_tag, m.inbound_media"""

#: Turns a stored, non-null time into a datetime (SQLite keeps text, PostgreSQL datetimes).
TimeOf = Callable[[Any], datetime]

#: The answer to a status for a message this store does not have.
UNKNOWN_MESSAGE = ApplyResult(effect=Effect.NOOP, unknown_message=True)


def _ms(at: datetime) -> datetime:
    """Truncate to the stored resolution, so a returned state equals the one read back."""
    return at.replace(microsecond=at.microsecond // 1000 * 1000)


def _optional(value: Any, time_of: TimeOf) -> datetime | None:
    return None if value is None else time_of(value)


def pending_migrations(
    version: int, migrations: Sequence[tuple[str, ...]], where: str
) -> list[tuple[int, tuple[str, ...]]]:
    """The migrations a schema at `version` still needs, each with the version it brings
    the schema to. `where` names the database in the error, e.g. "of /data/whatslike.db"."""
    if version > len(migrations):
        # An older release must not run on a schema it does not know.
        raise ConfigError(
            f"WHATSLIKE_DATABASE_URL: schema version {version} {where} is newer "
            f"than this Whatslike supports ({len(migrations)})"
        )
    return list(enumerate(migrations[version:], start=version + 1))


def new_conversation(org_id: str, channel: str, contact: str) -> Conversation:
    return Conversation(new_id("conv"), org_id, channel, contact, 0, utcnow())


def _digest(*parts: str) -> str:
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]


def contact_conversation(org_id: str, channel: str, contact: str) -> Conversation:
    """The conversation opened with a contact where the organization has none (Cassandra:
    a customer's first message, a campaign's). Its id is made from the organization,
    channel and contact, so callers opening it at once make one."""
    return Conversation(
        f"conv_in_{_digest(org_id, channel, contact)}", org_id, channel, contact, 0, utcnow()
    )


def inbound_conversation(inbound: InboundMessage) -> Conversation:
    """The conversation a customer's first message opens (`contact_conversation`)."""
    return contact_conversation(inbound.account_org_id, inbound.channel, inbound.contact)


def inbound_message_id(channel: str, provider_message_id: str) -> str:
    """Our id of the customer's message Meta knows by this id on this channel."""
    return f"msg_in_{_digest(channel, provider_message_id)}"


def inbound_message(conversation: Conversation, inbound: InboundMessage) -> Message:
    """A customer's message, not yet stored: PENDING until its arrival is applied. Its id
    is made from the channel and Meta's id, so a redelivered webhook finds it. It was
    created when the customer sent it (Meta's clock), never later than now."""
    now = _ms(min(inbound.sent_at, utcnow()))
    return Message(
        id=inbound_message_id(inbound.channel, inbound.provider_message_id),
        conversation_id=conversation.id,
        org_id=conversation.org_id,
        channel=conversation.channel,
        text=inbound.text,
        client_message_id="",
        created_at=now,
        state=MessageState(),
        seq=None,
        provider_message_id=inbound.provider_message_id,
        updated_at=now,
        direction=IN,
        inbound_media=inbound.media,
    )


def new_campaign(new: NewCampaign) -> Campaign:
    """A campaign with no message yet, not yet stored."""
    return Campaign(
        id=new_id("cmp"),
        org_id=new.org_id,
        client_campaign_id=new.client_campaign_id,
        fingerprint=new.fingerprint,
        channel=new.channel,
        text=new.text,
        total=len(new.contacts),
        created=0,
        created_at=_ms(utcnow()),
        template=new.template,
    )


def campaign_of(row: Row, time_of: TimeOf, counts: dict[str, int]) -> Campaign:
    """A campaign from its row and the rows of its counts (the `CHANGES` row is its
    version, not a count)."""
    version = counts.pop(campaigns.CHANGES, 0)
    return Campaign(
        id=row["id"],
        org_id=row["org_id"],
        client_campaign_id=row["client_campaign_id"],
        fingerprint=row["fingerprint"],
        channel=row["channel"],
        text=row["text"],
        total=int(row["total"]),
        created=int(row["created"]),
        created_at=time_of(row["created_at"]),
        counts=counts,
        template=row["template"],
        version=version,
    )


def new_message(
    conversation: Conversation,
    text: str,
    client_message_id: str,
    media_id: str | None = None,
    *,
    template: str | None = None,
    tag: str | None = None,
) -> Message:
    """A PENDING message, not yet stored."""
    now = utcnow()
    return Message(
        id=new_id("msg"),
        conversation_id=conversation.id,
        org_id=conversation.org_id,
        channel=conversation.channel,
        text=text,
        client_message_id=client_message_id,
        created_at=now,
        state=MessageState(),
        seq=None,
        updated_at=now,
        media_id=media_id,
        template=template,
        tag=tag,
    )


def outbound_entry(conversation: Conversation, message: Message) -> OutboxEntry:
    """The `messages` hand-off of a new message: the work of sending it."""
    event = OutboundMessage(
        event_id=new_id("evt"),
        message_id=message.id,
        conversation_id=conversation.id,
        org_id=conversation.org_id,
        channel=conversation.channel,
        to=conversation.contact,
        text=message.text,
        client_message_id=message.client_message_id,
        created_at=message.created_at,
        media_id=message.media_id,
        template=message.template,
        tag=message.tag,
    )
    return OutboxEntry(TOPIC_MESSAGES, conversation.id, event.to_json(), message.id)


def status_entry(event: StatusEvent) -> OutboxEntry:
    """The `msg.status` hand-off of an observed status, completed when it is applied."""
    return OutboxEntry(TOPIC_STATUS, event.conversation_id, event.to_json(), event.event_id)


def read_event(message: Message, at: datetime) -> StatusEvent:
    """An agent read a customer's message. The event id is the message's, so reads made
    at once (before the first is applied) apply once: one seq, one receipt to Meta."""
    return StatusEvent(
        event_id=f"evt_read_{message.id}",
        message_id=message.id,
        conversation_id=message.conversation_id,
        org_id=message.org_id,
        channel=message.channel,
        status=Status.READ,
        provider_message_id=message.provider_message_id or "",
        occurred_at=at,
        received_at=at,
    )


def receipt_entry(conversation: Conversation, message: Message) -> OutboxEntry:
    """The hand-off of the read receipt to Meta of a customer's message now READ,
    completed by the connector once Meta took it."""
    receipt = ReadReceipt(
        message_id=message.id,
        conversation_id=conversation.id,
        org_id=conversation.org_id,
        channel=conversation.channel,
        contact=conversation.contact,
        provider_message_id=message.provider_message_id or "",
    )
    return OutboxEntry(
        receipt_topic(message.channel), conversation.id, receipt.to_json(), message.id
    )


def redrivable(message: Message) -> bool:
    """PENDING, never accepted and no send under way: its hand-off may be made again."""
    return (
        message.status is Status.PENDING
        and message.provider_message_id is None
        and message.send_started_at is None
    )


def conversation_of_message(message: Message, contact: str) -> Conversation:
    """The parts of a message's conversation that its `messages` hand-off needs."""
    return Conversation(
        message.conversation_id, message.org_id, message.channel, contact, 0, message.created_at
    )


def outbox_items(rows: Iterable[Row]) -> list[OutboxItem]:
    return [
        OutboxItem(int(row["id"]), row["topic"], row["key"], bytes(row["payload"])) for row in rows
    ]


def send_claim(message: Message | None) -> SendClaim:
    """What a connector may do with a message it is asked to send (see `SendClaim`)."""
    if message is None:
        return SendClaim.MISSING
    if message.provider_message_id is not None:
        return SendClaim.LINKED
    if message.status is not Status.PENDING:
        return SendClaim.MOVED_ON
    if message.send_started_at is not None:
        return SendClaim.UNKNOWN
    return SendClaim.GO


def conversation_of(row: Row, time_of: TimeOf) -> Conversation:
    return Conversation(
        row["id"],
        row["org_id"],
        row["channel"],
        row["contact"],
        row["last_seq"],
        time_of(row["created_at"]),
    )


def message_of(row: Row, time_of: TimeOf) -> Message:
    """The message of a row with the columns of `messages`."""
    error = None
    if row["error_code"] is not None:
        error = ProviderError(row["error_code"], row["error_title"])
    state = MessageState(
        status=Status(row["status"]),
        sent_at=_optional(row["sent_at"], time_of),
        delivered_at=_optional(row["delivered_at"], time_of),
        read_at=_optional(row["read_at"], time_of),
        failed_at=_optional(row["failed_at"], time_of),
        error=error,
    )
    return Message(
        id=row["id"],
        conversation_id=row["conversation_id"],
        org_id=row["org_id"],
        channel=row["channel"],
        text=row["text"],
        client_message_id=row["client_message_id"],
        created_at=time_of(row["created_at"]),
        state=state,
        seq=row["seq"],
        provider_message_id=row["provider_message_id"],
        send_started_at=_optional(row["send_started_at"], time_of),
        updated_at=_optional(row["updated_at"], time_of),
        # Rows of stores older than inbound messages have none: they are all outbound.
        direction=row["direction"] or OUT,
        media_id=row["media_id"],
        template=row["template"],
        tag=row["message_tag"],
        inbound_media=inbound_media_of(row["inbound_media"]),
    )


def inbound_media_of(stored: str | None) -> InboundMedia | None:
    """A stored `inbound_media` column (JSON text, or null for a message with none)."""
    return InboundMedia.from_json(stored) if stored else None


def stored_inbound_media(media: InboundMedia | None) -> str | None:
    return media.to_json() if media is not None else None


def parked_of(channel: str, provider_message_id: str, rows: Iterable[Row]) -> list[ParkedStatus]:
    """The parked statuses of rows with `id` and `payload`, oldest first."""
    return [
        ParkedStatus(channel, provider_message_id, bytes(row["payload"]))
        for row in sorted(rows, key=lambda row: int(row["id"]))
    ]


def frames_of(rows: Iterable[Row]) -> tuple[str, ...]:
    return tuple(str(row["frame"]) for row in rows)


def observation_of(event: StatusEvent) -> Observation:
    # At the stored resolution, so the state we return equals the one read back later.
    return Observation(event.status, _ms(event.occurred_at), event.error)


def replayed(message: Message, frames: tuple[str, ...]) -> ApplyResult:
    """The answer to an event applied before: its frames again, the message as stored."""
    return ApplyResult(effect=Effect.NOOP, frames=frames, message=message)


def change_frame(message: Message, state: MessageState, seq: int, occurred_at: datetime) -> str:
    """The frame of a change of `message` to `state`, numbered `seq`: the `message` frame
    for a customer's message's first change (its arrival: no seq yet), else a `status`
    frame."""
    if message.direction == IN and message.seq is None:
        return message_frame(
            conversation_id=message.conversation_id,
            message_id=message.id,
            text=message.text,
            status=state.status,
            seq=seq,
            occurred_at=occurred_at,
            media=media_json(message),
        )
    return status_frame(
        conversation_id=message.conversation_id,
        message_id=message.id,
        status=state.status,
        seq=seq,
        occurred_at=occurred_at,
        error=state.error if state.status is Status.FAILED else None,
    )


def media_json(message: Message) -> dict[str, Any] | None:
    """What the agent sees of a customer's medium (protocol.md §4): its kind, type and
    filename, where it is (`state`) and, once stored, its `media_id`; never Meta's
    source (a Graph id or a CDN URL)."""
    media = message.inbound_media
    if media is None:
        return None
    return {
        "kind": media.kind,
        "content_type": media.content_type,
        "filename": media.filename,
        "state": media.state,
        "media_id": message.media_id,
        "error": media.error or None,
    }


def applied(
    message: Message,
    transition: Transition,
    seq: int | None,
    frames: tuple[str, ...],
    updated_at: datetime,
) -> ApplyResult:
    """The answer to a status that updated `message` to the transition's state."""
    return ApplyResult(
        effect=transition.effect,
        frames=frames,
        message=replace(message, state=transition.state, seq=seq, updated_at=updated_at),
    )


def changes_window(last_seq: int, since: int, limit: int) -> Changes | None:
    """The answer when no frame needs reading, else None: then read the frames after
    `since`, up to `last_seq`, and answer with `changes`."""
    if since > last_seq or last_seq - since > limit:
        return Changes((), last_seq, False)
    if since == last_seq:
        return Changes((), last_seq, True)
    return None


def changes(last_seq: int, since: int, frames: tuple[str, ...]) -> Changes:
    """The frames read after `since`, or none when history was trimmed."""
    if len(frames) != last_seq - since:
        return Changes((), last_seq, False)
    return Changes(frames, last_seq, True)
