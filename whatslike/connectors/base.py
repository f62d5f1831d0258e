"""The part of a Meta connector that does not depend on the channel: sending through the
Graph API, the signed webhook routes, resolving provider ids, parking, and handing the
statuses off durably.

Nothing is acknowledged before it is stored. A webhook is answered 200 only once its
statuses are outbox entries in the store (or parked there); a send is recorded in the
store before the provider is called, so a retry after a crash, a timeout or a store
outage never calls the provider a second time: it only finishes what the first call
left undone (the link to the provider id, the statuses parked for it).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import random
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Annotated, Any, Generic, Literal, TypeVar

import aiohttp
from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import BaseRoute

from whatslike.api.contract import Operation, Reply
from whatslike.bus.memory import backoff_delay
from whatslike.clock import format_time, utcnow
from whatslike.connectors.meta import (
    SIGNATURE_HEADER,
    CustomerMessage,
    Parsed,
    WebhookPayloadError,
    error_response,
    load_object,
    read_body,
    signature_valid,
    verification_response,
)
from whatslike.connectors.pacing import Pacer
from whatslike.errors import BackendUnavailable, MalformedEvent, WhatslikeError
from whatslike.events import (
    TOPIC_MESSAGES,
    MediaFetch,
    OutboundMessage,
    ReadReceipt,
    StatusEvent,
    media_topic,
    outbound_topic,
    receipt_topic,
)
from whatslike.grouping import Grouped
from whatslike.http_client import Answer, NotSent, OutcomeUnknown
from whatslike.media.factory import open_media_store
from whatslike.media.inbound import MediaFetchFailed
from whatslike.media.store import MediaRecord
from whatslike.roles import Deps
from whatslike.roles.relay import CLAIM_LEASE_S, ClaimedPublisher
from whatslike.settings import Settings
from whatslike.status.rules import ProviderError, Status, bounded
from whatslike.store.base import (
    InboundMedia,
    InboundMessage,
    Message,
    OutboxEntry,
    ParkedStatus,
    SendClaim,
)
from whatslike.store.common import status_entry

log = logging.getLogger(__name__)

#: Meta documents webhook bodies of up to 3 MB; anything past this is not Meta.
MAX_WEBHOOK_BYTES = 4 * 1024 * 1024

#: Meta error codes that mean "slow down" even when the HTTP status is 400: retrying
#: later succeeds, so they must not turn into a FAILED message.
THROTTLING_CODES = frozenset({4, 17, 32, 613, 80007, 130429, 131048, 131056})

#: A provider time moved by less is not logged: WhatsApp's are whole seconds, so a status
#: of a message created at 12:00:00.7 is often dated 12:00:00 (and moved to 12:00:00.7).
CLAMP_LOGGED = timedelta(seconds=1)

T = TypeVar("T")
R = TypeVar("R")


def observation_id(channel: str, message_id: str, status: Status, occurred_at: datetime) -> str:
    """The same provider observation always gets the same event id, so a webhook that
    Meta redelivers (after we failed to answer 200) is recognised by the store, which
    then hands back the frames it made the first time: a crash between the store's commit
    and the fan-out publish loses no notification."""
    key = f"{channel}|{message_id}|{status.value}|{format_time(occurred_at)}"
    return "evt_" + hashlib.sha256(key.encode()).hexdigest()[:32]


class VerifyQuery(BaseModel):
    """Meta's subscription handshake."""

    mode: Annotated[Literal["subscribe"], Field(alias="hub.mode")]
    verify_token: Annotated[
        str, Field(alias="hub.verify_token", description="`META_VERIFY_TOKEN`.")
    ]
    challenge: Annotated[
        str,
        Field(alias="hub.challenge", min_length=1, description="Echoed back when it matches."),
    ]


class SignatureHeader(BaseModel):
    signature: Annotated[
        str,
        Field(
            alias=SIGNATURE_HEADER,
            description="`sha256=` and the HMAC-SHA256 of the exact body with "
            "`META_APP_SECRET` (or one of `META_PREVIOUS_APP_SECRETS`).",
        ),
    ]


class MetaWebhook(BaseModel):
    """Meta's webhook (`object`, `entry[].changes[]` for WhatsApp, `entry[].messaging[]`
    for Instagram). Any signed JSON object is taken: the items not shaped like Meta's are
    skipped one by one (protocol.md §5), since Meta would redeliver a refused body."""

    model_config = ConfigDict(extra="allow")


@dataclass
class Handoff:
    """What one webhook (or one accepted send) hands off, in one store transaction."""

    received_at: datetime
    entries: list[OutboxEntry] = field(default_factory=list)
    #: (channel, provider id) whose parked statuses are among `entries` now.
    parked: list[tuple[str, str]] = field(default_factory=list)
    #: Our messages the webhook's items name (callback data), read at once up front.
    named: dict[str, Message] = field(default_factory=dict)


class ProviderUnavailable(WhatslikeError):
    """Meta could not take the send now (5xx, 429, throttling, network). Retriable."""


#: Meta's "too fast" (and "not now") codes, by what they hold back: every send of the
#: business number (130429 its throughput, 131057 its upgrade), or the sends to one
#: customer (131056, the pair rate).
ACCOUNT_RATE = "throttled_account"
PAIR_RATE = "throttled_pair"
THROTTLED = {"130429": ACCOUNT_RATE, "131057": ACCOUNT_RATE, "131056": PAIR_RATE}


class ProviderThrottled(WhatslikeError):
    """Meta refused the send as too fast (the attempt was released): try again later."""

    def __init__(self, scope: str, detail: str) -> None:
        super().__init__(detail)
        self.scope = scope


class MediaMissing(WhatslikeError):
    """The medium a message carries is no longer in the media store."""


def meta_error(response: Answer) -> tuple[ProviderError, bool]:
    """Meta's `{"error":{...}}` answer as (our error, retriable)."""
    try:
        error = response.json()["error"]
        code = error["code"]
        title = str(error.get("error_user_title") or error["message"])
        transient = error.get("is_transient") is True or code in THROTTLING_CODES
    except (ValueError, KeyError, TypeError):
        return ProviderError(f"http_{response.status}", response.reason), False
    return ProviderError(str(code), title), transient


class MetaConnector(ABC, Generic[T]):
    """A role: consumes `outbound.<channel>` and serves `/webhooks/<channel>`.

    `T` is one parsed webhook item (a WhatsApp status, an Instagram read)."""

    name: str
    channel: str

    def __init__(self, deps: Deps) -> None:
        self._settings = deps.settings
        self._store = deps.store
        self._http = deps.http
        self._metrics = deps.metrics
        self._handoffs = deps.handoffs
        self._bus = deps.bus
        self._pacer = Pacer(self.sends_per_s(deps.settings), self.sends_burst(deps.settings))
        self._send_headers = {
            "Authorization": f"Bearer {deps.settings.meta_access_token}",
            "Content-Type": "application/json",
        }
        self._relay_run = deps.relay_run
        self._media = open_media_store(deps.settings, deps.jwt_secret)
        #: Customers' media are downloaded on a session of their own (opened at start):
        #: long downloads never hold the sends' connections, and its pool bounds them.
        self._downloads: aiohttp.ClientSession | None = None
        # Bound once: per webhook, a labelled child is looked up otherwise.
        self._handoff_seconds = deps.metrics.store_seconds.labels("handoff")
        self._webhooks_ok = deps.metrics.webhooks.labels(self.channel, "ok")
        self._inbound = deps.metrics.inbound_messages.labels(self.channel)
        self._rng = random.Random()
        # Webhooks answered at the same time share one store transaction.
        self._webhook_handoffs = Grouped(self._hand_off_many, f"{self.name}-handoffs", 256)
        self._publisher = ClaimedPublisher(deps)
        deps.bus.subscribe(outbound_topic(self.channel), self.name, self.send)
        deps.bus.subscribe(receipt_topic(self.channel), self.name, self.send_receipt)
        deps.bus.subscribe(media_topic(self.channel), self.name, self.fetch_media)

    def routes(self) -> list[BaseRoute]:
        return []  # its webhooks are operations of the contract

    def operations(self) -> list[Operation]:
        path = f"/webhooks/{self.channel}"
        name = {"whatsapp": "WhatsApp"}.get(self.channel, self.channel.capitalize())
        tag = "provider webhooks"
        return [
            Operation(
                "GET",
                path,
                self.verify,
                f"verify{name}Webhook",
                f"Meta's subscription handshake for {name} webhooks",
                tag,
                200,
                Reply("`hub.challenge`, echoed.", media_type="text/plain"),
                auth="none",
                query=VerifyQuery,
                errors={403: "The mode is not `subscribe` or the token is not ours."},
            ),
            Operation(
                "POST",
                path,
                self.receive,
                f"receive{name}Webhook",
                f"Meta's {name} callbacks: statuses and customers' messages",
                tag,
                200,
                Reply("What the body holds is stored (an empty body)."),
                auth="none",
                body=MetaWebhook,
                headers=SignatureHeader,
                errors={
                    400: "The signed body is not a JSON object.",
                    403: f"No `{SIGNATURE_HEADER}`, or one made with another secret.",
                    413: "The body is larger than 4 MiB.",
                },
                hot=True,
            ),
        ]

    async def start(self) -> None:
        await self._media.open()
        self._downloads = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self._settings.media_fetch_concurrency)
        )
        self._webhook_handoffs.start()
        self._publisher.start()

    async def stop(self) -> None:
        await self._webhook_handoffs.stop()
        await self._publisher.stop()
        if self._downloads is not None:
            await self._downloads.close()
            self._downloads = None
        await self._media.close()

    # -- channel specifics ------------------------------------------------------------

    @abstractmethod
    def sends_per_s(self, settings: Settings) -> float:
        """The provider's send rate of this channel's account (we stay below it)."""

    def sends_burst(self, settings: Settings) -> float:
        """Sends that may leave at once after a quiet while: a tenth of a second's worth."""
        return max(1.0, self.sends_per_s(settings) / 10)

    @abstractmethod
    def send_url(self) -> str: ...

    @abstractmethod
    async def send_body(self, message: OutboundMessage) -> dict[str, Any]:
        """The send request of a message; MediaMissing when the medium it carries is gone
        (the message fails), BackendUnavailable when the media store is out of reach."""

    @abstractmethod
    def receipt_body(self, receipt: ReadReceipt) -> dict[str, Any]:
        """The Graph API call (to `send_url`) telling Meta the customer's message was read."""

    @abstractmethod
    def provider_id_of(self, answer: Any) -> str:
        """The provider message id in a 2xx send answer; raises on an unexpected shape."""

    @abstractmethod
    def parse(self, payload: dict[str, Any]) -> Parsed[T]:
        """Pure: the items of one webhook body, and what could not be read in it."""

    @abstractmethod
    async def collect(self, item: T, handoff: Handoff) -> None:
        """Add one item's statuses to `handoff`, or park the item."""

    @abstractmethod
    async def collect_parked(
        self, parked: ParkedStatus, message: Message, handoff: Handoff
    ) -> None:
        """Add a parked payload's statuses now that its provider id is `message`'s."""

    def named_messages(self, items: Sequence[T]) -> list[str]:
        """Our message ids the items name (callback data), read in one go before
        `collect`; none by default."""
        return []

    def accepted(self, message: Message, provider_message_id: str, handoff: Handoff) -> None:
        """Called once Meta accepted the send (or it was accepted before a redelivery)."""
        return None

    @abstractmethod
    async def download(
        self, http: aiohttp.ClientSession, media: InboundMedia, org_id: str
    ) -> MediaRecord:
        """Fetch a customer's medium from Meta into the media store (MediaFetchFailed,
        aiohttp.ClientError, TimeoutError; BackendUnavailable when the store is away)."""

    @abstractmethod
    def account(self) -> tuple[str, str]:
        """Our account on this channel (the phone number id, the Instagram account id)
        and the organization that owns it."""

    # -- customers' messages ----------------------------------------------------------

    async def receive_customer_message(self, item: CustomerMessage, handoff: Handoff) -> None:
        """Store a customer's message, then hand off its arrival (DELIVERED, which gives
        it its seq and `message` frame) with the webhook's other hand-offs. A crash in
        between loses nothing: the webhook had no 200, and its redelivery finds the
        message stored and hands off the same arrival (one event id)."""
        account_id, org_id = self.account()
        if item.account_id != account_id:
            self._metrics.webhooks.labels(self.channel, "foreign_account").inc()
            log.warning("%s: a message to account %s ignored", self.name, item.account_id)
            return
        message = await self._store.receive_message(
            InboundMessage(
                account_org_id=org_id,
                channel=self.channel,
                contact=item.contact,
                provider_message_id=item.provider_message_id,
                text=item.text,
                sent_at=item.sent_at,
                media=item.media,
            )
        )
        self._inbound.inc()
        if message.inbound_media is None:
            self.add_status(
                handoff, message, Status.DELIVERED, item.provider_message_id, item.sent_at
            )
        elif message.inbound_media.state == "fetching":
            # Its arrival is announced once its medium is fetched (`fetch_media`).
            fetch = MediaFetch(message.id, message.conversation_id, message.org_id, self.channel)
            handoff.entries.append(
                OutboxEntry(
                    media_topic(self.channel), message.conversation_id, fetch.to_json(), message.id
                )
            )
        else:  # fetched before: its arrival again (one event id), which may be lost
            self._add_arrival(handoff, message)

    def _add_arrival(self, handoff: Handoff, message: Message) -> None:
        """The arrival of a customer's message with a medium, dated by its stored time
        (the same event whoever hands it off: the webhook again, or the fetch)."""
        provider_id = message.provider_message_id or ""
        self.add_status(handoff, message, Status.DELIVERED, provider_id, message.created_at)

    # -- customers' media -------------------------------------------------------------

    async def fetch_media(self, raw: bytes) -> None:
        """Bus handler of `media.<channel>`: fetch a customer's medium into the media
        store, record where it is, then hand off its message's arrival (its `message`
        frame carries the medium, stored or failed) and complete this hand-off, in one
        transaction. Meta out of reach or answering 5xx/429 is tried again with back-off
        (`MEDIA_FETCH_ATTEMPTS`), a refusal is not; either way the medium ends `stored`
        or `failed` (with why) and the message is announced: never lost, never pending
        for ever. A media store out of reach raises: the bus retries while it lasts."""
        fetch = MediaFetch.from_json(raw)
        message = await self._retrying(lambda: self._store.get_message(fetch.message_id))
        if message is None or message.inbound_media is None:
            raise MalformedEvent(f"no customer's medium in {fetch.message_id!r}")
        if message.inbound_media.state == "fetching":
            media, media_id = await self._fetch_with_retries(message, message.inbound_media)
            stored_media = media
            await self._retrying(
                lambda: self._store.set_inbound_media(fetch.message_id, stored_media, media_id)
            )
            message = replace(message, inbound_media=media, media_id=media_id)
        handoff = Handoff(utcnow())
        self._add_arrival(handoff, message)
        await self._retrying(
            lambda: self._hand_off(handoff, done=[(media_topic(self.channel), fetch.message_id)])
        )

    async def _fetch_with_retries(
        self, message: Message, media: InboundMedia
    ) -> tuple[InboundMedia, str | None]:
        """The medium's final state and, once stored, its media id."""
        assert self._downloads is not None, "the connector is not started"
        attempts = self._settings.media_fetch_attempts
        reason = ""
        for attempt in range(1, attempts + 1):
            try:
                record = await self.download(self._downloads, media, message.org_id)
            except MediaFetchFailed as exc:
                reason = f"{exc.code}: {exc}"
                if not exc.retriable:
                    break
            except (aiohttp.ClientError, TimeoutError) as exc:
                reason = f"unreachable: {type(exc).__name__}"
            else:
                self._metrics.inbound_media.labels(self.channel, "stored").inc()
                log.info(
                    "%s: medium of %s stored as %s (%s, %d bytes)",
                    self.name,
                    message.id,
                    record.id,
                    record.content_type,
                    record.size,
                )
                stored = replace(
                    media, state="stored", kind=record.kind, content_type=record.content_type
                )
                return stored, record.id
            if attempt < attempts:
                self._metrics.inbound_media.labels(self.channel, "retry").inc()
                await asyncio.sleep(
                    min(30.0, self._settings.media_fetch_backoff_s * 2 ** (attempt - 1))
                    * self._rng.uniform(0.5, 1.0)
                )
        self._metrics.inbound_media.labels(self.channel, "failed").inc()
        log.warning("%s: medium of %s given up: %s", self.name, message.id, reason)
        return replace(media, state="failed", error=reason[:200]), None

    # -- read receipts ----------------------------------------------------------------

    async def send_receipt(self, raw: bytes) -> None:
        """Bus handler of `receipts.<channel>`: tell Meta an agent read a customer's
        message, then complete its hand-off. Meta takes a repeated receipt as a no-op, so
        one whose outcome is unknown is simply made again (raising makes the bus retry);
        one Meta refuses for good is logged and dropped (the message stays READ here)."""
        receipt = ReadReceipt.from_json(raw)
        await self._pacer.slot()
        body = json.dumps(self.receipt_body(receipt), separators=(",", ":")).encode()
        try:
            response = await self._http.post(
                self.send_url(), body, self._send_headers, self._settings.send_timeout_s
            )
        except (NotSent, OutcomeUnknown) as exc:
            self._metrics.receipts.labels(self.channel, "retry").inc()
            raise ProviderUnavailable(f"read receipt of {receipt.message_id}: {exc}") from exc
        if not response.ok:
            error, transient = meta_error(response)
            if response.status == 429 or response.status >= 500 or transient:
                self._metrics.receipts.labels(self.channel, "retry").inc()
                raise ProviderUnavailable(
                    f"read receipt of {receipt.message_id}: HTTP {response.status} {error.code}"
                )
            self._metrics.receipts.labels(self.channel, "refused").inc()
            log.warning(
                "%s: Meta refused the read receipt of %s: %s %s",
                self.name,
                receipt.message_id,
                error.code,
                error.title,
            )
        else:
            self._metrics.receipts.labels(self.channel, "ok").inc()
        await self._retrying(
            lambda: self._store.handoff(done=[(receipt_topic(self.channel), receipt.message_id)])
        )

    # -- sending ----------------------------------------------------------------------

    async def send(self, raw: bytes) -> None:
        """Bus handler of `outbound.<channel>`: raising makes the bus retry. Meta's "too
        fast" answers are waited out here, holding only this conversation (its lane of
        the bus): 130429 holds every send of the account a while, 131056 (the pair rate
        to one customer) waits for that customer's next slot; neither ever fails the
        message."""
        outbound = OutboundMessage.from_json(raw)
        throttled = 0
        while True:
            try:
                await self._send_once(outbound)
                return
            except ProviderThrottled as exc:
                throttled += 1
                self._metrics.sends.labels(self.channel, exc.scope).inc()
                if exc.scope == ACCOUNT_RATE:
                    # Every later send of the account waits too: the limit is the number's.
                    wait = min(60.0, self._settings.throttle_hold_s * throttled)
                    self._pacer.hold(wait)
                else:
                    wait = self._settings.pair_retry_s
                if throttled == 1 or throttled % 10 == 0:
                    log.info(
                        "%s: message %s throttled by Meta (%s, %d times); again in %.1f s",
                        self.name,
                        outbound.message_id,
                        exc,
                        throttled,
                        wait,
                    )
                if exc.scope == PAIR_RATE:
                    await asyncio.sleep(wait)

    async def _send_once(self, outbound: OutboundMessage) -> None:
        claim, stored = await self._store.begin_send(outbound.message_id)
        if claim is SendClaim.MISSING or stored is None:
            raise MalformedEvent(f"no message {outbound.message_id!r}")
        if claim is SendClaim.LINKED and stored.provider_message_id is not None:
            # A redelivery after Meta accepted the send: never send again, but finish what
            # the first attempt may not have (its SENT, the parked statuses).
            announce = stored.status is Status.PENDING
            await self._finish(stored, stored.provider_message_id, announce=announce)
            return
        if claim is not SendClaim.GO:
            # MOVED_ON (e.g. FAILED) or UNKNOWN: an earlier attempt may have reached Meta,
            # and the Graph API has no idempotency key, so it is never sent again. A
            # WhatsApp status webhook names our message (callback data) and settles it;
            # otherwise the watchdog fails it after `send_unknown_fail_s`.
            self._metrics.sends.labels(self.channel, claim.value).inc()
            log.info("%s: message %s not sent again (%s)", self.name, stored.id, claim.value)
            await self._store.handoff(done=[(TOPIC_MESSAGES, stored.id)])
            return
        await self._pacer.slot()
        provider_id = await self._post(outbound, stored)
        if provider_id is not None:
            await self._finish(stored, provider_id, announce=True)

    async def _finish(self, stored: Message, provider_id: str, *, announce: bool) -> None:
        """Link the provider id, then hand off the acceptance and the statuses that arrived
        before the link, completing the send's outbox entry. Only these store steps are
        retried here; the provider is not called again."""
        # Meta's own answer wins over an id linked from callback data meanwhile.
        parked, replaced = await self._retrying(
            lambda: self._store.link_answer(self.channel, provider_id, stored.id)
        )
        if replaced is not None:
            log.warning(
                "%s: message %s was linked to %s by a webhook's callback data; Meta's send "
                "answer names %s, which wins",
                self.name,
                stored.id,
                replaced,
                provider_id,
            )
        handoff = Handoff(utcnow())
        if announce:
            self.accepted(stored, provider_id, handoff)
        for item in parked:
            await self.collect_parked(item, stored, handoff)
        if parked:
            handoff.parked.append((self.channel, provider_id))
        if handoff.entries or handoff.parked or not self._bus.durable:
            await self._retrying(
                lambda: self._hand_off(handoff, done=[(TOPIC_MESSAGES, stored.id)])
            )
        # Else nothing is left to store: on a durable bus the relay deleted the send's
        # entry once the bus took it (a redelivery finds the link and comes back here).

    async def _retrying(self, step: Callable[[], Awaitable[R]]) -> R:
        """Run a store step, riding out an outage with back-off (bounded by the consumer
        budget); the last failure is raised and the bus redelivers the send, which then
        finds the send recorded and resumes here."""
        attempt = 0
        while True:
            attempt += 1
            try:
                return await step()
            except BackendUnavailable:
                if attempt >= self._settings.consumer_max_attempts:
                    raise
                await asyncio.sleep(
                    backoff_delay(
                        attempt,
                        self._settings.consumer_backoff_base_s,
                        self._settings.consumer_backoff_cap_s,
                        self._rng,
                    )
                )

    async def _post(self, outbound: OutboundMessage, stored: Message) -> str | None:
        """Meta's provider id; None when the send is settled otherwise (refused for good:
        FAILED handed off; or the outcome is unknown)."""
        try:
            body = await self.send_body(outbound)
        except BackendUnavailable as exc:
            await self._not_sent(stored)
            raise ProviderUnavailable(f"send of {stored.id}: {exc}") from exc
        except MediaMissing as exc:
            log.warning("%s: %s", self.name, exc)
            await self._fail(stored, ProviderError("media_gone", "The medium to send is gone"))
            return None
        try:
            response = await self._http.post(
                self.send_url(),
                json.dumps(body, separators=(",", ":")).encode(),
                self._send_headers,
                self._settings.send_timeout_s,
            )
        except NotSent as exc:
            await self._not_sent(stored)
            raise ProviderUnavailable(f"send of {stored.id} failed: {exc}") from exc
        except OutcomeUnknown as exc:
            # The request may have reached Meta: sending again could send twice.
            self._metrics.sends.labels(self.channel, "unknown").inc()
            log.warning("%s: outcome of the send of %s unknown: %s", self.name, stored.id, exc)
            await self._store.handoff(done=[(TOPIC_MESSAGES, stored.id)])
            return None
        if response.ok:
            try:
                provider_id = self.provider_id_of(response.json())
            except (ValueError, LookupError, TypeError):
                # Retrying could send twice; FAILED is visible, and a later delivery
                # webhook (found by our callback data) still moves the message on.
                log.error("%s: unreadable send answer for %s", self.name, stored.id)
                self._metrics.sends.labels(self.channel, "bad_answer").inc()
                error = ProviderError("bad_provider_answer", "Unreadable send answer")
                await self._fail(stored, error)
                return None
            self._metrics.sends.labels(self.channel, "ok").inc()
            return provider_id
        error, transient = meta_error(response)
        scope = THROTTLED.get(error.code)
        if scope is not None:
            await self._not_sent(stored)
            raise ProviderThrottled(scope, f"{error.code} {error.title}")
        if response.status == 429 or response.status >= 500 or transient:
            await self._not_sent(stored)
            raise ProviderUnavailable(
                f"send of {stored.id}: HTTP {response.status} {error.code} {error.title}"
            )
        log.warning(
            "%s: Meta refused %s: HTTP %s %s %s",
            self.name,
            stored.id,
            response.status,
            error.code,
            error.title,
        )
        self._metrics.sends.labels(self.channel, "refused").inc()
        await self._fail(stored, error)
        return None

    async def _not_sent(self, stored: Message) -> None:
        """Meta did not take the message (refused to connect, or answered "later"): the
        attempt is released so that the bus's retry may make it again."""
        self._metrics.sends.labels(self.channel, "retry").inc()
        await self._retrying(lambda: self._store.release_send(stored.id))

    async def _fail(self, stored: Message, error: ProviderError) -> None:
        handoff = Handoff(utcnow())
        self.add_status(handoff, stored, Status.FAILED, "", handoff.received_at, error=error)
        await self._hand_off(handoff, done=[(TOPIC_MESSAGES, stored.id)])

    async def _hand_off_many(self, handoffs: list[Handoff]) -> list[None]:
        """Several webhooks' hand-offs in one transaction: all of them, or none. The
        entries are then handed to the bus from here (`_hand_on`) rather than by a pass
        of the relay over the outbox."""
        started = time.perf_counter()
        entries = [entry for handoff in handoffs for entry in handoff.entries]
        durable = self._bus.durable
        claimed = await self._store.handoff(
            entries,
            parked=[key for handoff in handoffs for key in handoff.parked],
            relayed_run=self._relay_run.id if entries and not durable else None,
            claim_s=CLAIM_LEASE_S if entries and durable else None,
        )
        self._handoff_seconds.observe(time.perf_counter() - started)
        if entries:
            await self._hand_on(entries, claimed)
        return [None] * len(handoffs)

    async def _hand_on(self, entries: list[OutboxEntry], claimed: list[int]) -> None:
        """Publish committed entries. On a durable bus they were added claimed by this
        process (`claimed`, their ids): the publisher publishes them in the background
        (see `ClaimedPublisher`). On the in-process bus they were added as relayed by this
        run; if the bus does not take them, the relay's run is renewed, so the relay
        hands them on again."""
        if claimed:
            await self._publisher.submit(entries, claimed)
            return
        try:
            await self._bus.publish_many([(e.topic, e.key, e.payload) for e in entries])
        except Exception as exc:
            log.warning("%s: hand-offs left to the outbox relay: %s", self.name, exc)
            self._relay_run.renew()
            self._handoffs.set()
            return
        self._metrics.outbox_relayed.inc(len(entries))

    async def _hand_off(self, handoff: Handoff, done: Sequence[tuple[str, str]] = ()) -> None:
        """One send's hand-off: on a durable bus its entries are published from here,
        right after the commit (`_hand_on`); on the in-process bus the relay is woken."""
        entries = handoff.entries
        durable = self._bus.durable
        claimed = await self._store.handoff(
            entries,
            done=done,
            parked=handoff.parked,
            claim_s=CLAIM_LEASE_S if entries and durable else None,
        )
        if entries and durable:
            await self._hand_on(entries, claimed)
        elif entries:
            self._handoffs.set()

    # -- webhooks ---------------------------------------------------------------------

    async def verify(self, request: Request) -> Response:
        return verification_response(request, self._settings.meta_verify_token)

    async def receive(self, request: Request) -> Response:
        try:
            body = await read_body(request, MAX_WEBHOOK_BYTES)
        except ClientDisconnect:
            # Nobody to answer, nothing was read: not an error of ours, no traceback.
            self._count_webhook("disconnected")
            log.info("%s: client left before sending the whole webhook body", self.name)
            return Response(status_code=400)
        if body is None:
            self._count_webhook("too_large")
            return error_response(413, "too_large", "webhook body too large")
        header = request.headers.get(SIGNATURE_HEADER)
        if not signature_valid(self._settings.meta_app_secrets, body, header):
            self._count_webhook("bad_signature")
            return error_response(403, "forbidden", f"missing or wrong {SIGNATURE_HEADER}")
        try:
            payload = load_object(body)
        except WebhookPayloadError as exc:
            self._count_webhook("malformed")
            log.warning("%s: malformed webhook: %s", self.name, exc)
            return error_response(400, "bad_request", str(exc))
        # A signed body is never refused for some of its items: Meta would redeliver the
        # same body for ever, and its good items would never apply.
        parsed = self.parse(payload)
        self._report(parsed)
        items = parsed.items
        handoff = Handoff(utcnow())
        try:
            named = self.named_messages(items)
            if named:
                found = await self._store.get_messages(named)
                handoff.named = {message.id: message for message in found}
            for item in items:
                await self.collect(item, handoff)
            if handoff.entries or handoff.parked:
                await self._webhook_handoffs(handoff)
        except Exception as exc:
            # Meta redelivers a webhook that did not get a 200, so answering 503 loses
            # nothing: what was handed over already comes again and applies as a no-op.
            if isinstance(exc, BackendUnavailable):
                log.warning("%s: webhook not handled, Meta will retry: %s", self.name, exc)
            else:
                log.exception("%s: webhook not handled, Meta will retry", self.name)
            self._count_webhook("unavailable")
            response = error_response(503, "unavailable", "try again later")
            response.headers["Retry-After"] = str(self._settings.retry_after_s)
            return response
        self._webhooks_ok.inc()
        return Response(status_code=200)

    def _count_webhook(self, outcome: str) -> None:
        self._metrics.webhooks.labels(self.channel, outcome).inc()

    def _report(self, parsed: Parsed[T]) -> None:
        """One WARNING line per kind for what a signed webhook held but cannot apply."""
        if parsed.rejected:
            self._metrics.webhook_items_skipped.labels(self.channel, "malformed").inc(
                len(parsed.rejected)
            )
            log.warning(
                "%s: %d webhook item(s) skipped, the rest applied; first: %s",
                self.name,
                len(parsed.rejected),
                parsed.rejected[0],
            )
        if parsed.ignored:
            self._metrics.webhook_items_skipped.labels(self.channel, "ignored").inc(
                len(parsed.ignored)
            )
            log.info(
                "%s: %d webhook item(s) ignored on purpose: %s",
                self.name,
                len(parsed.ignored),
                ", ".join(sorted(set(parsed.ignored))),
            )
        if parsed.errors:
            self._metrics.webhook_items_skipped.labels(self.channel, "provider_error").inc(
                len(parsed.errors)
            )
            code, title = parsed.errors[0]
            log.warning(
                "%s: Meta reported %d error(s) with no status; first: code %s: %s",
                self.name,
                len(parsed.errors),
                code,
                title,
            )

    # -- resolving and handing off -------------------------------------------------

    async def resolve(
        self, handoff: Handoff, provider_message_id: str, payload: bytes, our_message_id: str = ""
    ) -> Message | None:
        """Our message for a provider id, or None after parking the payload for later.

        Callback data (WhatsApp's `biz_opaque_callback_data`, our message id) is only
        believed for a message of this channel whose stored provider id is this one, or
        whose send is under way with no provider id yet (the webhook beat the send
        answer, or the answer was lost): then the id is linked here. A forged webhook
        naming some other message is parked like an unknown provider id, and expires."""
        if our_message_id:
            claimed = handoff.named.get(our_message_id)
            if claimed is None:
                claimed = await self._store.get_message(our_message_id)
            if claimed is not None and claimed.channel == self.channel:
                if claimed.provider_message_id == provider_message_id:
                    return claimed
                if claimed.provider_message_id is None and claimed.send_started_at is not None:
                    waiting = await self._store.link_provider_id(
                        self.channel, provider_message_id, claimed.id
                    )
                    # Changed now: a later item naming it reads it again.
                    handoff.named.pop(claimed.id, None)
                    for item in waiting:
                        await self.collect_parked(item, claimed, handoff)
                    if waiting:
                        handoff.parked.append((self.channel, provider_message_id))
                    return claimed
        message = await self._store.find_by_provider_id(self.channel, provider_message_id)
        if message is None:
            parked = ParkedStatus(self.channel, provider_message_id, payload)
            message = await self._store.park_status(parked)
            if message is None:
                self._metrics.parked_statuses.labels(self.channel).inc()
                log.info("%s: parked a status for %s", self.name, provider_message_id)
                # Parking is rare, so it is also when the never-claimed ones are dropped.
                horizon = utcnow() - timedelta(seconds=self._settings.parked_ttl_s)
                expired = await self._store.expire_parked(horizon)
                if expired:
                    log.warning(
                        "%s: dropped %d statuses parked since before %s",
                        self.name,
                        expired,
                        format_time(horizon),
                    )
        return message

    def add_status(
        self,
        handoff: Handoff,
        message: Message,
        status: Status,
        provider_message_id: str,
        occurred_at: datetime,
        *,
        error: ProviderError | None = None,
    ) -> None:
        """Add the `msg.status` hand-off of one observation of `message`, its time kept
        within the message's life (`bounded`). The event id stays the provider's time's,
        so a redelivered webhook is still the same observation."""
        at = bounded(occurred_at, message.created_at, handoff.received_at)
        if abs(at - occurred_at) >= CLAMP_LOGGED:
            log.warning(
                "%s: %s of %s dated %s by the provider, outside its life; kept as %s",
                self.name,
                status.value,
                message.id,
                format_time(occurred_at),
                format_time(at),
            )
        event = StatusEvent(
            event_id=observation_id(self.channel, message.id, status, occurred_at),
            message_id=message.id,
            conversation_id=message.conversation_id,
            org_id=message.org_id,
            channel=self.channel,
            status=status,
            provider_message_id=provider_message_id,
            occurred_at=at,
            error=error,
            received_at=handoff.received_at,
        )
        handoff.entries.append(status_entry(event))
