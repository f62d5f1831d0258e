"""The store port: what every store adapter (SQLite, PostgreSQL, …) must do.

All tenant-facing reads take the `org_id` and answer None for another organization's
rows, so a caller can never tell "not yours" from "does not exist". Worker-facing calls
(`apply_status`, the provider-id index) are keyed by our own ids and are not scoped.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from typing import Any, Literal, NamedTuple, Protocol

from whatslike.events import StatusEvent
from whatslike.status.rules import Effect, MessageState, ProviderError, Status


@dataclass(frozen=True, slots=True)
class Conversation:
    id: str
    org_id: str
    channel: str
    contact: str
    last_seq: int
    created_at: datetime


#: Where a customer's medium is: its bytes being fetched from Meta, in the media store
#: (the message's `media_id`), or given up on (`error` says why).
MediaState = Literal["fetching", "stored", "failed"]


@dataclass(frozen=True, slots=True)
class InboundMedia:
    """The medium of a customer's message as Meta described it, and where its fetch is.
    `source` is where its bytes are: a Graph media id (WhatsApp) or a URL (Instagram's
    attachment); `content_type` and `sha256` are Meta's (Instagram gives neither: the
    type is then the download's, and `kind` Meta's attachment type)."""

    kind: str
    source: str
    content_type: str = ""
    sha256: str = ""
    filename: str = ""
    state: MediaState = "fetching"
    #: Why the fetch was given up (a short code and reason), when `failed`.
    error: str = ""

    def to_json(self) -> str:
        return json.dumps(
            {
                "kind": self.kind,
                "source": self.source,
                "content_type": self.content_type,
                "sha256": self.sha256,
                "filename": self.filename,
                "state": self.state,
                "error": self.error,
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str) -> InboundMedia:
        data: dict[str, Any] = json.loads(text)
        return cls(
            kind=str(data["kind"]),
            source=str(data["source"]),
            content_type=str(data.get("content_type", "")),
            sha256=str(data.get("sha256", "")),
            filename=str(data.get("filename", "")),
            state=data.get("state", "fetching"),
            error=str(data.get("error", "")),
        )


@dataclass(frozen=True, slots=True)
class Message:
    id: str
    conversation_id: str
    org_id: str
    channel: str
    text: str
    client_message_id: str
    created_at: datetime
    state: MessageState
    seq: int | None  # the seq of the message's latest notified change, if any
    provider_message_id: str | None = None
    #: When the connector recorded its provider send attempt; None when none is under
    #: way (never tried, or a try that certainly did not reach the provider).
    send_started_at: datetime | None = None
    #: The last time anything about the message changed (created, send, status).
    updated_at: datetime | None = None
    #: "out" (an agent's, sent by us) or "in" (the customer's, received from Meta).
    direction: str = "out"
    #: The medium it carries (whatslike/media; its `text` is then the caption).
    media_id: str | None = None
    #: The WhatsApp template it is (whatslike/templates' canonical JSON; `text` is empty).
    template: str | None = None
    #: The Instagram message tag it is sent with (`HUMAN_AGENT`), if any.
    tag: str | None = None
    #: A customer's medium as Meta described it, and its fetch's state (`media_id` once
    #: stored).
    inbound_media: InboundMedia | None = None

    @property
    def status(self) -> Status:
        return self.state.status


@dataclass(frozen=True, slots=True)
class InboundMessage:
    """A customer's message as a connector read it from Meta's webhook: what
    `receive_message` stores. `account_org_id` owns the business account (phone number,
    Instagram account) it was sent to; `sent_at` is Meta's time of it."""

    account_org_id: str
    channel: str
    contact: str
    provider_message_id: str
    text: str
    sent_at: datetime
    #: The medium it carries (`text` is then its caption, maybe empty).
    media: InboundMedia | None = None


@dataclass(frozen=True, slots=True)
class ApplyResult:
    """What `apply_status` did. `frames` are the status frames to fan out (JSON text):
    the new change, or — when this very event was applied before (a redelivery after
    a crash between commit and publish) — that earlier change again, so a notification
    is never lost. Clients drop the duplicate by `seq`."""

    effect: Effect
    frames: tuple[str, ...] = ()
    message: Message | None = None
    unknown_message: bool = False
    #: Nothing was done: another transaction (a slow or stuck one) holds this message's
    #: or its conversation's rows. The caller retries the event later (its earlier events
    #: of the same conversation in the call are busy too, so their order is kept).
    busy: bool = False


@dataclass(frozen=True, slots=True)
class Changes:
    """Frames after a seq. `complete` is False when they cannot all be given (history
    trimmed, or more than the replay limit): the client must reload over HTTP."""

    frames: tuple[str, ...]
    last_seq: int
    complete: bool


class SubscriptionRead(NamedTuple):
    """One subscribe's read: see `Store.subscription_changes`."""

    org_id: str
    conversation_id: str
    since: int | None


@dataclass(frozen=True, slots=True)
class ParkedStatus:
    """A status that arrived before its provider id was linked to one of our messages."""

    channel: str
    provider_message_id: str
    payload: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class OutboxEntry:
    """A hand-off waiting to be relayed to the bus: `payload` on `topic`, keyed by `key`.

    `done_key` names the work that completes it downstream — the message id for
    `messages` (the connector finished with the send), the event id for `msg.status`
    (the status worker applied it) — so that on a bus that keeps nothing (the in-process
    one) an entry stays until that work is stored, and is relayed again after a crash."""

    topic: str
    key: str
    payload: bytes = field(repr=False)
    done_key: str


@dataclass(frozen=True, slots=True)
class OutboxItem:
    """An `OutboxEntry` as stored, with its id (increasing in insertion order)."""

    id: int
    topic: str
    key: str
    payload: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """An event set aside as poison (see whatslike/bus/retry.py), kept for operators:
    `payload` is the dead-letter record (its topic, reason and the event verbatim)."""

    id: str
    topic: str
    reason: str
    at: datetime
    payload: bytes = field(repr=False)


class SendClaim(Enum):
    """What `begin_send` found, and so what the connector does."""

    GO = "go"  # the attempt is recorded: call the provider now
    MISSING = "missing"  # no such message
    LINKED = "linked"  # the provider accepted it before: finish, never send again
    MOVED_ON = "moved_on"  # no longer PENDING (e.g. FAILED): not sent again
    UNKNOWN = "unknown"  # an earlier attempt may have reached the provider: not sent again


@dataclass(frozen=True, slots=True)
class Stuck:
    """The messages that have not moved for a while, for the watchdog and operators."""

    #: Outbound, PENDING and not handed to the provider (no send under way) since
    #: `pending_before`.
    pending: tuple[Message, ...]
    #: PENDING with a send attempt whose outcome is unknown, started before `unknown_before`.
    unknown: tuple[Message, ...]
    #: SENT with no provider news since `sent_before`.
    sent: tuple[Message, ...]


@dataclass(frozen=True, slots=True)
class WebhookEndpoint:
    """An organization's outbound webhook target (see whatslike/webhooks)."""

    id: str
    org_id: str
    url: str
    secret: str = field(repr=False)
    created_at: datetime
    #: The secret before the last rotation, and until when it still signs.
    previous_secret: str | None = field(default=None, repr=False)
    previous_until: datetime | None = None


@dataclass(frozen=True, slots=True)
class WebhookDelivery:
    """An event waiting to be POSTed to one endpoint (or parked, `parked_at` set)."""

    id: int
    endpoint_id: str
    conversation_id: str
    seq: int
    event_type: str
    body: bytes = field(repr=False)
    attempts: int
    created_at: datetime
    next_at: datetime
    parked_at: datetime | None = None
    last_error: str = ""

    @property
    def webhook_id(self) -> str:
        """The Standard Webhooks `webhook-id`: the same on every attempt (receivers
        drop duplicates by it)."""
        return f"{self.conversation_id}:{self.seq}"


@dataclass(frozen=True, slots=True)
class NewCampaign:
    """A campaign as asked for: one message to each of `contacts` (distinct, in order)."""

    org_id: str
    client_campaign_id: str
    #: The caller's request, canonical: the same key with another fingerprint is refused.
    fingerprint: str
    channel: str
    text: str
    contacts: tuple[str, ...]
    #: A WhatsApp template each recipient gets instead of `text` (empty then).
    template: str | None = None


@dataclass(frozen=True, slots=True)
class Campaign:
    """A stored campaign with its live counts: `counts` maps each bucket (see
    `whatslike.campaigns.bucket_of`) to the number of the campaign's messages in it,
    moved in the same transaction as each message's status."""

    id: str
    org_id: str
    client_campaign_id: str
    fingerprint: str
    channel: str
    text: str
    total: int
    #: Recipients whose message exists (the first `created` positions).
    created: int
    created_at: datetime
    counts: dict[str, int] = field(default_factory=dict)
    #: The template each recipient gets (whatslike/templates' JSON), if not `text`.
    template: str | None = None
    #: How many moves the counts made (`whatslike.campaigns.CHANGES`): higher is newer.
    version: int = 0


@dataclass(frozen=True, slots=True)
class CampaignRecipient:
    position: int
    contact: str
    message: Message | None


class Store(Protocol):
    async def open(self) -> None:
        """Connect and create or migrate the schema. Idempotent."""

    async def close(self) -> None: ...

    async def ping(self) -> None:
        """Raise BackendUnavailable if the store cannot answer."""

    async def create_conversation(
        self, org_id: str, channel: str, contact: str
    ) -> Conversation: ...

    async def get_conversation(self, org_id: str, conversation_id: str) -> Conversation | None: ...

    async def create_message(
        self,
        conversation: Conversation,
        text: str,
        client_message_id: str,
        media_id: str | None = None,
        *,
        template: str | None = None,
        tag: str | None = None,
    ) -> tuple[Message, bool]:
        """Insert a PENDING message and, in the same transaction, its `messages` outbox
        entry (the work of sending it). The same non-empty client_message_id in the same
        conversation returns the first message and False, and adds nothing. With
        `media_id` it carries that medium, `text` being its caption (maybe empty); with
        `template` it is that template (`text` empty); `tag` is the Instagram message
        tag it is sent with. All three are kept with it, so a redrive sends the same."""

    async def receive_message(self, inbound: InboundMessage) -> Message:
        """Store a customer's message (direction "in", PENDING until its arrival is
        applied like a status: DELIVERED, which gives it its seq and `message` frame) in
        the organization's latest conversation with the contact on the channel, created
        if there is none. Idempotent on the provider id: the same one again answers the
        message stored the first time and changes nothing."""

    async def set_inbound_media(
        self, message_id: str, media: InboundMedia, media_id: str | None
    ) -> None:
        """Record where a customer's medium is (its fetch's outcome): `media` and, once
        stored, its `media_id`. Not a change of the seq stream: a medium is fetched
        before its message's arrival is announced."""

    async def last_inbound_at(self, conversation_id: str) -> datetime | None:
        """When the customer last wrote in this conversation (Meta's time of their latest
        message), or None: where WhatsApp's and Instagram's customer service window
        starts."""

    async def get_message(self, message_id: str) -> Message | None: ...

    async def get_messages(self, message_ids: Sequence[str]) -> list[Message]:
        """The messages of these ids that exist, in one read, in no particular order."""

    async def list_messages(self, org_id: str, conversation_id: str) -> list[Message] | None:
        """Oldest first; None when the conversation is not this organization's."""

    async def unread_up_to(self, message_id: str) -> list[Message]:
        """The outbound messages of the same conversation created no later than this one
        that the provider accepted (a provider id) and are not READ, oldest first: what Instagram's
        read watermark marks READ. Filtered here, not by the caller, so a long
        conversation does not load its whole history on every read receipt."""

    async def unread_sent_to(
        self, channel: str, contact: str, up_to: datetime, limit: int
    ) -> list[Message]:
        """The outbound messages of this channel's conversations with `contact` (of every
        organization: the provider keeps one thread per contact) that it accepted (a
        provider id), are not READ and were SENT at or before `up_to`; oldest first, at
        most `limit`: what a read watermark without a message id (Messenger's shape)
        marks READ."""

    async def link_provider_id(
        self, channel: str, provider_message_id: str, message_id: str
    ) -> list[ParkedStatus]:
        """Index a provider id (idempotent; the first link wins) and return the statuses
        parked for it, oldest first. They stay parked until a `handoff` names them, so a
        crash before they were handed on loses nothing: the next link returns them again."""

    async def link_answer(
        self, channel: str, provider_message_id: str, message_id: str
    ) -> tuple[list[ParkedStatus], str | None]:
        """`link_provider_id` for the provider's own answer to our send, which wins over a
        link made earlier from callback data (a signed status naming our message while
        its send was in flight): the message takes this id, the other one no longer
        names it. Answers the parked statuses and the provider id replaced (or None)."""

    async def expire_parked(self, before: datetime) -> int:
        """Drop statuses parked before this time (provider ids that never became ours:
        messages sent by another tool on the same number); answer how many."""

    async def find_by_provider_id(
        self, channel: str, provider_message_id: str
    ) -> Message | None: ...

    async def park_status(self, parked: ParkedStatus) -> Message | None:
        """Keep a status whose provider id is not yet known. Atomic with
        `link_provider_id`: if the id was linked meanwhile, nothing is parked and the
        message is returned instead."""

    async def apply_status(self, event: StatusEvent) -> ApplyResult:
        """Apply the status rules and, for a status change, assign the conversation's
        next seq, in one transaction, which also completes the event's outbox entry."""

    async def apply_statuses(self, events: Sequence[StatusEvent]) -> list[ApplyResult]:
        """`apply_status` of each event, in order, all in ONE transaction (group commit):
        answers one result per event, in the same order, each as `apply_status` alone
        would have (a later event sees what the earlier ones did, even on the same
        message). If it raises, none is applied — except on a store with no transaction
        across partitions (Cassandra), where any but the failed one and the later ones of
        its conversation may be, and the retry finds them by event id (a replay: no
        change, their frames again).

        A store may answer `busy` for the events of a conversation whose rows another
        transaction holds (PostgreSQL does, after a brief wait), and apply the others:
        one stuck conversation does not hold up the group commit."""

    # -- hand-offs (the transactional outbox) -------------------------------------------

    async def handoff(
        self,
        entries: Sequence[OutboxEntry] = (),
        *,
        done: Sequence[tuple[str, str]] = (),
        parked: Sequence[tuple[str, str]] = (),
        relayed_run: str | None = None,
        claim_s: float | None = None,
    ) -> list[int]:
        """In one transaction: add `entries` to the outbox, complete the entries that
        `done` names as (topic, done_key), and forget the statuses parked for each of
        `parked` (channel, provider id) — they are in `entries` now. With `relayed_run`
        the entries are added as already relayed by that run (`mark_relayed`): the caller
        hands them to a bus that keeps nothing itself, right after this commit.

        With `claim_s` the entries are added claimed for that long, as `claim_outbox`
        would claim them, and their ids are answered in order (else none are): the caller
        publishes them to a durable bus right after this commit and then deletes them
        (`delete_outbox`), or gives them back (`unclaim_outbox`). A caller that dies in
        between leaves them to the relays once the claim lapses."""

    async def outbox_batch(self, run: str, limit: int) -> list[OutboxItem]:
        """Outbox entries not yet relayed by the relay run `run` (a process's lifetime),
        oldest first, at most `limit`: after a restart, every entry left is relayed again."""

    async def claim_outbox(self, limit: int, lease_s: float) -> list[OutboxItem]:
        """For a durable bus: claim up to `limit` entries, oldest first, that nobody has
        claimed for the last `lease_s` seconds, so the relays of several processes share
        the outbox instead of each publishing everything; a relay that dies with a claim
        lets it lapse and another takes the entries over."""

    async def unclaim_outbox(self, ids: Sequence[int]) -> None:
        """Give claimed entries back at once (the bus did not take them)."""

    async def mark_relayed(self, ids: Sequence[int], run: str) -> None:
        """Entries handed to a bus that keeps nothing: they stay until their work is
        done downstream, and are relayed again by the next run."""

    async def delete_outbox(self, ids: Sequence[int]) -> None:
        """Drop relayed entries (a durable bus stored them)."""

    async def outbox_size(self) -> int: ...

    # -- provider sends --------------------------------------------------------------

    async def begin_send(self, message_id: str) -> tuple[SendClaim, Message | None]:
        """Record a send attempt before the provider is called (`GO`), in one
        transaction with the check that no earlier attempt may have reached it. Where a
        claim may apply though its writer never hears so (Cassandra: a lightweight
        transaction whose answer was lost), the claim carries an id of this call, so that
        the call recognizes its own claim (`GO`) rather than another's (`UNKNOWN`)."""

    async def release_send(self, message_id: str) -> None:
        """The attempt certainly did not reach the provider: it may be made again."""

    # -- the watchdog ----------------------------------------------------------------

    async def stuck(
        self,
        pending_before: datetime,
        unknown_before: datetime,
        sent_before: datetime,
        limit: int,
    ) -> Stuck:
        """Messages that have not moved since the given times, oldest first, at most
        `limit` of each kind."""

    async def redrive(self, message_id: str) -> bool:
        """Hand a PENDING message with no send under way to the outbox again (a fresh
        entry replacing any older one); False when it is no longer such a message."""

    async def changes_since(self, conversation_id: str, since: int, limit: int) -> Changes: ...

    async def subscription_changes(
        self, reads: Sequence[SubscriptionRead], limit: int
    ) -> list[Changes | None]:
        """What each subscription starts from, in order, read together (the hub groups
        the subscribes that wait at once): None when the organization has no such
        conversation, else `changes_since(since)`; without `since`, nothing but the
        conversation's current last_seq (`Changes((), last_seq, True)`)."""

    async def message_history(self, message_id: str) -> tuple[str, ...]:
        """The status frames of one message's changes, oldest first (for operators)."""

    # -- campaigns (whatslike/campaigns.py) ---------------------------------------------

    async def create_campaign(self, new: NewCampaign) -> tuple[Campaign, bool]:
        """Store the campaign and all its recipients in one transaction; the same
        organization's `client_campaign_id` again answers the stored campaign and False
        (the caller compares fingerprints)."""

    async def get_campaign(self, org_id: str, campaign_id: str) -> Campaign | None: ...

    async def campaign_recipients(
        self, org_id: str, campaign_id: str, after: int, limit: int
    ) -> list[CampaignRecipient] | None:
        """Recipients past position `after`, in order, at most `limit`, each with its
        message once created; None when the campaign is not this organization's."""

    async def campaigns_to_run(self, limit: int) -> list[Campaign]:
        """Campaigns with recipients whose message is not created yet, oldest first."""

    async def campaign_backlog(self, channel: str) -> int:
        """Campaign messages of this channel still PENDING (waiting to be sent)."""

    async def campaign_step(self, campaign_id: str, limit: int) -> int:
        """Create the messages of the next `limit` recipients (a conversation where the
        organization has none with the contact), their `messages` outbox entries, and
        count them queued, in one transaction; answer how many. A recipient's message is
        created once: its position is passed in the same transaction."""

    # -- outbound webhooks (whatslike/webhooks) -----------------------------------------
    # `apply_status`/`apply_statuses` add, with each status change (in its transaction;
    # on Cassandra in the logged batch that completes it), one delivery per endpoint of
    # the message's organization.

    async def add_webhook_endpoint(
        self, endpoint: WebhookEndpoint, limit: int
    ) -> WebhookEndpoint | None:
        """Add it unless its organization has `limit` endpoints already (then None)."""

    async def webhook_endpoints(self, org_id: str) -> list[WebhookEndpoint]:
        """The organization's endpoints, oldest first."""

    async def webhook_endpoint(self, org_id: str, endpoint_id: str) -> WebhookEndpoint | None: ...

    async def delete_webhook_endpoint(self, org_id: str, endpoint_id: str) -> bool:
        """Delete it and its deliveries; False when there is no such endpoint."""

    async def rotate_webhook_secret(
        self, org_id: str, endpoint_id: str, secret: str, previous_until: datetime
    ) -> WebhookEndpoint | None:
        """Sign with `secret` from now on; the current one keeps signing until
        `previous_until`. None when there is no such endpoint."""

    async def claim_webhook_endpoints(
        self, owner: str, limit: int, lease_s: float, now: datetime
    ) -> list[WebhookEndpoint]:
        """Lease up to `limit` endpoints that have a delivery due at `now` and that no
        other owner holds (an owner's own lease is renewed), for `lease_s` seconds."""

    async def renew_webhook_lease(self, owner: str, endpoint_id: str, lease_s: float) -> bool:
        """Extend the lease; False when `owner` no longer holds it."""

    async def release_webhook_lease(self, owner: str, endpoint_id: str) -> None: ...

    async def due_webhook_deliveries(
        self, endpoint_id: str, now: datetime, limit: int
    ) -> list[WebhookDelivery]:
        """The endpoint's deliveries that are due: only the oldest (lowest seq) unparked
        one of each conversation, if its `next_at` has come; oldest first, at most
        `limit`."""

    async def webhook_delivered(self, delivery_id: int) -> None:
        """The receiver answered 2xx: delete it."""

    async def webhook_failed(
        self, delivery_id: int, next_at: datetime | None, error: str, now: datetime
    ) -> None:
        """Count a failed attempt: try again at `next_at`, or park it (None)."""

    async def parked_webhook_deliveries(
        self, org_id: str, endpoint_id: str, limit: int
    ) -> list[WebhookDelivery] | None:
        """The endpoint's parked deliveries, oldest first; None for no such endpoint."""

    async def oldest_pending_webhook(self) -> datetime | None:
        """When the oldest delivery not yet delivered nor parked was queued (or made due
        again by a replay); None when there is none. For the metrics: a scan of them."""

    async def replay_parked_webhooks(
        self, org_id: str, endpoint_id: str, now: datetime
    ) -> int | None:
        """Make every parked delivery of the endpoint due again (a fresh retry period);
        answer how many, or None for no such endpoint."""

    async def record_dead_letter(self, topic: str, payload: bytes, reason: str) -> None: ...

    async def dead_letter_count(self) -> int: ...

    async def dead_letters(self, limit: int) -> list[DeadLetter]:
        """The newest dead letters, newest first, at most `limit` (for operators)."""

    async def dead_letter(self, dead_letter_id: str) -> DeadLetter | None:
        """One dead letter by the id `dead_letters` gave; None for no such (or a
        malformed) id."""


__all__ = [
    "ApplyResult",
    "Campaign",
    "CampaignRecipient",
    "Changes",
    "Conversation",
    "DeadLetter",
    "InboundMedia",
    "InboundMessage",
    "MediaState",
    "Message",
    "NewCampaign",
    "OutboxEntry",
    "OutboxItem",
    "ParkedStatus",
    "ProviderError",
    "SendClaim",
    "Store",
    "Stuck",
    "SubscriptionRead",
    "WebhookDelivery",
    "WebhookEndpoint",
]
