"""Fault tests of the scaled layout on the clusters (`make test-cluster`, which starts
them with `scripts/services.sh cassandra-cluster kafka-cluster`; `make test` runs it last):
api, router, connector and status worker as processes of their own on three Kafka brokers
(topics of 3 replicas, min.insync.replicas=2, acks=all), Redis and three Cassandra nodes
(replication factor 3, QUORUM, SERIAL), while messages flow, the broker that leads a
partition is killed (`kill -9`), or one Cassandra node, and started again 10 s later.
bench/chaos.py runs the load and its oracle: every message answered 202 ends READ or
FAILED, every webhook answered 200 is in the store, nothing is sent twice, every
conversation's seqs are 1..N with none given twice, the socket saw exactly `/changes`, and
no request was answered 500. A role that exits is started again by the harness (as
supervisord does) and counted in the report.

Replay a failure with the seed the report prints: WHATSLIKE_CHAOS_SEED=<seed> make test-cluster
"""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from bench.chaos import ChaosConfig, ChaosSetupError, cluster_nodes, run_chaos
from whatslike.bus.kafka import KafkaBus
from whatslike.events import TOPIC_STATUS
from whatslike.metrics import Metrics
from whatslike.settings import load_settings

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(1200)]

ROOT = Path(__file__).resolve().parents[2]
SEED = int(os.environ.get("WHATSLIKE_CHAOS_SEED") or random.randrange(10**6))


def setting(name: str) -> str:
    value = os.environ.get(name, "")
    if not value:
        pytest.fail(
            f"{name} is not set: run scripts/services.sh cassandra-cluster kafka-cluster"
            " (make test-cluster does)",
            pytrace=False,
        )
    return value


@pytest.fixture
async def whole_again() -> AsyncIterator[None]:
    """Whatever the test did, both clusters are whole again for the next one (a node the
    harness started again is kept; one that does not answer is started by the scripts)."""
    yield
    for script in ("cassandra-cluster.sh", "kafka-cluster.sh"):
        await asyncio.to_thread(
            subprocess.run,
            [str(ROOT / "scripts" / "services" / script)],
            check=True,
            timeout=600,
            capture_output=True,
        )


def scaled_config(tmp_path: Path, **faults: Any) -> ChaosConfig:
    return ChaosConfig(
        seed=SEED,
        database="cassandra",
        layout="scaled",
        messages=150,
        conversations=6,
        rate=5.0,
        pipeline_kills=0,
        pipeline_stops=0,
        simulator_kills=0,
        database_cuts=0,
        # Every status is several lightweight transactions on three nodes sharing the
        # machine: a backlog built while a node was away takes a while to clear.
        quiesce_s=300,
        settle_s=60,
        bus_url=setting("WHATSLIKE_TEST_KAFKA_CLUSTER_URL"),
        fanout_url=setting("WHATSLIKE_TEST_REDIS_URL"),
        kafka_replication=3,
        cassandra_url=setting("WHATSLIKE_TEST_CASSANDRA_CLUSTER_URL"),
        store_nodes=tuple(
            cluster_nodes(setting("WHATSLIKE_TEST_CASSANDRA_CLUSTER_DIR"), "cassandra.pid")
        ),
        bus_nodes={
            int(path.parent.name.removeprefix("node")): path
            for path in cluster_nodes(setting("WHATSLIKE_TEST_KAFKA_CLUSTER_DIR"), "kafka.pid")
        },
        node_down_s=10.0,
        workdir=tmp_path,
        **faults,
    )


async def run_and_check(config: ChaosConfig) -> None:
    try:
        result = await run_chaos(config, out=print)
    except ChaosSetupError as exc:
        pytest.fail(f"seed {SEED}: {exc}", pytrace=False)
    assert result.passed, f"{result.report}\nreplay: WHATSLIKE_CHAOS_SEED={SEED} make test-cluster"


async def test_the_bus_makes_topics_of_three_replicas_two_in_sync_and_produces_with_acks_all() -> (
    None
):
    bus_url = setting("WHATSLIKE_TEST_KAFKA_CLUSTER_URL")
    prefix = f"topics-{SEED}-{random.randrange(10**9)}."
    # A new topic's first record waits for its three replicas to be in sync: on a loaded
    # machine (load 18, 2026-12-05) that took longer than the default 5 s publish timeout.
    settings = load_settings(
        bus_url=bus_url,
        kafka_topic_prefix=prefix,
        kafka_replication_factor=3,
        bus_publish_timeout_s=60,
    )
    bus = KafkaBus(settings, Metrics())
    await bus.start()
    try:
        await bus.publish(TOPIC_STATUS, "c1", b"{}")  # acknowledged by two replicas at least
        assert bus.producer_config().acks == -1
    finally:
        await bus.stop()
    topic = prefix + TOPIC_STATUS
    admin = AIOKafkaAdminClient(bootstrap_servers=bus_url.removeprefix("kafka://").split(","))
    await admin.start()
    try:
        [described] = await admin.describe_topics([topic])
        [configs] = await admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, topic, None)]
        )
        await admin.delete_topics([topic, f"{topic}.dlq"])
    finally:
        await admin.close()
    assert {len(p["replicas"]) for p in described["partitions"]} == {3}
    # (value, source): 1 is the topic's own setting (the bus set it), not the broker's.
    entries = {entry[0]: (entry[1], entry[3]) for entry in configs.resources[0][4]}
    assert entries["min.insync.replicas"] == ("2", 1)


async def test_the_kafka_partition_leader_killed_under_load_loses_nothing(
    tmp_path: Path, whole_again: None
) -> None:
    await run_and_check(scaled_config(tmp_path, bus_leader_kills=1))


async def test_a_cassandra_node_killed_under_load_loses_nothing(
    tmp_path: Path, whole_again: None
) -> None:
    await run_and_check(scaled_config(tmp_path, store_node_kills=1))
