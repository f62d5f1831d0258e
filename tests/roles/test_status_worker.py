"""The status worker on a real SQLite store and the in-process bus: a fan-out failure
after the store committed is retried, and the notification still goes out."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest

from whatslike.bus.memory import MemoryBus
from whatslike.connectors.base import ProviderUnavailable
from whatslike.errors import MalformedEvent
from whatslike.events import TOPIC_STATUS, OutboundMessage, StatusEvent, outbound_topic
from whatslike.fanout.memory import MemoryFanout
from whatslike.http_client import AiohttpClient
from whatslike.metrics import Metrics
from whatslike.roles import Deps
from whatslike.roles.relay import OutboxRelay
from whatslike.roles.status_worker import StatusWorker
from whatslike.settings import load_settings
from whatslike.status.rules import Status
from whatslike.store.base import Message
from whatslike.store.sqlite import SQLiteStore


class FlakyFanout(MemoryFanout):
    """Fails its first `failures` publishes, like a Redis that blinked."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures
        self.published: list[tuple[str, bytes]] = []
        self.arrived = asyncio.Event()

    async def publish(self, channel: str, payload: bytes) -> None:
        if self.failures:
            self.failures -= 1
            raise ConnectionError("fan-out down")
        self.published.append((channel, payload))
        self.arrived.set()


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    store = SQLiteStore(tmp_path / "w.db")
    await store.open()
    yield store
    await store.close()


def deps(store: SQLiteStore, fanout: FlakyFanout, metrics: Metrics) -> Deps:
    settings = load_settings(
        consumer_max_attempts=3, consumer_backoff_base_s=0.001, consumer_backoff_cap_s=0.005
    )
    return Deps(
        settings=settings,
        store=store,
        bus=MemoryBus(settings, metrics, seed=3),
        fanout=fanout,
        http=AiohttpClient(connections=1, keepalive_s=1.0),
        metrics=metrics,
        jwt_secret="x",
    )


def sent(message: Message) -> StatusEvent:
    return StatusEvent(
        event_id="evt_sent",
        message_id=message.id,
        conversation_id=message.conversation_id,
        org_id=message.org_id,
        channel="whatsapp",
        status=Status.SENT,
        provider_message_id="wamid.1",
        occurred_at=datetime(2026, 11, 25, 12, tzinfo=UTC),
    )


async def test_a_failed_fanout_after_commit_is_retried_and_the_frame_goes_out(
    store: SQLiteStore,
) -> None:
    conversation = await store.create_conversation("org1", "whatsapp", "+55")
    message, _ = await store.create_message(conversation, "hi", "")
    fanout, metrics = FlakyFanout(failures=2), Metrics()
    wiring = deps(store, fanout, metrics)
    StatusWorker(wiring)
    await wiring.bus.start()
    await wiring.bus.publish(TOPIC_STATUS, conversation.id, sent(message).to_json())
    await asyncio.wait_for(fanout.arrived.wait(), 5)
    await wiring.bus.stop()
    await wiring.http.close()

    [(channel, payload)] = fanout.published
    assert channel == f"status:{conversation.id}"
    frame = json.loads(payload)
    assert (frame["status"], frame["seq"], frame["message_id"]) == ("SENT", 1, message.id)
    stored = await store.get_message(message.id)
    assert stored is not None
    assert (stored.status, stored.seq) == (Status.SENT, 1)
    labels = {"topic": TOPIC_STATUS, "group": "status-worker"}
    assert metrics.registry.get_sample_value("whatslike_bus_retries_total", labels) == 2


async def test_an_event_for_no_message_is_dead_lettered_and_kept(store: SQLiteStore) -> None:
    conversation = await store.create_conversation("org1", "whatsapp", "+55")
    message, _ = await store.create_message(conversation, "hi", "")
    ghost = replace(sent(message), event_id="evt_ghost", message_id="msg_nobody")
    fanout, metrics = FlakyFanout(failures=0), Metrics()
    wiring = deps(store, fanout, metrics)
    StatusWorker(wiring)
    await wiring.bus.start()
    await wiring.bus.publish(TOPIC_STATUS, conversation.id, ghost.to_json())
    await wiring.bus.stop()
    await wiring.http.close()
    assert await store.dead_letter_count() == 1
    assert fanout.published == []


async def test_a_message_the_provider_never_got_becomes_failed(store: SQLiteStore) -> None:
    conversation = await store.create_conversation("org1", "whatsapp", "+55")
    message, _ = await store.create_message(conversation, "hi", "")
    fanout, metrics = FlakyFanout(failures=0), Metrics()
    wiring = deps(store, fanout, metrics)
    StatusWorker(wiring)
    relay = OutboxRelay(wiring)

    async def unreachable_provider(raw: bytes) -> None:
        raise ProviderUnavailable("graph.facebook.com unreachable")  # as the connector does

    wiring.bus.subscribe(outbound_topic("whatsapp"), "connector-whatsapp", unreachable_provider)
    await relay.start()
    await wiring.bus.start()
    outbound = OutboundMessage(
        event_id="evt_out",
        message_id=message.id,
        conversation_id=conversation.id,
        org_id="org1",
        channel="whatsapp",
        to="+55",
        text="hi",
        client_message_id="",
        created_at=message.created_at,
    )
    await wiring.bus.publish(outbound_topic("whatsapp"), conversation.id, outbound.to_json())
    await asyncio.wait_for(fanout.arrived.wait(), 5)
    await relay.stop()
    await wiring.bus.stop()
    await wiring.http.close()

    frame = json.loads(fanout.published[0][1])
    assert (frame["status"], frame["seq"]) == ("FAILED", 1)
    # The FAILED was handed off with the send's own hand-off done: nothing is left over.
    assert await store.outbox_size() == 0
    assert frame["error"] == {"code": "send_failed", "title": "Could not be handed to the provider"}
    stored = await store.get_message(message.id)
    assert stored is not None
    assert stored.status is Status.FAILED
    assert await store.dead_letter_count() == 1


async def test_statuses_arriving_together_are_applied_in_few_transactions(
    store: SQLiteStore,
) -> None:
    """Group commit: with the worker started, the bus's consumers' events share store
    transactions; every status is applied once, each conversation's seqs are gap free,
    each frame is published, and the ingest metrics count them."""
    conversations = [await store.create_conversation("org1", "whatsapp", f"+{n}") for n in range(8)]
    messages = [(await store.create_message(c, "hi", ""))[0] for c in conversations for _ in (1, 2)]
    fanout, metrics = FlakyFanout(failures=0), Metrics()
    wiring = deps(store, fanout, metrics)
    worker = StatusWorker(wiring)
    await worker.start()
    kinds = ((Status.SENT, 1), (Status.DELIVERED, 2), (Status.READ, 3))
    for status, second in kinds:
        for n, message in enumerate(messages):
            event = replace(
                sent(message),
                event_id=f"evt_{n}_{status.value}",
                status=status,
                occurred_at=datetime(2026, 11, 25, 12, 0, second, tzinfo=UTC),
                received_at=datetime.now(UTC),
            )
            await wiring.bus.publish(TOPIC_STATUS, message.conversation_id, event.to_json())
    # All queued before the consumers start: they all reach the group commit at once.
    await wiring.bus.start()
    await asyncio.wait_for(_published(fanout, len(messages) * 3), 10)
    await wiring.bus.stop()
    await worker.stop()
    await wiring.http.close()

    by_conversation: dict[str, list[int]] = {}
    for channel, payload in fanout.published:
        by_conversation.setdefault(channel, []).append(json.loads(payload)["seq"])
    assert sorted(by_conversation) == sorted(f"status:{c.id}" for c in conversations)
    assert all(seqs == list(range(1, 7)) for seqs in by_conversation.values())
    for message in messages:
        stored = await store.get_message(message.id)
        assert stored is not None
        assert stored.status is Status.READ
    sample = metrics.registry.get_sample_value
    assert sample("whatslike_status_consumed_total") == 48
    assert sample("whatslike_status_batch_size_sum") == 48
    # Four partitions' consumers wait together: fewer transactions than statuses.
    transactions = sample("whatslike_status_batch_size_count")
    assert transactions is not None
    assert transactions < 48
    assert sample("whatslike_store_seconds_count", {"op": "apply_statuses"}) == transactions
    assert sample("whatslike_status_bus_lag_seconds_count") == 48


async def _published(fanout: FlakyFanout, count: int) -> None:
    while len(fanout.published) < count:
        fanout.arrived.clear()
        await fanout.arrived.wait()


async def test_a_batch_is_one_transaction_and_its_frames_go_out_in_order(
    store: SQLiteStore,
) -> None:
    """`apply_batch` (what the Kafka bus hands a partition's fetched events to): one
    store transaction, every frame published in event order; an unknown message in a
    batch raises MalformedEvent, for the bus to hand the events over one by one."""
    conversation = await store.create_conversation("org1", "whatsapp", "+55")
    messages = [(await store.create_message(conversation, "hi", ""))[0] for _ in range(3)]
    fanout, metrics = FlakyFanout(failures=0), Metrics()
    worker = StatusWorker(deps(store, fanout, metrics))
    events = [
        replace(sent(message), event_id=f"evt_{n}_{status.value}", status=status)
        for status in (Status.SENT, Status.DELIVERED)
        for n, message in enumerate(messages)
    ]
    await worker.apply_batch([event.to_json() for event in events])
    frames = [json.loads(payload) for _, payload in fanout.published]
    assert [(f["message_id"], f["status"], f["seq"]) for f in frames] == [
        (event.message_id, event.status.value, seq) for seq, event in enumerate(events, 1)
    ]
    sample = metrics.registry.get_sample_value
    assert sample("whatslike_status_batch_size_count") == 1
    assert sample("whatslike_status_batch_size_sum") == len(events)

    ghost = replace(sent(messages[0]), event_id="evt_ghost", message_id="msg_nobody")
    read = replace(sent(messages[0]), event_id="evt_read", status=Status.READ)
    with pytest.raises(MalformedEvent, match="msg_nobody"):
        await worker.apply_batch([read.to_json(), ghost.to_json()])
    # The failed batch is handed over again one event at a time, and counted then.
    assert sample("whatslike_status_consumed_total") == len(events)
