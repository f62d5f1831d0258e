"""The Kafka bus (aiokafka): the same contract as the in-process bus, stored by a broker.

Publishing: one idempotent producer with `acks=all`; `publish` returns once the broker
has stored the record, and raises `BusFull` (nothing acknowledged within
`bus_publish_timeout_s`) or `BackendUnavailable` (the broker refused it). Records are
keyed by conversation id, so one conversation lives on one partition.

Consuming: one consumer per group name (the group id is the name the role passes). Each
assigned partition gets its own task that hands each record to its key's lane
(whatslike/bus/lanes.py): up to `bus_concurrency` records at work at once, each key's in
order, while the partitions of a process run concurrently. A group that
subscribed with `subscribe_batch` gets, at each turn of the partition's task, everything
the partition has buffered (at least what one fetch brought) in one call of its batch
handler; if that raises, the same records go one by one through the per-event handler,
with its retries and dead letters. Offsets are committed by hand, only below the oldest record
whose handler has not returned (a batch: the whole batch) nor dead-lettered, every
`kafka_commit_interval_s`, on rebalance and on stop: at-least-once, as in memory.py.

Lag: after each fetch, `whatslike_bus_consumer_lag{topic,group,partition}` is the
partition's high watermark (as the last fetch response gave it) minus the offset of its
next record this process has not handled: records waiting in the broker and in our buffer.
While every buffer is full (no fetch), the end offsets are asked of the broker instead,
every `kafka_commit_interval_s`.
A partition's gauge appears with its first fetched record and goes when it is revoked.

Bounds: each partition buffers at most `kafka_partition_buffer` fetched records (plus
up to `bus_concurrency` at work in its lanes, or the batch at work: at most as many
again); a full partition is not
fetched again until its task catches up, so the broker keeps the backlog and nothing is
dropped. The producer holds at most a batch
(`max_batch_size`, 16 KiB) per partition beside the ones in flight; a publisher waits
for room, up to the publish timeout, then gets BusFull.

Rebalance: aiokafka revokes every partition before a rebalance and waits for the
listener. Ours stops feeding the revoked partitions, drops what they buffered (still
uncommitted: the next owner reads it again), lets the handler at work finish for up to
`kafka_handler_grace_s` (then abandons it: cancelled, uncommitted, redelivered), and
commits what is done before the partitions go. `stop` does the same, then leaves the group.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import (
    InvalidProducerEpoch,
    KafkaError,
    OutOfOrderSequenceNumber,
    ProducerFenced,
    UnknownProducerId,
)
from aiokafka.structs import OffsetAndMetadata
from prometheus_client import Gauge

from whatslike.bus import BatchHandler, BusFull, Event, Handler, PublishIncomplete
from whatslike.bus.lanes import Lanes, Offsets
from whatslike.bus.memory import backoff_delay, dead_letter
from whatslike.bus.retry import Failure, Tries, retry_line
from whatslike.errors import BackendUnavailable
from whatslike.events import (
    CHANNELS,
    TOPIC_MESSAGES,
    TOPIC_STATUS,
    dlq_topic,
    media_topic,
    outbound_topic,
    receipt_topic,
)
from whatslike.metrics import Metrics
from whatslike.settings import Settings

log = logging.getLogger(__name__)

#: The topics of protocol.md §2 (each with its `.dlq`), created at start by every process:
#: a publisher may start before the process that consumes the topic.
PROTOCOL_TOPICS = (
    TOPIC_MESSAGES,
    *(outbound_topic(c) for c in CHANNELS),
    TOPIC_STATUS,
    *(receipt_topic(c) for c in CHANNELS),
    *(media_topic(c) for c in CHANNELS),
)
_TOPIC_ALREADY_EXISTS = 36
#: Errors after which an idempotent producer refuses every later record: it is replaced.
_PRODUCER_BROKEN = (
    OutOfOrderSequenceNumber,
    UnknownProducerId,
    InvalidProducerEpoch,
    ProducerFenced,
)
#: Put in a released partition's buffer: its task ends there.
_END = object()


#: How long the broker keeps a silent member (aiokafka's default, said here because the
#: join bound depends on it).
SESSION_TIMEOUT_MS = 10_000
#: How long a fetch of a group in the background waits for records (Kafka's default).
BACKGROUND_FETCH_WAIT_MS = 500
#: The rebalance timeout beyond the handler grace: the broker waits that long for
#: members to rejoin.
REBALANCE_MARGIN_MS = 30_000


def join_timeout_s(settings: Settings) -> float:
    """The longest a group join may take when the broker is well: a dead member's session
    expiry or a live member's rejoin, whichever is longer, plus the publish timeout."""
    rebalance_s = settings.kafka_handler_grace_s + REBALANCE_MARGIN_MS / 1000
    return max(SESSION_TIMEOUT_MS / 1000, rebalance_s) + settings.bus_publish_timeout_s


def bootstrap_servers(bus_url: str) -> list[str]:
    """`kafka://host:port[,host:port]` → ["host:port", …] (the settings validated it)."""
    return [part.strip() for part in bus_url.removeprefix("kafka://").split(",") if part.strip()]


def is_dead_letter_topic(label: str) -> bool:
    """A `<topic>.dlq`: the end of the line, with no dead-letter topic of its own."""
    return label.endswith(dlq_topic(""))


@dataclass(frozen=True)
class ProducerConfig:
    """What the running producer does, read back from it (not from our arguments)."""

    idempotent: bool
    acks: int  # -1 is "all"
    producer_id: int  # given by the broker; -1 when it has not granted one


@dataclass
class _Partition:
    """One assigned partition: its buffer, its task, and how far it is done."""

    tp: TopicPartition
    handler: Handler
    batch: BatchHandler | None
    group: str
    buffer: asyncio.Queue[Any]  # aiokafka ConsumerRecord
    lag: Gauge  # its child of `whatslike_bus_consumer_lag`, bound once
    task: asyncio.Task[None] | None = None
    lanes: Lanes[Any] | None = None  # per-event handling: records at work, by key
    offsets: Offsets = field(default_factory=Offsets)  # ... and how far they are done
    done: int | None = None  # offset of the next record to read: all before it are handled
    committed: int | None = None
    fed_from: int | None = None  # offset of the first record fetched here (lag until `done`)


@dataclass
class _Group:
    name: str
    handlers: dict[str, Handler] = field(default_factory=dict)  # full topic name → handler
    batches: dict[str, BatchHandler] = field(default_factory=dict)  # ... → batch handler
    consumer: Any = None  # AIOKafkaConsumer
    partitions: dict[TopicPartition, _Partition] = field(default_factory=dict)
    poller: asyncio.Task[None] | None = None
    room: asyncio.Event = field(default_factory=asyncio.Event)
    releasing: asyncio.Lock = field(default_factory=asyncio.Lock)
    #: Its fetch wait, when not `kafka_fetch_max_wait_ms` (a group in the background).
    fetch_wait_ms: int | None = None


class KafkaBus:
    durable = True

    def __init__(self, settings: Settings, metrics: Metrics, *, seed: int | None = None) -> None:
        self._settings = settings
        self._metrics = metrics
        self._servers = bootstrap_servers(settings.bus_url)
        self._prefix = settings.kafka_topic_prefix
        self._groups: dict[str, _Group] = {}
        self._rng = random.Random(seed)
        self._producer: Any = None  # AIOKafkaProducer
        self._replacing = asyncio.Lock()
        self._admin: Any = None  # AIOKafkaAdminClient
        self._started = False
        self._stopping = False

    def topic_name(self, topic: str) -> str:
        """The broker's name of a topic: the configured prefix, then the protocol's name."""
        return self._prefix + topic

    def subscribe(self, topic: str, group: str, handler: Handler) -> None:
        if self._started:
            raise RuntimeError("subscribe before the bus starts")
        entry = self._groups.setdefault(group, _Group(group))
        name = self.topic_name(topic)
        if name in entry.handlers:
            raise RuntimeError(f"group {group!r} already consumes {topic!r}")
        entry.handlers[name] = handler

    def subscribe_background(self, topic: str, group: str, handler: Handler) -> None:
        """Like `subscribe`; the group's fetches wait up to `BACKGROUND_FETCH_WAIT_MS`
        (Kafka's default) when there is nothing to fetch. aiokafka keeps one fetch in
        flight per broker for all of a group's partitions, so an idle group with the
        short wait of the latency path sends a fetch of all its partitions every 20 ms:
        the dead-letter recorder's idle topics were most of a status worker's fetches."""
        self.subscribe(topic, group, handler)
        self._groups[group].fetch_wait_ms = BACKGROUND_FETCH_WAIT_MS

    def subscribe_batch(
        self, topic: str, group: str, handler: Handler, batch: BatchHandler
    ) -> None:
        """Like `subscribe`; each partition's buffered records go to `batch` at once."""
        self.subscribe(topic, group, handler)
        self._groups[group].batches[self.topic_name(topic)] = batch

    async def start(self) -> None:
        settings = self._settings
        try:
            self._admin = AIOKafkaAdminClient(
                bootstrap_servers=self._servers,
                client_id="whatslike-admin",
                request_timeout_ms=int(settings.bus_publish_timeout_s * 1000),
            )
            async with asyncio.timeout(settings.bus_publish_timeout_s):
                await self._admin.start()
            await self._create_topics()
            self._producer = await self._new_producer()
            for group in self._groups.values():
                await self._start_group(group)
        except (KafkaError, OSError, TimeoutError, BackendUnavailable) as exc:
            await self.stop()
            why = str(exc) if isinstance(exc, BackendUnavailable) else repr(exc)
            raise BackendUnavailable(
                f"Kafka at {','.join(self._servers)} (WHATSLIKE_BUS_URL): {why}"
            ) from exc
        self._started = True

    async def stop(self) -> None:
        """Stop fetching, let the handlers at work finish (up to `kafka_handler_grace_s`),
        commit what is done, leave the groups, then flush and close the producer."""
        self._stopping = True
        pollers = [g.poller for g in self._groups.values() if g.poller is not None]
        for poller in pollers:
            poller.cancel()
        await asyncio.gather(*pollers, return_exceptions=True)
        groups = [g for g in self._groups.values() if g.consumer is not None]
        # Every group's handlers get the same grace, at the same time.
        await asyncio.gather(*(self._release(g, list(g.partitions)) for g in groups))
        for group in groups:
            group.poller = None
            await self._bounded(f"consumer {group.name} leaving its group", group.consumer.stop())
            group.consumer = None
        await self._close_clients()
        self._started = False
        self._stopping = False

    async def ping(self) -> None:
        if self._admin is None:
            raise BackendUnavailable("the Kafka bus is not started")
        for group in self._groups.values():
            if group.poller is not None and group.poller.done():
                raise BackendUnavailable(f"the Kafka consumer of group {group.name!r} stopped")
        try:
            async with asyncio.timeout(self._settings.bus_publish_timeout_s):
                await self._admin.describe_cluster()
        except (KafkaError, OSError, TimeoutError) as exc:
            raise BackendUnavailable(f"Kafka at {','.join(self._servers)}: {exc!r}") from exc

    async def publish(self, topic: str, key: str, value: bytes) -> None:
        try:
            await self.publish_many([(topic, key, value)])
        except PublishIncomplete as exc:
            raise exc.error from exc

    async def publish_many(self, events: Sequence[Event]) -> None:
        """Every record goes to the producer's batches at once and is then awaited: one
        round trip to the broker (per partition batch) for all of them, not one each. The
        idempotent producer keeps each partition's records in the given order."""
        if not events:
            return  # the relay's idle turn (asyncio.wait refuses an empty set)
        producer = self._producer
        if producer is None:
            raise PublishIncomplete(0, BackendUnavailable("the Kafka bus is not started"))
        sent: list[asyncio.Future[Any]] = []
        failure: Exception | None = None
        try:
            async with asyncio.timeout(self._settings.bus_publish_timeout_s):
                for topic, key, value in events:
                    sent.append(
                        await producer.send(self.topic_name(topic), value, key=key.encode())
                    )
                await asyncio.wait(sent)
        except TimeoutError:
            failure = BusFull("Kafka did not acknowledge an event in time")
        except KafkaError as exc:
            failure = exc
        taken = 0
        for future in sent:
            if not future.done() or future.cancelled() or future.exception() is not None:
                break
            taken += 1
        for topic, _, _ in events[:taken]:
            self._metrics.bus_published.labels(topic).inc()
        if taken == len(events):
            return
        if failure is None and taken < len(sent):
            failure = cast(Exception, sent[taken].exception())
        if isinstance(failure, KafkaError):
            if isinstance(failure, _PRODUCER_BROKEN) or producer._sender.sender_task.done():
                await self._replace_producer(producer)
            failure = BackendUnavailable(f"Kafka refused an event: {failure!r}")
        assert failure is not None
        raise PublishIncomplete(taken, failure)

    async def _new_producer(self) -> Any:
        producer = AIOKafkaProducer(
            bootstrap_servers=self._servers,
            client_id="whatslike-producer",
            enable_idempotence=True,
            acks="all",
            request_timeout_ms=int(self._settings.bus_publish_timeout_s * 1000),
        )
        try:
            async with asyncio.timeout(self._settings.bus_publish_timeout_s):
                await producer.start()
        except BaseException:
            await producer.stop()
            raise
        return producer

    async def _replace_producer(self, dead: Any) -> None:
        """An idempotent producer out of step with the broker (OutOfOrderSequenceNumber: a
        batch expired while the broker was away, leaving a gap in its sequence numbers) or
        whose sender stopped takes no more records; the next one gets a new producer id.
        Its unacknowledged records were reported to their publishers, who retry: nothing
        acknowledged is lost."""
        async with self._replacing:
            if self._producer is not dead:
                return  # another publisher replaced it already
            log.warning("the Kafka producer is out of step with the broker; starting a new one")
            try:
                fresh = await self._new_producer()
            except (KafkaError, OSError, TimeoutError) as exc:
                log.warning("no new Kafka producer yet: %r", exc)
                return  # the next failing publish tries again
            self._producer = fresh
        # Bounded and outside the lock: a close that hangs on a broker still away must
        # hold up neither this publisher nor the next replacement.
        await self._bounded("close of the replaced producer", dead.stop())

    def assignment(self, group: str) -> list[tuple[str, int]]:
        """The partitions this process consumes for `group` now, as (topic, partition)."""
        entry = self._groups.get(group)
        if entry is None:
            return []
        return sorted((self._label(tp.topic), tp.partition) for tp in entry.partitions)

    def producer_config(self) -> ProducerConfig:
        """The effective settings of the started producer (tests assert them)."""
        if self._producer is None:
            raise BackendUnavailable("the Kafka bus is not started")
        txn = self._producer._txn_manager
        return ProducerConfig(
            idempotent=txn is not None,
            acks=int(self._producer._sender._acks),
            producer_id=int(txn.producer_id) if txn is not None else -1,
        )

    # Topics.

    async def _create_topics(self) -> None:
        wanted = {self.topic_name(t) for t in PROTOCOL_TOPICS}
        for group in self._groups.values():
            wanted.update(group.handlers)
        # A `.dlq` topic (the dead-letter recorder subscribes to them) has none of its own.
        wanted |= {
            self.topic_name(dlq_topic(label))
            for label in map(self._label, list(wanted))
            if not is_dead_letter_topic(label)
        }
        wanted -= set(await self._admin.list_topics())
        if not wanted:
            return
        response = await self._admin.create_topics(
            [
                NewTopic(
                    name,
                    num_partitions=self._settings.kafka_partitions,
                    replication_factor=self._settings.kafka_replication_factor,
                    topic_configs={
                        "min.insync.replicas": str(self._settings.effective_min_insync_replicas)
                    },
                )
                for name in sorted(wanted)
            ]
        )
        for error in response.topic_errors:
            name, code = error[0], error[1]
            if code not in (0, _TOPIC_ALREADY_EXISTS):
                detail = error[2] if len(error) > 2 else ""
                raise BackendUnavailable(f"Kafka cannot create topic {name!r}: {code} {detail}")
        log.info("created Kafka topics %s", ", ".join(sorted(wanted)))

    # Consuming.

    async def _start_group(self, group: _Group) -> None:
        grace_ms = int(self._settings.kafka_handler_grace_s * 1000)
        group.consumer = AIOKafkaConsumer(
            bootstrap_servers=self._servers,
            client_id=f"whatslike-{group.name}",
            # Prefixed like the topics: deployments (and tests) sharing a broker share
            # no group, so one's rebalance never stalls another's.
            group_id=self._prefix + group.name,
            enable_auto_commit=False,
            # A group's first start reads what was published before it joined: the API may
            # accept messages before the router's first start, and they must not be lost.
            auto_offset_reset="earliest",
            # The broker waits this long for members to rejoin; ours may spend the grace
            # on in-flight handlers first.
            rebalance_timeout_ms=grace_ms + REBALANCE_MARGIN_MS,
            session_timeout_ms=SESSION_TIMEOUT_MS,
            max_poll_records=self._settings.kafka_partition_buffer,
            fetch_max_wait_ms=group.fetch_wait_ms or self._settings.kafka_fetch_max_wait_ms,
            fetch_min_bytes=self._settings.kafka_fetch_min_bytes,
        )
        group.consumer.subscribe(list(group.handlers), listener=_Listener(self, group))
        # `start` returns once the group gave this member its partitions. A member that
        # died (kill -9) holds the group's join until its session expires, and a live one
        # may take the rebalance timeout to rejoin: the broker ends the join within the
        # longer of the two, so the start waits that out (plus a publish timeout for the
        # round trips) rather than fail, as it did within the publish timeout alone.
        bound = join_timeout_s(self._settings)
        try:
            async with asyncio.timeout(bound):
                await group.consumer.start()
        except TimeoutError as exc:
            raise BackendUnavailable(
                f"consumer group {group.name!r} not joined within {bound:g} s"
            ) from exc
        group.poller = asyncio.create_task(self._poll(group), name=f"kafka-poll-{group.name}")
        group.poller.add_done_callback(_report_poller_end)

    async def _poll(self, group: _Group) -> None:
        """Fetch into the partitions' buffers and commit what is done, until cancelled.
        A broker's error is retried after a pause; so is any other error (a bug of ours
        or of aiokafka's, logged with its traceback): a consumer that stopped for good
        would leave its partitions unread while the process, alive, is never restarted."""
        last_commit = time.monotonic()
        failures = 0
        while True:
            try:
                last_commit = await self._fetch_and_commit(group, last_commit)
                failures = 0
            except KafkaError as exc:
                log.warning("Kafka fetch for group %s failed: %r", group.name, exc)
                await asyncio.sleep(self._settings.consumer_backoff_base_s)
            except Exception:
                failures += 1
                delay = self._delay(failures)
                log.critical(
                    "Kafka consumer of group %s failed; fetching again in %.1f s",
                    group.name,
                    delay,
                    exc_info=True,
                )
                await asyncio.sleep(delay)

    async def _fetch_and_commit(self, group: _Group, last_commit: float) -> float:
        """One turn of `_poll`: answer when the group's offsets were last committed."""
        settings = self._settings
        limit = settings.kafka_partition_buffer
        consumer = group.consumer
        ready = [p for p in group.partitions.values() if p.buffer.qsize() < limit]
        if group.partitions and not ready:
            # Every partition's buffer is full: fetch nothing until a handler takes one.
            group.room.clear()
            try:
                async with asyncio.timeout(settings.kafka_commit_interval_s):
                    await group.room.wait()
            except TimeoutError:
                await self._refresh_lag(group)  # no fetch: ask the broker instead
        else:
            room = min((limit - p.buffer.qsize() for p in ready), default=limit)
            batches = await consumer.getmany(
                *(p.tp for p in ready), timeout_ms=200, max_records=room
            )
            # aiokafka returns records of the current assignment only (none while a
            # rebalance is under way), and `_feed` runs before anything else can.
            for tp, records in batches.items():
                self._feed(group, tp, records)
            self._report_lag(group)
        if time.monotonic() - last_commit >= settings.kafka_commit_interval_s:
            await self._commit(group, list(group.partitions.values()))
            last_commit = time.monotonic()
        return last_commit

    def _feed(self, group: _Group, tp: TopicPartition, records: list[Any]) -> None:
        # A partition's records may come before aiokafka calls on_partitions_assigned.
        self._assign(group, [tp])
        partition = group.partitions[tp]
        if partition.fed_from is None and records:
            partition.fed_from = records[0].offset
        for record in records:
            partition.buffer.put_nowait(record)
        self._metrics.bus_queue_depth.labels(self._label(tp.topic), group.name).inc(len(records))

    async def _refresh_lag(self, group: _Group) -> None:
        """The lag of stalled partitions (full buffers: no fetch brings high watermarks)."""
        try:
            async with asyncio.timeout(self._settings.bus_publish_timeout_s):
                ends = await group.consumer.end_offsets(list(group.partitions))
        except (KafkaError, OSError, TimeoutError) as exc:
            log.warning("Kafka end offsets for group %s unknown: %r", group.name, exc)
            return
        self._report_lag(group, ends)

    def _report_lag(self, group: _Group, ends: dict[TopicPartition, int] | None = None) -> None:
        # aiokafka asserts that a partition whose high watermark is asked is assigned; a
        # partition held here may have left its assignment in a rebalance under way (its
        # release comes with aiokafka's callback).
        assigned = group.consumer.assignment()
        for partition in group.partitions.values():
            if partition.tp not in assigned:
                continue
            if ends is None:
                highwater = group.consumer.highwater(partition.tp)
            else:
                highwater = ends.get(partition.tp)
            handled = partition.done if partition.done is not None else partition.fed_from
            if highwater is None or handled is None:
                continue  # nothing fetched here yet
            partition.lag.set(max(highwater - handled, 0))

    def _assign(self, group: _Group, assigned: Iterable[TopicPartition]) -> None:
        for tp in assigned:
            if tp in group.partitions:
                continue
            partition = _Partition(
                tp=tp,
                handler=group.handlers[tp.topic],
                batch=group.batches.get(tp.topic),
                group=group.name,
                # One more than the limit: room for the end-of-work marker.
                buffer=asyncio.Queue(maxsize=self._settings.kafka_partition_buffer + 1),
                lag=self._metrics.bus_consumer_lag.labels(
                    self._label(tp.topic), group.name, str(tp.partition)
                ),
            )
            partition.task = asyncio.create_task(
                self._drain(group, partition), name=f"kafka-{group.name}-{tp.topic}-{tp.partition}"
            )
            group.partitions[tp] = partition

    async def _release(self, group: _Group, revoked: Iterable[TopicPartition]) -> None:
        """Finish (within the grace) or abandon the work of these partitions, commit what
        is done, and forget them. One release at a time per group: a revoke that comes
        while `stop` releases waits for it, so no partition leaves with work running."""
        async with group.releasing:
            await self._release_now(group, revoked)

    async def _release_now(self, group: _Group, revoked: Iterable[TopicPartition]) -> None:
        leaving = [group.partitions.pop(tp) for tp in revoked if tp in group.partitions]
        for partition in leaving:
            dropped = partition.buffer.qsize()
            while not partition.buffer.empty():
                partition.buffer.get_nowait()
            self._metrics.bus_queue_depth.labels(self._label(partition.tp.topic), group.name).dec(
                dropped
            )
            partition.buffer.put_nowait(_END)
            with contextlib.suppress(KeyError):  # never reported: nothing was fetched
                self._metrics.bus_consumer_lag.remove(
                    self._label(partition.tp.topic), group.name, str(partition.tp.partition)
                )
        tasks = [p.task for p in leaving if p.task is not None]
        if tasks:
            # Each task ends at the marker, once the records at work in its lanes finish.
            _, late = await asyncio.wait(tasks, timeout=self._settings.kafka_handler_grace_s)
            for task in late:
                log.warning("abandoning a handler still running on %s", task.get_name())
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        await self._commit(group, leaving)

    async def _commit(self, group: _Group, partitions: Iterable[_Partition]) -> None:
        offsets = {
            p.tp: OffsetAndMetadata(p.done, "")
            for p in partitions
            if p.done is not None and p.done != p.committed
        }
        if not offsets or group.consumer is None:
            return
        # Failing (the partitions moved on in a rebalance, or the broker is away), their
        # next owner handles these events again: at-least-once allows it, and idempotent
        # handlers absorb it.
        committing = group.consumer.commit(offsets)
        if not await self._bounded(f"commit for group {group.name}", committing):
            return
        for partition in partitions:
            if partition.tp in offsets:
                partition.committed = offsets[partition.tp].offset

    async def _drain(self, group: _Group, partition: _Partition) -> None:
        """Handle one partition's records until the end-of-work marker: with a batch
        handler, everything buffered at each turn; otherwise each record in its key's
        lane (many conversations at once, each in order), `done` following the oldest
        record still at work."""
        label = self._label(partition.tp.topic)
        depth = self._metrics.bus_queue_depth.labels(label, group.name)
        if partition.batch is None:

            async def handle(record: Any) -> None:
                await self._handle(partition, label, record)
                partition.offsets.finish(record.offset)
                partition.done = partition.offsets.done

            partition.lanes = Lanes(
                self._settings.bus_concurrency, handle, f"kafka-{group.name}-{label}"
            )
        try:
            while True:
                if partition.lanes is not None:
                    await partition.lanes.reserve()
                records = [await partition.buffer.get()]
                if partition.batch is not None:
                    while not partition.buffer.empty():
                        records.append(partition.buffer.get_nowait())
                ended = records[-1] is _END
                if ended:
                    records.pop()
                    if partition.lanes is not None:
                        partition.lanes.unreserve()
                if records:
                    depth.dec(len(records))
                    group.room.set()
                    if partition.lanes is not None:
                        [record] = records
                        partition.offsets.take(record.offset)
                        partition.lanes.add(record.key, record)
                    elif partition.batch is not None and len(records) > 1:
                        await self._handle_batch(partition, partition.batch, label, records)
                    else:
                        for record in records:
                            await self._handle(partition, label, record)
                            partition.done = record.offset + 1
                if ended:
                    if partition.lanes is not None:
                        await partition.lanes.drain()
                    return
        except asyncio.CancelledError:
            # Abandoned (the grace ran out): what is at work stays uncommitted.
            if partition.lanes is not None:
                await partition.lanes.cancel()
            raise

    async def _handle_batch(
        self, partition: _Partition, batch: BatchHandler, label: str, records: list[Any]
    ) -> None:
        """The batch handler with all of them; if it raises, each through `_handle`."""
        try:
            await batch([record.value or b"" for record in records])
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning(
                "batch handler %s on %s failed on %d events (%s); handling them one by one",
                partition.group,
                label,
                len(records),
                exc,
            )
            for record in records:
                await self._handle(partition, label, record)
                partition.done = record.offset + 1
        else:
            self._metrics.bus_handled.labels(label, partition.group).inc(len(records))
            partition.done = records[-1].offset + 1

    async def _handle(self, partition: _Partition, label: str, record: Any) -> None:
        """Until the handler returns: an outage is waited out (never dead-lettered), a
        malformed event and one failing `consumer_max_attempts` times go to the DLQ
        (retry.py). Meanwhile the partition waits: its order is kept."""
        value: bytes = record.value or b""
        tries = Tries(self._settings.consumer_max_attempts)
        while True:
            try:
                await partition.handler(value)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                step = tries.failed(exc, time.monotonic())
                # A dead letter's handler is retried until it succeeds: there is no further
                # topic to put it in, and it stays uncommitted in its `.dlq` meanwhile (an
                # unreadable one is logged and left there by `_dead_letter`).
                if step.dead_letter is not None and (
                    step.failure is Failure.MALFORMED or not is_dead_letter_topic(label)
                ):
                    await self._dead_letter(
                        partition, label, record, reason=step.dead_letter, attempts=tries.total
                    )
                    return
                self._metrics.bus_retries.labels(label, partition.group).inc()
                if step.log or step.dead_letter is not None:
                    log.warning("%s", retry_line(step, tries, partition.group, label, exc))
                await asyncio.sleep(self._delay(step.backoff_attempt))
            else:
                recovered = tries.recovered(time.monotonic(), partition.group, label)
                if recovered is not None:
                    log.info("%s", recovered)
                self._metrics.bus_handled.labels(label, partition.group).inc()
                return

    async def _dead_letter(
        self, partition: _Partition, label: str, record: Any, *, reason: str, attempts: int
    ) -> None:
        """Publish the DLQ record; until Kafka takes it the event stays uncommitted and
        this partition waits (retrying with back-off), so it is never lost. A dead letter
        its handler cannot read has no further topic: it is logged and left where it is."""
        if is_dead_letter_topic(label):
            log.critical(
                "unreadable dead letter kept in %s partition %d offset %d: %s",
                label,
                record.partition,
                record.offset,
                reason,
            )
            return
        self._metrics.bus_dead_letters.labels(label, partition.group).inc()
        log.error("dead-lettering an event of %s (group %s): %s", label, partition.group, reason)
        letter = dead_letter(label, partition.group, record.value or b"", reason, attempts)
        key = record.key.decode() if record.key else ""
        retry = 0
        while True:
            try:
                await self.publish(dlq_topic(label), key, letter)
                return
            except (BusFull, BackendUnavailable) as exc:
                retry += 1
                log.warning("DLQ %s unavailable (try %d): %s", dlq_topic(label), retry, exc)
                await asyncio.sleep(self._delay(retry))

    def _delay(self, attempt: int) -> float:
        return backoff_delay(
            attempt,
            self._settings.consumer_backoff_base_s,
            self._settings.consumer_backoff_cap_s,
            self._rng,
        )

    def _label(self, name: str) -> str:
        """The protocol's topic name (metrics, DLQ records) of a broker topic name."""
        return name.removeprefix(self._prefix)

    async def _close_clients(self) -> None:
        if self._producer is not None:
            # Records still unacknowledged after this were reported to their publishers
            # (BusFull): dropping them loses nothing anyone was told is stored.
            await self._bounded("producer flush", self._producer.stop())
        if self._admin is not None:
            await self._bounded("admin client close", self._admin.close())
        self._producer = None
        self._admin = None

    async def _bounded(self, what: str, step: Awaitable[Any]) -> bool:
        """Await a step that talks to the broker, for at most the publish timeout: an
        unresponsive broker must not hold a stop (or a rebalance) forever."""
        try:
            async with asyncio.timeout(self._settings.bus_publish_timeout_s):
                await step
        except (KafkaError, OSError, TimeoutError) as exc:
            log.warning("Kafka %s did not complete: %r", what, exc)
            return False
        return True


def _report_poller_end(task: asyncio.Task[None]) -> None:
    """A consumer loop ends only when cancelled; anything else is a bug that `ping` (and
    so /readyz) reports from then on."""
    if not task.cancelled() and task.exception() is not None:
        log.critical("%s stopped consuming", task.get_name(), exc_info=task.exception())


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    """aiokafka awaits these before the group rebalances."""

    def __init__(self, bus: KafkaBus, group: _Group) -> None:
        self._bus = bus
        self._group = group

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self._bus._release(self._group, revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        if not self._bus._stopping:
            self._bus._assign(self._group, assigned)
