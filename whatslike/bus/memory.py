"""The in-process bus: every topic's consumer groups get their own bounded partitions.

Like Kafka, a key always lands on the same partition. A partition is drained into lanes
(whatslike/bus/lanes.py): up to `bus_concurrency` events at work at once, each key's
(conversation's) in publish order; a handler being retried holds its key's lane (later
events of that conversation wait — order over speed) and one place of the window.
Full partitions make `publish` wait up to `bus_publish_timeout_s`, then raise `BusFull`:
the caller (an HTTP request, a webhook) answers 503 and the sender retries; nothing is
dropped silently. Events still queued when the process exits are not kept here; every
one of them stands for a hand-off still in the store's outbox, which the relay hands on
again at the next start (see README, "Durability").
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import random
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field

from whatslike.bus import BusFull, Event, Handler, publish_in_turn
from whatslike.bus.lanes import Lanes
from whatslike.bus.retry import Tries, retry_line
from whatslike.events import dlq_topic
from whatslike.metrics import Metrics
from whatslike.settings import Settings

log = logging.getLogger(__name__)


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Exponential back-off with full jitter: uniform in [0, min(cap, base * 2**attempt)]."""
    return rng.uniform(0, min(cap, base * 2 ** (attempt - 1)))


def dead_letter(topic: str, group: str, value: bytes, reason: str, attempts: int) -> bytes:
    """The DLQ record: the original event verbatim (as text, or base64 if not UTF-8)."""
    record: dict[str, object] = {
        "topic": topic,
        "group": group,
        "reason": reason,
        "attempts": attempts,
    }
    try:
        record["event"] = value.decode()
    except UnicodeDecodeError:
        record["event_b64"] = base64.b64encode(value).decode()
    return json.dumps(record, separators=(",", ":")).encode()


@dataclass
class _Group:
    topic: str
    name: str
    handler: Handler
    partitions: list[asyncio.Queue[tuple[str, bytes]]] = field(default_factory=list)
    lanes: list[Lanes[tuple[str, bytes]]] = field(default_factory=list)


class MemoryBus:
    durable = False

    def __init__(self, settings: Settings, metrics: Metrics, *, seed: int | None = None) -> None:
        self._settings = settings
        self._metrics = metrics
        self._groups: dict[str, list[_Group]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._rng = random.Random(seed)
        self._started = False
        # Events queued or being handled, across all groups; a handler's own publishes
        # (forwarding, dead letters) count before its event is done, so zero means idle.
        self._unfinished = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def subscribe(self, topic: str, group: str, handler: Handler) -> None:
        if self._started:
            raise RuntimeError("subscribe before the bus starts")
        size = self._settings.bus_queue_size
        entry = _Group(topic, group, handler)
        entry.partitions = [
            asyncio.Queue(maxsize=size) for _ in range(self._settings.bus_partitions)
        ]
        self._groups.setdefault(topic, []).append(entry)

    async def start(self) -> None:
        self._started = True
        for groups in self._groups.values():
            for group in groups:
                for partition in group.partitions:
                    self._tasks.append(asyncio.create_task(self._consume(group, partition)))

    async def stop(self) -> None:
        """Let the consumers drain what is queued (bounded by the publish timeout), then
        cancel them."""
        try:
            async with asyncio.timeout(self._settings.bus_publish_timeout_s):
                await self._idle.wait()
        except TimeoutError:
            log.info(
                "bus stopped with %d events unfinished; their hand-offs stay in the outbox"
                " and are resumed at the next start",
                self._unfinished,
            )
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        for groups in self._groups.values():
            for group in groups:
                for lanes in group.lanes:
                    await lanes.cancel()
                group.lanes.clear()
        self._started = False

    async def ping(self) -> None:
        return None

    async def publish(self, topic: str, key: str, value: bytes) -> None:
        groups = self._groups.get(topic)
        if not groups:
            # In one process every topic has its consumers; none means a wiring bug.
            raise BusFull(f"no consumer group for topic {topic!r} in this process")
        index = zlib.crc32(key.encode()) % self._settings.bus_partitions
        for group in groups:
            try:
                async with asyncio.timeout(self._settings.bus_publish_timeout_s):
                    await group.partitions[index].put((key, value))
            except TimeoutError as exc:
                raise BusFull(f"topic {topic!r} group {group.name!r} is full") from exc
            self._unfinished += 1
            self._idle.clear()
            self._metrics.bus_queue_depth.labels(topic, group.name).inc()
        self._metrics.bus_published.labels(topic).inc()

    async def publish_many(self, events: Sequence[Event]) -> None:
        await publish_in_turn(self.publish, events)

    async def _consume(self, group: _Group, partition: asyncio.Queue[tuple[str, bytes]]) -> None:
        """Hand each event of the partition to its key's lane: many conversations at
        once, each one's events in publish order."""
        depth = self._metrics.bus_queue_depth.labels(group.topic, group.name)

        async def handle(event: tuple[str, bytes]) -> None:
            try:
                await self._handle(group, *event, self._settings.consumer_max_attempts)
            finally:
                self._unfinished -= 1
                if not self._unfinished:
                    self._idle.set()

        lanes = Lanes(self._settings.bus_concurrency, handle, f"bus-{group.name}")
        group.lanes.append(lanes)
        while True:
            await lanes.reserve()
            event = await partition.get()
            depth.dec()
            lanes.add(event[0], event)

    async def _handle(self, group: _Group, key: str, value: bytes, max_attempts: int) -> None:
        """Until the handler returns: an outage is waited out (never dead-lettered), a
        malformed event and one failing `max_attempts` times go to the DLQ (retry.py)."""
        labels = (group.topic, group.name)
        tries = Tries(max_attempts)
        while True:
            try:
                await group.handler(value)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                step = tries.failed(exc, time.monotonic())
                if step.dead_letter is not None:
                    await self._dead_letter(group, key, value, step.dead_letter, tries.total)
                    return
                self._metrics.bus_retries.labels(*labels).inc()
                if step.log:
                    log.warning("%s", retry_line(step, tries, group.name, group.topic, exc))
                await asyncio.sleep(
                    backoff_delay(
                        step.backoff_attempt,
                        self._settings.consumer_backoff_base_s,
                        self._settings.consumer_backoff_cap_s,
                        self._rng,
                    )
                )
            else:
                recovered = tries.recovered(time.monotonic(), group.name, group.topic)
                if recovered is not None:
                    log.info("%s", recovered)
                self._metrics.bus_handled.labels(*labels).inc()
                return

    async def _dead_letter(
        self, group: _Group, key: str, value: bytes, reason: str, attempts: int
    ) -> None:
        self._metrics.bus_dead_letters.labels(group.topic, group.name).inc()
        log.error("dead-lettering an event of %s (group %s): %s", group.topic, group.name, reason)
        record = dead_letter(group.topic, group.name, value, reason, attempts)
        try:
            await self.publish(dlq_topic(group.topic), key, record)
        except BusFull:
            # The last place the event exists: put it in the log whole rather than lose it.
            log.critical("DLQ unavailable; event follows: %s", record.decode())
