"""Measurements of the multi-process deployment (issue 7): every role its own process
(2 api, 2 status workers, router, connector, simulator) on Kafka + Redis + PostgreSQL, as
tests/scale runs it.

    python -m bench.scale --messages 600 --rate 60

Prints: the time scripts/services.sh takes (a reuse when the servers already run), the
time the seven processes take to be ready, status events/s through the pipeline, POST →
READ frame p50/p99 (both hubs' sockets), and, in a second run, the rebalance time after a
status worker is killed: from the kill to the last conversation's first status after it
(the conversations on the dead worker's partitions wait for the group to rebalance).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import urlsplit

from aiokafka.admin import AIOKafkaAdminClient

from bench.chaos import fresh_database
from tests.scale.harness import (
    Cluster,
    Load,
    Watcher,
    cluster_env,
    create_conversations,
    latencies,
    open_watchers,
    oracle,
    percentile,
    running_cluster,
    settle,
    until,
)
from whatslike.bus.kafka import bootstrap_servers

REPO = Path(__file__).resolve().parent.parent


def start_services() -> float:
    """Run scripts/services.sh postgres redis kafka; load the URLs it wrote."""
    began = time.monotonic()
    subprocess.run(
        [str(REPO / "scripts/services.sh"), "postgres", "redis", "kafka"],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    took = time.monotonic() - began
    for env_file in sorted((REPO / ".services").glob("*.env")):
        for line in env_file.read_text().splitlines():
            name, sep, value = line.partition("=")
            if sep and name.startswith("WHATSLIKE_TEST_"):
                os.environ[name] = value
    return took


@asynccontextmanager
async def deployment(workdir: Path) -> AsyncIterator[tuple[Cluster, Load, list[Watcher]]]:
    kafka = os.environ["WHATSLIKE_TEST_KAFKA_URL"]
    prefix = f"bench-{uuid.uuid4().hex[:10]}."
    admin_url = os.environ["WHATSLIKE_TEST_POSTGRES_URL"]
    async with fresh_database(admin_url) as name:
        database = urlsplit(admin_url)._replace(path=f"/{name}").geturl()
        env = cluster_env(kafka, os.environ["WHATSLIKE_TEST_REDIS_URL"], database, prefix)
        try:
            with running_cluster(workdir, env) as cluster:
                conversations = await create_conversations(cluster, 10)
                watchers = await open_watchers(cluster, conversations)
                try:
                    yield cluster, Load(cluster, conversations), watchers
                finally:
                    for watcher in watchers:
                        await watcher.close()
        finally:
            await delete_topics(kafka, prefix)


async def delete_topics(kafka: str, prefix: str) -> None:
    """Delete the benchmark's topics (those named with its prefix) from the broker."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers(kafka))
    await admin.start()
    try:
        topics = [t for t in await admin.list_topics() if t.startswith(prefix)]
        await admin.delete_topics(topics)
    finally:
        await admin.close()


async def throughput(workdir: Path, messages: int, rate: float) -> None:
    async with deployment(workdir) as (cluster, load, watchers):
        print(f"processes ready in {cluster.started_in_s:.1f} s (7 processes started at once)")
        began = time.monotonic()
        await load.run(messages, rate)
        await settle(load, watchers)
        took = time.monotonic() - began
        verdict = await oracle(cluster, load, watchers, exact=False)
        lat = latencies(load, watchers)
        print(
            f"{messages} messages at {rate:g}/s offered: {verdict.statuses} status events in "
            f"{took:.1f} s = {verdict.statuses / took:.0f} events/s "
            f"({messages / took:.0f} messages/s); finals {dict(verdict.finals)}"
        )
        print(
            f"POST -> READ frame over {len(lat)} (message, socket) pairs: "
            f"p50 {percentile(lat, 0.5) * 1000:.0f} ms, p99 {percentile(lat, 0.99) * 1000:.0f} ms"
        )


async def rebalance(workdir: Path, messages: int, rate: float) -> None:
    async with deployment(workdir) as (cluster, load, watchers):
        sending = asyncio.create_task(load.run(messages, rate))
        await until(lambda: len(load.sent) >= messages // 3, lambda: "load did not start")
        cluster.kill("worker-1")
        killed = time.monotonic()
        await sending
        await settle(load, watchers)
        drained = time.monotonic() - killed
        await oracle(cluster, load, watchers, exact=False)
        firsts = [
            min((at for at in watcher.arrived.values() if at > killed), default=float("inf"))
            for watcher in watchers
        ]
        stalls = []
        for watcher in watchers:
            for frames in watcher.frames.values():
                after = [
                    watcher.arrived[(f["message_id"], f["status"])]
                    for f in frames
                    if watcher.arrived[(f["message_id"], f["status"])] > killed
                ]
                stalls.append(min(after) - killed)
        print(
            f"kill -9 of a status worker: every conversation moving again after "
            f"{max(stalls):.1f} s (first status after the kill: {min(firsts) - killed:.2f} s); "
            f"all {messages} messages final {drained:.1f} s after the kill"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=600)
    parser.add_argument("--rate", type=float, default=60.0, help="messages per second offered")
    args = parser.parse_args(argv)
    print(f"scripts/services.sh postgres redis kafka: {start_services():.1f} s")
    with tempfile.TemporaryDirectory(prefix="whatslike-scale-") as workdir:
        asyncio.run(throughput(Path(workdir) / "throughput", args.messages, args.rate))
        asyncio.run(rebalance(Path(workdir) / "rebalance", args.messages // 2, args.rate / 2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
