"""The in-process bus: per-key order, at-least-once with back-off, dead letters, bounds."""

from __future__ import annotations

import asyncio
import json
import random

import pytest

from whatslike.bus import BusFull
from whatslike.bus.memory import MemoryBus, backoff_delay
from whatslike.errors import BackendUnavailable, MalformedEvent
from whatslike.metrics import Metrics
from whatslike.settings import load_settings


def make_bus(**overrides: object) -> MemoryBus:
    values: dict[str, object] = {
        "bus_partitions": 2,
        "consumer_max_attempts": 3,
        "consumer_backoff_base_s": 0.001,
        "consumer_backoff_cap_s": 0.005,
        "bus_publish_timeout_s": 1.0,
    }
    values.update(overrides)
    return MemoryBus(load_settings(**values), Metrics(), seed=1)


class Collector:
    def __init__(self, expected: int) -> None:
        self.items: list[bytes] = []
        self.expected = expected
        self.done = asyncio.Event()

    async def __call__(self, value: bytes) -> None:
        self.items.append(value)
        if len(self.items) >= self.expected:
            self.done.set()


async def test_each_group_gets_every_event_and_keys_keep_their_order() -> None:
    bus = make_bus()
    first, second = Collector(40), Collector(40)
    bus.subscribe("t", "g1", first)
    bus.subscribe("t", "g2", second)
    await bus.start()
    for i in range(20):
        for key in ("a", "b"):
            await bus.publish("t", key, f"{key}{i}".encode())
    await asyncio.wait_for(asyncio.gather(first.done.wait(), second.done.wait()), 5)
    await bus.stop()
    for collector in (first, second):
        for key in ("a", "b"):
            seen = [x.decode() for x in collector.items if x.decode().startswith(key)]
            assert seen == [f"{key}{i}" for i in range(20)]


async def test_a_failing_handler_gets_the_event_again_until_it_succeeds() -> None:
    bus = make_bus()
    calls: list[bytes] = []
    done = asyncio.Event()

    async def flaky(value: bytes) -> None:
        calls.append(value)
        if len(calls) < 3:
            raise ConnectionError("database down")
        done.set()

    bus.subscribe("t", "g", flaky)
    await bus.start()
    await bus.publish("t", "k", b"e1")
    await asyncio.wait_for(done.wait(), 5)
    await bus.stop()
    assert calls == [b"e1"] * 3


async def test_after_max_attempts_the_event_goes_to_the_dlq_with_the_reason() -> None:
    bus = make_bus()
    dead = Collector(1)

    async def broken(value: bytes) -> None:
        raise ValueError("no such state")  # the event's fault, not an outage

    bus.subscribe("t", "g", broken)
    bus.subscribe("t.dlq", "dlq", dead)
    await bus.start()
    await bus.publish("t", "k", b'{"x":1}')
    await asyncio.wait_for(dead.done.wait(), 5)
    await bus.stop()
    record = json.loads(dead.items[0])
    assert record["topic"] == "t"
    assert record["attempts"] == 3
    assert "ValueError: no such state" in record["reason"]
    assert record["event"] == '{"x":1}'


async def test_an_outage_longer_than_the_retry_budget_is_waited_out_not_dead_lettered() -> None:
    """Ten store outage failures in a row (the budget is 3 attempts), interleaved with
    two failures of another kind (counted, still under the budget): the event is
    handled in the end, nothing dead-lettered, every retry counted in the metric."""
    metrics = Metrics()
    bus = MemoryBus(
        load_settings(
            bus_partitions=1,
            consumer_max_attempts=3,
            consumer_backoff_base_s=0.001,
            consumer_backoff_cap_s=0.005,
        ),
        metrics,
        seed=1,
    )
    failures: list[Exception] = [
        BackendUnavailable("store down"),
        ValueError("passing"),
        *(BackendUnavailable("store down") for _ in range(4)),
        BusFull("bus full"),
        ValueError("passing"),
        *(TimeoutError() for _ in range(3)),
        ConnectionResetError(),
    ]
    calls: list[bytes] = []
    done = asyncio.Event()
    dead = Collector(1)

    async def during_outage(value: bytes) -> None:
        calls.append(value)
        if failures:
            raise failures.pop(0)
        done.set()

    bus.subscribe("t", "g", during_outage)
    bus.subscribe("t.dlq", "dlq", dead)
    await bus.start()
    await bus.publish("t", "k", b"e1")
    await asyncio.wait_for(done.wait(), 5)
    await bus.stop()
    assert calls == [b"e1"] * 13
    assert dead.items == []
    assert metrics.bus_dead_letters.labels("t", "g")._value.get() == 0
    assert metrics.bus_retries.labels("t", "g")._value.get() == 12


async def test_a_malformed_event_is_dead_lettered_at_once() -> None:
    bus = make_bus()
    dead = Collector(1)
    calls: list[bytes] = []

    async def strict(value: bytes) -> None:
        calls.append(value)
        raise MalformedEvent("not JSON")

    bus.subscribe("t", "g", strict)
    bus.subscribe("t.dlq", "dlq", dead)
    await bus.start()
    await bus.publish("t", "k", b"\xff\xfe")
    await asyncio.wait_for(dead.done.wait(), 5)
    await bus.stop()
    assert len(calls) == 1
    record = json.loads(dead.items[0])
    assert record["reason"] == "malformed: not JSON"
    assert record["event_b64"] == "//4="


async def test_a_full_partition_makes_publish_raise_after_the_timeout() -> None:
    bus = make_bus(
        bus_queue_size=2, bus_partitions=1, bus_publish_timeout_s=0.05, bus_concurrency=3
    )
    release = asyncio.Event()

    async def stuck(value: bytes) -> None:
        await release.wait()

    bus.subscribe("t", "g", stuck)
    await bus.start()
    # Three events are taken (one at work in each key's lane, or waiting in one), two
    # wait in the queue: the sixth cannot get in.
    for i in range(5):
        await bus.publish("t", "k" if i % 2 else "j", str(i).encode())
    with pytest.raises(BusFull, match="full"):
        await bus.publish("t", "k", b"5")
    release.set()
    await bus.stop()


async def test_publishing_to_a_topic_nobody_consumes_is_an_error() -> None:
    bus = make_bus()
    await bus.start()
    with pytest.raises(BusFull, match="no consumer"):
        await bus.publish("nobody", "k", b"x")
    await bus.stop()


async def test_stop_lets_queued_events_finish() -> None:
    bus = make_bus()
    handled: list[bytes] = []

    async def slow(value: bytes) -> None:
        await asyncio.sleep(0.001)
        handled.append(value)

    bus.subscribe("t", "g", slow)
    await bus.start()
    for i in range(50):
        await bus.publish("t", str(i), str(i).encode())
    await bus.stop()
    assert len(handled) == 50


def test_backoff_has_full_jitter_below_the_cap() -> None:
    rng = random.Random(7)
    for attempt in range(1, 12):
        bound = min(2.0, 0.05 * 2 ** (attempt - 1))
        delays = [backoff_delay(attempt, 0.05, 2.0, rng) for _ in range(200)]
        assert all(0 <= d <= bound for d in delays)
        assert max(delays) > bound / 2


async def test_a_conversation_that_waits_does_not_hold_up_the_others_of_its_partition() -> None:
    bus = make_bus(bus_partitions=1)
    release = asyncio.Event()
    handled: list[bytes] = []

    async def handler(value: bytes) -> None:
        if value == b"slow/0":
            await release.wait()
        handled.append(value)
        if value == b"fast/2":
            release.set()  # reached only while slow/0 waits

    bus.subscribe("t", "g", handler)
    await bus.start()
    for value in (b"slow/0", b"slow/1", b"fast/0", b"fast/1", b"fast/2"):
        await bus.publish("t", value.decode().split("/")[0], value)
    await asyncio.wait_for(bus.stop(), 5)
    assert handled == [b"fast/0", b"fast/1", b"fast/2", b"slow/0", b"slow/1"]
