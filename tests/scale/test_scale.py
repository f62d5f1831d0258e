"""Every role its own process, on Kafka + Redis + PostgreSQL (and Cassandra): clients on
both hubs see every status of their organization's conversations in seq order and nothing
of another tenant's; and the same holds, with nothing lost or sent twice, when a status
worker is killed, when Redis restarts and when the Kafka broker restarts mid-stream."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.bus.test_kafka import restart_broker
from tests.fanout.test_redis import OwnRedis
from tests.scale.harness import (
    Cluster,
    Load,
    Watcher,
    cluster_env,
    create_conversations,
    open_watchers,
    oracle,
    running_cluster,
    settle,
    until,
)

CONVERSATIONS_PER_ORG = 6


@dataclass
class Run:
    cluster: Cluster
    load: Load
    watchers: list[Watcher]


@asynccontextmanager
async def deployment(
    tmp_path: Path, kafka_url: str, redis_url: str, database_url: str, prefix: str
) -> AsyncIterator[Run]:
    env = cluster_env(kafka_url, redis_url, database_url, prefix)
    with running_cluster(tmp_path, env) as cluster:
        conversations = await create_conversations(cluster, CONVERSATIONS_PER_ORG)
        watchers = await open_watchers(cluster, conversations)
        try:
            yield Run(cluster, Load(cluster, conversations), watchers)
        finally:
            for watcher in watchers:
                await watcher.close()


async def mid_stream(
    run: Run, messages: int, rate: float, fault: Callable[[], Awaitable[None]]
) -> None:
    """Send the load; once a third of it was accepted, run the fault; settle."""
    sending = asyncio.create_task(run.load.run(messages, rate))
    await until(
        lambda: sum(bool(s.accepted_at) for s in run.load.sent) >= messages // 3,
        lambda: f"{len(run.load.sent)} posted",
        timeout_s=60,
    )
    await fault()
    await sending
    await settle(run.load, run.watchers)


async def test_both_hubs_show_each_org_its_own_statuses_in_seq_order(
    tmp_path: Path, kafka_url: str, redis_url: str, database_url: str, prefix: str
) -> None:
    async with deployment(tmp_path, kafka_url, redis_url, database_url, prefix) as run:
        await run.load.run(messages=60, rate=30)
        await settle(run.load, run.watchers)
        verdict = await oracle(run.cluster, run.load, run.watchers, exact=True)
    # Every message READ (a DELIVERED overtaken by its READ is not applied after it).
    assert verdict.finals == {"READ": 60}
    assert verdict.statuses >= 2 * 60


async def test_a_status_worker_killed_mid_stream_loses_nothing(
    tmp_path: Path, kafka_url: str, redis_url: str, postgres_url: str, prefix: str
) -> None:
    async with deployment(tmp_path, kafka_url, redis_url, postgres_url, prefix) as run:
        killed_at = 0.0

        async def kill_worker() -> None:
            nonlocal killed_at
            run.cluster.kill("worker-1")
            killed_at = time.monotonic()

        await mid_stream(run, messages=150, rate=15, fault=kill_worker)
        await oracle(run.cluster, run.load, run.watchers, exact=False)
        # Every conversation moved on after the kill: the survivor took the dead one's
        # partitions (the rebalance time itself is measured by bench/scale.py).
        for watcher in run.watchers:
            for conversation, frames in watcher.frames.items():
                assert any(
                    watcher.arrived[(f["message_id"], f["status"])] > killed_at for f in frames
                ), f"{conversation}: nothing after the kill"


async def test_redis_restarted_mid_stream_clients_end_with_the_full_state(
    tmp_path: Path, kafka_url: str, own_redis: OwnRedis, postgres_url: str, prefix: str
) -> None:
    async with deployment(tmp_path, kafka_url, own_redis.url, postgres_url, prefix) as run:

        async def restart_redis() -> None:
            own_redis.kill()
            await asyncio.sleep(1)  # an outage, not a blip: statuses go on meanwhile
            await asyncio.to_thread(own_redis.start)

        await mid_stream(run, messages=120, rate=15, fault=restart_redis)
        await oracle(run.cluster, run.load, run.watchers, exact=False)


async def test_the_kafka_broker_restarted_mid_stream_loses_nothing(
    tmp_path: Path, kafka_url: str, redis_url: str, postgres_url: str, prefix: str
) -> None:
    async with deployment(tmp_path, kafka_url, redis_url, postgres_url, prefix) as run:
        await mid_stream(run, messages=120, rate=15, fault=lambda: restart_broker(kafka_url))
        await oracle(run.cluster, run.load, run.watchers, exact=False)
