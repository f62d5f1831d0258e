"""One message's way through the scaled-out layout, hop by hop (`bench.send --trace`).

Nothing is added to the processes for it: the times come from what the pipeline already
writes down. The generator knows when it POSTed and when the READ frame came; the events
carry `created_at` (the API's, when it accepted the message) and `received_at` (the
connector's, when the send answer or the webhook came); and every Kafka record has the
time its producer was asked to send it (CreateTime). All are wall-clock times of the
one machine, so they compare.

    POST ─ created_at ─ `messages` record ─ `outbound.whatsapp` record ─ SENT received_at
         ─ READ received_at ─ READ `msg.status` record ─ READ frame
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

from aiokafka import AIOKafkaConsumer

from tests.scale.harness import percentile
from whatslike.clock import parse_time
from whatslike.events import TOPIC_MESSAGES, TOPIC_STATUS, outbound_topic

#: (hop, what its time covers).
HOPS = (
    ("POST → created", "the API: request, token, validation (created_at)"),
    ("created → messages", "store commit, the API relay's claim and publish"),
    ("messages → outbound", "the router: Kafka fetch, re-publish"),
    ("outbound → SENT", "the connector: fetch, claim, pacing, the Graph call"),
    ("SENT → READ webhook", "the stand-in's DELIVERED and READ webhooks"),
    ("READ webhook → msg.status", "webhook hand-off, commit, the connector relay's publish"),
    ("msg.status → READ frame", "status worker: fetch, apply, Redis fan-out, hub, socket"),
)
#: The stamps the hops go between, in order.
STAMPS = (
    "POST",
    "created",
    "messages",
    "outbound",
    "SENT",
    "READ webhook",
    "msg.status",
    "READ frame",
)


async def records(kafka_url: str, topic: str) -> list[tuple[float, dict[str, object]]]:
    """Every record of `topic`: (CreateTime in seconds, decoded value)."""
    servers = kafka_url.removeprefix("kafka://").split(",")
    # No group: a subscription then takes every partition, read from the earliest offset.
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=servers, enable_auto_commit=False, auto_offset_reset="earliest"
    )
    await consumer.start()
    try:
        while not consumer.assignment():
            await consumer.getmany(timeout_ms=100)
        await consumer.seek_to_beginning()
        partitions = list(consumer.assignment())
        ends = await consumer.end_offsets(partitions)
        taken: list[tuple[float, dict[str, object]]] = []
        while [tp for tp in partitions if await consumer.position(tp) < ends[tp]]:
            batches = await consumer.getmany(timeout_ms=1000)
            for batch in batches.values():
                taken += [(r.timestamp / 1000, json.loads(r.value)) for r in batch]
        return taken
    finally:
        await consumer.stop()


def _when(text: object) -> float:
    return parse_time(str(text)).timestamp()


@dataclass
class Timeline:
    """Each stamp of `STAMPS` by message id (wall-clock seconds), for the messages seen."""

    stamps: list[dict[str, float]]

    def hops(self, messages: Iterable[str]) -> list[tuple[str, str, list[float]]]:
        """Per hop, its duration (seconds) for every message of `messages` seen on it."""
        wanted = list(messages)
        result = []
        for n, (name, covers) in enumerate(HOPS):
            start, end = self.stamps[n], self.stamps[n + 1]
            durations = sorted(end[m] - start[m] for m in wanted if m in start and m in end)
            result.append((name, covers, durations))
        return result

    def offsets(self, message: str) -> list[float | None]:
        """Each stamp of `message` in seconds after its POST (None: not seen)."""
        posted = self.stamps[0][message]
        return [s[message] - posted if message in s else None for s in self.stamps]


async def timeline(
    kafka_url: str, prefix: str, posted: dict[str, float], read: dict[str, float]
) -> Timeline:
    """The stamps of every message of `posted`, from its POST to its READ frame."""
    created: dict[str, float] = {}
    accepted: dict[str, float] = {}
    routed: dict[str, float] = {}
    for at, value in await records(kafka_url, prefix + TOPIC_MESSAGES):
        accepted.setdefault(str(value["message_id"]), at)
        created.setdefault(str(value["message_id"]), _when(value["created_at"]))
    for at, value in await records(kafka_url, prefix + outbound_topic("whatsapp")):
        routed.setdefault(str(value["message_id"]), at)
    sent: dict[str, float] = {}
    read_hook: dict[str, float] = {}
    read_status: dict[str, float] = {}
    for at, value in await records(kafka_url, prefix + TOPIC_STATUS):
        message, status, received = str(value["message_id"]), value["status"], value["received_at"]
        if status == "SENT" and received:
            sent.setdefault(message, _when(received))
        if status == "READ" and received:
            read_hook.setdefault(message, _when(received))
            read_status.setdefault(message, at)
    return Timeline([posted, created, accepted, routed, sent, read_hook, read_status, read])


def print_hops(found: list[tuple[str, str, list[float]]], say: Callable[[str], None]) -> None:
    say("  hop                          p50 ms  p99 ms  max ms   n  (what it covers)")
    for name, covers, durations in found:
        if not durations:
            say(f"  {name:<28} (not seen)")
            continue
        p50, p99 = percentile(durations, 0.5) * 1000, percentile(durations, 0.99) * 1000
        say(
            f"  {name:<28} {p50:6.1f}  {p99:6.1f}  {durations[-1] * 1000:6.1f}"
            f"  {len(durations):4d}  ({covers})"
        )


def print_slowest(found: Timeline, count: int, say: Callable[[str], None]) -> None:
    """The `count` messages slowest from POST to READ frame, each stamp in ms after the
    POST, and the POST's wall-clock time (to find the moment in the processes' logs)."""
    posted, read = found.stamps[0], found.stamps[-1]
    slowest = sorted((m for m in posted if m in read), key=lambda m: posted[m] - read[m])
    say(f"  slowest {count}, ms after the POST: " + " | ".join(STAMPS[1:]))
    for message in slowest[:count]:
        offsets = " ".join(
            "-" if at is None else f"{at * 1000:.0f}" for at in found.offsets(message)[1:]
        )
        when = datetime.fromtimestamp(posted[message], UTC).strftime("%H:%M:%S.%f")[:-3]
        say(f"  {message} POST {when} UTC: {offsets}")
