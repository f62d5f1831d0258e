"""The WhatsApp Cloud API connector: sends through `/{phone_number_id}/messages`, turns
status webhooks (sent, delivered, read, failed) into `msg.status` events, and stores the
customers' messages of the same webhooks (`value.messages[]`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
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
from whatslike.media.inbound import fetch_inbound_media
from whatslike.media.store import MediaRecord
from whatslike.settings import Settings
from whatslike.status.rules import ProviderError, Status
from whatslike.store.base import InboundMedia, Message, ParkedStatus
from whatslike.templates import meta_template

log = logging.getLogger(__name__)

WEBHOOK_OBJECT = "whatsapp_business_account"

STATUS_OF: dict[str, Status] = {
    "sent": Status.SENT,
    "delivered": Status.DELIVERED,
    "read": Status.READ,
    "failed": Status.FAILED,
}

#: protocol.md §1: FAILED always carries an error, even when Meta left `errors` out.
UNKNOWN_FAILURE = ProviderError("unknown", "Failed without error details")


@dataclass(frozen=True, slots=True)
class WhatsAppStatus:
    """One entry of a webhook's `statuses[]`."""

    phone_number_id: str
    provider_message_id: str
    status: Status
    occurred_at: datetime
    error: ProviderError | None
    callback_data: str
    payload: bytes = field(repr=False)  # this status alone, as JSON: what gets parked


#: What a webhook item is: one of our messages' statuses, or a customer's message.
WhatsAppItem = WhatsAppStatus | CustomerMessage

#: Customers' message types whose text is kept, and where it is.
TEXT_OF: dict[str, tuple[str, ...]] = {
    "text": ("text", "body"),
    # A tap on a template's quick-reply button: its label.
    "button": ("button", "text"),
}

#: Customers' media kept (fetched into the media store): what Meta's media object says.
MEDIA_TYPES = frozenset({"image", "audio", "video", "document"})

#: Message types ignored on purpose (protocol.md §5). A sticker (image/webp) is not a
#: type the media store takes (its limit depends on animation); a reaction changes no
#: message of ours.
IGNORED_TYPES = frozenset(
    {
        "sticker",
        "reaction",
        "location",
        "contacts",
        "interactive",
        "order",
        "system",
        "request_welcome",
        "unsupported",
    }
)


def parse_webhook(payload: dict[str, Any]) -> Parsed[WhatsAppItem]:
    """Every status and customer's message of every change of every entry; unknown
    statuses and the message types in `IGNORED_TYPES` are skipped. A part not shaped like
    Meta's (an entry, a change, a status, a message) is rejected alone, said in
    `rejected`: the rest still applies."""
    parsed: Parsed[WhatsAppItem] = Parsed()
    for i, entry_value in enumerate(webhook_entries(payload, WEBHOOK_OBJECT, "WhatsApp", parsed)):
        try:
            entry = json_object(entry_value, f"entry[{i}]")
            changes = json_list(entry.get("changes"), f"entry[{i}].changes")
        except WebhookPayloadError as exc:
            parsed.rejected.append(str(exc))
            continue
        for j, change_value in enumerate(changes):
            try:
                _parse_change(change_value, f"entry[{i}].changes[{j}]", parsed)
            except WebhookPayloadError as exc:
                parsed.rejected.append(str(exc))
    return parsed


def _parse_change(change_value: Any, where: str, parsed: Parsed[WhatsAppItem]) -> None:
    """One change's statuses and errors into `parsed`; raises for the change as a whole."""
    change = json_object(change_value, where)
    if change.get("field") != "messages":
        return
    value = json_object(change.get("value"), f"{where}.value")
    for error in json_list(value.get("errors"), f"{where}.value.errors"):
        # Errors of the change itself (e.g. 131000, "Something went wrong"), no status.
        found = _error_of(error)
        parsed.errors.append((found.code, found.title))
    raw_statuses = json_list(value.get("statuses"), f"{where}.value.statuses")
    raw_messages = json_list(value.get("messages"), f"{where}.value.messages")
    if not raw_statuses and not raw_messages:
        return
    metadata = json_object(value.get("metadata"), f"{where}.value.metadata")
    phone_number_id = json_text(metadata.get("phone_number_id"), f"{where}.metadata")
    for k, raw in enumerate(raw_messages):
        try:
            message = parse_message(raw, phone_number_id, f"{where}.value.messages[{k}]")
        except WebhookPayloadError as exc:
            parsed.rejected.append(str(exc))
            continue
        if isinstance(message, str):
            parsed.ignored.append(message)
        else:
            parsed.items.append(message)
    for k, raw in enumerate(raw_statuses):
        try:
            status = parse_status(raw, phone_number_id, f"{where}.value.statuses[{k}]")
        except WebhookPayloadError as exc:
            parsed.rejected.append(str(exc))
            continue
        if status is not None:
            parsed.items.append(status)


def parse_status(raw: Any, phone_number_id: str, where: str = "status") -> WhatsAppStatus | None:
    """One status object; None (logged) for a status we do not track."""
    obj = json_object(raw, where)
    provider_message_id = json_text(obj.get("id"), f"{where}.id")
    name = obj.get("status")
    status = STATUS_OF.get(name) if isinstance(name, str) else None
    if status is None:
        log.info("WhatsApp status %r of %s ignored", name, provider_message_id)
        return None
    callback_data = obj.get("biz_opaque_callback_data")
    return WhatsAppStatus(
        phone_number_id=phone_number_id,
        provider_message_id=provider_message_id,
        status=status,
        occurred_at=_unix_seconds(obj.get("timestamp"), f"{where}.timestamp"),
        error=_first_error(obj, where) if status is Status.FAILED else None,
        # Only a hint (our message id, echoed back): anything but clean text is dropped.
        callback_data=callback_data
        if isinstance(callback_data, str)
        and callback_data.isprintable()
        and callback_data.isascii()
        else "",
        payload=json.dumps(obj, separators=(",", ":")).encode(),
    )


def parse_message(raw: Any, phone_number_id: str, where: str = "message") -> CustomerMessage | str:
    """One customer's message, or the kind it is when ignored on purpose."""
    obj = json_object(raw, where)
    kind = json_text(obj.get("type"), f"{where}.type")
    if kind in MEDIA_TYPES:
        media, caption = _media_of(obj, kind, where)
        return CustomerMessage(
            account_id=phone_number_id,
            contact=json_text(obj.get("from"), f"{where}.from"),
            provider_message_id=json_text(obj.get("id"), f"{where}.id"),
            text=caption,
            sent_at=_unix_seconds(obj.get("timestamp"), f"{where}.timestamp"),
            media=media,
        )
    path = TEXT_OF.get(kind)
    if path is None:
        if kind not in IGNORED_TYPES:
            log.info("WhatsApp message type %r ignored", kind)
        return kind
    part = json_object(obj.get(path[0]), f"{where}.{path[0]}")
    text = part.get(path[1])
    if not isinstance(text, str) or not text:
        raise WebhookPayloadError(f"{where}.{'.'.join(path)} must be a non-empty string")
    return CustomerMessage(
        account_id=phone_number_id,
        contact=json_text(obj.get("from"), f"{where}.from"),
        provider_message_id=json_text(obj.get("id"), f"{where}.id"),
        text=clean_text(text),
        sent_at=_unix_seconds(obj.get("timestamp"), f"{where}.timestamp"),
    )


def _media_of(obj: dict[str, Any], kind: str, where: str) -> tuple[InboundMedia, str]:
    """A media message's medium (Meta's media id, MIME type, sha256, a document's
    filename) and its caption (maybe empty)."""
    part = json_object(obj.get(kind), f"{where}.{kind}")
    media = InboundMedia(
        kind=kind,
        source=json_text(part.get("id"), f"{where}.{kind}.id"),
        content_type=_text(part.get("mime_type")),
        sha256=_text(part.get("sha256")),
        filename=_text(part.get("filename")) if kind == "document" else "",
    )
    return media, _text(part.get("caption"))


def _unix_seconds(value: Any, where: str) -> datetime:
    try:
        return from_unix(int(json_text(value, where)))
    except (ValueError, OverflowError, OSError) as exc:
        raise WebhookPayloadError(f"{where} must be Unix seconds") from exc


def _first_error(obj: dict[str, Any], where: str) -> ProviderError:
    """The first of `errors`: its code (a number or text) and its title (or message).
    A code that is missing or not a code reads as "unknown", keeping Meta's title."""
    errors = json_list(obj.get("errors"), f"{where}.errors")
    return _error_of(errors[0] if errors else None)


def _error_of(error: Any) -> ProviderError:
    """One of Meta's error objects as text every store and log can take (lone surrogates
    replaced): its code a number or text, else "unknown" keeping Meta's title."""
    first: dict[str, Any] = error if isinstance(error, dict) else {}
    titles = (_text(first.get("title")), _text(first.get("message")))
    title = next((text for text in titles if text), "")
    code = first.get("code")
    if isinstance(code, int) and not isinstance(code, bool):
        return ProviderError(str(code), title)
    if isinstance(code, str) and code and clean_text(code) == code:
        return ProviderError(code, title)
    return ProviderError(UNKNOWN_FAILURE.code, title or UNKNOWN_FAILURE.title)


def _text(value: Any) -> str:
    """`value` if it is text (lone surrogates replaced), else nothing."""
    return clean_text(value) if isinstance(value, str) else ""


def send_body(to: str, text: str, message_id: str) -> dict[str, Any]:
    """The send request; our message id rides along as callback data, so every status
    webhook names our message even before Meta's answer was stored."""
    return {
        "messaging_product": "whatsapp",
        "recipient_type": "individual",
        "to": to,
        "type": "text",
        "text": {"preview_url": False, "body": text},
        "biz_opaque_callback_data": message_id,
    }


def template_send_body(to: str, template: str, message_id: str) -> dict[str, Any]:
    """The send request of a template (a stored one, whatslike/templates)."""
    return {
        "messaging_product": "whatsapp",
        "recipient_type": "individual",
        "to": to,
        "type": "template",
        "template": meta_template(template),
        "biz_opaque_callback_data": message_id,
    }


def receipt_body(wamid: str) -> dict[str, Any]:
    """Marks a customer's message read: the customer sees blue ticks."""
    return {"messaging_product": "whatsapp", "status": "read", "message_id": wamid}


def media_send_body(
    to: str, record: MediaRecord, link: str, caption: str, message_id: str
) -> dict[str, Any]:
    """The send request of a medium, by link (a URL Meta fetches, valid for
    `MEDIA_URL_TTL_S`): a caption for an image, a document or a video, a document's
    filename."""
    media: dict[str, Any] = {"link": link}
    if caption and record.kind != "audio":
        media["caption"] = caption
    if record.kind == "document" and record.filename:
        media["filename"] = record.filename
    return {
        "messaging_product": "whatsapp",
        "recipient_type": "individual",
        "to": to,
        "type": record.kind,
        record.kind: media,
        "biz_opaque_callback_data": message_id,
    }


class WhatsAppConnector(MetaConnector[WhatsAppItem]):
    name = "connector-whatsapp"
    channel = "whatsapp"

    def sends_per_s(self, settings: Settings) -> float:
        return settings.whatsapp_sends_per_s

    def send_url(self) -> str:
        s = self._settings
        return (
            f"{s.effective_graph_url}/{s.graph_api_version}/{s.whatsapp_phone_number_id}/messages"
        )

    async def send_body(self, message: OutboundMessage) -> dict[str, Any]:
        if message.template is not None:
            return template_send_body(message.to, message.template, message.message_id)
        if message.media_id is None:
            return send_body(message.to, message.text, message.message_id)
        record = await self._media.record(message.org_id, message.media_id)
        if record is None:
            raise MediaMissing(f"medium {message.media_id} of {message.message_id} is gone")
        link = await self._media.url(record, self._settings.media_url_ttl_s)
        return media_send_body(message.to, record, link, message.text, message.message_id)

    def receipt_body(self, receipt: ReadReceipt) -> dict[str, Any]:
        return receipt_body(receipt.provider_message_id)

    async def download(
        self, http: aiohttp.ClientSession, media: InboundMedia, org_id: str
    ) -> MediaRecord:
        s = self._settings
        return await fetch_inbound_media(
            http,
            graph_url=s.effective_graph_url,
            api_version=s.graph_api_version,
            access_token=s.meta_access_token,
            graph_media_id=media.source,
            org_id=org_id,
            store=self._media,
            timeout_s=s.media_fetch_timeout_s,
        )

    def provider_id_of(self, answer: Any) -> str:
        provider_id = answer["messages"][0]["id"]
        if not isinstance(provider_id, str) or not provider_id:
            raise TypeError("messages[0].id is not a string")
        return provider_id

    def account(self) -> tuple[str, str]:
        return self._settings.whatsapp_phone_number_id, self._settings.whatsapp_org_id

    def parse(self, payload: dict[str, Any]) -> Parsed[WhatsAppItem]:
        return parse_webhook(payload)

    def named_messages(self, items: Sequence[WhatsAppItem]) -> list[str]:
        return [
            item.callback_data
            for item in items
            if isinstance(item, WhatsAppStatus) and item.callback_data
        ]

    async def collect(self, item: WhatsAppItem, handoff: Handoff) -> None:
        if isinstance(item, CustomerMessage):
            await self.receive_customer_message(item, handoff)
            return
        if item.phone_number_id != self._settings.whatsapp_phone_number_id:
            # Another number on the same Meta app: not a tenant of this deployment.
            self._metrics.webhooks.labels(self.channel, "foreign_number").inc()
            log.warning("WhatsApp status for phone number %s ignored", item.phone_number_id)
            return
        message = await self.resolve(
            handoff, item.provider_message_id, item.payload, item.callback_data
        )
        if message is not None:
            self._add(handoff, message, item)

    async def collect_parked(
        self, parked: ParkedStatus, message: Message, handoff: Handoff
    ) -> None:
        try:
            item = parse_status(json.loads(parked.payload), self._settings.whatsapp_phone_number_id)
        except (ValueError, WebhookPayloadError):
            log.error("unreadable parked WhatsApp status for %s", parked.provider_message_id)
            return
        if item is not None:
            self._add(handoff, message, item)

    def _add(self, handoff: Handoff, message: Message, item: WhatsAppStatus) -> None:
        self.add_status(
            handoff,
            message,
            item.status,
            item.provider_message_id,
            item.occurred_at,
            error=item.error,
        )
