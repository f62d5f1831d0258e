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
from collections.abc import Callable

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


async def hops(
    kafka_url: str, prefix: str, posted: dict[str, float], read: dict[str, float]
) -> list[tuple[str, str, list[float]]]:
    """Per hop, its duration (seconds) for every message of `posted` seen on each hop."""
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
    stamps: list[dict[str, float]] = [
        posted,
        created,
        accepted,
        routed,
        sent,
        read_hook,
        read_status,
        read,
    ]
    result = []
    for n, (name, covers) in enumerate(HOPS):
        start, end = stamps[n], stamps[n + 1]
        result.append(
            (name, covers, sorted(end[m] - start[m] for m in posted if m in start and m in end))
        )
    return result


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
