"""The outbox relay and the stuck-message watchdog, on a real SQLite store: hand-offs are
relayed at least once, resumed by the next run until done, and messages that stop moving
are noticed."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from tests.store.test_contract import at, status_event
from whatslike.bus import BusFull, Event, Handler, publish_in_turn
from whatslike.events import TOPIC_MESSAGES, TOPIC_STATUS, OutboundMessage, StatusEvent
from whatslike.fanout.memory import MemoryFanout
from whatslike.http_client import AiohttpClient
from whatslike.metrics import Metrics
from whatslike.roles import Deps
from whatslike.roles.relay import CLAIM_LEASE_S, ClaimedPublisher, OutboxRelay
from whatslike.roles.watchdog import Watchdog
from whatslike.settings import load_settings
from whatslike.status.rules import Status
from whatslike.store.base import Message, OutboxEntry, OutboxItem
from whatslike.store.common import status_entry
from whatslike.store.sqlite import SQLiteStore


class ScriptedBus:
    """Records what the relay publishes; `full` makes the next publishes raise BusFull."""

    def __init__(self, *, durable: bool) -> None:
        self.durable = durable
        self.published: list[tuple[str, str, bytes]] = []
        self.full = 0

    def subscribe(self, topic: str, group: str, handler: Handler) -> None:
        return None

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def ping(self) -> None:
        return None

    async def publish(self, topic: str, key: str, value: bytes) -> None:
        if self.full:
            self.full -= 1
            raise BusFull("full")
        self.published.append((topic, key, value))

    async def publish_many(self, events: Sequence[Event]) -> None:
        await publish_in_turn(self.publish, events)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    store = SQLiteStore(tmp_path / "w.db")
    await store.open()
    yield store
    await store.close()


def deps(store: SQLiteStore, bus: Any, metrics: Metrics | None = None, **settings: Any) -> Deps:
    return Deps(
        settings=load_settings(consumer_backoff_base_s=0.001, **settings),
        store=store,
        bus=bus,
        fanout=MemoryFanout(),
        http=AiohttpClient(connections=1, keepalive_s=1.0),
        metrics=metrics or Metrics(),
        jwt_secret="x",
    )


async def new_message(store: SQLiteStore, text: str = "hi") -> Message:
    conversation = await store.create_conversation("org1", "whatsapp", "+55")
    message, _ = await store.create_message(conversation, text, "")
    return message


def sent_ids(bus: ScriptedBus) -> list[str]:
    return [OutboundMessage.from_json(v).message_id for t, _, v in bus.published]


async def test_on_a_bus_that_keeps_nothing_every_run_relays_what_is_not_done(
    store: SQLiteStore,
) -> None:
    first = await new_message(store, "one")
    second = await new_message(store, "two")
    bus = ScriptedBus(durable=False)
    relay = OutboxRelay(deps(store, bus))
    assert await relay.relay_once() == 2
    assert await relay.relay_once() == 0  # this run handed them on already
    assert sent_ids(bus) == [first.id, second.id]
    assert await store.outbox_size() == 2  # kept until the work is done downstream
    # The connector finished the first send; then the process restarts (a new run).
    await store.handoff(done=[(TOPIC_MESSAGES, first.id)])
    restarted = OutboxRelay(deps(store, bus))
    assert await restarted.relay_once() == 1
    assert sent_ids(bus)[-1] == second.id


async def test_on_a_durable_bus_relayed_entries_leave_the_outbox(store: SQLiteStore) -> None:
    await new_message(store)
    bus = ScriptedBus(durable=True)
    assert await OutboxRelay(deps(store, bus)).relay_once() == 1
    assert await store.outbox_size() == 0


async def test_a_full_bus_delays_the_relay_and_loses_nothing(store: SQLiteStore) -> None:
    messages = [await new_message(store, f"m{n}") for n in range(3)]
    bus = ScriptedBus(durable=True)
    bus.full = 2
    wiring = deps(store, bus)
    relay = OutboxRelay(wiring)
    await relay.start()
    try:
        # Published is not yet done: the relay deletes the entries after the bus took
        # them, and a stop in between leaves them to be relayed again (at least once).
        for _ in range(500):
            if len(bus.published) == 3 and not await store.outbox_size():
                break
            await asyncio.sleep(0.01)
    finally:
        await relay.stop()
    assert sent_ids(bus) == [m.id for m in messages]  # in order, each once
    assert await store.outbox_size() == 0


async def test_the_watchdog_redrives_fails_and_counts(store: SQLiteStore) -> None:
    lost = await new_message(store, "lost")  # its hand-off vanished (a bug, or by hand)
    await store.handoff(done=[(TOPIC_MESSAGES, lost.id)])
    unknown = await new_message(store, "unknown")  # a crash between call and answer
    await store.begin_send(unknown.id)
    await store.handoff(done=[(TOPIC_MESSAGES, unknown.id)])
    quiet = await new_message(store, "quiet")  # SENT, then nothing
    await store.handoff(done=[(TOPIC_MESSAGES, quiet.id)])
    await store.link_provider_id("whatsapp", "wamid.q", quiet.id)
    await store.apply_status(
        StatusEvent(
            "evt_q",
            quiet.id,
            quiet.conversation_id,
            "org1",
            "whatsapp",
            Status.SENT,
            "wamid.q",
            quiet.created_at,
        )
    )
    await asyncio.sleep(0.02)
    metrics = Metrics()
    watchdog = Watchdog(
        deps(
            store,
            ScriptedBus(durable=False),
            metrics,
            stuck_pending_s=0.01,
            send_unknown_fail_s=0.01,
            stuck_sent_s=0.01,
        )
    )
    stuck = await watchdog.sweep()
    assert [m.id for m in stuck.pending] == [lost.id]
    assert [m.id for m in stuck.unknown] == [unknown.id]
    assert [m.id for m in stuck.sent] == [quiet.id]
    for kind in ("pending", "unknown", "sent"):
        value = metrics.registry.get_sample_value("whatslike_stuck_messages", {"kind": kind})
        assert value == 1
    items = await store.outbox_batch("run", 10)
    assert [(i.topic, i.key) for i in items] == [
        (TOPIC_MESSAGES, lost.conversation_id),  # handed off again
        (TOPIC_STATUS, unknown.conversation_id),  # FAILED send_outcome_unknown
    ]
    failure = StatusEvent.from_json(items[1].payload)
    assert failure.status is Status.FAILED
    assert failure.error is not None and failure.error.code == "send_outcome_unknown"
    await store.apply_status(failure)
    stored = await store.get_message(unknown.id)
    assert stored is not None and stored.status is Status.FAILED
    # A later sweep hands off the same event id again at most: it applies once.
    again = await watchdog.sweep()
    assert again.unknown == ()


async def test_a_stop_that_meets_a_wake_up_still_stops_the_relay(
    store: SQLiteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Python 3.11's `asyncio.wait_for` returned the result of a wait that ended at the
    moment its task was cancelled, and so swallowed the cancellation: a stop arriving
    with a hand-off's wake-up left the relay running and its `stop()` waiting forever.
    The wake-up goes through the event loop in a few steps; a stop lands between each."""
    read = asyncio.Event()
    outbox_batch = store.outbox_batch

    async def reading(run: str, limit: int) -> list[OutboxItem]:
        try:
            return await outbox_batch(run, limit)
        finally:
            read.set()

    # An empty batch read, then the relay waits for a wake-up without yielding between.
    monkeypatch.setattr(store, "outbox_batch", reading)
    wiring = deps(store, ScriptedBus(durable=False), relay_poll_s=60.0)
    for steps in range(8):
        relay = OutboxRelay(wiring)
        read.clear()
        await relay.start()
        await read.wait()  # the relay is now waiting for its wake-up
        wiring.handoffs.set()
        for _ in range(steps):
            await asyncio.sleep(0)
        await asyncio.wait_for(relay.stop(), 5)
    await wiring.http.close()


async def claimed(
    store: SQLiteStore, bus: ScriptedBus, n: int
) -> tuple[list[OutboxEntry], list[int]]:
    """A hand-off of `n` statuses committed claimed by its writer, as a connector on a
    durable bus makes one."""
    message = await new_message(store)
    await store.handoff(done=[(TOPIC_MESSAGES, message.id)])
    entries = [status_entry(status_event(message, Status.SENT, at(k))) for k in range(n)]
    return entries, await store.handoff(entries, claim_s=CLAIM_LEASE_S)


def published_events(bus: ScriptedBus) -> list[str]:
    return [StatusEvent.from_json(v).event_id for _, _, v in bus.published]


def event_ids(entries: list[OutboxEntry]) -> list[str]:
    return [StatusEvent.from_json(e.payload).event_id for e in entries]


async def test_claimed_hand_offs_are_published_in_order_then_deleted(
    store: SQLiteStore,
) -> None:
    bus = ScriptedBus(durable=True)
    wiring = deps(store, bus)
    publisher = ClaimedPublisher(wiring)
    publisher.start()
    try:
        first, second = await claimed(store, bus, 2), await claimed(store, bus, 1)
        await publisher.submit(*first)
        await publisher.submit(*second)
        deadline = time.monotonic() + 10
        while await store.outbox_size():
            assert time.monotonic() < deadline, "not deleted after their publish"
            await asyncio.sleep(0.01)
    finally:
        await publisher.stop()
    assert published_events(bus) == event_ids(first[0] + second[0])
    assert await OutboxRelay(wiring).relay_once() == 0  # nothing published twice


async def test_claimed_hand_offs_the_bus_refuses_go_to_the_relay_at_once(
    store: SQLiteStore,
) -> None:
    bus = ScriptedBus(durable=True)
    wiring = deps(store, bus)
    entries, ids = await claimed(store, bus, 3)
    bus.full = 1  # the bus refuses the first, so takes none of them
    await ClaimedPublisher(wiring).submit(entries, ids)
    assert wiring.handoffs.is_set()
    assert bus.published == []
    assert await OutboxRelay(wiring).relay_once() == 3  # given back: no wait for a lapse
    assert published_events(bus) == event_ids(entries)
    assert await store.outbox_size() == 0


async def test_the_claimed_publisher_outlives_a_store_error_of_any_kind(
    store: SQLiteStore, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """PostgreSQL's deadlock error (the delete of published hand-offs against a status
    batch completing the same entries) is not one of ours: it ended the publisher's task,
    silently, and from then on every hand-off of the process waited for its claim to
    lapse (30 s) before a relay published it."""
    bus = ScriptedBus(durable=True)
    wiring = deps(store, bus)
    delete_outbox = store.delete_outbox
    failed = asyncio.Event()

    async def deleting(ids: Sequence[int]) -> None:
        if not failed.is_set():
            failed.set()
            raise asyncpg.exceptions.DeadlockDetectedError("deadlock detected")
        await delete_outbox(ids)

    monkeypatch.setattr(store, "delete_outbox", deleting)
    publisher = ClaimedPublisher(wiring)
    publisher.start()
    try:
        first, second = await claimed(store, bus, 2), await claimed(store, bus, 1)
        await publisher.submit(*first)
        await asyncio.wait_for(failed.wait(), 10)
        await publisher.submit(*second)
        deadline = time.monotonic() + 10
        while len(bus.published) < 3 or await store.outbox_size() > 2:
            assert time.monotonic() < deadline, "the second hand-off waits for its lapse"
            await asyncio.sleep(0.01)
    finally:
        await publisher.stop()
    assert published_events(bus) == event_ids(first[0] + second[0])
    # The first stays claimed: published already, a relay publishes it again at the lapse.
    assert await store.claim_outbox(10, lease_s=60) == []
    assert "DeadlockDetectedError" in caplog.text


class StallingBus(ScriptedBus):
    """A durable bus whose publishes never return (a broker that hangs)."""

    def __init__(self) -> None:
        super().__init__(durable=True)
        self.stalled = asyncio.Event()

    async def publish_many(self, events: Sequence[Event]) -> None:
        self.stalled.set()
        await asyncio.Event().wait()


async def test_claimed_hand_offs_still_queued_at_stop_are_given_back(store: SQLiteStore) -> None:
    """At a stop, the hand-off being published stays claimed (a relay takes it once the
    claim lapses); those still queued behind it are given back to the relays at once."""
    bus = StallingBus()
    wiring = deps(store, bus)
    publisher = ClaimedPublisher(wiring)
    publisher.start()
    in_flight, queued = await claimed(store, bus, 1), await claimed(store, bus, 2)
    await publisher.submit(*in_flight)
    await asyncio.wait_for(bus.stalled.wait(), 10)
    await publisher.submit(*queued)
    await publisher.stop()
    given_back = await store.claim_outbox(10, lease_s=60)
    assert [item.id for item in given_back] == queued[1]
