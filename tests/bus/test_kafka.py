"""The Kafka bus against the real broker (scripts/services.sh kafka): commits, per-key
order, retries, dead letters, rebalances and the producer's effective configuration.
Each test has topics of its own (a unique `kafka_topic_prefix`)."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path

import pytest
import pytest_asyncio
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError
from aiokafka.partitioner import DefaultPartitioner
from aiokafka.structs import TopicPartition

from tests.e2e.conftest import (
    OWN_SECRETS,
    Server,
    one_message_to_read,
    start_server,
    stop_server,
)
from whatslike.bus import BusFull, PublishIncomplete
from whatslike.bus.factory import open_bus
from whatslike.bus.kafka import BACKGROUND_FETCH_WAIT_MS, KafkaBus, bootstrap_servers
from whatslike.bus.memory import MemoryBus
from whatslike.errors import BackendUnavailable, ConfigError, MalformedEvent
from whatslike.events import TOPIC_STATUS, dlq_topic
from whatslike.metrics import Metrics
from whatslike.settings import Settings, load_settings

TOPIC = TOPIC_STATUS
WAIT_S = 30.0


@pytest.fixture
def kafka_url() -> str:
    url = os.environ.get("WHATSLIKE_TEST_KAFKA_URL")
    if not url:
        pytest.fail(
            "WHATSLIKE_TEST_KAFKA_URL is not set: run scripts/services.sh kafka first",
            pytrace=False,
        )
    return url


@pytest_asyncio.fixture
async def prefix(kafka_url: str) -> AsyncIterator[str]:
    """A topic prefix of the test's own; its topics are deleted afterwards (a broker with
    thousands of partitions left over starts slowly)."""
    name = f"test-{uuid.uuid4().hex[:10]}."
    yield name
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers(kafka_url))
    try:
        await admin.start()
        leftovers = [topic for topic in await admin.list_topics() if topic.startswith(name)]
        if leftovers:
            await admin.delete_topics(leftovers)
    except KafkaError:
        pass  # no broker: the test itself already failed saying so
    finally:
        await admin.close()


def kafka_settings(url: str, prefix: str, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "bus_url": url,
        "kafka_topic_prefix": prefix,
        "kafka_partitions": 4,
        "kafka_commit_interval_s": 0.2,
        "kafka_handler_grace_s": 5.0,
        "bus_publish_timeout_s": 10.0,
        "consumer_max_attempts": 3,
        "consumer_backoff_base_s": 0.01,
        "consumer_backoff_cap_s": 0.05,
    }
    values.update(overrides)
    return load_settings(**values)


@asynccontextmanager
async def running(bus: KafkaBus) -> AsyncIterator[KafkaBus]:
    try:
        await bus.start()
    except BackendUnavailable as exc:
        pytest.fail(f"Kafka does not answer at {bus_servers(bus)}: {exc}", pytrace=False)
    try:
        yield bus
    finally:
        await bus.stop()


def bus_servers(bus: KafkaBus) -> str:
    return ",".join(bus._servers)


class Collector:
    """Records what a handler got (and, through `member`, which member of a group got
    it); `until` waits for a condition on it."""

    def __init__(self) -> None:
        self.items: list[bytes] = []
        self.by_member: dict[str, list[bytes]] = {}
        self._changed = asyncio.Condition()

    async def __call__(self, value: bytes) -> None:
        await self.record("", value)

    async def record(self, member: str, value: bytes) -> None:
        async with self._changed:
            self.items.append(value)
            self.by_member.setdefault(member, []).append(value)
            self._changed.notify_all()

    def member(self, name: str) -> Callable[[bytes], Awaitable[None]]:
        async def handler(value: bytes) -> None:
            await self.record(name, value)

        return handler

    async def until(self, done: Callable[[list[bytes]], bool]) -> None:
        async with asyncio.timeout(WAIT_S), self._changed:
            await self._changed.wait_for(lambda: done(self.items))


def key_of(value: bytes) -> str:
    """The conversation of a test event `conv/n`."""
    return value.decode().split("/")[0]


async def eventually(condition: Callable[[], bool]) -> None:
    """Wait (bounded) until the condition holds, e.g. a rebalance gave partitions."""
    async with asyncio.timeout(WAIT_S):
        while not condition():  # noqa: ASYNC110 (the group's state has no event to await)
            await asyncio.sleep(0.05)


async def wait_assigned(bus: KafkaBus, group: str) -> None:
    await eventually(lambda: bool(bus.assignment(group)))


# Settings and selection (no broker needed).


def test_bus_url_takes_kafka_brokers_and_refuses_others() -> None:
    settings = load_settings(bus_url="kafka://10.0.0.1:9092, kafka-2:9093")
    assert bootstrap_servers(settings.bus_url) == ["10.0.0.1:9092", "kafka-2:9093"]
    for bad in ("kafka://", "kafka://host", "kafka://host:port", "redis://x:1"):
        with pytest.raises(ConfigError, match="bus_url"):
            load_settings(bus_url=bad)


def test_open_bus_chooses_the_adapter_by_url() -> None:
    assert isinstance(open_bus(load_settings(bus_url="kafka://h:1"), Metrics()), KafkaBus)
    assert isinstance(open_bus(load_settings(), Metrics()), MemoryBus)
    assert KafkaBus.durable is True


# Against the broker.


async def test_the_producer_is_idempotent_with_acks_all(kafka_url: str, prefix: str) -> None:
    async with running(KafkaBus(kafka_settings(kafka_url, prefix), Metrics())) as bus:
        await bus.publish(TOPIC, "c1", b"{}")
        config = bus.producer_config()
    assert config.idempotent
    assert config.acks == -1  # "all"
    assert config.producer_id >= 0  # the broker granted an idempotent producer id


async def test_a_producer_replaced_while_its_close_hangs_leaves_publishing_free(
    kafka_url: str, prefix: str
) -> None:
    """The producer put aside (out of step with the broker) is closed within the publish
    timeout: a close hanging on a broker still away held the replacement's lock, and
    with it every publisher whose producer broke next."""
    settings = kafka_settings(kafka_url, prefix, bus_publish_timeout_s=1.0)
    async with running(KafkaBus(settings, Metrics())) as bus:
        dead = bus._producer
        closing = asyncio.Event()
        close = dead.stop

        async def hangs() -> None:
            closing.set()
            await asyncio.Event().wait()

        dead.stop = hangs
        await asyncio.wait_for(bus._replace_producer(dead), 10 * settings.bus_publish_timeout_s)
        assert closing.is_set() and bus._producer is not dead
        await bus.publish(TOPIC, "c1", b"e1")  # on the new producer
        await close()


async def test_a_committed_event_is_not_seen_again_and_an_unfinished_one_is(
    kafka_url: str, prefix: str
) -> None:
    # One partition: the group's position is one number, and arrival order is total.
    settings = kafka_settings(kafka_url, prefix, kafka_partitions=1, kafka_handler_grace_s=0.5)
    stuck = asyncio.Event()
    first: list[bytes] = []

    async def hangs_on_e3(value: bytes) -> None:
        first.append(value)
        if value == b"e3":
            stuck.set()
            await asyncio.Event().wait()  # never returns: abandoned at stop

    bus = KafkaBus(settings, Metrics())
    bus.subscribe(TOPIC, "g", hangs_on_e3)
    async with running(bus):
        for i in range(1, 6):
            await bus.publish(TOPIC, "c1", f"e{i}".encode())
        await asyncio.wait_for(stuck.wait(), WAIT_S)
    assert first == [b"e1", b"e2", b"e3"]

    # The next member of the group starts after e2 (committed) with e3 (never finished).
    again = Collector()
    bus = KafkaBus(settings, Metrics())
    bus.subscribe(TOPIC, "g", again)
    async with running(bus):
        await bus.publish(TOPIC, "c1", b"end")
        await again.until(lambda items: b"end" in items)
    assert again.items == [b"e3", b"e4", b"e5", b"end"]


async def test_a_stuck_conversation_holds_up_only_itself_and_the_commit_stays_below_it(
    kafka_url: str, prefix: str
) -> None:
    # One partition, two conversations: "slow" never finishes its first event.
    settings = kafka_settings(kafka_url, prefix, kafka_partitions=1, kafka_handler_grace_s=0.5)
    stuck = asyncio.Event()
    seen = Collector()

    async def handler(value: bytes) -> None:
        if value == b"slow/1":
            stuck.set()
            await asyncio.Event().wait()  # never returns: abandoned at stop
        await seen(value)

    bus = KafkaBus(settings, Metrics())
    bus.subscribe(TOPIC, "g", handler)
    async with running(bus):
        for value in (b"slow/1", b"fast/1", b"slow/2", b"fast/2", b"fast/3"):
            await bus.publish(TOPIC, key_of(value), value)
        await seen.until(lambda items: len(items) == 3)
        await bus._commit(bus._groups["g"], list(bus._groups["g"].partitions.values()))
    assert stuck.is_set()
    assert seen.items == [b"fast/1", b"fast/2", b"fast/3"]

    # The group's position stayed at slow/1: the next member gets it and what followed.
    again = Collector()
    bus = KafkaBus(settings, Metrics())
    bus.subscribe(TOPIC, "g", again)
    async with running(bus):
        await bus.publish(TOPIC, "end", b"end/1")
        await again.until(lambda items: b"end/1" in items)
    assert [v for v in again.items if v.startswith(b"slow/")] == [b"slow/1", b"slow/2"]
    assert sorted(v for v in again.items if v.startswith(b"fast/")) == [
        b"fast/1",
        b"fast/2",
        b"fast/3",
    ]


async def test_keys_keep_their_order_while_partitions_run_concurrently(
    kafka_url: str, prefix: str
) -> None:
    keys = [f"conv-{i}" for i in range(24)]
    per_key = 40
    got: dict[str, list[int]] = {key: [] for key in keys}
    running_now = 0
    most = 0
    rng = random.Random(7)
    seen = Collector()

    async def handler(value: bytes) -> None:
        nonlocal running_now, most
        key, n = value.decode().split("/")
        running_now += 1
        most = max(most, running_now)
        await asyncio.sleep(rng.uniform(0, 0.002))
        got[key].append(int(n))
        running_now -= 1
        await seen(value)

    bus = KafkaBus(kafka_settings(kafka_url, prefix), Metrics())
    bus.subscribe(TOPIC, "g", handler)
    async with running(bus):
        await asyncio.gather(
            *(
                asyncio.gather(
                    *[bus.publish(TOPIC, key, f"{key}/{n}".encode()) for n in range(per_key)]
                )
                for key in keys
            )
        )
        await seen.until(lambda items: len(items) >= len(keys) * per_key)
    for key in keys:
        assert got[key] == sorted(got[key]), key
        assert set(got[key]) == set(range(per_key)), key
    assert most > 1  # partitions were handled at the same time


async def test_a_failing_handler_is_retried_until_it_succeeds(kafka_url: str, prefix: str) -> None:
    calls: list[bytes] = []
    done = asyncio.Event()

    async def flaky(value: bytes) -> None:
        calls.append(value)
        if len(calls) < 3:
            raise ConnectionError("database down")
        done.set()

    metrics = Metrics()
    bus = KafkaBus(kafka_settings(kafka_url, prefix), metrics)
    bus.subscribe(TOPIC, "g", flaky)
    async with running(bus):
        await bus.publish(TOPIC, "c1", b"e1")
        await asyncio.wait_for(done.wait(), WAIT_S)
    assert calls == [b"e1"] * 3
    assert metrics.bus_retries.labels(TOPIC, "g")._value.get() == 2
    assert metrics.bus_dead_letters.labels(TOPIC, "g")._value.get() == 0


async def test_a_consumer_whose_fetch_fails_unexpectedly_keeps_consuming(
    kafka_url: str, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """An error aiokafka does not type as a Kafka error (an assertion of its own, a bug of
    ours) used to end the group's fetch loop for good: the process stayed up, so nothing
    restarted it, and its partitions were never read again."""
    seen = Collector()
    bus = KafkaBus(kafka_settings(kafka_url, prefix), Metrics())
    bus.subscribe(TOPIC, "g", seen)
    async with running(bus):
        await bus.publish(TOPIC, "c1", b"c1/0")
        await seen.until(lambda items: items == [b"c1/0"])
        consumer = bus._groups["g"].consumer
        fetch = consumer.getmany
        failures = 0

        async def fails_twice(*partitions: object, **options: object) -> object:
            nonlocal failures
            if failures < 2:
                failures += 1
                raise AssertionError("Partition is not assigned")
            return await fetch(*partitions, **options)

        consumer.getmany = fails_twice
        await eventually(lambda: failures == 2)
        await bus.publish(TOPIC, "c1", b"c1/1")
        await seen.until(lambda items: items == [b"c1/0", b"c1/1"])
        await bus.ping()  # the consumer is alive: /readyz stays ready
    failed = [r for r in caplog.records if "Kafka consumer of group g failed" in r.getMessage()]
    assert len(failed) == 2 and all(r.exc_info for r in failed)


async def test_lag_is_not_asked_of_a_partition_that_left_the_assignment(
    kafka_url: str, prefix: str
) -> None:
    """aiokafka asserts a partition is assigned before it gives its high watermark; a
    partition still held here while a rebalance takes it away is skipped."""
    seen = Collector()
    bus = KafkaBus(kafka_settings(kafka_url, prefix), Metrics())
    bus.subscribe(TOPIC, "g", seen)
    async with running(bus):
        await wait_assigned(bus, "g")
        group = bus._groups["g"]
        gone = TopicPartition(bus.topic_name(TOPIC), 99)
        bus._assign(group, [gone])
        bus._report_lag(group)
        await bus._release(group, [gone])


async def test_dead_letters_after_max_attempts_and_at_once_when_malformed(
    kafka_url: str, prefix: str
) -> None:
    calls: dict[bytes, int] = {}
    handled = Collector()
    dead = Collector()

    async def handler(value: bytes) -> None:
        calls[value] = calls.get(value, 0) + 1
        if value == b"broken":
            raise ValueError("no such state")  # the event's fault, not an outage
        if value == b"\xff\xfe":
            raise MalformedEvent("not JSON")
        await handled(value)

    bus = KafkaBus(kafka_settings(kafka_url, prefix), Metrics())
    bus.subscribe(TOPIC, "g", handler)
    bus.subscribe(dlq_topic(TOPIC), "dlq", dead)
    async with running(bus):
        for value in (b"broken", b"\xff\xfe", b"after"):
            await bus.publish(TOPIC, "c1", value)
        await dead.until(lambda items: len(items) == 2)
        await handled.until(lambda items: b"after" in items)  # the partition went on
    broken, malformed = (json.loads(item) for item in dead.items)
    assert broken["topic"] == TOPIC
    assert broken["group"] == "g"
    assert broken["attempts"] == 3
    assert "ValueError: no such state" in broken["reason"]
    assert broken["event"] == "broken"
    assert malformed["attempts"] == 1
    assert malformed["reason"] == "malformed: not JSON"
    assert malformed["event_b64"] == "//4="
    assert calls == {b"broken": 3, b"\xff\xfe": 1, b"after": 1}


async def test_a_dead_letter_topic_gets_no_dead_letter_topic_and_its_handler_is_retried(
    kafka_url: str, prefix: str
) -> None:
    """The dead-letter recorder subscribes to `.dlq` topics: none gets a `.dlq.dlq`, and a
    dead letter it cannot record yet (its store down) is retried past the attempts an
    ordinary event gets, staying uncommitted, instead of going anywhere else."""
    calls: list[bytes] = []
    recorded = asyncio.Event()

    async def recorder(value: bytes) -> None:
        calls.append(value)
        if len(calls) <= 5:  # more than consumer_max_attempts (3)
            raise ConnectionError("database down")
        recorded.set()

    metrics = Metrics()
    bus = KafkaBus(kafka_settings(kafka_url, prefix), metrics)
    bus.subscribe(TOPIC, "g", Collector())
    bus.subscribe(dlq_topic(TOPIC), "dlq-recorder", recorder)
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers(kafka_url))
    async with running(bus):
        await admin.start()
        try:
            topics = {t for t in await admin.list_topics() if t.startswith(prefix)}
        finally:
            await admin.close()
        await bus.publish(dlq_topic(TOPIC), "c1", b"a dead letter")
        await asyncio.wait_for(recorded.wait(), WAIT_S)
    assert f"{prefix}{dlq_topic(TOPIC)}" in topics
    assert [t for t in topics if t.endswith(".dlq.dlq")] == []
    assert calls == [b"a dead letter"] * 6
    assert metrics.bus_dead_letters.labels(dlq_topic(TOPIC), "dlq-recorder")._value.get() == 0


async def test_consumer_groups_carry_the_topic_prefix(kafka_url: str, prefix: str) -> None:
    bus = KafkaBus(kafka_settings(kafka_url, prefix), Metrics())
    bus.subscribe(TOPIC, "g", Collector())
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers(kafka_url))
    async with running(bus):
        await wait_assigned(bus, "g")
        await admin.start()
        try:
            groups = {entry[0] for entry in await admin.list_consumer_groups()}
        finally:
            await admin.close()
    assert f"{prefix}g" in groups


async def test_a_second_member_shares_the_partitions_and_nothing_is_lost(
    kafka_url: str, prefix: str
) -> None:
    settings = kafka_settings(kafka_url, prefix)
    seen = Collector()
    a, b = KafkaBus(settings, Metrics()), KafkaBus(settings, Metrics())
    a.subscribe(TOPIC, "g", seen.member("a"))
    b.subscribe(TOPIC, "g", seen.member("b"))
    sent = [f"c{i % 16}/{i}".encode() for i in range(400)]
    async with running(a):
        for value in sent[:200]:
            await a.publish(TOPIC, key_of(value), value)
        async with running(b):
            await wait_assigned(b, "g")
            await wait_assigned(a, "g")
            assert len(a.assignment("g")) + len(b.assignment("g")) == 4
            for value in sent[200:]:
                await b.publish(TOPIC, key_of(value), value)
            await seen.until(lambda items: set(items) >= set(sent))
    assert seen.by_member["b"]  # the second member did take partitions over


async def test_when_a_member_stops_mid_stream_the_other_takes_over(
    kafka_url: str, prefix: str
) -> None:
    settings = kafka_settings(kafka_url, prefix)
    seen = Collector()
    published = asyncio.Event()

    async def slow_a(value: bytes) -> None:
        await published.wait()
        await asyncio.sleep(0.01)
        await seen.record("a", value)

    a, b = KafkaBus(settings, Metrics()), KafkaBus(settings, Metrics())
    a.subscribe(TOPIC, "g", slow_a)
    b.subscribe(TOPIC, "g", seen.member("b"))
    sent = [f"c{i % 16}/{i}".encode() for i in range(600)]
    async with running(b):
        async with running(a):
            await wait_assigned(a, "g")
            await wait_assigned(b, "g")
            assert len(a.assignment("g")) + len(b.assignment("g")) == 4
            taken_by_a = set(a.assignment("g"))
            for value in sent:
                await b.publish(TOPIC, key_of(value), value)
            published.set()
            await seen.until(lambda _: len(seen.by_member.get("a", [])) >= 50)
        # `a` stopped with work left; `b` gets its partitions and every event.
        await seen.until(lambda items: set(items) >= set(sent))
        await eventually(lambda: taken_by_a <= set(b.assignment("g")))
    partitioner = DefaultPartitioner()
    of_a = {
        value
        for value in sent
        if (TOPIC, partitioner(key_of(value).encode(), [0, 1, 2, 3], [0, 1, 2, 3])) in taken_by_a
    }
    left_by_a = of_a - set(seen.by_member["a"])
    assert left_by_a  # `a` really stopped mid-stream
    assert left_by_a <= set(seen.by_member["b"])  # and `b` handled the rest of its events


async def test_ping_and_start_fail_clearly_without_a_broker(kafka_url: str, prefix: str) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead_port = probe.getsockname()[1]
    settings = kafka_settings(f"kafka://127.0.0.1:{dead_port}", prefix, bus_publish_timeout_s=2)
    bus = KafkaBus(settings, Metrics())
    with pytest.raises(BackendUnavailable, match="not started"):
        await bus.ping()
    with pytest.raises(BackendUnavailable, match=f"127.0.0.1:{dead_port}"):
        await bus.start()
    async with running(KafkaBus(kafka_settings(kafka_url, prefix), Metrics())) as live:
        await live.ping()


async def test_publishing_to_a_topic_the_broker_lacks_raises_busfull(
    kafka_url: str, prefix: str
) -> None:
    settings = kafka_settings(kafka_url, prefix, bus_publish_timeout_s=1.0)
    async with running(KafkaBus(settings, Metrics())) as bus:
        with pytest.raises(BusFull, match="in time"):
            await bus.publish("no-such-topic", "c1", b"{}")


async def test_publish_many_takes_them_at_once_in_order_and_says_how_far_it_got(
    kafka_url: str, prefix: str
) -> None:
    settings = kafka_settings(kafka_url, prefix, bus_publish_timeout_s=1.0)
    seen = Collector()
    bus = KafkaBus(settings, Metrics())
    bus.subscribe(TOPIC, "g", seen)
    sent = [f"c{i % 3}/{i}".encode() for i in range(60)]
    async with running(bus):
        await bus.publish_many([])  # the relay's idle turn: nothing to do, no error
        await bus.publish_many([(TOPIC, key_of(value), value) for value in sent])
        await seen.until(lambda items: len(items) == len(sent))
        with pytest.raises(PublishIncomplete) as refused:
            await bus.publish_many([(TOPIC, "c0", b"c0/ok"), ("no-such-topic", "c1", b"{}")])
    for key in ("c0", "c1", "c2"):
        got = [v for v in seen.items if key_of(v) == key and v != b"c0/ok"]
        assert got == [v for v in sent if key_of(v) == key]
    assert refused.value.taken == 1
    assert isinstance(refused.value.error, BusFull)


@pytest.fixture
def kafka_server(kafka_url: str, prefix: str, tmp_path: Path) -> Iterator[Server]:
    env = {
        "WHATSLIKE_ROLES": "api,router,connector,status-worker,simulator",
        "WHATSLIKE_BUS_URL": kafka_url,
        "WHATSLIKE_KAFKA_TOPIC_PREFIX": prefix,
        "WHATSLIKE_SIM_DELAY_MS": "30",
        **OWN_SECRETS,
    }
    server = start_server(tmp_path, env)  # its output is read all along (no full pipe)
    yield server
    stop_server(server)


async def test_whatslike_serve_on_kafka_takes_a_message_to_read(kafka_server: Server) -> None:
    await one_message_to_read(kafka_server, WAIT_S)


REPO = Path(__file__).resolve().parents[2]


def broker_pid(kafka_url: str) -> int:
    """The process of the broker this checkout started (scripts/services.sh kafka)."""
    pid_file = REPO / ".services" / "kafka" / "kafka.pid"
    env_file = REPO / ".services" / "kafka.env"
    port = kafka_url.rsplit(":", 1)[1]
    if not pid_file.exists() or f"PORT={port}\n" not in env_file.read_text():
        pytest.fail(
            f"{kafka_url} is not the broker of scripts/services.sh kafka: cannot stop it",
            pytrace=False,
        )
    return int(pid_file.read_text())


def every_thread_stopped(pid: int) -> bool:
    """SIGSTOP stops a process's threads one by one, each at its next return to user
    space: a JVM thread already answering a request may still send its answer."""
    states = []
    for stat in Path(f"/proc/{pid}/task").glob("*/stat"):
        with suppress(FileNotFoundError):  # a thread that ended meanwhile
            # The state follows the command name, which is in parentheses.
            states.append(stat.read_text().rsplit(")", 1)[1].split()[0])
    return bool(states) and all(state in "Tt" for state in states)


async def restart_broker(kafka_url: str) -> None:
    """Crash the broker this checkout started (kill -9) and start it again on its port."""
    port = kafka_url.rsplit(":", 1)[1]
    os.kill(broker_pid(kafka_url), signal.SIGKILL)
    script = await asyncio.create_subprocess_exec(
        str(REPO / "scripts/services/kafka.sh"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await script.communicate()
    assert script.returncode == 0, output.decode()
    assert f"127.0.0.1:{port}" in output.decode()  # the same address again


async def test_a_broker_crash_mid_stream_loses_no_acknowledged_event(
    kafka_url: str, prefix: str
) -> None:
    settings = kafka_settings(kafka_url, prefix, bus_publish_timeout_s=2.0)
    seen = Collector()
    bus = KafkaBus(settings, Metrics())
    bus.subscribe(TOPIC, "g", seen)
    acked: list[bytes] = []
    refused: list[Exception] = []
    crashed = asyncio.Event()
    after_restart = 0

    async def publish_steadily() -> None:
        nonlocal after_restart
        i = 0
        while after_restart < 50:
            value = f"c{i % 8}/{i}".encode()
            i += 1
            try:
                await bus.publish(TOPIC, key_of(value), value)
            except (BusFull, BackendUnavailable) as exc:
                refused.append(exc)
                await asyncio.sleep(0.1)
                continue
            acked.append(value)
            if crashed.is_set():
                after_restart += 1
            await asyncio.sleep(0.002)

    async with running(bus):
        publisher = asyncio.create_task(publish_steadily())
        await seen.until(lambda items: len(items) >= 50)
        await restart_broker(kafka_url)
        crashed.set()
        await asyncio.wait_for(publisher, WAIT_S)
        await seen.until(lambda items: set(items) >= set(acked))
        await bus.ping()
    assert refused  # the outage was seen by publishers, as errors they can retry


def stuck_consumer(
    kafka_url: str, prefix: str
) -> tuple[KafkaBus, Metrics, asyncio.Event, Collector]:
    """A bus whose one-partition group `g` buffers at most 5 records and whose handler
    waits for `release` before it records what it got."""
    settings = kafka_settings(kafka_url, prefix, kafka_partitions=1, kafka_partition_buffer=5)
    metrics = Metrics()
    release = asyncio.Event()
    seen = Collector()

    async def stuck(value: bytes) -> None:
        await release.wait()
        await seen(value)

    bus = KafkaBus(settings, metrics)
    bus.subscribe(TOPIC, "g", stuck)
    return bus, metrics, release, seen


async def test_a_stuck_partition_buffers_at_most_its_bound_and_the_broker_keeps_the_rest(
    kafka_url: str, prefix: str
) -> None:
    bus, metrics, release, seen = stuck_consumer(kafka_url, prefix)
    depth = metrics.bus_queue_depth.labels(TOPIC, "g")
    sent = [f"c1/{i}".encode() for i in range(200)]
    async with running(bus):
        for value in sent:
            await bus.publish(TOPIC, "c1", value)
        # Five wait in the buffer (one more is at the handler); the rest stays in Kafka.
        await eventually(lambda: depth._value.get() == 5)
        release.set()
        await seen.until(lambda items: len(items) == len(sent))
        await bus.ping()  # the consumer loop never overfilled a buffer (it would have died)
    assert seen.items == sent


async def test_stop_lets_the_handler_at_work_finish_and_commits_its_event(
    kafka_url: str, prefix: str
) -> None:
    settings = kafka_settings(kafka_url, prefix, kafka_partitions=1)
    entered, release = asyncio.Event(), asyncio.Event()
    finished: list[bytes] = []

    async def slow(value: bytes) -> None:
        entered.set()
        await release.wait()
        finished.append(value)

    bus = KafkaBus(settings, Metrics())
    bus.subscribe(TOPIC, "g", slow)
    try:
        await bus.start()
    except BackendUnavailable as exc:
        pytest.fail(f"Kafka does not answer at {kafka_url}: {exc}", pytrace=False)
    await bus.publish(TOPIC, "c1", b"e1")
    await asyncio.wait_for(entered.wait(), WAIT_S)
    stopping = asyncio.create_task(bus.stop())
    await eventually(lambda: not bus.assignment("g"))  # stop let the partition go...
    assert not stopping.done()  # ...and waits for the handler
    release.set()
    await asyncio.wait_for(stopping, WAIT_S)
    assert finished == [b"e1"]

    again = Collector()
    bus = KafkaBus(settings, Metrics())
    bus.subscribe(TOPIC, "g", again)
    async with running(bus):
        await bus.publish(TOPIC, "c1", b"end")
        await again.until(lambda items: b"end" in items)
    assert again.items == [b"end"]  # e1 was committed at stop


async def test_stop_is_bounded_when_the_broker_hangs(kafka_url: str, prefix: str) -> None:
    settings = kafka_settings(kafka_url, prefix, bus_publish_timeout_s=1.0)
    bus = KafkaBus(settings, Metrics())
    bus.subscribe(TOPIC, "g", Collector())
    try:
        await bus.start()
    except BackendUnavailable as exc:
        pytest.fail(f"Kafka does not answer at {kafka_url}: {exc}", pytrace=False)
    await bus.publish(TOPIC, "c1", b"e1")
    pid = broker_pid(kafka_url)
    os.kill(pid, signal.SIGSTOP)  # the broker stops answering, its sockets stay open
    try:
        await eventually(lambda: every_thread_stopped(pid))
        with pytest.raises(BusFull):
            await bus.publish(TOPIC, "c1", b"e2")
        with pytest.raises(BackendUnavailable):
            await bus.ping()
        # Leaving the group and flushing the producer each wait at most the publish
        # timeout (the handler grace is not needed: nothing is being handled).
        await asyncio.wait_for(bus.stop(), 4 * settings.bus_publish_timeout_s + 2)
    finally:
        os.kill(pid, signal.SIGCONT)


async def test_consumer_lag_counts_the_records_waiting_and_falls_when_they_are_handled(
    kafka_url: str, prefix: str
) -> None:
    bus, metrics, release, seen = stuck_consumer(kafka_url, prefix)
    lag = metrics.bus_consumer_lag.labels(TOPIC, "g", "0")
    sent = [f"c1/{i}".encode() for i in range(30)]
    async with running(bus):
        for value in sent:
            await bus.publish(TOPIC, "c1", value)
        # Nothing handled: every record waits (six fetched here, the rest in the broker).
        await eventually(lambda: lag._value.get() == len(sent))
        release.set()
        await seen.until(lambda items: len(items) == len(sent))
        await eventually(lambda: lag._value.get() == 0)
    assert seen.items == sent


async def publish_before_consuming(settings: Settings, values: list[bytes]) -> None:
    """Publish from a member of no group: the consumer started next fetches them at once."""
    async with running(KafkaBus(settings, Metrics())) as producer:
        for value in values:
            await producer.publish(TOPIC, key_of(value), value)


async def test_a_batch_handler_gets_what_was_fetched_in_order_and_commits_after_it(
    kafka_url: str, prefix: str
) -> None:
    settings = kafka_settings(kafka_url, prefix, kafka_partitions=1)
    sent = [f"c1/{i}".encode() for i in range(20)]
    sent.insert(10, b"c1/bad")
    await publish_before_consuming(settings, sent)
    calls: list[list[bytes]] = []
    handled = Collector()  # both paths, in the order they handled

    async def batch(values: list[bytes]) -> None:
        calls.append(values)
        if b"c1/bad" in values:
            raise ValueError("refused")
        for value in values:
            await handled(value)

    bus = KafkaBus(settings, Metrics())
    bus.subscribe_batch(TOPIC, "g", handled, batch)
    async with running(bus):
        await handled.until(lambda items: len(items) == len(sent))
    assert handled.items == sent  # the failed batch's records again, one by one, in order
    assert max(map(len, calls)) > 1
    assert any(b"c1/bad" in values for values in calls)

    # Everything was committed after its batch: the next member starts after it.
    again = Collector()
    bus = KafkaBus(settings, Metrics())
    bus.subscribe(TOPIC, "g", again)
    async with running(bus):
        await bus.publish(TOPIC, "c1", b"end")
        await again.until(lambda items: b"end" in items)
    assert again.items == [b"end"]


async def test_a_batch_that_never_returns_is_not_committed(kafka_url: str, prefix: str) -> None:
    settings = kafka_settings(kafka_url, prefix, kafka_partitions=1, kafka_handler_grace_s=0.5)
    sent = [f"c1/{i}".encode() for i in range(10)]
    await publish_before_consuming(settings, sent)
    entered = asyncio.Event()

    async def hangs(values: list[bytes]) -> None:
        entered.set()
        await asyncio.Event().wait()  # abandoned at stop

    alone = Collector()  # a record fetched alone goes to the per-event handler
    bus = KafkaBus(settings, Metrics())
    bus.subscribe_batch(TOPIC, "g", alone, hangs)
    async with running(bus):
        await asyncio.wait_for(entered.wait(), WAIT_S)
    again = Collector()
    bus = KafkaBus(settings, Metrics())
    bus.subscribe(TOPIC, "g", again)
    async with running(bus):
        await bus.publish(TOPIC, "c1", b"end")
        await again.until(lambda items: b"end" in items)
    assert again.items == [*sent[len(alone.items) :], b"end"]


async def test_a_background_group_gets_its_events_with_the_long_fetch_wait(
    kafka_url: str, prefix: str
) -> None:
    """The dead-letter recorder's group is idle nearly always: its fetches wait Kafka's
    500 ms, not the latency path's 20 ms, and its events still come."""
    got = Collector()
    urgent = Collector()
    bus = KafkaBus(kafka_settings(kafka_url, prefix), Metrics())
    bus.subscribe_background(TOPIC, "slow", got)
    bus.subscribe(TOPIC, "fast", urgent)
    async with running(bus):
        await bus.publish(TOPIC, "c1", b"e1")
        await got.until(lambda items: items == [b"e1"])
        await urgent.until(lambda items: items == [b"e1"])
        waits = {g: bus._groups[g].consumer._fetcher._fetch_max_wait_ms for g in ("slow", "fast")}
    assert waits == {"slow": BACKGROUND_FETCH_WAIT_MS, "fast": 20}
