"""The Kafka bus alone: N small events published (each acknowledged by the broker, acks=all,
`--concurrency` publishes in flight) and consumed by one group in one process, on topics
of the run's own. Prints the publish rate and the produce→consume rate.

    scripts/services.sh kafka
    .venv/bin/python -m bench.kafka_bus --events 10000
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
import uuid
from pathlib import Path

from aiokafka.admin import AIOKafkaAdminClient

from whatslike.bus.kafka import KafkaBus, bootstrap_servers
from whatslike.events import TOPIC_STATUS
from whatslike.metrics import Metrics
from whatslike.settings import load_settings


def default_url() -> str:
    env = Path(__file__).resolve().parent.parent / ".services" / "kafka.env"
    if "WHATSLIKE_TEST_KAFKA_URL" not in os.environ and env.exists():
        for line in env.read_text().splitlines():
            name, _, value = line.partition("=")
            if name == "WHATSLIKE_TEST_KAFKA_URL":
                return value
    return os.environ.get("WHATSLIKE_TEST_KAFKA_URL", "")


async def delete_topics(url: str, prefix: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers(url))
    try:
        await admin.start()
        await admin.delete_topics([t for t in await admin.list_topics() if t.startswith(prefix)])
    finally:
        await admin.close()


async def run(url: str, events: int, keys: int, partitions: int, concurrency: int) -> None:
    prefix = f"bench-{uuid.uuid4().hex[:8]}."
    settings = load_settings(bus_url=url, kafka_topic_prefix=prefix, kafka_partitions=partitions)
    bus = KafkaBus(settings, Metrics())
    handled = 0
    all_handled = asyncio.Event()

    async def handler(value: bytes) -> None:
        nonlocal handled
        handled += 1
        if handled >= events:
            all_handled.set()

    bus.subscribe(TOPIC_STATUS, "bench", handler)
    await bus.start()
    try:
        while not bus.assignment("bench"):  # noqa: ASYNC110 (no event for the group's state)
            await asyncio.sleep(0.05)
        payload = b'{"event_id":"e","status":"DELIVERED","conversation_id":"c"}'
        gate = asyncio.Semaphore(concurrency)

        async def publish(i: int) -> None:
            async with gate:
                await bus.publish(TOPIC_STATUS, f"conv-{i % keys}", payload)

        start = time.perf_counter()
        await asyncio.gather(*(publish(i) for i in range(events)))
        published = time.perf_counter() - start
        await asyncio.wait_for(all_handled.wait(), 120)
        total = time.perf_counter() - start
    finally:
        await bus.stop()
        await delete_topics(url, prefix)
    print(
        f"{events} events, {keys} keys, {partitions} partitions, {concurrency} publishes in flight"
    )
    print(f"published (acked, acks=all): {published:.2f} s = {events / published:,.0f} events/s")
    print(f"produce→consume, all handled: {total:.2f} s = {events / total:,.0f} events/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default=default_url(), help="kafka://host:port")
    parser.add_argument("--events", type=int, default=10_000)
    parser.add_argument("--keys", type=int, default=1000)
    parser.add_argument("--partitions", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=500)
    args = parser.parse_args()
    if not args.url:
        parser.error("no --url and no WHATSLIKE_TEST_KAFKA_URL: run scripts/services.sh kafka")
    asyncio.run(run(args.url, args.events, args.keys, args.partitions, args.concurrency))


if __name__ == "__main__":
    main()
