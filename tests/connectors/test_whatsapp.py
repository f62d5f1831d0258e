"""The WhatsApp connector: status parsing on Meta's payloads, the signed webhook route,
parking statuses that beat the send answer, and sending through the Graph API."""

from __future__ import annotations

import asyncio
import copy
import inspect
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, MutableMapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest
from starlette.applications import Starlette

from whatslike.api.contract import routes
from whatslike.bus import BusFull, Event, publish_in_turn
from whatslike.clock import utcnow
from whatslike.connectors.base import MetaConnector, ProviderUnavailable
from whatslike.connectors.meta import CustomerMessage, Parsed, WebhookPayloadError, sign
from whatslike.connectors.whatsapp import (
    WhatsAppConnector,
    WhatsAppStatus,
    media_send_body,
    parse_status,
    parse_webhook,
    template_send_body,
)
from whatslike.errors import BackendUnavailable, MalformedEvent
from whatslike.events import (
    TOPIC_MESSAGES,
    TOPIC_STATUS,
    MediaFetch,
    OutboundMessage,
    ReadReceipt,
    StatusEvent,
    media_topic,
    outbound_topic,
    receipt_topic,
)
from whatslike.fanout.memory import MemoryFanout
from whatslike.http_client import Answer, NotSent, OutcomeUnknown
from whatslike.media.inbound import MediaFetchFailed
from whatslike.media.store import MediaRecord
from whatslike.metrics import Metrics
from whatslike.roles import Deps
from whatslike.roles.relay import OutboxRelay
from whatslike.settings import load_settings
from whatslike.status.rules import PROVIDER_CLOCK_SKEW, ProviderError, Status
from whatslike.store.base import Conversation, InboundMedia, Message, OutboxEntry, ParkedStatus
from whatslike.store.sqlite import SQLiteStore
from whatslike.templates import Template, canonical

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "meta"
PHONE = "109876543210987"
SECRET = "test-app-secret"
RECEIPTS = receipt_topic("whatsapp")
WAMID = "wamid.HBgNNTUxMTk4ODg3NzY2NRUCABEYEjRBMkQ3QjE5QzA1RDk4RTFBAA=="

#: The Graph API's answer to a send (or a coroutine of it, for answers that wait).
SendHandler = Callable[[httpx.Request], httpx.Response | Awaitable[httpx.Response]]


def fixture(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((FIXTURES / name).read_bytes())
    return data


def status_webhook(*statuses: dict[str, Any], phone: str = PHONE) -> dict[str, Any]:
    payload = fixture("whatsapp-status-sent.json")
    value = payload["entry"][0]["changes"][0]["value"]
    value["metadata"]["phone_number_id"] = phone
    value["statuses"] = list(statuses)
    return payload


def status(wamid: str, name: str, callback: str = "", at: str = "1764072000") -> dict[str, Any]:
    item: dict[str, Any] = {"id": wamid, "status": name, "timestamp": at, "recipient_id": "55"}
    if callback:
        item["biz_opaque_callback_data"] = callback
    return item


class RecordingBus:
    """Keeps what subscribed and what was published (a webhook's statuses, after their
    commit); `refuse` makes publishing fail, as a full in-process bus does."""

    def __init__(self) -> None:
        self.durable = False
        self.published: list[tuple[str, str, bytes]] = []
        self.refuse = False
        #: While set, a publish waits (for ever, unless cleared): a process stalled or
        #: dying between its commit and its publish.
        self.stalled = asyncio.Event()
        self.subscribed: list[tuple[str, str]] = []

    def subscribe(self, topic: str, group: str, handler: Callable[[bytes], Any]) -> None:
        self.subscribed.append((topic, group))

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def ping(self) -> None:
        return None

    async def publish(self, topic: str, key: str, value: bytes) -> None:
        if self.refuse:
            raise BusFull("full")
        if self.stalled.is_set():
            await asyncio.Future()
        self.published.append((topic, key, value))

    async def publish_many(self, events: Sequence[Event]) -> None:
        await publish_in_turn(self.publish, events)


class ScriptedHttp:
    """The Graph API as a script: each POST goes to `handler` as an httpx.Request; a
    ConnectError it raises is a request that never left (NotSent), any other httpx error
    one that may have reached Meta (OutcomeUnknown)."""

    def __init__(self, handler: SendHandler) -> None:
        self._handler = handler

    async def post(
        self, url: str, body: bytes, headers: Mapping[str, str], timeout_s: float
    ) -> Answer:
        request = httpx.Request("POST", url, content=body, headers=headers)
        try:
            answer = self._handler(request)
            response = await answer if inspect.isawaitable(answer) else answer
        except httpx.ConnectError as exc:
            raise NotSent(str(exc)) from exc
        except httpx.HTTPError as exc:
            raise OutcomeUnknown(str(exc)) from exc
        return Answer(response.status_code, response.content, response.reason_phrase)

    async def close(self) -> None:
        return None


class Harness:
    """A connector on a real SQLite store, a recording bus and a scripted Graph API."""

    def __init__(
        self,
        store: SQLiteStore,
        http: ScriptedHttp,
        connector_type: Callable[[Deps], MetaConnector[Any]],
    ) -> None:
        self.store = store
        self.bus = RecordingBus()
        self.send_handler: SendHandler = lambda request: httpx.Response(500)
        self.requests: list[httpx.Request] = []
        self.settings = load_settings(
            meta_app_secret=SECRET, port=8123, consumer_backoff_base_s=0.001
        )
        self.deps = Deps(
            settings=self.settings,
            store=store,
            bus=self.bus,
            fanout=MemoryFanout(),
            http=http,
            metrics=Metrics(),
            jwt_secret="x",
        )
        self.connector = connector_type(self.deps)
        self.channel = self.connector.channel
        self.conversations: dict[str, Conversation] = {}
        app = Starlette(routes=routes(self.connector.operations()))
        self.client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://test"
        )

    async def handed(self) -> list[tuple[str, str, bytes]]:
        """What the connector handed off: the outbox, less the sends of new messages."""
        items = await self.store.outbox_batch("test", 10_000)
        return [(i.topic, i.key, i.payload) for i in items if i.topic != TOPIC_MESSAGES]

    async def statuses(self) -> list[StatusEvent]:
        return [StatusEvent.from_json(v) for t, _, v in await self.handed() if t == TOPIC_STATUS]

    async def clear(self) -> None:
        await self.store.delete_outbox([i.id for i in await self.store.outbox_batch("t", 10_000)])

    async def message(self, text: str = "Seu pedido foi enviado", contact: str = "") -> Message:
        """A new PENDING message, in a new conversation unless `contact` names one."""
        conversation = self.conversations.get(contact)
        if conversation is None:
            conversation = await self.store.create_conversation("org1", self.channel, contact)
            self.conversations[contact] = conversation
        message, _ = await self.store.create_message(conversation, text, f"client-{text}")
        return message

    async def post(
        self, payload: dict[str, Any] | bytes, signature: str | None = ""
    ) -> httpx.Response:
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        headers = {"Content-Type": "application/json"}
        if signature is not None:
            headers["X-Hub-Signature-256"] = signature or sign(SECRET, body)
        return await self.client.post(f"/webhooks/{self.channel}", content=body, headers=headers)

    async def send(self, message: Message, to: str = "+5511988877665") -> None:
        outbound = OutboundMessage(
            event_id="evt_1",
            message_id=message.id,
            conversation_id=message.conversation_id,
            org_id=message.org_id,
            channel=self.channel,
            to=to,
            text=message.text,
            client_message_id=message.client_message_id,
            created_at=message.created_at,
        )
        await self.connector.send(outbound.to_json())


@asynccontextmanager
async def open_harness(
    tmp_path: Path, connector_type: Callable[[Deps], MetaConnector[Any]]
) -> AsyncIterator[Harness]:
    store = SQLiteStore(tmp_path / "whatslike.db")
    await store.open()
    holder: list[Harness] = []

    def graph_api(request: httpx.Request) -> httpx.Response | Awaitable[httpx.Response]:
        holder[0].requests.append(request)
        return holder[0].send_handler(request)

    try:
        harness = Harness(store, ScriptedHttp(graph_api), connector_type)
        holder.append(harness)
        async with harness.client:
            yield harness
    finally:
        await store.close()


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    async with open_harness(tmp_path, WhatsAppConnector) as harness:
        yield harness


def send_answer(wamid: str) -> httpx.Response:
    answer = fixture("whatsapp-send-response.json")
    answer["messages"][0]["id"] = wamid
    return httpx.Response(200, json=answer)


def answer_with(wamid: str) -> SendHandler:
    return lambda request: send_answer(wamid)


# -- parsing ---------------------------------------------------------------------------


def test_parse_sent_fixture() -> None:
    [sent] = statuses(fixture("whatsapp-status-sent.json"))
    assert sent.phone_number_id == PHONE
    assert sent.provider_message_id == WAMID
    assert sent.status is Status.SENT
    assert sent.occurred_at == datetime.fromtimestamp(1764072000, UTC)
    assert sent.error is None
    assert sent.callback_data == "msg_01JCXZ7Q3W"
    assert json.loads(sent.payload)["id"] == WAMID


def test_parse_delivered_fixture_without_callback_data() -> None:
    [delivered] = statuses(fixture("whatsapp-status-delivered.json"))
    assert delivered.status is Status.DELIVERED
    assert delivered.callback_data == ""


def test_parse_failed_fixture_keeps_the_first_error() -> None:
    [failed] = statuses(fixture("whatsapp-status-failed.json"))
    assert failed.status is Status.FAILED
    assert failed.error == ProviderError("131026", "Message undeliverable")
    assert failed.occurred_at == datetime.fromtimestamp(1764072130, UTC)


def statuses(payload: dict[str, Any]) -> list[WhatsAppStatus]:
    parsed = parse_webhook(payload)
    assert not parsed.rejected
    return [item for item in parsed.items if isinstance(item, WhatsAppStatus)]


def test_parse_inbound_text_fixture() -> None:
    [message] = parse_webhook(fixture("whatsapp-inbound-text.json")).items
    assert message == CustomerMessage(
        account_id=PHONE,
        contact="5511988877665",
        provider_message_id="wamid.HBgNNTUxMTk4ODg3NzY2NRUCABIYFjNFQjBBQkNERUYwMTIzNDU2Nzg5AA==",
        text="Oi, recebi sim, obrigada!",
        sent_at=datetime.fromtimestamp(1764072200, UTC),
    )


def test_parse_inbound_media_fixture() -> None:
    """An image with its caption and a document with its filename: Meta's media id, MIME
    type and sha256 kept, to fetch the bytes after the webhook's 200."""
    image, document = parse_webhook(fixture("whatsapp-inbound-image.json")).items
    assert isinstance(image, CustomerMessage) and isinstance(document, CustomerMessage)
    assert image.text == "A foto do recibo"
    assert image.media == InboundMedia(
        kind="image",
        source="1234567890123456",
        content_type="image/jpeg",
        sha256="5bc5f5d4cf1fc4c6a6e7e1c8a0b6e6f9f3c0b5d8a2e4c6f8a1b3d5e7f9a1c3e5",
    )
    assert document.text == ""
    assert document.media is not None
    assert (document.media.kind, document.media.filename) == ("document", "recibo.pdf")
    assert document.media.state == "fetching"


def test_parse_ignores_reactions_and_stickers_on_purpose_and_rejects_a_bodyless_text() -> None:
    payload = fixture("whatsapp-inbound-text.json")
    value = payload["entry"][0]["changes"][0]["value"]
    text = value["messages"][0]
    reaction = {**text, "type": "reaction", "reaction": {"message_id": "wamid.x", "emoji": "👍"}}
    sticker = {**text, "type": "sticker", "sticker": {"id": "1", "mime_type": "image/webp"}}
    button = {**text, "id": "wamid.b", "type": "button", "button": {"text": "Yes", "payload": "y"}}
    bodyless = {**text, "id": "wamid.e", "text": {}}
    value["messages"] = [reaction, sticker, button, bodyless]
    parsed = parse_webhook(payload)
    assert parsed.ignored == ["reaction", "sticker"]
    assert [
        (m.provider_message_id, m.text) for m in parsed.items if isinstance(m, CustomerMessage)
    ] == [("wamid.b", "Yes")]
    assert len(parsed.rejected) == 1 and "text.body" in parsed.rejected[0]


def test_parse_read_and_failed_without_errors() -> None:
    payload = status_webhook(status("w1", "read"), status("w2", "failed"))
    read, failed = statuses(payload)
    assert read.status is Status.READ
    assert failed.error is not None and failed.error.code == "unknown"


def test_parse_every_entry_change_and_status() -> None:
    payload = status_webhook(status("w1", "sent"), status("w2", "delivered"))
    second = copy.deepcopy(payload["entry"][0])
    second["changes"][0]["value"]["statuses"] = [status("w3", "read")]
    second["changes"].append({"field": "account_update", "value": {"anything": 1}})
    second["changes"].append(copy.deepcopy(second["changes"][0]))
    second["changes"][2]["value"]["statuses"] = [status("w1", "read")]
    payload["entry"].append(second)
    parsed = [(s.provider_message_id, s.status) for s in statuses(payload)]
    assert parsed == [
        ("w1", Status.SENT),
        ("w2", Status.DELIVERED),
        ("w3", Status.READ),
        ("w1", Status.READ),
    ]


def test_unknown_status_is_skipped() -> None:
    payload = status_webhook(status("w1", "deleted"), status("w2", "sent"), status("w3", "warning"))
    assert [s.provider_message_id for s in parse_webhook(payload).items] == ["w2"]


def test_other_objects_are_ignored() -> None:
    assert parse_webhook({"object": "page", "entry": "whatever"}) == Parsed()


@pytest.mark.parametrize(
    "breakage",
    [
        lambda p: p.update(entry={"not": "a list"}),
        lambda p: p["entry"][0].update(changes=[1]),
        lambda p: p["entry"][0]["changes"][0].update(value=None),
        lambda p: p["entry"][0]["changes"][0]["value"].pop("metadata"),
        lambda p: p["entry"][0]["changes"][0]["value"]["statuses"][0].pop("id"),
        lambda p: p["entry"][0]["changes"][0]["value"]["statuses"][0].update(timestamp="soon"),
        lambda p: p["entry"][0]["changes"][0]["value"].update(statuses={"id": "x"}),
    ],
)
def test_a_malformed_part_is_rejected_alone(breakage: Callable[[dict[str, Any]], None]) -> None:
    payload = fixture("whatsapp-status-sent.json")
    breakage(payload)
    payload.setdefault("entry", [])
    if isinstance(payload["entry"], list):  # a good entry beside the broken one applies
        payload["entry"].append(status_webhook(status("w-good", "read"))["entry"][0])
    parsed = parse_webhook(payload)
    assert len(parsed.rejected) == 1
    good = [] if not isinstance(payload["entry"], list) else ["w-good"]
    assert [s.provider_message_id for s in parsed.items] == good


# -- webhook route ---------------------------------------------------------------------


async def test_handshake(harness: Harness) -> None:
    params = {"hub.mode": "subscribe", "hub.challenge": "42"}
    good = await harness.client.get(
        "/webhooks/whatsapp", params={**params, "hub.verify_token": "whatslike-dev-verify-token"}
    )
    assert (good.status_code, good.text) == (200, "42")
    bad = await harness.client.get(
        "/webhooks/whatsapp", params={**params, "hub.verify_token": "guess"}
    )
    assert bad.status_code == 403
    assert bad.json()["error"]["code"] == "forbidden"


async def test_signature_checked_on_raw_bytes_before_parsing(harness: Harness) -> None:
    raw = (FIXTURES / "whatsapp-status-sent.json").read_bytes()
    reserialized = json.dumps(json.loads(raw)).encode()
    for body, signature in (
        (raw, None),
        (raw, "sha256=" + "0" * 64),
        (reserialized, sign(SECRET, raw)),
        (b"not json at all", None),
    ):
        response = await harness.post(body, signature)
        assert response.status_code == 403
        assert response.json()["error"]["code"] == "forbidden"
    assert await harness.handed() == []
    assert (await harness.post(raw, sign(SECRET, raw))).status_code == 200


async def test_a_signed_body_that_is_not_a_json_object_is_400(harness: Harness) -> None:
    for body in (b"not json", b"[1, 2]", b'"text"', b"\xff\xfe"):
        response = await harness.post(body)
        assert response.status_code == 400
        assert response.json()["error"]["code"] == "bad_request"


def skipped(harness: Harness, reason: str) -> float:
    counter = harness.deps.metrics.webhook_items_skipped.labels("whatsapp", reason)
    value: float = counter._value.get()
    return value


async def test_one_bad_item_never_refuses_a_signed_webhook(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    """Meta redelivers a refused body for ever: its good items would never apply."""
    message = await harness.message()
    await harness.store.link_provider_id("whatsapp", "wamid.good", message.id)
    broken = status("wamid.bad", "read")
    del broken["id"]
    payload = status_webhook(broken, status("wamid.good", "read"), status("x", "read", at="soon"))
    payload["entry"].append(7)  # an entry that is not an object
    response = await harness.post(payload)
    assert response.status_code == 200
    [event] = await harness.statuses()
    assert (event.message_id, event.status) == (message.id, Status.READ)
    assert skipped(harness, "malformed") == 3
    [line] = [r for r in caplog.records if "skipped" in r.getMessage()]
    assert line.levelname == "WARNING" and "3 webhook item(s)" in line.getMessage()
    # A body whose `entry` is not even a list is signed and JSON: 200, said, nothing lost.
    assert (
        await harness.post({"object": "whatsapp_business_account", "entry": 7})
    ).status_code == 200
    assert skipped(harness, "malformed") == 4


async def test_a_lone_surrogate_in_an_error_title_is_replaced_not_a_poison_event(
    harness: Harness,
) -> None:
    message = await harness.message()
    await harness.store.link_provider_id("whatsapp", "wamid.f", message.id)
    failed = status("wamid.f", "failed")
    failed["errors"] = [{"code": 131026, "title": "bad \ud800 title \U0001f600"}]
    body = json.dumps(status_webhook(failed)).encode()  # "\ud800" escaped, as JSON allows
    assert b"\\ud800" in body
    assert (await harness.post(body)).status_code == 200
    [event] = await harness.statuses()
    assert event.error == ProviderError("131026", "bad \ufffd title \U0001f600")


def test_an_event_no_consumer_can_store_is_malformed() -> None:
    event = StatusEvent(
        event_id="evt_1",
        message_id="msg_1",
        conversation_id="conv_1",
        org_id="org1",
        channel="whatsapp",
        status=Status.FAILED,
        provider_message_id="wamid.1",
        occurred_at=utcnow(),
        error=ProviderError("131026", "title"),
    )
    assert StatusEvent.from_json(event.to_json()) == event
    for field, value in (
        ("title", "\ud800"),
        ("code", "\udfff"),
        ("provider_message_id", "\ud8ff"),
    ):
        data = json.loads(event.to_json())
        if field == "provider_message_id":
            data[field] = value
        else:
            data["error"][field] = value
        with pytest.raises(MalformedEvent, match="not valid Unicode"):
            StatusEvent.from_json(json.dumps(data).encode())


async def test_a_change_with_only_errors_is_logged_and_counted(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    payload = status_webhook()
    value = payload["entry"][0]["changes"][0]["value"]
    del value["statuses"]
    value["errors"] = [{"code": 131000, "title": "Something went wrong"}]
    assert (await harness.post(payload)).status_code == 200
    assert await harness.handed() == []
    assert skipped(harness, "provider_error") == 1
    [line] = [r for r in caplog.records if "131000" in r.getMessage()]
    assert line.levelname == "WARNING"
    assert "Something went wrong" in line.getMessage()


async def test_a_client_leaving_mid_body_leaves_no_traceback(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    app = Starlette(routes=routes(harness.connector.operations()))
    messages: list[dict[str, Any]] = [
        {"type": "http.request", "body": b'{"object": "whatsapp_bus', "more_body": True},
        {"type": "http.disconnect"},
    ]
    sent: list[MutableMapping[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return messages.pop(0)

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/webhooks/whatsapp",
        "raw_path": b"/webhooks/whatsapp",
        "query_string": b"",
        "headers": [(b"content-type", b"application/json"), (b"content-length", b"900")],
        "client": ("203.0.113.9", 5000),
        "server": ("test", 80),
    }
    await app(scope, receive, send)
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert await harness.handed() == []


async def test_status_resolved_by_callback_data(harness: Harness) -> None:
    message = await harness.message()
    await harness.store.begin_send(message.id)  # the webhook beat the send answer
    sent_at = int(time.time()) + 1  # within the message's life: kept as Meta dated it
    webhook = status_webhook(status(WAMID, "sent", callback=message.id, at=str(sent_at)))
    response = await harness.post(webhook)
    assert response.status_code == 200
    [(topic, key, _)] = await harness.handed()
    assert (topic, key) == (TOPIC_STATUS, message.conversation_id)
    [event] = await harness.statuses()
    assert event.message_id == message.id
    assert event.org_id == "org1"
    assert event.conversation_id == message.conversation_id
    assert event.channel == "whatsapp"
    assert event.status is Status.SENT
    assert event.provider_message_id == WAMID
    assert event.occurred_at == datetime.fromtimestamp(sent_at, UTC)
    assert event.event_id.startswith("evt_")
    assert event.received_at is not None
    # The provider id was linked on the way: the send's answer will find it done.
    linked = await harness.store.find_by_provider_id("whatsapp", WAMID)
    assert linked is not None and linked.id == message.id


async def test_forged_callback_data_moves_nothing(harness: Harness) -> None:
    """Callback data naming a message that is not being sent, or that the provider knows
    under another id, is not believed: the status is parked like an unknown one."""
    idle = await harness.message("idle")
    sent = await harness.message("sent")
    await harness.store.link_provider_id("whatsapp", "wamid.real", sent.id)
    failed = await harness.message("failed")
    await harness.store.begin_send(failed.id)
    await harness.store.release_send(failed.id)
    for target in (idle, sent, failed):
        forged = status_webhook(status("wamid.forged", "failed", callback=target.id))
        assert (await harness.post(forged)).status_code == 200
    assert await harness.handed() == []
    for target in (idle, sent, failed):
        stored = await harness.store.get_message(target.id)
        assert stored is not None and stored.status is Status.PENDING


async def test_a_redelivered_webhook_carries_the_same_event_id(harness: Harness) -> None:
    message = await harness.message()
    await harness.store.begin_send(message.id)
    webhook = status_webhook(status(WAMID, "delivered", callback=message.id))
    for _ in range(2):
        assert (await harness.post(webhook)).status_code == 200
    first, again = await harness.statuses()
    assert first.event_id == again.event_id
    read = status_webhook(status(WAMID, "read", callback=message.id))
    assert (await harness.post(read)).status_code == 200
    assert (await harness.statuses())[-1].event_id != first.event_id


async def test_a_provider_time_outside_the_messages_life_is_bounded_and_logged(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    """A signed READ dated 2001 set sent/delivered/read to before the message existed;
    one dated the year 3000 was kept."""
    message = await harness.message()
    await harness.store.link_provider_id("whatsapp", "wamid.t", message.id)
    stored = await harness.store.get_message(message.id)
    assert stored is not None
    before = utcnow()
    past = status_webhook(status("wamid.t", "read", at="978307200"))  # 2001-01-01
    future = status_webhook(status("wamid.t", "delivered", at="32503680000"))  # 3000-01-01
    for payload in (past, future, future):
        assert (await harness.post(payload)).status_code == 200
    after = utcnow()
    read, delivered, again = await harness.statuses()
    assert read.occurred_at == stored.created_at
    assert before <= delivered.occurred_at - PROVIDER_CLOCK_SKEW <= after
    assert again.event_id == delivered.event_id  # a redelivery: still the same observation
    lines = [r for r in caplog.records if "outside its life" in r.getMessage()]
    assert [r.levelname for r in lines] == ["WARNING"] * 3
    assert "2001-01-01" in lines[0].getMessage() and "3000-01-01" in lines[1].getMessage()


async def test_batched_post_for_several_messages(harness: Harness) -> None:
    first, second = await harness.message("one"), await harness.message("two")
    await harness.store.link_provider_id("whatsapp", "wamid.A", first.id)
    await harness.store.link_provider_id("whatsapp", "wamid.B", second.id)
    payload = status_webhook(
        status("wamid.A", "delivered", at="1764072001"),
        status("wamid.B", "sent", callback=second.id),
        status("wamid.A", "read", at="1764072005"),
        status("wamid.B", "failed"),
        status("wamid.B", "played"),
    )
    assert (await harness.post(payload)).status_code == 200
    events = [(e.message_id, e.status) for e in (await harness.statuses())]
    assert events == [
        (first.id, Status.DELIVERED),
        (second.id, Status.SENT),
        (first.id, Status.READ),
        (second.id, Status.FAILED),
    ]


async def test_status_of_another_phone_number_is_skipped(harness: Harness) -> None:
    message = await harness.message()
    payload = status_webhook(status(WAMID, "sent", callback=message.id), phone="999")
    assert (await harness.post(payload)).status_code == 200
    assert await harness.handed() == []


async def test_store_outage_answers_503_so_meta_retries(harness: Harness) -> None:
    message = await harness.message()
    await harness.store.close()
    response = await harness.post(status_webhook(status(WAMID, "sent", callback=message.id)))
    assert response.status_code == 503
    assert response.headers["Retry-After"] == str(harness.settings.retry_after_s)
    assert set(response.json()["error"]) == {"code", "message"}
    assert "Traceback" not in response.text


# -- statuses that beat the send answer ------------------------------------------------


async def test_webhook_before_send_answer_is_parked_then_applied(harness: Harness) -> None:
    message = await harness.message()
    early = status_webhook(status(WAMID, "delivered"), status(WAMID, "sent"))
    assert (await harness.post(early)).status_code == 200
    assert await harness.handed() == []  # nothing to say yet: parked

    harness.send_handler = answer_with(WAMID)
    await harness.send(message)
    events = await harness.statuses()
    assert [(e.message_id, e.status) for e in events] == [
        (message.id, Status.DELIVERED),
        (message.id, Status.SENT),
    ]
    assert all(e.provider_message_id == WAMID for e in events)
    linked = await harness.store.find_by_provider_id("whatsapp", WAMID)
    assert linked is not None and linked.id == message.id


async def test_webhook_after_send_answer_resolves_by_provider_id(harness: Harness) -> None:
    message = await harness.message()
    harness.send_handler = answer_with(WAMID)
    await harness.send(message)
    assert await harness.handed() == []
    assert (await harness.post(status_webhook(status(WAMID, "read")))).status_code == 200
    [event] = await harness.statuses()
    assert (event.message_id, event.status) == (message.id, Status.READ)


async def test_a_webhooks_statuses_go_to_the_bus_once_committed(harness: Harness) -> None:
    """On a bus that keeps nothing the connector hands the statuses on itself, right
    after the commit, added as relayed by this run: the relay does not publish them
    again, a restart (another run) does, until they are applied."""
    message = await harness.message()
    harness.send_handler = answer_with(WAMID)
    await harness.send(message)
    assert (await harness.post(status_webhook(status(WAMID, "read")))).status_code == 200
    [(topic, key, value)] = harness.bus.published
    assert (topic, key) == (TOPIC_STATUS, message.conversation_id)
    assert StatusEvent.from_json(value).status is Status.READ
    assert await harness.store.outbox_batch(harness.deps.relay_run.id, 10) == []
    assert [e.status for e in await harness.statuses()] == [Status.READ]


async def test_statuses_the_bus_refuses_are_left_to_the_relay(harness: Harness) -> None:
    message = await harness.message()
    harness.send_handler = answer_with(WAMID)
    await harness.send(message)
    harness.bus.refuse = True
    run = harness.deps.relay_run.id
    # Committed already: Meta gets its 200, and the relay's new run hands them on.
    assert (await harness.post(status_webhook(status(WAMID, "read")))).status_code == 200
    assert harness.deps.relay_run.id != run
    assert harness.deps.handoffs.is_set()
    [item] = await harness.store.outbox_batch(harness.deps.relay_run.id, 10)
    assert StatusEvent.from_json(item.payload).status is Status.READ


async def test_on_a_durable_bus_the_connector_publishes_its_hand_offs_once(
    harness: Harness,
) -> None:
    """On Kafka the connector publishes a send's and a webhook's hand-offs itself, right
    after their commit (added claimed, so no relay takes them meanwhile), and deletes
    them once published: the relay finds nothing to publish a second time."""
    harness.bus.durable = True
    message = await harness.message()
    # Before the send answer: parked, then handed off by the send.
    assert (await harness.post(status_webhook(status(WAMID, "sent")))).status_code == 200
    harness.send_handler = answer_with(WAMID)
    await harness.send(message)
    assert (await harness.post(status_webhook(status(WAMID, "read")))).status_code == 200
    published = [StatusEvent.from_json(value) for _, _, value in harness.bus.published]
    assert [(e.message_id, e.status) for e in published] == [
        (message.id, Status.SENT),
        (message.id, Status.READ),
    ]
    assert await OutboxRelay(harness.deps).relay_once() == 0
    assert len(harness.bus.published) == 2
    assert await harness.store.outbox_size() == 0


async def test_on_a_durable_bus_a_send_whose_statuses_came_first_stores_nothing_more(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Meta's webhooks can beat its send answer (the simulator's do at no delay): they
    link the provider id by callback data and hand the statuses off. The send answer
    then only checks the link: on a durable bus there is no hand-off left to store (the
    send's own entry left the outbox when the bus took it)."""
    harness.bus.durable = True
    message = await harness.message()
    await harness.clear()  # the send's own entry: the relay took it
    handoffs: list[int] = []
    handoff = harness.store.handoff

    async def counted(*args: Any, **kwargs: Any) -> list[int]:
        handoffs.append(len(args[0]) if args else 0)
        return await handoff(*args, **kwargs)

    monkeypatch.setattr(harness.store, "handoff", counted)
    sent_at = str(int(time.time()) + 1)

    async def webhook_first(request: httpx.Request) -> httpx.Response:
        early = status_webhook(status(WAMID, "sent", callback=message.id, at=sent_at))
        assert (await harness.post(early)).status_code == 200
        return send_answer(WAMID)

    harness.send_handler = webhook_first
    await harness.send(message)
    assert handoffs == [1]  # the webhook's SENT; nothing after the send answer
    [(_, _, value)] = harness.bus.published
    assert StatusEvent.from_json(value).status is Status.SENT
    linked = await harness.store.find_by_provider_id("whatsapp", WAMID)
    assert linked is not None and linked.id == message.id


async def test_on_a_durable_bus_what_the_bus_refuses_goes_to_the_relay_at_once(
    harness: Harness,
) -> None:
    harness.bus.durable = True
    message = await harness.message()
    assert (await harness.post(status_webhook(status(WAMID, "sent")))).status_code == 200
    harness.send_handler = answer_with(WAMID)
    harness.bus.refuse = True
    await harness.send(message)  # the send is done: its SENT is stored
    assert harness.deps.handoffs.is_set()
    harness.bus.refuse = False
    assert await OutboxRelay(harness.deps).relay_once() == 1
    [(_, _, value)] = harness.bus.published
    assert StatusEvent.from_json(value).status is Status.SENT
    assert await harness.store.outbox_size() == 0


async def test_a_connector_dying_between_commit_and_publish_leaves_its_hand_offs_to_the_relay(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hand-off is committed claimed; the process stops before it publishes: once
    the claim lapses, a relay (of any process) publishes it."""
    monkeypatch.setattr("whatslike.connectors.base.CLAIM_LEASE_S", 0.2)
    harness.bus.durable = True
    message = await harness.message()
    assert (await harness.post(status_webhook(status(WAMID, "sent")))).status_code == 200
    await harness.clear()  # the message's own entry: the relay took it
    harness.send_handler = answer_with(WAMID)
    harness.bus.stalled.set()
    sending = asyncio.create_task(harness.send(message))
    relay = OutboxRelay(harness.deps)
    deadline = time.monotonic() + 10
    while not await harness.statuses():  # until the SENT is committed
        assert time.monotonic() < deadline, "the SENT was not committed"
        await asyncio.sleep(0.01)
    assert await relay.relay_once() == 0  # claimed by the connector
    sending.cancel()  # it dies before its publish
    harness.bus.stalled.clear()
    while not await relay.relay_once():
        assert time.monotonic() < deadline, "the relay never took the lapsed claim"
        await asyncio.sleep(0.05)
    [(_, _, value)] = harness.bus.published
    assert StatusEvent.from_json(value).status is Status.SENT
    assert await harness.store.outbox_size() == 0


# -- sending ---------------------------------------------------------------------------


async def test_send_request_shape(harness: Harness) -> None:
    message = await harness.message()
    harness.send_handler = answer_with(WAMID)
    await harness.send(message)
    [request] = harness.requests
    assert str(request.url) == "http://127.0.0.1:8123/simulator/v21.0/109876543210987/messages"
    assert request.headers["authorization"] == "Bearer whatslike-dev-access-token"
    expected = fixture("whatsapp-send-request.json")
    expected["biz_opaque_callback_data"] = message.id
    expected["to"] = "+5511988877665"
    assert json.loads(request.content) == expected


async def test_send_refused_by_meta_publishes_failed(harness: Harness) -> None:
    message = await harness.message()
    refusal = {
        "error": {
            "message": "(#131030) Recipient phone number not in allowed list",
            "type": "OAuthException",
            "code": 131030,
            "fbtrace_id": "Az8or2yhqkZfEZ-_4Qn_Bam",
        }
    }
    harness.send_handler = lambda request: httpx.Response(400, json=refusal)
    await harness.send(message)
    [event] = await harness.statuses()
    assert event.status is Status.FAILED
    assert event.error == ProviderError(
        "131030", "(#131030) Recipient phone number not in allowed list"
    )
    assert event.provider_message_id == ""


@pytest.mark.parametrize(
    "handler",
    [
        lambda request: httpx.Response(500, json={"error": {"code": 2, "message": "down"}}),
        lambda request: httpx.Response(503, text="<html>busy</html>"),
        lambda request: httpx.Response(
            429, json={"error": {"code": 4, "message": "(#4) Application request limit"}}
        ),
        lambda request: httpx.Response(
            400, json={"error": {"code": 1, "message": "try later", "is_transient": True}}
        ),
    ],
)
async def test_send_retriable_answers_raise(harness: Harness, handler: SendHandler) -> None:
    message = await harness.message()
    harness.send_handler = handler
    with pytest.raises(ProviderUnavailable):
        await harness.send(message)
    assert await harness.handed() == []


async def test_a_send_that_never_left_is_made_again(harness: Harness) -> None:
    def unreachable(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    message = await harness.message()
    harness.send_handler = unreachable
    with pytest.raises(ProviderUnavailable):
        await harness.send(message)
    harness.send_handler = answer_with(WAMID)
    await harness.send(message)  # the bus's retry
    assert len(harness.requests) == 2
    stored = await harness.store.get_message(message.id)
    assert stored is not None and stored.provider_message_id == WAMID
    assert await harness.store.outbox_size() == 0  # the send's hand-off is done


async def test_a_send_of_unknown_outcome_is_never_made_again(harness: Harness) -> None:
    """A timeout after the request left may mean Meta sent it: the Graph API has no
    idempotency key, so the message is not sent again; WhatsApp's status webhook, which
    carries our id as callback data, settles it."""

    def slow(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("no answer", request=request)

    message = await harness.message()
    harness.send_handler = slow
    await harness.send(message)  # settled as unknown: nothing for the bus to retry
    harness.send_handler = answer_with(WAMID)
    await harness.send(message)  # a redelivery (e.g. after a crash)
    assert len(harness.requests) == 1
    assert await harness.store.outbox_size() == 0
    webhook = status_webhook(status(WAMID, "delivered", callback=message.id))
    assert (await harness.post(webhook)).status_code == 200
    [event] = await harness.statuses()
    assert (event.message_id, event.status) == (message.id, Status.DELIVERED)
    linked = await harness.store.find_by_provider_id("whatsapp", WAMID)
    assert linked is not None and linked.id == message.id


async def test_a_failed_link_is_retried_without_sending_again(harness: Harness) -> None:
    """The provider accepted the send, then the store failed: only the link is retried."""
    link = harness.store.link_answer
    failures = iter([BackendUnavailable("store down"), BackendUnavailable("still down")])

    async def flaky_link(
        channel: str, provider_message_id: str, message_id: str
    ) -> tuple[list[ParkedStatus], str | None]:
        failure = next(failures, None)
        if failure is not None:
            raise failure
        return await link(channel, provider_message_id, message_id)

    harness.store.link_answer = flaky_link  # type: ignore[method-assign]
    message = await harness.message()
    harness.send_handler = answer_with(WAMID)
    await harness.send(message)
    assert len(harness.requests) == 1
    stored = await harness.store.get_message(message.id)
    assert stored is not None and stored.provider_message_id == WAMID


async def test_the_send_answer_wins_over_callback_data_linked_while_in_flight(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    """A signed status naming our message (callback data) with an unknown wamid while its
    send was in flight took the message; Meta's real answer must take it back."""
    message = await harness.message()
    forged = status_webhook(status("wamid.forged", "delivered", callback=message.id))
    taken: list[str | None] = []

    async def forged_status_then_answer(request: httpx.Request) -> httpx.Response:
        # The send is under way (recorded, no answer yet) when the forged status comes.
        assert (await harness.post(forged)).status_code == 200
        during = await harness.store.get_message(message.id)
        taken.append(during.provider_message_id if during else None)
        return send_answer(WAMID)

    harness.send_handler = forged_status_then_answer
    await harness.send(message)
    assert taken == ["wamid.forged"]
    stored = await harness.store.get_message(message.id)
    assert stored is not None and stored.provider_message_id == WAMID
    assert await harness.store.find_by_provider_id("whatsapp", "wamid.forged") is None
    found = await harness.store.find_by_provider_id("whatsapp", WAMID)
    assert found is not None and found.id == message.id
    [line] = [r for r in caplog.records if "wamid.forged" in r.getMessage()]
    assert line.levelname == "WARNING" and WAMID in line.getMessage()


async def test_redelivered_send_is_not_sent_twice(harness: Harness) -> None:
    message = await harness.message()
    harness.send_handler = answer_with(WAMID)
    await harness.send(message)
    await harness.send(message)  # the bus redelivers after a crash: already linked
    sent = StatusEvent(
        "evt_x", message.id, message.conversation_id, "org1", "whatsapp",
        Status.SENT, WAMID, utcnow(),
    )  # fmt: skip
    await harness.store.apply_status(sent)
    await harness.send(message)  # no longer PENDING
    assert len(harness.requests) == 1


async def test_send_of_unknown_message_is_dead_lettered(harness: Harness) -> None:
    ghost = OutboundMessage(
        "evt_2", "msg_ghost", "conv", "org1", "whatsapp", "+55", "hi", "c", utcnow()
    )
    with pytest.raises(MalformedEvent):
        await harness.connector.send(ghost.to_json())


async def test_subscribes_to_its_topics_as_its_group(harness: Harness) -> None:
    assert harness.bus.subscribed == [
        (outbound_topic("whatsapp"), "connector-whatsapp"),
        (receipt_topic("whatsapp"), "connector-whatsapp"),
        (media_topic("whatsapp"), "connector-whatsapp"),
    ]


# -- customers' messages and read receipts ------------------------------------------


async def test_a_customers_message_is_stored_then_its_arrival_handed_off(
    harness: Harness,
) -> None:
    payload = fixture("whatsapp-inbound-text.json")
    for _ in range(2):  # a redelivery stores nothing new and hands off the same event
        assert (await harness.post(payload)).status_code == 200
    first, again = await harness.statuses()
    assert first.event_id == again.event_id and first.message_id == again.message_id
    message = await harness.store.get_message(first.message_id)
    assert message is not None
    assert (message.direction, message.org_id, message.text) == (
        "in",
        "demo",
        "Oi, recebi sim, obrigada!",
    )
    assert (first.status, first.occurred_at) == (
        Status.DELIVERED,
        datetime.fromtimestamp(1764072200, UTC),
    )
    conversation = await harness.store.get_conversation("demo", message.conversation_id)
    assert conversation is not None and conversation.contact == "5511988877665"


async def test_a_customers_medium_is_stored_before_the_200_and_fetched_after(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The webhook stores the media messages with Meta's descriptor and hands off their
    fetches, not their arrivals (nothing is downloaded in the webhook). A fetch Meta
    answers 5xx is tried again, then stored: the arrival follows, and the fetch's
    hand-off is done; one Meta refuses (404) is given up at once, `failed`, and
    announced all the same. A redelivered webhook then hands off the same arrivals."""
    payload = fixture("whatsapp-inbound-image.json")
    assert (await harness.post(payload)).status_code == 200
    handed = await harness.handed()
    assert [topic for topic, _, _ in handed] == [media_topic("whatsapp")] * 2
    fetches = [MediaFetch.from_json(value) for _, _, value in handed]
    image, document = await harness.store.get_messages([f.message_id for f in fetches])
    if image.text != "A foto do recibo":
        image, document = document, image
    assert image.inbound_media is not None and image.inbound_media.state == "fetching"
    assert image.inbound_media.source == "1234567890123456"
    fetched = replace(image.inbound_media, state="stored")

    answers: list[Exception | None] = [
        MediaFetchFailed("Meta answered 503", code="http_503", retriable=True),
        None,
        MediaFetchFailed("Meta answered 404", code="http_404"),
    ]
    stored = MediaRecord("med_" + "a" * 32, "demo", "image/jpeg", "image", 9, "s", "", utcnow())

    async def download(http: Any, media: InboundMedia, org_id: str) -> MediaRecord:
        answer = answers.pop(0)
        if answer is not None:
            raise answer
        return stored

    monkeypatch.setattr(harness.connector, "download", download)
    quick = harness.settings.model_copy(update={"media_fetch_backoff_s": 0.001})
    monkeypatch.setattr(harness.connector, "_settings", quick)
    async with aiohttp.ClientSession() as session:
        harness.connector._downloads = session
        for fetch in fetches:
            await harness.connector.fetch_media(fetch.to_json())
    assert answers == []
    image, document = await harness.store.get_messages([image.id, document.id])
    if image.text != "A foto do recibo":
        image, document = document, image
    assert (image.media_id, image.inbound_media) == (stored.id, fetched)
    assert document.media_id is None and document.inbound_media is not None
    assert (document.inbound_media.state, document.inbound_media.error) == (
        "failed",
        "http_404: Meta answered 404",
    )
    arrivals = await harness.statuses()
    assert sorted(e.message_id for e in arrivals) == sorted([image.id, document.id])
    assert all(e.status is Status.DELIVERED for e in arrivals)
    assert [t for t, _, _ in await harness.handed()] == [TOPIC_STATUS] * 2
    assert (await harness.post(payload)).status_code == 200
    again = await harness.statuses()
    assert {e.event_id for e in again} == {e.event_id for e in arrivals}


async def test_a_message_to_another_number_is_not_stored(harness: Harness) -> None:
    payload = fixture("whatsapp-inbound-text.json")
    payload["entry"][0]["changes"][0]["value"]["metadata"]["phone_number_id"] = "999"
    assert (await harness.post(payload)).status_code == 200
    assert await harness.handed() == []


async def test_a_read_receipt_marks_the_wamid_read_then_completes_its_hand_off(
    harness: Harness,
) -> None:
    receipt = ReadReceipt("msg_in_1", "conv_1", "demo", "whatsapp", "55119", "wamid.in")
    await harness.store.handoff(
        [OutboxEntry(receipt_topic("whatsapp"), "conv_1", b"x", "msg_in_1")]
    )
    harness.send_handler = lambda request: httpx.Response(200, json={"success": True})
    await harness.connector.send_receipt(receipt.to_json())
    [request] = harness.requests
    assert str(request.url) == "http://127.0.0.1:8123/simulator/v21.0/109876543210987/messages"
    assert json.loads(request.content) == {
        "messaging_product": "whatsapp",
        "status": "read",
        "message_id": "wamid.in",
    }
    assert await harness.store.outbox_size() == 0


async def test_a_read_receipt_meta_cannot_take_now_is_retried(harness: Harness) -> None:
    receipt = ReadReceipt("msg_in_1", "conv_1", "demo", "whatsapp", "55119", "wamid.in")
    await harness.store.handoff(
        [OutboxEntry(receipt_topic("whatsapp"), "conv_1", b"x", "msg_in_1")]
    )
    harness.send_handler = lambda request: httpx.Response(503)
    with pytest.raises(ProviderUnavailable):
        await harness.connector.send_receipt(receipt.to_json())
    assert await harness.store.outbox_size() == 1


# -- one status item, as `parse_status` reads it ---------------------------------------


def failed_with(*errors: Any) -> dict[str, Any]:
    return {**status("w1", "failed"), "errors": list(errors)}


@pytest.mark.parametrize(
    ("errors", "expected"),
    [
        ([{"code": 131026, "title": "Undeliverable"}], ProviderError("131026", "Undeliverable")),
        ([{"code": "131026", "title": "Undeliverable"}], ProviderError("131026", "Undeliverable")),
        ([{"code": 131026, "message": "From message"}], ProviderError("131026", "From message")),
        ([{"code": 131026, "title": "", "message": "m"}], ProviderError("131026", "m")),
        ([{"code": 131026}], ProviderError("131026", "")),
        ([{"code": 0, "title": "Zero"}], ProviderError("0", "Zero")),
        # errors[0] without a code: "unknown", and Meta's words are kept.
        ([{"title": "Rate limit hit"}], ProviderError("unknown", "Rate limit hit")),
        ([{"message": "Only a message"}], ProviderError("unknown", "Only a message")),
        ([{}], ProviderError("unknown", "Failed without error details")),
        # A code that is not one: never "None", "True" or a dict's repr.
        ([{"code": None, "title": "t"}], ProviderError("unknown", "t")),
        ([{"code": True, "title": "t"}], ProviderError("unknown", "t")),
        ([{"code": "", "title": "t"}], ProviderError("unknown", "t")),
        ([{"code": {"n": 1}, "title": "t"}], ProviderError("unknown", "t")),
        ([{"code": [131026]}], ProviderError("unknown", "Failed without error details")),
        # A title that is not text is left out; a lone surrogate in one is replaced.
        ([{"code": 1, "title": {"x": 1}}], ProviderError("1", "")),
        ([{"code": 1, "title": 5, "message": "m"}], ProviderError("1", "m")),
        ([{"code": 1, "title": "\ud800"}], ProviderError("1", "\ufffd")),
        ([{"code": "\udfff", "title": "t"}], ProviderError("unknown", "t")),
        # Only the first error counts; a first that is not an object is no error.
        ([{"code": 1, "title": "a"}, {"code": 2, "title": "b"}], ProviderError("1", "a")),
        (["131026"], ProviderError("unknown", "Failed without error details")),
        ([], ProviderError("unknown", "Failed without error details")),
    ],
)
def test_the_error_of_a_failed_status(errors: list[Any], expected: ProviderError) -> None:
    parsed = parse_status(failed_with(*errors), PHONE)
    assert parsed is not None
    assert parsed.error == expected


def test_errors_of_other_statuses_are_not_read() -> None:
    item = {**status("w1", "delivered"), "errors": [{"code": 1, "title": "t"}]}
    parsed = parse_status(item, PHONE)
    assert parsed is not None and parsed.error is None


def test_errors_that_are_not_a_list_are_a_clear_error() -> None:
    with pytest.raises(WebhookPayloadError, match=r"^s\.errors must be a JSON array$"):
        parse_status({**status("w1", "failed"), "errors": {"code": 1}}, PHONE, "s")


@pytest.mark.parametrize("name", [None, 1, True, ["sent"], {"sent": 1}, "SENT", "", "sent "])
def test_a_status_that_is_not_one_of_meta_s_four_is_skipped(name: object) -> None:
    # Like a status Meta adds later ("deleted", "warning"): logged and skipped, the
    # webhook's other statuses still count; never a crash (a list is not hashable).
    assert parse_status({**status("w1", "sent"), "status": name}, PHONE) is None


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"id": ""}, "s.id must be a non-empty string"),
        ({"id": None}, "s.id must be a non-empty string"),
        ({"id": False}, "s.id must be a non-empty string"),
        ({"id": ["w1"]}, "s.id must be a non-empty string"),
        ({"timestamp": ""}, "s.timestamp must be a non-empty string"),
        ({"timestamp": "1.5"}, "s.timestamp must be Unix seconds"),
        ({"timestamp": "99999999999999999999"}, "s.timestamp must be Unix seconds"),
    ],
)
def test_a_bad_id_or_time_is_a_clear_error_for_the_item(
    change: dict[str, Any], message: str
) -> None:
    with pytest.raises(WebhookPayloadError) as raised:
        parse_status({**status("w1", "sent"), **change}, PHONE, "s")
    assert str(raised.value) == message


def test_a_numeric_id_is_taken_as_text() -> None:
    parsed = parse_status({**status("w1", "sent"), "id": 12345}, PHONE)
    assert parsed is not None and parsed.provider_message_id == "12345"


def test_an_item_that_is_not_an_object_is_a_clear_error() -> None:
    with pytest.raises(WebhookPayloadError, match=r"^s must be a JSON object$"):
        parse_status(["w1"], PHONE, "s")


@pytest.mark.parametrize("phone", ["", None, 0.5])
def test_an_empty_phone_number_id_is_a_clear_error(phone: object) -> None:
    payload = status_webhook(status("w1", "sent"))
    payload["entry"][0]["changes"][0]["value"]["metadata"]["phone_number_id"] = phone
    parsed = parse_webhook(payload)
    assert parsed.items == []
    [rejected] = parsed.rejected
    assert rejected.endswith("metadata must be a non-empty string")


@pytest.mark.parametrize(
    ("callback", "kept"),
    [("msg_01", "msg_01"), ("", ""), (7, ""), ("tab\there", ""), ("né", ""), (None, "")],
)
def test_callback_data_is_kept_only_as_clean_printable_ascii(callback: object, kept: str) -> None:
    parsed = parse_status({**status("w1", "sent"), "biz_opaque_callback_data": callback}, PHONE)
    assert parsed is not None and parsed.callback_data == kept


def test_the_item_is_kept_whole_as_compact_json() -> None:
    item = {**status("w1", "sent"), "extra": {"a": [1, 2]}}
    parsed = parse_status(item, PHONE)
    assert parsed is not None
    assert parsed.payload == json.dumps(item, separators=(",", ":")).encode()
    assert parsed.phone_number_id == PHONE


async def test_a_status_of_another_phone_number_is_counted_as_foreign(harness: Harness) -> None:
    message = await harness.message()
    payload = status_webhook(status(WAMID, "sent", callback=message.id), phone="999")
    assert (await harness.post(payload)).status_code == 200
    labels = {"channel": "whatsapp", "outcome": "foreign_number"}
    registry = harness.deps.metrics.registry
    assert registry.get_sample_value("whatslike_webhooks_total", labels) == 1


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        (lambda p: p.update(entry={}), "entry must be a JSON array"),
        (lambda p: p.update(entry=[1]), "entry[0] must be a JSON object"),
        (lambda p: p["entry"][0].update(changes=""), "entry[0].changes must be a JSON array"),
        (lambda p: p["entry"][0].update(changes=[1]), "entry[0].changes[0] must be a JSON object"),
        (
            lambda p: p["entry"][0]["changes"][0].update(value=[]),
            "entry[0].changes[0].value must be a JSON object",
        ),
        (
            lambda p: p["entry"][0]["changes"][0]["value"].update(metadata=1),
            "entry[0].changes[0].value.metadata must be a JSON object",
        ),
        (
            lambda p: p["entry"][0]["changes"][0]["value"].update(statuses={}),
            "entry[0].changes[0].value.statuses must be a JSON array",
        ),
    ],
)
def test_a_webhook_not_shaped_like_meta_s_names_where(
    breakage: Callable[[dict[str, Any]], None], message: str
) -> None:
    payload = fixture("whatsapp-status-sent.json")
    breakage(payload)
    parsed = parse_webhook(payload)
    assert (parsed.items, parsed.rejected) == ([], [message])


async def test_a_failed_webhook_hands_on_meta_s_error(harness: Harness) -> None:
    message = await harness.message()
    harness.send_handler = answer_with(WAMID)
    await harness.send(message)
    failed = {
        **status(WAMID, "failed"),
        "errors": [{"code": 131026, "title": "Message undeliverable"}],
    }
    assert (await harness.post(status_webhook(failed))).status_code == 200
    [event] = await harness.statuses()
    assert (event.status, event.error) == (
        Status.FAILED,
        ProviderError("131026", "Message undeliverable"),
    )


def test_a_medium_is_sent_by_link_with_its_caption_and_filename() -> None:
    record = MediaRecord(
        "med_" + "0" * 32, "acme", "application/pdf", "document", 10, "", "r.pdf", utcnow()
    )
    body = media_send_body("5511", record, "https://h/x", "your receipt", "msg_1")
    assert body["type"] == "document"
    assert body["document"] == {
        "link": "https://h/x",
        "caption": "your receipt",
        "filename": "r.pdf",
    }
    assert body["biz_opaque_callback_data"] == "msg_1"
    audio = replace(record, kind="audio", content_type="audio/ogg", filename="")
    assert media_send_body("5511", audio, "https://h/a", "ignored", "msg_2")["audio"] == {
        "link": "https://h/a"
    }


def test_a_template_is_sent_in_metas_shape() -> None:
    stored = canonical(
        Template.model_validate(
            {
                "name": "order_update",
                "language": {"code": "pt_BR"},
                "components": [
                    {"type": "body", "parameters": [{"type": "text", "text": "Ana"}]},
                    {
                        "type": "button",
                        "sub_type": "quick_reply",
                        "index": 0,
                        "parameters": [{"type": "payload", "payload": "ok"}],
                    },
                ],
            }
        )
    )
    assert template_send_body("5511", stored, "msg_1") == {
        "messaging_product": "whatsapp",
        "recipient_type": "individual",
        "to": "5511",
        "type": "template",
        "template": {
            "name": "order_update",
            "language": {"code": "pt_BR", "policy": "deterministic"},
            "components": [
                {"type": "body", "parameters": [{"type": "text", "text": "Ana"}]},
                {
                    "type": "button",
                    "sub_type": "quick_reply",
                    "index": "0",
                    "parameters": [{"type": "payload", "payload": "ok"}],
                },
            ],
        },
        "biz_opaque_callback_data": "msg_1",
    }
    bare = canonical(Template.model_validate({"name": "hello_world", "language": {"code": "en"}}))
    assert "components" not in template_send_body("5511", bare, "msg_2")["template"]


def test_a_template_travels_in_its_event_and_a_broken_one_is_malformed() -> None:
    stored = canonical(Template.model_validate({"name": "hello_world", "language": {"code": "en"}}))
    event = OutboundMessage(
        event_id="evt_1",
        message_id="msg_1",
        conversation_id="conv_1",
        org_id="org1",
        channel="whatsapp",
        to="5511",
        text="",
        client_message_id="",
        created_at=utcnow(),
        template=stored,
    )
    decoded = OutboundMessage.from_json(event.to_json())
    assert decoded.template == stored
    assert decoded == replace(event, created_at=decoded.created_at)
    for broken in ({"name": "Hello"}, {"name": "hi", "language": {"code": "\ud800"}}, "hi"):
        data = json.loads(event.to_json())
        data["template"] = broken
        with pytest.raises(MalformedEvent, match="template"):
            OutboundMessage.from_json(json.dumps(data).encode())
    data = json.loads(event.to_json())
    data["template"]["components"] = [
        {"type": "body", "parameters": [{"type": "text", "text": "\ud800"}]}
    ]
    with pytest.raises(MalformedEvent, match="template"):
        OutboundMessage.from_json(json.dumps(data).encode())
