"""The bus events of protocol.md §2 and their JSON codec.

Decoding is strict about what consumers need and lenient about what they do not: unknown
fields are ignored, and `organizacao_id` (the original design's name) is read as `org_id`.
A payload that cannot be decoded raises `MalformedEvent`, which the bus dead-letters.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from whatslike.clock import format_time, parse_time
from whatslike.errors import MalformedEvent
from whatslike.status.rules import OBSERVABLE, Observation, ProviderError, Status
from whatslike.templates import Template, canonical

TOPIC_MESSAGES = "messages"
TOPIC_STATUS = "msg.status"
CHANNELS = ("whatsapp", "instagram")


def outbound_topic(channel: str) -> str:
    return f"outbound.{channel}"


def receipt_topic(channel: str) -> str:
    """Where the read receipts to Meta of a channel's customers' messages go."""
    return f"receipts.{channel}"


def media_topic(channel: str) -> str:
    """Where the fetches of a channel's customers' media go (protocol.md §2)."""
    return f"media.{channel}"


def dlq_topic(topic: str) -> str:
    return f"{topic}.dlq"


def status_channel(conversation_id: str) -> str:
    """The fan-out channel of one conversation (protocol.md §3)."""
    return f"status:{conversation_id}"


#: The payload of a campaign's channel: only news that its counts may have moved (the hubs
#: read them from the store; protocol.md §3).
CAMPAIGN_HINT = b""


def campaign_channel(campaign_id: str) -> str:
    """The fan-out channel of one campaign's counts (protocol.md §3)."""
    return f"campaign:{campaign_id}"


def _flat(event: ReadReceipt | MediaFetch) -> bytes:
    """An event of text fields only, as compact JSON in its fields' order."""
    return json.dumps(asdict(event), separators=(",", ":")).encode()


def _channel(data: dict[str, Any]) -> str:
    channel = _text(data, "channel")
    if channel not in CHANNELS:
        raise MalformedEvent(f"unknown channel {channel!r}")
    return channel


def _load(raw: bytes) -> dict[str, Any]:
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MalformedEvent(f"not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise MalformedEvent("event is not a JSON object")
    if "org_id" not in data and "organizacao_id" in data:
        data["org_id"] = data["organizacao_id"]
    return data


def _text(data: dict[str, Any], name: str, *, optional: bool = False) -> str:
    value = data.get(name)
    if optional and value in (None, ""):
        return ""
    if not isinstance(value, str) or not value:
        raise MalformedEvent(f"field {name!r} must be a non-empty string")
    return _utf8(value, name)


def _utf8(value: str, name: str) -> str:
    """JSON can carry a lone surrogate ("\\ud800") that no store or log can take: such
    an event can never be handled, so it is malformed (dead-lettered at once), not
    retried while it holds up its partition."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise MalformedEvent(f"field {name!r} is not valid Unicode") from exc
    return value


def _time(data: dict[str, Any], name: str) -> datetime:
    try:
        return parse_time(_text(data, name))
    except ValueError as exc:
        raise MalformedEvent(f"field {name!r} is not an RFC 3339 time") from exc


@dataclass(frozen=True, slots=True)
class OutboundMessage:
    """An outbound message the API accepted (topics `messages`, `outbound.<channel>`)."""

    event_id: str
    message_id: str
    conversation_id: str
    org_id: str
    channel: str
    to: str
    text: str
    client_message_id: str
    created_at: datetime
    #: The medium it carries (`text` is then its caption, maybe empty).
    media_id: str | None = None
    #: A WhatsApp template it is (whatslike/templates: canonical JSON; `text` is empty).
    template: str | None = None
    #: Instagram's message tag it is sent with (`HUMAN_AGENT`), if any.
    tag: str | None = None

    def to_json(self) -> bytes:
        optional: dict[str, Any] = {"media_id": self.media_id} if self.media_id else {}
        if self.template:
            optional["template"] = json.loads(self.template)
        if self.tag:
            optional["tag"] = self.tag
        return json.dumps(
            {
                **optional,
                "event_id": self.event_id,
                "message_id": self.message_id,
                "conversation_id": self.conversation_id,
                "org_id": self.org_id,
                "channel": self.channel,
                "to": self.to,
                "text": self.text,
                "client_message_id": self.client_message_id,
                "created_at": format_time(self.created_at),
            },
            separators=(",", ":"),
        ).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> OutboundMessage:
        data = _load(raw)
        channel = _channel(data)
        media_id = _text(data, "media_id", optional=True) or None
        template = _template(data)
        return cls(
            event_id=_text(data, "event_id"),
            message_id=_text(data, "message_id"),
            conversation_id=_text(data, "conversation_id"),
            org_id=_text(data, "org_id"),
            channel=channel,
            to=_text(data, "to"),
            # A medium's caption may be empty, a template has none; a text may not be empty.
            text=_text(data, "text", optional=media_id is not None or template is not None),
            client_message_id=_text(data, "client_message_id", optional=True),
            created_at=_time(data, "created_at"),
            media_id=media_id,
            template=template,
            tag=_text(data, "tag", optional=True) or None,
        )


def _template(data: dict[str, Any]) -> str | None:
    """An event's template, as the canonical JSON text it was made from."""
    value = data.get("template")
    if value is None:
        return None
    try:
        return _utf8(canonical(Template.model_validate(value)), "template")
    except ValidationError as exc:
        raise MalformedEvent(
            f"field 'template' is not a template: {exc.errors()[0]['msg']}"
        ) from exc


@dataclass(frozen=True, slots=True)
class StatusEvent:
    """A status a connector observed for one of our messages (topic `msg.status`)."""

    event_id: str
    message_id: str
    conversation_id: str
    org_id: str
    channel: str
    status: Status
    provider_message_id: str
    occurred_at: datetime
    error: ProviderError | None = None
    #: When we received the provider's news (the webhook, or the send answer): the start
    #: of our own latency, apart from the provider's clock (WhatsApp's is whole seconds).
    received_at: datetime | None = None

    @property
    def observation(self) -> Observation:
        return Observation(self.status, self.occurred_at, self.error)

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "event_id": self.event_id,
                "message_id": self.message_id,
                "conversation_id": self.conversation_id,
                "org_id": self.org_id,
                "channel": self.channel,
                "status": self.status.value,
                "provider_message_id": self.provider_message_id,
                "occurred_at": format_time(self.occurred_at),
                "error": (
                    {"code": self.error.code, "title": self.error.title} if self.error else None
                ),
                "received_at": format_time(self.received_at) if self.received_at else None,
            },
            separators=(",", ":"),
        ).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> StatusEvent:
        data = _load(raw)
        try:
            status = Status(_text(data, "status"))
        except ValueError as exc:
            raise MalformedEvent(f"unknown status {data.get('status')!r}") from exc
        if status not in OBSERVABLE:
            raise MalformedEvent(f"status {status.value} cannot be observed")
        error = data.get("error")
        if error is not None and not (
            isinstance(error, dict) and {"code", "title"} <= error.keys()
        ):
            raise MalformedEvent("field 'error' must be null or {code, title}")
        return cls(
            event_id=_text(data, "event_id"),
            message_id=_text(data, "message_id"),
            conversation_id=_text(data, "conversation_id"),
            org_id=_text(data, "org_id"),
            channel=_text(data, "channel"),
            status=status,
            provider_message_id=_text(data, "provider_message_id", optional=True),
            occurred_at=_time(data, "occurred_at"),
            error=ProviderError(
                _utf8(str(error["code"]), "error.code"), _utf8(str(error["title"]), "error.title")
            )
            if error
            else None,
            received_at=_time(data, "received_at") if data.get("received_at") else None,
        )


@dataclass(frozen=True, slots=True)
class ReadReceipt:
    """An agent read a customer's message: tell Meta (topics `receipts.<channel>`).
    `provider_message_id` is Meta's id of it (WhatsApp marks that wamid read); `contact`
    the customer (Instagram marks the whole thread seen)."""

    message_id: str
    conversation_id: str
    org_id: str
    channel: str
    contact: str
    provider_message_id: str

    def to_json(self) -> bytes:
        return _flat(self)

    @classmethod
    def from_json(cls, raw: bytes) -> ReadReceipt:
        data = _load(raw)
        channel = _channel(data)
        return cls(
            message_id=_text(data, "message_id"),
            conversation_id=_text(data, "conversation_id"),
            org_id=_text(data, "org_id"),
            channel=channel,
            contact=_text(data, "contact"),
            provider_message_id=_text(data, "provider_message_id"),
        )


@dataclass(frozen=True, slots=True)
class MediaFetch:
    """A customer's message carries a medium to fetch from Meta into the media store
    (topics `media.<channel>`): where it is and what Meta said of it are the message's
    (`inbound_media`), read by the connector when it fetches."""

    message_id: str
    conversation_id: str
    org_id: str
    channel: str

    def to_json(self) -> bytes:
        return _flat(self)

    @classmethod
    def from_json(cls, raw: bytes) -> MediaFetch:
        data = _load(raw)
        channel = _channel(data)
        return cls(
            message_id=_text(data, "message_id"),
            conversation_id=_text(data, "conversation_id"),
            org_id=_text(data, "org_id"),
            channel=channel,
        )
