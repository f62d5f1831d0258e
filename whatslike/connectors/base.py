"""The part of a Meta connector that does not depend on the channel: sending through the
Graph API, the signed webhook routes, resolving provider ids, parking and publishing.
"""

from __future__ import annotations

import hashlib
import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any, Generic, TypeVar

import httpx
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from whatslike.clock import format_time, utcnow
from whatslike.connectors.meta import (
    SIGNATURE_HEADER,
    WebhookPayloadError,
    error_response,
    load_object,
    read_body,
    signature_valid,
    verification_response,
)
from whatslike.errors import MalformedEvent, WhatslikeError
from whatslike.events import TOPIC_STATUS, OutboundMessage, StatusEvent, outbound_topic
from whatslike.roles import Deps
from whatslike.status.rules import ProviderError, Status
from whatslike.store.base import Message, ParkedStatus

log = logging.getLogger(__name__)

#: Meta documents webhook bodies of up to 3 MB; anything past this is not Meta.
MAX_WEBHOOK_BYTES = 4 * 1024 * 1024

#: Meta error codes that mean "slow down" even when the HTTP status is 400: retrying
#: later succeeds, so they must not turn into a FAILED message.
THROTTLING_CODES = frozenset({4, 17, 32, 613, 80007, 130429, 131048, 131056})

T = TypeVar("T")


def observation_id(channel: str, message_id: str, status: Status, occurred_at: datetime) -> str:
    """The same provider observation always gets the same event id, so a webhook that
    Meta redelivers (after we failed to answer 200) is recognised by the store, which
    then hands back the frames it made the first time: a crash between the store's commit
    and the fan-out publish loses no notification."""
    key = f"{channel}|{message_id}|{status.value}|{format_time(occurred_at)}"
    return "evt_" + hashlib.sha256(key.encode()).hexdigest()[:32]


class ProviderUnavailable(WhatslikeError):
    """Meta could not take the send now (5xx, 429, throttling, network). Retriable."""


def meta_error(response: httpx.Response) -> tuple[ProviderError, bool]:
    """Meta's `{"error":{...}}` answer as (our error, retriable)."""
    try:
        error = response.json()["error"]
        code = error["code"]
        title = str(error.get("error_user_title") or error["message"])
        transient = error.get("is_transient") is True or code in THROTTLING_CODES
    except (ValueError, KeyError, TypeError):
        return ProviderError(f"http_{response.status_code}", response.reason_phrase), False
    return ProviderError(str(code), title), transient


class MetaConnector(ABC, Generic[T]):
    """A role: consumes `outbound.<channel>` and serves `/webhooks/<channel>`.

    `T` is one parsed webhook item (a WhatsApp status, an Instagram read)."""

    name: str
    channel: str

    def __init__(self, deps: Deps) -> None:
        self._settings = deps.settings
        self._store = deps.store
        self._bus = deps.bus
        self._http = deps.http
        self._metrics = deps.metrics
        deps.bus.subscribe(outbound_topic(self.channel), self.name, self.send)

    def routes(self) -> list[BaseRoute]:
        path = f"/webhooks/{self.channel}"
        return [
            Route(path, self.verify, methods=["GET"]),
            Route(path, self.receive, methods=["POST"]),
        ]

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    # -- channel specifics ------------------------------------------------------------

    @abstractmethod
    def send_url(self) -> str: ...

    @abstractmethod
    def send_body(self, message: OutboundMessage) -> dict[str, Any]: ...

    @abstractmethod
    def provider_id_of(self, answer: Any) -> str:
        """The provider message id in a 2xx send answer; raises on an unexpected shape."""

    @abstractmethod
    def parse(self, payload: dict[str, Any]) -> Sequence[T]:
        """Pure: the items of one webhook body; raises WebhookPayloadError."""

    @abstractmethod
    async def handle(self, item: T) -> None:
        """Hand one item to the bus or park it; raises if neither could be done."""

    @abstractmethod
    async def replay(self, parked: ParkedStatus, message: Message) -> None:
        """Handle a parked payload now that its provider id is linked to `message`."""

    async def accepted(self, message: Message, provider_message_id: str) -> None:
        """Called once Meta accepted the send (or it was accepted before a redelivery)."""
        return None

    # -- sending ----------------------------------------------------------------------

    async def send(self, raw: bytes) -> None:
        """Bus handler of `outbound.<channel>`: raising makes the bus retry."""
        outbound = OutboundMessage.from_json(raw)
        stored = await self._store.get_message(outbound.message_id)
        if stored is None:
            raise MalformedEvent(f"no message {outbound.message_id!r}")
        if stored.provider_message_id is not None:
            # A redelivery after Meta accepted the send: never send again, but finish what
            # the first attempt may not have (its SENT, the parked statuses).
            announce = stored.status is Status.PENDING
            await self._link(stored, stored.provider_message_id, announce=announce)
            return
        # Best effort against sending twice: a message that moved on (a refused send is
        # FAILED) is not sent again. A crash between Meta's answer and the link still
        # sends twice; the Graph API has no idempotency key that could close that gap.
        if stored.status is not Status.PENDING:
            self._metrics.sends.labels(self.channel, "skipped").inc()
            log.info("%s: message %s is %s, not sent again", self.name, stored.id, stored.status)
            return
        provider_id = await self._post(outbound, stored)
        if provider_id is None:
            return
        await self._link(stored, provider_id, announce=True)

    async def _link(self, stored: Message, provider_id: str, *, announce: bool) -> None:
        """Link the provider id first (so a retry never sends again), then announce the
        acceptance and replay the statuses that arrived before the link. Parked statuses
        are forgotten only once all were handed on, so a failure here retries them."""
        parked = await self._store.link_provider_id(self.channel, provider_id, stored.id)
        if announce:
            await self.accepted(stored, provider_id)
        for item in parked:
            await self.replay(item, stored)
        if parked:
            await self._store.forget_parked(self.channel, provider_id)

    async def _post(self, outbound: OutboundMessage, stored: Message) -> str | None:
        """Meta's provider id, or None when Meta refused for good (FAILED published)."""
        try:
            response = await self._http.post(
                self.send_url(),
                json=self.send_body(outbound),
                headers={"Authorization": f"Bearer {self._settings.meta_access_token}"},
                timeout=self._settings.send_timeout_s,
            )
        except httpx.HTTPError as exc:
            self._metrics.sends.labels(self.channel, "retry").inc()
            raise ProviderUnavailable(f"send of {stored.id} failed: {exc!r}") from exc
        if response.is_success:
            try:
                provider_id = self.provider_id_of(response.json())
            except (ValueError, LookupError, TypeError):
                # Retrying could send twice; FAILED is visible, and a later delivery
                # webhook (found by our callback data) still moves the message on.
                log.error("%s: unreadable send answer for %s", self.name, stored.id)
                self._metrics.sends.labels(self.channel, "bad_answer").inc()
                error = ProviderError("bad_provider_answer", "Unreadable send answer")
                await self.publish(stored, Status.FAILED, "", utcnow(), error)
                return None
            self._metrics.sends.labels(self.channel, "ok").inc()
            return provider_id
        error, transient = meta_error(response)
        if response.status_code == 429 or response.status_code >= 500 or transient:
            self._metrics.sends.labels(self.channel, "retry").inc()
            raise ProviderUnavailable(
                f"send of {stored.id}: HTTP {response.status_code} {error.code} {error.title}"
            )
        log.warning(
            "%s: Meta refused %s: HTTP %s %s %s",
            self.name,
            stored.id,
            response.status_code,
            error.code,
            error.title,
        )
        self._metrics.sends.labels(self.channel, "refused").inc()
        await self.publish(stored, Status.FAILED, "", utcnow(), error)
        return None

    # -- webhooks ---------------------------------------------------------------------

    async def verify(self, request: Request) -> Response:
        return verification_response(request, self._settings.meta_verify_token)

    async def receive(self, request: Request) -> Response:
        body = await read_body(request, MAX_WEBHOOK_BYTES)
        if body is None:
            self._count_webhook("too_large")
            return error_response(413, "too_large", "webhook body too large")
        header = request.headers.get(SIGNATURE_HEADER)
        if not signature_valid(self._settings.meta_app_secrets, body, header):
            self._count_webhook("bad_signature")
            return error_response(403, "forbidden", f"missing or wrong {SIGNATURE_HEADER}")
        try:
            items = self.parse(load_object(body))
        except WebhookPayloadError as exc:
            self._count_webhook("malformed")
            log.warning("%s: malformed webhook: %s", self.name, exc)
            return error_response(400, "bad_request", str(exc))
        try:
            for item in items:
                await self.handle(item)
        except Exception:
            # Meta redelivers a webhook that did not get a 200, so answering 503 loses
            # nothing: the items handed over already come again and apply as no-ops.
            log.exception("%s: webhook not handled, Meta will retry", self.name)
            self._count_webhook("unavailable")
            return error_response(503, "unavailable", "try again later")
        self._count_webhook("ok")
        return Response(status_code=200)

    def _count_webhook(self, outcome: str) -> None:
        self._metrics.webhooks.labels(self.channel, outcome).inc()

    # -- resolving and publishing ---------------------------------------------------

    async def resolve(
        self, provider_message_id: str, payload: bytes, our_message_id: str = ""
    ) -> Message | None:
        """Our message for a provider id, or None after parking the payload for later."""
        message = None
        if our_message_id:
            message = await self._store.get_message(our_message_id)
            if message is not None and message.channel != self.channel:
                message = None
        if message is None:
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

    async def publish(
        self,
        message: Message,
        status: Status,
        provider_message_id: str,
        occurred_at: datetime,
        error: ProviderError | None = None,
    ) -> None:
        event = StatusEvent(
            event_id=observation_id(self.channel, message.id, status, occurred_at),
            message_id=message.id,
            conversation_id=message.conversation_id,
            org_id=message.org_id,
            channel=self.channel,
            status=status,
            provider_message_id=provider_message_id,
            occurred_at=occurred_at,
            error=error,
        )
        await self._bus.publish(TOPIC_STATUS, message.conversation_id, event.to_json())
