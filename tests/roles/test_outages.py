"""Outages never dead-letter; poison events do, and operators see and replay them.

The status worker on a real SQLite store with an injected outage (its status writes
refused, as a store away refuses them) longer than the retry budget, on the in-process
bus and on a real Kafka broker: every status is applied once the store is back, nothing
is dead-lettered. A poison event (a handler failing with an error of its own) still goes
to the DLQ after the budget, is kept in the store, listed as unapplied (also by the
watchdog's gauge), and a replay applies it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.bus.test_kafka import kafka_url, prefix
from whatslike.bus.kafka import KafkaBus
from whatslike.bus.memory import MemoryBus
from whatslike.errors import BackendUnavailable
from whatslike.events import TOPIC_MESSAGES, TOPIC_STATUS, StatusEvent
from whatslike.fanout.memory import MemoryFanout
from whatslike.http_client import AiohttpClient
from whatslike.metrics import Metrics
from whatslike.roles import Deps, dead_letters
from whatslike.roles.relay import OutboxRelay
from whatslike.roles.status_worker import StatusWorker
from whatslike.roles.watchdog import Watchdog
from whatslike.settings import Settings, load_settings
from whatslike.status.rules import Status
from whatslike.store.base import ApplyResult, Message
from whatslike.store.sqlite import SQLiteStore

__all__ = ["kafka_url", "prefix"]

#: The retry budget of these tests: the outage refuses many more writes than this.
MAX_ATTEMPTS = 3
REFUSALS = 40
WAIT_S = 60.0


class FlakyStore(SQLiteStore):
    """A real SQLite store whose status writes are refused `refusals` times (an outage:
    BackendUnavailable, as the adapters raise when their database is away), and that
    fails with an error of its own (a bug the event triggers) for the `poison` event ids."""

    def __init__(self, path: Path, refusals: int) -> None:
        super().__init__(path)
        self.refusals = refusals
        self.poison: set[str] = set()

    async def apply_statuses(self, events: Sequence[StatusEvent]) -> list[ApplyResult]:
        if self.refusals > 0:
            self.refusals -= 1
            raise BackendUnavailable("SQLite database: disk I/O error (injected outage)")
        if any(event.event_id in self.poison for event in events):
            raise ValueError("this event trips a bug")
        return await super().apply_statuses(events)


@dataclass
class Worker:
    store: FlakyStore
    deps: Deps
    watchdog: Watchdog
    relay: OutboxRelay


def settings_for(**overrides: object) -> Settings:
    values: dict[str, object] = {
        "consumer_max_attempts": MAX_ATTEMPTS,
        "consumer_backoff_base_s": 0.001,
        "consumer_backoff_cap_s": 0.01,
        "relay_poll_s": 0.05,
        "bus_publish_timeout_s": 10.0,
    }
    values.update(overrides)
    return load_settings(**values)


async def running_worker(
    store: FlakyStore, settings: Settings, bus_of: Callable[[Settings, Metrics], object]
) -> AsyncIterator[Worker]:
    metrics = Metrics()
    deps = Deps(
        settings=settings,
        store=store,
        bus=bus_of(settings, metrics),  # type: ignore[arg-type]
        fanout=MemoryFanout(),
        http=AiohttpClient(connections=1, keepalive_s=1.0),
        metrics=metrics,
        jwt_secret="x",
    )
    worker, relay = StatusWorker(deps), OutboxRelay(deps)

    async def router(raw: bytes) -> None:
        """Takes the messages' own hand-offs (the messages are made in the store)."""

    deps.bus.subscribe(TOPIC_MESSAGES, "router", router)
    await worker.start()
    await relay.start()
    await deps.bus.start()
    try:
        yield Worker(store, deps, Watchdog(deps), relay)
    finally:
        await relay.stop()
        await deps.bus.stop()
        await worker.stop()
        await deps.http.close()


def sent(message: Message, n: int) -> StatusEvent:
    return StatusEvent(
        event_id=f"evt_{n}",
        message_id=message.id,
        conversation_id=message.conversation_id,
        org_id=message.org_id,
        channel="whatsapp",
        status=Status.SENT,
        provider_message_id=f"wamid.{n}",
        occurred_at=datetime(2026, 11, 25, 12, tzinfo=UTC),
    )


async def until(condition: Callable[[], object], what: str) -> None:
    """Poll an async condition (bounded): store state has no event to wait on."""
    deadline = time.monotonic() + WAIT_S
    while not await condition():  # type: ignore[misc]
        assert time.monotonic() < deadline, f"not within {WAIT_S} s: {what}"
        await asyncio.sleep(0.02)


async def messages(store: SQLiteStore, count: int) -> list[Message]:
    made = []
    for n in range(count):
        conversation = await store.create_conversation("org1", "whatsapp", f"+55{n}")
        message, _ = await store.create_message(conversation, "hi", "")
        made.append(message)
    return made


async def outage_then_poison(worker: Worker) -> None:
    """The scenario, on whichever bus the worker has."""
    store, bus, metrics = worker.store, worker.deps.bus, worker.deps.metrics
    made = await messages(store, 6)
    # The outage is under way: each of these is refused far more often than the budget.
    for n, message in enumerate(made):
        await bus.publish(TOPIC_STATUS, message.conversation_id, sent(message, n).to_json())

    async def all_sent() -> bool:
        found = await store.get_messages([m.id for m in made])
        return all(m.status is Status.SENT for m in found) and len(found) == len(made)

    await until(all_sent, "every status applied after the outage")
    assert store.refusals == 0  # the whole outage was seen
    assert await store.dead_letter_count() == 0
    retries = metrics.registry.get_sample_value(
        "whatslike_bus_retries_total", {"topic": TOPIC_STATUS, "group": "status-worker"}
    )
    assert retries is not None and retries >= REFUSALS // len(made)

    # A poison event: the same error every time. It is set aside after the budget.
    victim = (await messages(store, 1))[0]
    poison = replace(sent(victim, 99), status=Status.DELIVERED)
    store.poison.add(poison.event_id)
    began = time.monotonic()
    await bus.publish(TOPIC_STATUS, victim.conversation_id, poison.to_json())

    async def kept() -> bool:
        return await store.dead_letter_count() == 1

    await until(kept, "the poison event kept as a dead letter")
    assert time.monotonic() - began < 10
    [reviewed] = await dead_letters.review(store, 10)
    assert reviewed.kind is dead_letters.Kind.UNAPPLIED
    assert reviewed.status == poison
    assert "ValueError: this event trips a bug" in reviewed.dead.reason
    await worker.watchdog.sweep()
    assert metrics.dead_letters_unapplied._value.get() == 1

    # The operator fixed the bug and replays it: applied, and no longer counted.
    store.poison.clear()
    await dead_letters.replay(store, reviewed.dead.id)
    worker.deps.handoffs.set()

    async def delivered() -> bool:
        found = await store.get_message(victim.id)
        return found is not None and found.status is Status.DELIVERED

    await until(delivered, "the replayed status applied")
    [after] = await dead_letters.review(store, 10)
    assert after.kind is dead_letters.Kind.APPLIED
    await worker.watchdog.sweep()
    assert metrics.dead_letters_unapplied._value.get() == 0


async def test_an_outage_longer_than_the_budget_loses_nothing_on_the_memory_bus(
    tmp_path: Path,
) -> None:
    store = FlakyStore(tmp_path / "w.db", REFUSALS)
    await store.open()
    try:
        async for worker in running_worker(store, settings_for(), MemoryBus):
            await outage_then_poison(worker)
    finally:
        await store.close()


@pytest.mark.timeout(120)
async def test_an_outage_longer_than_the_budget_loses_nothing_on_kafka(
    tmp_path: Path, kafka_url: str, prefix: str
) -> None:
    store = FlakyStore(tmp_path / "w.db", REFUSALS)
    await store.open()
    settings = settings_for(
        bus_url=kafka_url,
        kafka_topic_prefix=prefix,
        kafka_partitions=2,
        kafka_commit_interval_s=0.2,
        kafka_handler_grace_s=5.0,
    )
    try:
        async for worker in running_worker(store, settings, KafkaBus):
            await outage_then_poison(worker)
    finally:
        await store.close()
