"""The Instagram connector: seen webhooks as read watermarks, SENT on Meta's answer,
parked reads that beat the send answer, and refused sends."""

from __future__ import annotations

import asyncio
import copy
import json
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.connectors.test_whatsapp import SECRET, Harness, open_harness
from whatslike.clock import utcnow
from whatslike.connectors.base import ProviderUnavailable
from whatslike.connectors.instagram import (
    InstagramConnector,
    InstagramRead,
    parse_webhook,
    send_body,
)
from whatslike.connectors.meta import CustomerMessage, Parsed, sign
from whatslike.events import TOPIC_STATUS, StatusEvent
from whatslike.status.rules import Status
from whatslike.store.base import InboundMedia, Message

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "meta"
ACCOUNT = "17841400000000001"
USER = "7000000000000042"
SEEN_AT_MS = 1764072300120


def fixture(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((FIXTURES / name).read_bytes())
    return data


def seen(mid: str, at_ms: int = SEEN_AT_MS, account: str = ACCOUNT) -> dict[str, Any]:
    payload = fixture("instagram-seen.json")
    payload["entry"][0]["id"] = account
    item = payload["entry"][0]["messaging"][0]
    item["read"]["mid"] = mid
    item["timestamp"] = at_ms
    return payload


def answer_with(mid: str) -> Any:
    answer = fixture("instagram-send-response.json")
    answer["message_id"] = mid
    return lambda request: httpx.Response(200, json=answer)


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    async with open_harness(tmp_path, InstagramConnector) as harness:
        yield harness


async def sent_message(harness: Harness, mid: str, text: str) -> Message:
    """A message Meta accepted as `mid`, in the one conversation with USER."""
    await asyncio.sleep(0.002)  # distinct created_at: the watermark orders by it
    message = await harness.message(text, contact=USER)
    harness.send_handler = answer_with(mid)
    await harness.send(message, to=USER)
    return message


async def reads(harness: Harness) -> list[str]:
    return [e.message_id for e in (await harness.statuses()) if e.status is Status.READ]


# -- parsing ---------------------------------------------------------------------------


def test_parse_seen_fixture() -> None:
    [read] = parse_webhook(fixture("instagram-seen.json")).items
    assert isinstance(read, InstagramRead)
    assert read.account_id == ACCOUNT
    assert read.provider_message_id == fixture("instagram-send-response.json")["message_id"]
    assert read.occurred_at == datetime(2025, 11, 25, 12, 5, 0, 120000, tzinfo=UTC)
    assert json.loads(read.payload)["read"]["mid"] == read.provider_message_id


def test_parse_reads_messages_and_skips_echoes_reactions_and_other_objects() -> None:
    payload = fixture("instagram-seen.json")
    message_event = {
        "sender": {"id": USER},
        "timestamp": 1764072300120,
        "message": {"mid": "m", "text": "oi"},
    }
    echo = {**message_event, "message": {"mid": "e", "text": "ours", "is_echo": True}}
    reaction = {**message_event, "reaction": {"mid": "m", "action": "react", "emoji": "x"}}
    share = {"type": "share", "payload": {"url": "https://example.com/post"}}
    photo = {**message_event, "message": {"mid": "p", "attachments": [share]}}
    payload["entry"][0]["messaging"][:0] = [message_event, echo, reaction, photo]
    second = copy.deepcopy(payload["entry"][0])
    second["messaging"] = [second["messaging"][-1]]
    second["messaging"][0]["read"]["mid"] = "other"
    payload["entry"].append(second)
    parsed = parse_webhook(payload)
    message, _, other = parsed.items
    assert message == CustomerMessage(
        ACCOUNT, USER, "m", "oi", datetime(2025, 11, 25, 12, 5, 0, 120000, tzinfo=UTC)
    )
    assert other.provider_message_id == "other"
    assert parsed.ignored == ["reaction", "attachments"]
    assert parse_webhook({"object": "page", "entry": []}) == Parsed()


def test_parse_attachments_one_message_per_medium() -> None:
    """Image, video, audio and file attachments are media (file: a document), each a
    message of its own; a kind not kept (a shared post) is left out; an attachment
    without a URL is malformed."""
    image = {"type": "image", "payload": {"url": "https://lookaside.example/1"}}
    share = {"type": "share", "payload": {"url": "https://example.com/post"}}
    document = {"type": "file", "payload": {"url": "https://lookaside.example/2"}}
    item = {
        "sender": {"id": USER},
        "timestamp": 1764072300120,
        "message": {"mid": "m", "attachments": [image, share, document]},
    }
    broken = {**item, "message": {"mid": "b", "attachments": [{"type": "image"}]}}
    parsed = parse_webhook(
        {"object": "instagram", "entry": [{"id": ACCOUNT, "messaging": [item, broken]}]}
    )
    first, second = parsed.items
    assert isinstance(first, CustomerMessage) and isinstance(second, CustomerMessage)
    assert (first.provider_message_id, first.text) == ("m", "")
    assert first.media == InboundMedia(kind="image", source="https://lookaside.example/1")
    assert second.provider_message_id == "m#2"
    assert second.media == InboundMedia(kind="document", source="https://lookaside.example/2")
    assert len(parsed.rejected) == 1 and "payload" in parsed.rejected[0]


@pytest.mark.parametrize(
    "breakage",
    [
        lambda p: p.update(entry=3),
        lambda p: p["entry"][0].pop("id"),
        lambda p: p["entry"][0]["messaging"][0].update(timestamp="yesterday"),
        lambda p: p["entry"][0]["messaging"][0].update(read={"watermark": "late"}),
        lambda p: p["entry"][0]["messaging"][0].update(read=None),
    ],
)
def test_a_malformed_part_is_rejected_alone(breakage: Any) -> None:
    payload = fixture("instagram-seen.json")
    breakage(payload)
    if isinstance(payload["entry"], list):  # a good entry beside the broken one applies
        payload["entry"].append(seen("mid-good")["entry"][0])
    parsed = parse_webhook(payload)
    assert len(parsed.rejected) == 1
    good = [] if not isinstance(payload["entry"], list) else ["mid-good"]
    assert [read.provider_message_id for read in parsed.items] == good


# -- sending ---------------------------------------------------------------------------


async def test_send_shape_then_sent_published(harness: Harness) -> None:
    before = utcnow()
    message = await sent_message(harness, "mid.1", "Seu pedido foi enviado")
    [request] = harness.requests
    assert str(request.url) == "http://127.0.0.1:8123/simulator/v21.0/me/messages"
    assert request.headers["authorization"] == "Bearer whatslike-dev-access-token"
    assert json.loads(request.content) == fixture("instagram-send-request.json")
    [(topic, key, _)] = await harness.handed()
    assert (topic, key) == (TOPIC_STATUS, message.conversation_id)
    [event] = await harness.statuses()
    assert (event.status, event.provider_message_id) == (Status.SENT, "mid.1")
    assert event.occurred_at >= before
    linked = await harness.store.find_by_provider_id("instagram", "mid.1")
    assert linked is not None and linked.id == message.id


def test_an_answer_tagged_human_agent_says_so_in_the_send_apis_terms() -> None:
    assert send_body(USER, "Seguimos com seu caso", "HUMAN_AGENT") == {
        "recipient": {"id": USER},
        "messaging_type": "MESSAGE_TAG",
        "tag": "HUMAN_AGENT",
        "message": {"text": "Seguimos com seu caso"},
    }
    assert send_body(USER, "oi") == {"recipient": {"id": USER}, "message": {"text": "oi"}}


async def test_send_refused_publishes_failed_and_5xx_raises(harness: Harness) -> None:
    message = await harness.message("x", contact=USER)
    harness.send_handler = lambda request: httpx.Response(502)
    with pytest.raises(ProviderUnavailable):
        await harness.send(message, to=USER)
    refusal = {"error": {"message": "(#551) This person isn't available right now.", "code": 551}}
    harness.send_handler = lambda request: httpx.Response(400, json=refusal)
    await harness.send(message, to=USER)
    [event] = await harness.statuses()
    assert event.status is Status.FAILED
    assert event.error is not None and event.error.code == "551"


# -- webhooks --------------------------------------------------------------------------


async def test_signature_and_handshake(harness: Harness) -> None:
    raw = (FIXTURES / "instagram-seen.json").read_bytes()
    assert (await harness.post(raw, None)).status_code == 403
    assert (
        await harness.post(json.dumps(json.loads(raw)).encode(), sign(SECRET, raw))
    ).status_code == 403
    assert (await harness.post(raw, sign(SECRET, raw))).status_code == 200
    params = {
        "hub.mode": "subscribe",
        "hub.verify_token": "whatslike-dev-verify-token",
        "hub.challenge": "c",
    }
    assert (await harness.client.get("/webhooks/instagram", params=params)).text == "c"


async def test_seen_is_a_watermark_for_earlier_messages(harness: Harness) -> None:
    first = await sent_message(harness, "mid.1", "one")
    refused = await harness.message("two", contact=USER)  # never accepted: no provider id
    second = await sent_message(harness, "mid.3", "three")
    later = await sent_message(harness, "mid.4", "four")
    already_read = StatusEvent(
        "evt_r", first.id, first.conversation_id, "org1", "instagram",
        Status.READ, "mid.1", utcnow(),
    )  # fmt: skip
    await harness.store.apply_status(already_read)
    await harness.clear()

    seen_at_ms = int(time.time() * 1000)  # after every message was created: kept as is
    assert (await harness.post(seen("mid.3", at_ms=seen_at_ms))).status_code == 200
    events = await harness.statuses()
    assert [e.message_id for e in events] == [second.id]  # first is READ already
    assert refused.id not in await reads(harness) and later.id not in await reads(harness)
    assert events[0].occurred_at == datetime.fromtimestamp(seen_at_ms / 1000, UTC)

    await harness.clear()
    assert (await harness.post(seen("mid.4"))).status_code == 200
    assert sorted(await reads(harness)) == sorted([second.id, later.id])


async def test_seen_before_send_answer_is_parked_then_applied(harness: Harness) -> None:
    first = await sent_message(harness, "mid.1", "one")
    await asyncio.sleep(0.002)
    second = await harness.message("two", contact=USER)
    await harness.clear()

    assert (await harness.post(seen("mid.2"))).status_code == 200
    assert await harness.handed() == []  # mid.2 unknown yet: parked

    harness.send_handler = answer_with("mid.2")
    await harness.send(second, to=USER)
    events = [(e.message_id, e.status) for e in (await harness.statuses())]
    assert events[0] == (second.id, Status.SENT)
    assert sorted(events[1:]) == sorted([(second.id, Status.READ), (first.id, Status.READ)])


async def test_seen_for_another_account_is_skipped(harness: Harness) -> None:
    await sent_message(harness, "mid.1", "one")
    await harness.clear()
    assert (await harness.post(seen("mid.1", account="999"))).status_code == 200
    assert await harness.handed() == []


async def test_store_failure_answers_503(harness: Harness) -> None:
    await harness.store.close()
    response = await harness.post(seen("mid.1"))
    assert response.status_code == 503
    assert response.json() == {"error": {"code": "unavailable", "message": "try again later"}}


def watermark_read(watermark: datetime, contact: str = USER) -> dict[str, Any]:
    """Messenger's shape: `read.watermark` (Unix ms), no `read.mid`."""
    return {
        "sender": {"id": contact},
        "recipient": {"id": ACCOUNT},
        "timestamp": int(time.time() * 1000),
        "read": {"watermark": int(watermark.timestamp() * 1000)},
    }


async def sent_at(harness: Harness, message: Message, when: datetime) -> None:
    """Apply the SENT the send handed off, dated `when` (the status worker's part)."""
    event = StatusEvent(
        f"evt_{message.id}", message.id, message.conversation_id, "org1", "instagram",
        Status.SENT, message.provider_message_id or "mid", when,
    )  # fmt: skip
    await harness.store.apply_status(event)


async def test_a_watermark_read_marks_what_was_sent_up_to_it_and_never_refuses_the_body(
    harness: Harness,
) -> None:
    """Messenger's shape (`read.watermark`, no `read.mid`) was a 400 for the whole body,
    and Meta redelivered it for ever: the valid read beside it never applied."""
    early = await sent_message(harness, "mid.1", "one")
    late = await sent_message(harness, "mid.2", "two")
    other_contact = await harness.message("three", contact="7000000000000099")
    harness.send_handler = answer_with("mid.9")
    await harness.send(other_contact, to="7000000000000099")
    watermark = utcnow() - timedelta(seconds=10)
    for message, when in ((early, -5), (late, 5), (other_contact, -5)):
        stored = await harness.store.get_message(message.id)
        assert stored is not None
        await sent_at(harness, stored, watermark + timedelta(seconds=when))
    await harness.clear()

    payload = seen("mid.1")
    payload["entry"][0]["messaging"] = [watermark_read(watermark)]
    assert (await harness.post(payload)).status_code == 200
    assert await reads(harness) == [early.id]  # not sent after it, nor to someone else

    await harness.clear()
    beside = seen("mid.2", at_ms=int(time.time() * 1000))
    beside["entry"][0]["messaging"].insert(0, watermark_read(watermark))
    assert (await harness.post(beside)).status_code == 200
    assert sorted(await reads(harness)) == sorted([early.id, early.id, late.id])
