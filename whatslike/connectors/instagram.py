"""The Instagram Messaging connector: sends through `/me/messages` (SENT once Meta answers),
turns `messaging_seen` webhooks, read watermarks, into READ events, and stores the
customers' messages (`messaging[].message`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

import aiohttp

from whatslike.clock import from_unix
from whatslike.connectors.base import Handoff, MediaMissing, MetaConnector
from whatslike.connectors.meta import (
    CustomerMessage,
    Parsed,
    WebhookPayloadError,
    clean_text,
    json_list,
    json_object,
    json_text,
    webhook_entries,
)
from whatslike.events import OutboundMessage, ReadReceipt
from whatslike.media.inbound import fetch_attachment
from whatslike.media.limits import MediaRefused, instagram_attachment
from whatslike.media.store import MediaRecord
from whatslike.settings import Settings
from whatslike.status.rules import Status
from whatslike.store.base import InboundMedia, Message, ParkedStatus

log = logging.getLogger(__name__)

WEBHOOK_OBJECT = "instagram"

#: The most messages one watermark read marks READ (a bound on one item's work); the
#: rest stay unread until the next read, whose watermark covers them too.
WATERMARK_LIMIT = 1000


@dataclass(frozen=True, slots=True)
class InstagramRead:
    """The recipient saw `provider_message_id` and everything we sent before it; or, in
    the Messenger-style shape (`read.watermark` without `read.mid`), everything sent to
    them at or before `watermark`."""

    account_id: str
    provider_message_id: str  # "" for a watermark-only read
    occurred_at: datetime
    payload: bytes = field(repr=False)  # this `messaging[]` item alone: what gets parked
    watermark: datetime | None = None
    contact: str = ""  # `sender.id` of a watermark read: who read (our recipient)


#: What a webhook item is: a read of our messages, or a customer's message.
InstagramItem = InstagramRead | CustomerMessage

#: `messaging[]` events ignored on purpose (protocol.md §5): a reaction changes no
#: message of ours; an edit or an unsend of a customer's message, a postback (a button
#: of ours) and a referral (an ad) are not kept yet.
IGNORED_EVENTS = ("reaction", "message_edit", "postback", "referral", "optin")

#: Attachment types kept as media (fetched into the media store), as our media kinds.
ATTACHMENT_KINDS = {"image": "image", "video": "video", "audio": "audio", "file": "document"}


def parse_webhook(payload: dict[str, Any]) -> Parsed[InstagramItem]:
    """Every read and customer's message of every messaging item of every entry; our
    own messages' echoes (`is_echo`) and the events of `IGNORED_EVENTS` are skipped. A
    part not shaped like Meta's (an entry, an item) is rejected alone, said in
    `rejected`: the rest still applies."""
    parsed: Parsed[InstagramItem] = Parsed()
    for i, entry_value in enumerate(webhook_entries(payload, WEBHOOK_OBJECT, "Instagram", parsed)):
        try:
            entry = json_object(entry_value, f"entry[{i}]")
            account_id = json_text(entry.get("id"), f"entry[{i}].id")
            items = json_list(entry.get("messaging"), f"entry[{i}].messaging")
        except WebhookPayloadError as exc:
            parsed.rejected.append(str(exc))
            continue
        for j, item in enumerate(items):
            where = f"entry[{i}].messaging[{j}]"
            try:
                read = parse_messaging(item, account_id, where)
                found = [read] if read is not None else parse_message(item, account_id, where)
            except WebhookPayloadError as exc:
                parsed.rejected.append(str(exc))
                continue
            if isinstance(found, str):
                parsed.ignored.append(found)
            elif found is not None:
                parsed.items.extend(found)
    return parsed


def parse_message(raw: Any, account_id: str, where: str) -> list[CustomerMessage] | str | None:
    """A customer's message (one per medium it carries: see `_attachments`); the kind of
    an event ignored on purpose; None for an echo of ours."""
    obj = json_object(raw, where)
    ignored = next((kind for kind in IGNORED_EVENTS if kind in obj), None)
    if ignored is not None:
        return ignored
    if "message" not in obj:
        return None
    message = json_object(obj["message"], f"{where}.message")
    if message.get("is_echo") is True:
        return None
    if message.get("is_deleted") is True:
        return "unsend"
    text = message.get("text")
    media = _attachments(message, f"{where}.message")
    if text is None and not media:
        return "attachments" if "attachments" in message else "unsupported"
    if text is not None and (not isinstance(text, str) or not text):
        raise WebhookPayloadError(f"{where}.message.text must be a non-empty string")
    sender = json_object(obj.get("sender"), f"{where}.sender")
    first = CustomerMessage(
        account_id=account_id,
        contact=json_text(sender.get("id"), f"{where}.sender.id"),
        provider_message_id=json_text(message.get("mid"), f"{where}.message.mid"),
        text=clean_text(text or ""),
        sent_at=_unix_ms(obj.get("timestamp"), f"{where}.timestamp"),
        media=media[0] if media else None,
    )
    # Each further medium is a message of its own (Meta's id, then `#2`, `#3`, …).
    return [first] + [
        replace(first, provider_message_id=f"{first.provider_message_id}#{k}", text="", media=m)
        for k, m in enumerate(media[1:], start=2)
    ]


def _attachments(message: dict[str, Any], where: str) -> list[InboundMedia]:
    """The media of a message's `attachments` of the kinds kept (`ATTACHMENT_KINDS`),
    each by its `payload.url`; the other kinds (a shared post, a story mention, a reel)
    are left out."""
    media = []
    for i, raw in enumerate(json_list(message.get("attachments"), f"{where}.attachments")):
        attachment = json_object(raw, f"{where}.attachments[{i}]")
        kind = ATTACHMENT_KINDS.get(str(attachment.get("type")))
        if kind is None:
            continue
        payload = json_object(attachment.get("payload"), f"{where}.attachments[{i}].payload")
        url = json_text(payload.get("url"), f"{where}.attachments[{i}].payload.url")
        if not url.startswith(("https://", "http://")):
            raise WebhookPayloadError(f"{where}.attachments[{i}].payload.url must be a URL")
        media.append(InboundMedia(kind=kind, source=url))
    return media


def parse_messaging(raw: Any, account_id: str, where: str = "messaging") -> InstagramRead | None:
    """One `messaging[]` item; None when it is not a read."""
    obj = json_object(raw, where)
    if "read" not in obj:
        return None
    read = json_object(obj["read"], f"{where}.read")
    occurred_at = _unix_ms(obj.get("timestamp"), f"{where}.timestamp")
    payload = json.dumps(obj, separators=(",", ":")).encode()
    if "mid" in read or "watermark" not in read:
        return InstagramRead(
            account_id=account_id,
            provider_message_id=json_text(read.get("mid"), f"{where}.read.mid"),
            occurred_at=occurred_at,
            payload=payload,
        )
    sender = json_object(obj.get("sender"), f"{where}.sender")
    return InstagramRead(
        account_id=account_id,
        provider_message_id="",
        occurred_at=occurred_at,
        payload=payload,
        contact=json_text(sender.get("id"), f"{where}.sender.id"),
        watermark=_unix_ms(read["watermark"], f"{where}.read.watermark"),
    )


def _unix_ms(value: Any, where: str) -> datetime:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise WebhookPayloadError(f"{where} must be Unix milliseconds")
    try:
        return from_unix(value / 1000)
    except (ValueError, OverflowError, OSError) as exc:
        raise WebhookPayloadError(f"{where} must be Unix milliseconds") from exc


def send_body(recipient_id: str, text: str, tag: str | None = None) -> dict[str, Any]:
    """The send request; with a message tag (`HUMAN_AGENT`: a human agent's answer up to
    7 days after the customer's last message), `messaging_type` `MESSAGE_TAG`."""
    tagged = {"messaging_type": "MESSAGE_TAG", "tag": tag} if tag else {}
    return {"recipient": {"id": recipient_id}, **tagged, "message": {"text": text}}


def attachment_send_body(
    recipient_id: str, attachment: str, link: str, tag: str | None = None
) -> dict[str, Any]:
    """The send request of a medium, by URL (one Meta fetches, valid `MEDIA_URL_TTL_S`):
    Instagram takes no caption with it; a message tag as for a text."""
    tagged = {"messaging_type": "MESSAGE_TAG", "tag": tag} if tag else {}
    return {
        "recipient": {"id": recipient_id},
        **tagged,
        "message": {"attachment": {"type": attachment, "payload": {"url": link}}},
    }


def receipt_body(recipient_id: str) -> dict[str, Any]:
    """Marks the thread with the customer seen (Instagram has no per-message receipt)."""
    return {"recipient": {"id": recipient_id}, "sender_action": "mark_seen"}


class InstagramConnector(MetaConnector[InstagramItem]):
    name = "connector-instagram"
    channel = "instagram"

    def sends_per_s(self, settings: Settings) -> float:
        return settings.instagram_sends_per_s

    def send_url(self) -> str:
        s = self._settings
        return f"{s.effective_graph_url}/{s.graph_api_version}/me/messages"

    async def send_body(self, message: OutboundMessage) -> dict[str, Any]:
        if message.media_id is None:
            return send_body(message.to, message.text, message.tag)
        record = await self._media.record(message.org_id, message.media_id)
        if record is None:
            raise MediaMissing(f"medium {message.media_id} of {message.message_id} is gone")
        try:
            attachment = instagram_attachment(record.content_type, record.size)
        except MediaRefused as exc:  # checked by the API: only an old message gets here
            raise MediaMissing(f"medium of {message.message_id}: {exc.message}") from exc
        link = await self._media.url(record, self._settings.media_url_ttl_s)
        return attachment_send_body(message.to, attachment, link, message.tag)

    def receipt_body(self, receipt: ReadReceipt) -> dict[str, Any]:
        return receipt_body(receipt.contact)

    async def download(
        self, http: aiohttp.ClientSession, media: InboundMedia, org_id: str
    ) -> MediaRecord:
        return await fetch_attachment(
            http,
            url=media.source,
            org_id=org_id,
            store=self._media,
            timeout_s=self._settings.media_fetch_timeout_s,
        )

    def provider_id_of(self, answer: Any) -> str:
        provider_id = answer["message_id"]
        if not isinstance(provider_id, str) or not provider_id:
            raise TypeError("message_id is not a string")
        return provider_id

    def accepted(self, message: Message, provider_message_id: str, handoff: Handoff) -> None:
        # Instagram sends no sent/delivered webhooks: Meta's answer is the SENT.
        self.add_status(handoff, message, Status.SENT, provider_message_id, handoff.received_at)

    def account(self) -> tuple[str, str]:
        return self._settings.instagram_account_id, self._settings.instagram_org_id

    def parse(self, payload: dict[str, Any]) -> Parsed[InstagramItem]:
        return parse_webhook(payload)

    async def collect(self, item: InstagramItem, handoff: Handoff) -> None:
        if isinstance(item, CustomerMessage):
            await self.receive_customer_message(item, handoff)
            return
        if item.account_id != self._settings.instagram_account_id:
            self._metrics.webhooks.labels(self.channel, "foreign_account").inc()
            log.warning("Instagram read for account %s ignored", item.account_id)
            return
        if item.watermark is not None:
            await self._mark_read_by_watermark(handoff, item, item.watermark)
            return
        message = await self.resolve(handoff, item.provider_message_id, item.payload)
        if message is not None:
            await self._mark_read_up_to(handoff, message, item)

    async def collect_parked(
        self, parked: ParkedStatus, message: Message, handoff: Handoff
    ) -> None:
        try:
            item = parse_messaging(json.loads(parked.payload), self._settings.instagram_account_id)
        except (ValueError, WebhookPayloadError):
            log.error("unreadable parked Instagram read for %s", parked.provider_message_id)
            return
        if item is not None:
            await self._mark_read_up_to(handoff, message, item)

    async def _mark_read_by_watermark(
        self, handoff: Handoff, item: InstagramRead, watermark: datetime
    ) -> None:
        """Messenger's shape names no message: READ for every message sent to the reader
        at or before the watermark (nothing is parked: a later read covers a later SENT)."""
        unread = await self._store.unread_sent_to(
            self.channel, item.contact, watermark, WATERMARK_LIMIT
        )
        if len(unread) == WATERMARK_LIMIT:
            log.warning(
                "%s: a watermark read marks the oldest %d messages READ; the next covers more",
                self.name,
                WATERMARK_LIMIT,
            )
        for message in unread:
            if message.provider_message_id:
                self.add_status(
                    handoff, message, Status.READ, message.provider_message_id, item.occurred_at
                )

    async def _mark_read_up_to(self, handoff: Handoff, seen: Message, item: InstagramRead) -> None:
        """READ for the seen message and every earlier one Meta accepted: the watermark.
        Messages never accepted (no provider id) were not delivered, so they stay."""
        self.add_status(handoff, seen, Status.READ, item.provider_message_id, item.occurred_at)
        for earlier in await self._store.unread_up_to(seen.id):
            if earlier.id != seen.id and earlier.provider_message_id:
                self.add_status(
                    handoff, earlier, Status.READ, earlier.provider_message_id, item.occurred_at
                )
