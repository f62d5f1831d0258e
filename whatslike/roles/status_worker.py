"""The status-worker role: applies `msg.status` events to the store and fans out the
resulting status frames; it also keeps every dead-lettered event in the store, and turns
a message that could not be handed to the provider into a FAILED status.

The bus's consumers (one per partition) hand their events to one group commit: while a
store transaction runs, the events that arrive wait, and the next transaction takes them
all (at most `MAX_BATCH`) through `apply_statuses`, so under load a commit carries many
statuses and at low load nothing waits for a timer. Each consumer still waits for its own
event's result before it publishes and takes its next event, so per-conversation order
is kept (one conversation's events share a partition).

On Kafka the bus hands each partition's buffered events at once to `apply_batch`: they
join the same group commit together (with the other partitions' batches waiting then,
`MAX_BATCH` per transaction, in partition order), then every frame goes out in one
pipelined publish; the bus commits their offsets only after that returned. Any
failure in a batch (an unknown message, a malformed event, the store or Redis away) makes
the bus hand the same events one by one to `apply`, which retries and dead-letters each;
the events of the batch already applied are matched by event_id and their frames published
again (clients drop the duplicates by seq).

Publishing happens after the store committed (the same transaction completed the event's
outbox entry). If it fails, the bus redelivers the event and `apply_status` returns the
same frames again (matched by event_id), so a notification is never lost; clients drop
the duplicate by seq.

A campaign message's change also moved its campaign's counts (in the same transaction):
the same publish carries one hint per campaign on `campaign:{id}` (no counts: the hubs
that follow the campaign read them, at their own pace). Sent with the status frames,
before the bus commits, it is as sure as they are: a redelivered event hints again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from datetime import datetime

from whatslike.bus import Background, Batching
from whatslike.campaigns import campaign_of
from whatslike.clock import utcnow
from whatslike.errors import BackendUnavailable, MalformedEvent
from whatslike.events import (
    CAMPAIGN_HINT,
    CHANNELS,
    TOPIC_MESSAGES,
    TOPIC_STATUS,
    OutboundMessage,
    StatusEvent,
    campaign_channel,
    dlq_topic,
    media_topic,
    outbound_topic,
    status_channel,
)
from whatslike.grouping import Grouped
from whatslike.roles import Deps, RoleDefaults
from whatslike.status.frame import IN
from whatslike.status.rules import Effect, ProviderError, Status
from whatslike.store.base import ApplyResult
from whatslike.store.common import receipt_entry, status_entry

log = logging.getLogger(__name__)

#: Topics whose dead letters are messages that never reached the provider.
UNSENT_SOURCES = (TOPIC_MESSAGES, outbound_topic("whatsapp"), outbound_topic("instagram"))
#: A customer's medium whose fetch failed past the bus's retries (not Meta's failures:
#: those end the medium `failed`; a bug, say) is kept like any dead letter, for operators.
MEDIA_SOURCES = tuple(media_topic(channel) for channel in CHANNELS)
DEAD_LETTER_SOURCES = (*UNSENT_SOURCES, TOPIC_STATUS, *MEDIA_SOURCES)
SEND_FAILED = ProviderError("send_failed", "Could not be handed to the provider")
#: Statuses applied in one store transaction at most.
MAX_BATCH = 256


class StatusWorker(RoleDefaults):
    name = "status-worker"

    def __init__(self, deps: Deps) -> None:
        self._store = deps.store
        self._fanout = deps.fanout
        self._metrics = deps.metrics
        self._handoffs = deps.handoffs
        self._commit = Grouped(self._apply_many, "status-group-commit", MAX_BATCH)
        # Bound once: per status, a labelled child is looked up otherwise.
        self._apply_seconds = deps.metrics.store_seconds.labels("apply_statuses")
        self._applied = {e: deps.metrics.status_applied.labels(e.value) for e in Effect}
        if isinstance(deps.bus, Batching):
            deps.bus.subscribe_batch(TOPIC_STATUS, "status-worker", self.apply, self.apply_batch)
        else:
            deps.bus.subscribe(TOPIC_STATUS, "status-worker", self.apply)
        for topic in DEAD_LETTER_SOURCES:
            if isinstance(deps.bus, Background):
                deps.bus.subscribe_background(
                    dlq_topic(topic), "dlq-recorder", self.record_dead_letter
                )
            else:
                deps.bus.subscribe(dlq_topic(topic), "dlq-recorder", self.record_dead_letter)

    async def start(self) -> None:
        self._commit.start()

    async def stop(self) -> None:
        await self._commit.stop()

    async def _apply_many(self, events: list[StatusEvent]) -> list[ApplyResult]:
        started = time.perf_counter()
        results = await self._store.apply_statuses(events)
        self._apply_seconds.observe(time.perf_counter() - started)
        self._metrics.status_batch_size.observe(len(events))
        return results

    async def apply(self, raw: bytes) -> None:
        event = StatusEvent.from_json(raw)
        self._taken([event], utcnow())
        result = await self._commit(event)
        frames = self._outcome(event, result) + _hints([result])
        await self._hand_off_receipts([result])
        await self._fanout.publish_many(frames)
        self._published([(event, result)])

    async def apply_batch(self, raws: list[bytes]) -> None:
        events = [StatusEvent.from_json(raw) for raw in raws]
        taken = utcnow()
        done = list(zip(events, await self._commit.many(events), strict=True))
        frames = [frame for event, result in done for frame in self._outcome(event, result)]
        frames += _hints([result for _, result in done])
        await self._hand_off_receipts([result for _, result in done])
        await self._fanout.publish_many(frames)
        # Counted once the batch is done: one that fails is handed over again one event
        # at a time (through `apply`), and each is counted there.
        self._taken(events, taken)
        self._published(done)

    async def _hand_off_receipts(self, results: list[ApplyResult]) -> None:
        """The read receipts to Meta of customers' messages that just became READ: only a
        change makes one (a replayed or repeated READ does not), so Meta is told once. A
        crash between the change and this hand-off loses that receipt; the next one of
        the conversation covers it (WhatsApp marks the earlier messages read too,
        Instagram the whole thread seen)."""
        read = [
            result.message
            for result in results
            if result.effect is Effect.CHANGED
            and result.message is not None
            and result.message.direction == IN
            and result.message.status is Status.READ
        ]
        if not read:
            return
        entries = []
        for message in read:
            conversation = await self._store.get_conversation(
                message.org_id, message.conversation_id
            )
            if conversation is not None:
                entries.append(receipt_entry(conversation, message))
        await self._store.handoff(entries)
        self._handoffs.set()

    def _taken(self, events: list[StatusEvent], when: datetime) -> None:
        self._metrics.status_consumed.inc(len(events))
        for event in events:
            if event.received_at is not None:
                lag = (when - event.received_at).total_seconds()
                self._metrics.status_bus_lag.observe(max(lag, 0.0))

    def _outcome(self, event: StatusEvent, result: ApplyResult) -> list[tuple[str, bytes]]:
        """Count an applied event; its frames, to publish. An unknown message raises."""
        if result.busy:  # retried by the bus, with back-off, like an outage
            raise BackendUnavailable(f"message {event.message_id!r} is held by another writer")
        if result.unknown_message or result.message is None:
            raise MalformedEvent(f"no message {event.message_id!r}")
        self._applied[result.effect].inc()
        if result.frames and result.effect is Effect.NOOP:
            self._metrics.status_duplicates.inc()
        if result.effect is Effect.ANOMALY:
            self._metrics.status_anomalies.inc()
            log.warning(
                "message %s: %s after %s recorded, not applied",
                event.message_id,
                event.status.value,
                result.message.status.value,
            )
        channel = status_channel(result.message.conversation_id)
        return [(channel, frame.encode()) for frame in result.frames]

    def _published(self, done: list[tuple[StatusEvent, ApplyResult]]) -> None:
        now = utcnow()
        for event, result in done:
            if not result.frames:
                continue
            if event.received_at is not None:
                ours = (now - event.received_at).total_seconds()
                self._metrics.status_latency.observe(max(ours, 0.0))
            lag = (now - event.occurred_at).total_seconds()
            self._metrics.provider_lag.observe(max(lag, 0.0))

    async def record_dead_letter(self, raw: bytes) -> None:
        try:
            record = json.loads(raw)
            topic, reason = str(record["topic"]), str(record["reason"])
        except (ValueError, KeyError, TypeError):
            record, topic, reason = {}, "unknown", "unreadable dead letter"
        await self._store.record_dead_letter(topic, raw, reason)
        event = record.get("event")
        if not isinstance(event, str):
            return
        if topic in UNSENT_SOURCES:
            await self._fail_unsent(event.encode())
        elif topic == TOPIC_STATUS:
            # Kept in the store now, where operators see it (`whatslike dlq list`, the
            # watchdog's count of unapplied ones) and replay it: its hand-off is done, it
            # must not come again by itself. Only poison gets here: an outage is retried
            # by the bus for as long as it lasts (whatslike/bus/retry.py).
            with contextlib.suppress(MalformedEvent):
                status = StatusEvent.from_json(event.encode())
                await self._store.handoff(done=[(TOPIC_STATUS, status.event_id)])

    async def _fail_unsent(self, raw: bytes) -> None:
        """A message that could not be handed to the provider must not sit PENDING for
        ever: it becomes FAILED (`send_failed`), which the agent sees like any failure;
        in the same transaction its send hand-off is done."""
        try:
            message = OutboundMessage.from_json(raw)
        except MalformedEvent:
            return  # nothing to fail: the dead letter itself is kept
        failed = StatusEvent(
            event_id=f"evt_unsent_{message.message_id}",
            message_id=message.message_id,
            conversation_id=message.conversation_id,
            org_id=message.org_id,
            channel=message.channel,
            status=Status.FAILED,
            provider_message_id="",
            occurred_at=utcnow(),
            error=SEND_FAILED,
            received_at=utcnow(),
        )
        await self._store.handoff(
            [status_entry(failed)], done=[(TOPIC_MESSAGES, message.message_id)]
        )
        self._handoffs.set()


def _hints(results: list[ApplyResult]) -> list[tuple[str, bytes]]:
    """One hint per campaign whose messages these results are (counted or not: a
    redelivery hints again, in case the first hint was lost with its process)."""
    campaigns = {
        campaign
        for result in results
        if result.message is not None
        and (campaign := campaign_of(result.message.client_message_id)) is not None
    }
    return [(campaign_channel(c), CAMPAIGN_HINT) for c in sorted(campaigns)]
