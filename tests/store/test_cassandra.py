"""What the Cassandra adapter adds to the contract: its URL, several workers (sessions)
numbering one conversation, and the completion of a change whose writer died between its
steps (the state such a crash leaves is written here with CQL, on the real server)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile
from cassandra.policies import RoundRobinPolicy

from tests.api.test_http import client_for, messages_url
from tests.e2e.conftest import OWN_SECRETS, Server, one_message_to_read, start_server, stop_server
from tests.store.conftest import _admin_cluster, fresh_cassandra_keyspace
from tests.store.test_contract import at, current, decoded, new_message, seqs, status_event
from tests.store.test_webhooks import endpoint
from whatslike.app import Runtime
from whatslike.clock import new_id, utcnow
from whatslike.errors import BackendUnavailable, ConfigError
from whatslike.events import TOPIC_MESSAGES
from whatslike.settings import load_settings
from whatslike.status.frame import status_frame
from whatslike.status.rules import Effect, Status
from whatslike.store import CassandraStore, open_store
from whatslike.store.base import Message, SendClaim
from whatslike.store.cassandra import CassandraAddress
from whatslike.store.common import status_entry

pytestmark = pytest.mark.cassandra

LEASE = timedelta(milliseconds=300)
#: How long the serve test waits for each status frame.
SERVE_WAIT_S = 30.0


@pytest.fixture
async def url() -> AsyncIterator[str]:
    async with fresh_cassandra_keyspace() as fresh:
        yield fresh


@pytest.fixture
async def store(url: str) -> AsyncIterator[CassandraStore]:
    opened = CassandraStore(url, bucket_size=4, pending_lease=LEASE)
    await opened.open()
    try:
        yield opened
    finally:
        await opened.close()


def test_the_url_names_hosts_port_keyspace_and_replication() -> None:
    address = CassandraAddress.parse("cassandra://db1:9142,db2/chat?replication_factor=3")
    assert address == CassandraAddress(("db1", "db2"), 9142, "chat", 3, "QUORUM", "SERIAL")
    local = "cassandra://db/chat?consistency=local_quorum&serial_consistency=LOCAL_SERIAL"
    assert CassandraAddress.parse(local) == CassandraAddress(
        ("db",), 9042, "chat", 1, "LOCAL_QUORUM", "LOCAL_SERIAL"
    )
    assert CassandraAddress.parse("cassandra://db/chat").port == 9042
    assert isinstance(open_store("cassandra://127.0.0.1:9042/whatslike"), CassandraStore)
    bad_urls = (
        "cassandra://db:port/chat",
        "cassandra://db/",
        "cassandra://db/1chat",
        "cassandra://db/chat;DROP",
        "cassandra://u:pw@db/chat",
        "cassandra://db/chat?replication_factor=0",
        "cassandra://db/chat?consistency=ONE",
        "cassandra://db/chat?serial_consistency=QUORUM",
    )
    for bad in bad_urls:
        with pytest.raises(ConfigError, match="WHATSLIKE_DATABASE_URL") as caught:
            CassandraAddress.parse(bad)
        assert "pw" not in str(caught.value)


async def test_an_unreachable_cassandra_is_backend_unavailable() -> None:
    store = CassandraStore("cassandra://127.0.0.1:1/whatslike", request_timeout_s=2)
    with pytest.raises(BackendUnavailable, match=r"127\.0\.0\.1:1/whatslike"):
        await store.open()


async def test_workers_on_their_own_sessions_number_one_conversation_without_gaps(
    url: str, store: CassandraStore
) -> None:
    workers = [CassandraStore(url, bucket_size=4) for _ in range(3)]
    for worker in workers:
        await worker.open()
    try:
        conversation = await store.create_conversation("org_a", "whatsapp", "+1")
        messages = [(await store.create_message(conversation, f"m{n}", ""))[0] for n in range(8)]
        events = [
            status_event(message, status, at(ms))
            for message in messages
            for status, ms in ((Status.SENT, 1000), (Status.DELIVERED, 2000), (Status.READ, 3000))
        ]
        results = await asyncio.gather(
            *(workers[n % len(workers)].apply_status(event) for n, event in enumerate(events))
        )
    finally:
        for worker in workers:
            await worker.close()
    # A status overtaken by a later one only fills its time, so fewer than 24 may change.
    taken = sorted(seq for result in results for seq in seqs(result.frames))
    assert taken == list(range(1, len(taken) + 1))
    assert len(taken) == sum(result.effect is Effect.CHANGED for result in results)
    changes = await store.changes_since(conversation.id, 0, 100)
    assert (seqs(changes.frames), changes.last_seq) == (taken, len(taken))
    for message in messages:
        assert (await current(store, message)).status is Status.READ


def _cql(store: CassandraStore, statement: str, params: list[Any]) -> Any:
    """Run one statement on a session of its own; `{keyspace}` names the store's."""
    address = store.address
    cluster = Cluster(
        list(address.hosts),
        port=address.port,
        execution_profiles={
            EXEC_PROFILE_DEFAULT: ExecutionProfile(load_balancing_policy=RoundRobinPolicy())
        },
        protocol_version=5,
    )
    try:
        return cluster.connect().execute(statement.format(keyspace=address.keyspace), params)
    finally:
        cluster.shutdown()


async def _crash_after_begin(store: CassandraStore, message: Message, event_id: str) -> datetime:
    """Leave `message` as a worker that died right after writing a DELIVERED change
    (before numbering it) leaves it: the new state with its pending marker. Answers the
    time of the marker, as stored (to the millisecond)."""
    now = utcnow()
    since = now.replace(microsecond=now.microsecond // 1000 * 1000)
    version = _cql(
        store, "SELECT version FROM {keyspace}.messages WHERE id = %s", [message.id]
    ).one()[0]
    applied = _cql(
        store,
        "UPDATE {keyspace}.messages SET status = 'DELIVERED', delivered_at = %s, version = %s,"
        " pending_event = %s, pending_at = %s, pending_floor = 1, pending_since = %s"
        " WHERE id = %s IF version = %s",
        [at(2000), version + 1, event_id, at(2000), since, message.id, version],
    )
    assert applied.was_applied
    return since


async def _claimed_by_dead_worker(
    store: CassandraStore, message: Message, event_id: str, seq: int
) -> None:
    """The change row a worker that died after numbering its change left behind."""
    frame = status_frame(
        conversation_id=message.conversation_id,
        message_id=message.id,
        status=Status.DELIVERED,
        seq=seq,
        occurred_at=at(2000),
        error=None,
    )
    claimed = _cql(
        store,
        "INSERT INTO {keyspace}.changes (conversation_id, bucket, seq, message_id, event_id, frame)"
        " VALUES (%s, %s, %s, %s, %s, %s) IF NOT EXISTS",
        [message.conversation_id, seq // 4, seq, message.id, event_id, frame],
    )
    assert claimed.was_applied


@pytest.mark.parametrize("numbered", [False, True], ids=["before-numbering", "after-numbering"])
async def test_the_redelivered_event_completes_a_change_its_dead_worker_left(
    store: CassandraStore, numbered: bool
) -> None:
    message = await new_message(store)
    await store.apply_status(status_event(message, Status.SENT, at(1000)))
    event = status_event(message, Status.DELIVERED, at(2000), event_id=new_id("evt"))
    await _crash_after_begin(store, message, event.event_id)
    if numbered:
        await _claimed_by_dead_worker(store, message, event.event_id, 2)
    redelivered = await store.apply_status(event)
    assert redelivered.effect is Effect.NOOP
    assert seqs(redelivered.frames) == [2]
    assert decoded(redelivered.frames)[0]["status"] == "DELIVERED"
    changes = await store.changes_since(message.conversation_id, 0, 100)
    assert (seqs(changes.frames), changes.last_seq) == ([1, 2], 2)
    stored = await current(store, message)
    assert (stored.status, stored.seq) == (Status.DELIVERED, 2)


@pytest.mark.parametrize("numbered", [False, True], ids=["before-numbering", "after-numbering"])
async def test_a_change_completed_for_its_dead_worker_queues_its_webhook_deliveries_once(
    store: CassandraStore, numbered: bool
) -> None:
    """The deliveries are written with the record that completes a change: the
    redelivered event that completes it queues them, and a replay queues nothing more."""
    message = await new_message(store)
    hook = await store.add_webhook_endpoint(endpoint(message.org_id, "one"), 5)
    assert hook is not None
    await store.apply_status(status_event(message, Status.SENT, at(1000)))
    event = status_event(message, Status.DELIVERED, at(2000), event_id=new_id("evt"))
    await _crash_after_begin(store, message, event.event_id)
    if numbered:
        await _claimed_by_dead_worker(store, message, event.event_id, 2)
    far = utcnow() + timedelta(days=1)
    [first] = await store.due_webhook_deliveries(hook.id, far, 10)
    await store.webhook_delivered(first.id)
    assert await store.due_webhook_deliveries(hook.id, far, 10) == []  # not complete yet
    await store.apply_status(event)
    await store.apply_status(event)  # a replay
    [second] = await store.due_webhook_deliveries(hook.id, far, 10)
    assert (first.seq, second.seq) == (1, 2)
    assert json.loads(second.body)["data"]["status"] == "DELIVERED"
    await store.webhook_delivered(second.id)
    assert await store.due_webhook_deliveries(hook.id, far, 10) == []
    assert await store.oldest_pending_webhook() is None


async def test_another_status_waits_for_a_pending_change_then_completes_it_after_the_lease(
    store: CassandraStore,
) -> None:
    message = await new_message(store)
    await store.apply_status(status_event(message, Status.SENT, at(1000)))
    since = await _crash_after_begin(store, message, new_id("evt"))
    read = await store.apply_status(status_event(message, Status.READ, at(3000)))
    assert utcnow() > since + LEASE  # it waited for the lease of the dead worker
    assert (read.effect, seqs(read.frames)) == (Effect.CHANGED, [3])
    changes = await store.changes_since(message.conversation_id, 0, 100)
    assert [frame["status"] for frame in decoded(changes.frames)] == ["SENT", "DELIVERED", "READ"]
    assert (seqs(changes.frames), changes.last_seq) == ([1, 2, 3], 3)
    assert (await current(store, message)).seq == 3


async def test_a_change_recorded_by_its_writer_is_complete_though_its_marker_is_still_set(
    url: str, store: CassandraStore
) -> None:
    """A change is complete once its seq is recorded under the message: its marker stays
    on the row until the next change, which neither waits for a lease nor takes it over
    (with a lease of an hour, waiting would fail the bound below)."""
    message = await new_message(store)
    await store.apply_status(status_event(message, Status.SENT, at(1000)))
    event_id = new_id("evt")
    await _crash_after_begin(store, message, event_id)
    await _claimed_by_dead_worker(store, message, event_id, 2)
    _cql(
        store,
        "INSERT INTO {keyspace}.message_changes (message_id, event_id, seq, frame)"
        " VALUES (%s, %s, 2, 'recorded')",
        [message.id, event_id],
    )
    patient = CassandraStore(url, bucket_size=4, pending_lease=timedelta(hours=1))
    await patient.open()
    try:
        stored = await current(patient, message)
        assert (stored.status, stored.seq) == (Status.DELIVERED, 2)
        async with asyncio.timeout(SERVE_WAIT_S):
            read = await patient.apply_status(status_event(message, Status.READ, at(3000)))
    finally:
        await patient.close()
    assert (read.effect, seqs(read.frames)) == (Effect.CHANGED, [3])
    assert (await current(store, message)).seq == 3
    # The marker left by a change is cleared by the next one, a fill included.
    row = _cql(
        store, "SELECT pending_event FROM {keyspace}.messages WHERE id = %s", [message.id]
    ).one()
    assert row[0] is not None
    filled = await store.apply_status(status_event(message, Status.DELIVERED, at(1500)))
    assert filled.effect is Effect.FILLED
    row = _cql(
        store, "SELECT pending_event, seq FROM {keyspace}.messages WHERE id = %s", [message.id]
    ).one()
    assert tuple(row) == (None, 3)


@pytest.fixture
def cassandra_server(url: str, tmp_path: Path) -> Iterator[Server]:
    env = {
        "WHATSLIKE_ROLES": "api,router,connector,status-worker,simulator",
        "WHATSLIKE_DATABASE_URL": url,
        "WHATSLIKE_SIM_DELAY_MS": "30",
        **OWN_SECRETS,
    }
    server = start_server(tmp_path, env)  # its output is read all along (no full pipe)
    yield server
    stop_server(server)


async def test_whatslike_serve_on_cassandra_takes_a_message_to_read(
    cassandra_server: Server, url: str
) -> None:
    """Every role in one process with the in-process bus, the store on Cassandra: the
    message goes through the outbox, the connector's send claim and the simulator's
    webhooks to READ, numbered without gaps, and the store's history agrees."""
    frames = await one_message_to_read(cassandra_server, SERVE_WAIT_S)
    store = CassandraStore(url)
    await store.open()
    try:
        history = decoded(await store.message_history(frames[0]["message_id"]))
        message = await store.get_message(frames[0]["message_id"])
    finally:
        await store.close()
    assert [(f["status"], f["seq"]) for f in history] == [(f["status"], f["seq"]) for f in frames]
    assert message is not None and message.send_started_at is not None


async def test_a_status_hand_off_left_by_a_crash_after_the_change_is_completed_by_its_redelivery(
    store: CassandraStore,
) -> None:
    """The outbox entry of a status is completed after the change is stored: a worker that
    died in between leaves it, the relay hands the event on again, and applying it (a
    replay, found by its event id) completes it without a second change."""
    message = await new_message(store)
    await store.handoff(done=[(TOPIC_MESSAGES, message.id)])
    event = status_event(message, Status.SENT, at(1000))
    first = await store.apply_status(event)
    await store.handoff([status_entry(event)])  # what the dead worker left
    assert await store.outbox_size() == 1
    again = await store.apply_status(event)
    assert (again.effect, again.frames) == (Effect.NOOP, first.frames)
    assert await store.outbox_size() == 0


async def test_the_watchdog_drops_an_entry_a_failed_write_left(store: CassandraStore) -> None:
    """A watchdog entry is written before the change it stands for: one whose write then
    failed names a state the message is not in, and the watchdog drops it unseen."""
    message = await new_message(store)
    store_time = utcnow().replace(microsecond=0)
    bucket = store._index_bucket(store_time)
    left_behind: list[tuple[str, list[Any]]] = [
        ("INSERT INTO {keyspace}.stuck_buckets (kind, bucket) VALUES ('sent', %s)", [bucket]),
        (
            "INSERT INTO {keyspace}.stuck_entries (kind, bucket, at, message_id)"
            " VALUES ('sent', %s, %s, %s)",
            [bucket, store_time, message.id],
        ),
    ]
    for statement, params in left_behind:
        _cql(store, statement, params)
    later = utcnow() + timedelta(seconds=5)
    stuck = await store.stuck(later, later, later, 10)
    assert ([m.id for m in stuck.pending], stuck.sent) == ([message.id], ())
    left = _cql(
        store,
        "SELECT count(*) FROM {keyspace}.stuck_entries WHERE kind = 'sent' AND bucket = %s",
        [bucket],
    ).one()[0]
    assert left == 0


async def test_a_send_waits_for_its_message_to_become_readable(store: CassandraStore) -> None:
    """The relay may hand on a send before the logged batch that holds it and its message
    is readable everywhere (a lost node, a batch log replay): the message is waited for,
    not taken as missing and failed."""
    conversation = await store.create_conversation("org_a", "whatsapp", "+1")
    message_id = new_id("msg")
    now = utcnow().replace(microsecond=0)

    async def late() -> None:
        await asyncio.sleep(0.5)
        await asyncio.to_thread(
            _cql,
            store,
            "INSERT INTO {keyspace}.messages (id, conversation_id, org_id, channel, text,"
            " client_message_id, created_at, status, updated_at, version)"
            " VALUES (%s, %s, 'org_a', 'whatsapp', 'hi', '', %s, 'PENDING', %s, 0)",
            [message_id, conversation.id, now, now],
        )

    writer = asyncio.create_task(late())
    claim, claimed = await store.begin_send(message_id)
    await writer
    assert claim is SendClaim.GO
    assert claimed is not None and claimed.id == message_id


class LostAnswer(CassandraStore):
    """The node applies the first send claim, and its answer is lost on the way back (a
    client timeout): what the driver reports then, after the claim is stored."""

    lost = 1

    async def _lwt(self, name: str, *params: Any) -> tuple[bool, dict[str, Any]]:
        answer = await super()._lwt(name, *params)
        if name == "begin_send" and self.lost:
            self.lost -= 1
            raise BackendUnavailable("Cassandra is unavailable: OperationTimedOut")
        return answer


async def test_a_send_claim_whose_answer_was_lost_is_recognized_as_ours(url: str) -> None:
    store = LostAnswer(url)
    await store.open()
    try:
        message = await new_message(store)
        claim, claimed = await store.begin_send(message.id)
        assert store.lost == 0  # the answer was lost
        assert claim is SendClaim.GO  # before: the outage, then UNKNOWN on the retry
        assert claimed is not None and claimed.send_started_at is not None
        # Anyone else's claim now, this call's included, is not ours: never sent twice.
        again, _ = await store.begin_send(message.id)
        assert again is SendClaim.UNKNOWN
        # A released attempt (it certainly did not reach the provider) may go again.
        await store.release_send(message.id)
        assert (await store.begin_send(message.id))[0] is SendClaim.GO
    finally:
        await store.close()


class Proxy:
    """A TCP proxy on loopback in front of the node: stopping it is the node going away
    (every connection cut, new ones refused), starting it again on the same port, the
    node coming back. Cheaper than a second Cassandra to kill."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._server: asyncio.Server | None = None
        self._links: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._link, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._links:
            writer.transport.abort()
        self._links.clear()
        await self._server.wait_closed()

    async def _link(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self._links |= {writer, upstream}
        await asyncio.gather(self._pipe(reader, upstream), self._pipe(upstream_reader, writer))

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65_536):
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.transport.abort()


@pytest.fixture
async def proxy(url: str) -> AsyncIterator[Proxy]:
    proxy = Proxy(CassandraAddress.parse(url).port)
    await proxy.start()
    yield proxy
    with contextlib.suppress(AssertionError):
        await proxy.stop()


async def test_an_unreachable_node_is_a_503_and_the_store_answers_again_within_seconds(
    url: str, proxy: Proxy, tmp_path: Path
) -> None:
    keyspace = CassandraAddress.parse(url).keyspace
    settings = load_settings(
        data_dir=tmp_path,
        retry_after_s=7,
        database_url=f"cassandra://127.0.0.1:{proxy.port}/{keyspace}",
        roles=("api", "router", "connector", "status-worker"),
        jwt_secret="cassandra-outage-test-secret-4f1d9a2c7b",
        **{name.removeprefix("WHATSLIKE_").lower(): value for name, value in OWN_SECRETS.items()},
    )
    runtime = Runtime(settings)
    await runtime.open()
    try:
        async with await client_for(runtime) as client:
            messages = await messages_url(client)
            await proxy.stop()  # the node goes away
            # 8 s of clients trying: long enough for the driver's default back-off to
            # have grown (tries 1, 3, 7, 15 s after the loss); every answer is a 503.
            answers: list[httpx.Response] = []
            away = time.monotonic()
            while time.monotonic() - away < 8:
                answers.append(
                    await client.post(messages, json={"text": "oi", "client_message_id": "c"})
                )
                answers.append(await client.get(messages))
                await asyncio.sleep(0.2)
            assert {a.status_code for a in answers} == {503}  # before: 500
            assert {a.headers["Retry-After"] for a in answers} == {"7"}
            assert {a.json()["error"]["code"] for a in answers} == {"unavailable"}
            await proxy.start()  # it is back
            back = time.monotonic()
            # Before: the driver's next try came about 7 s later (then up to 10 min).
            for _ in range(50):
                if (await client.get("/readyz")).status_code == 200:
                    break
                await asyncio.sleep(0.1)
            answered = time.monotonic() - back
            first = await client.post(messages, json={"text": "oi", "client_message_id": "c"})
            assert first.status_code == 202
            listed = (await client.get(messages)).json()["messages"]
    finally:
        await runtime.deps.store.close()
        await runtime.deps.http.close()
    assert [m["id"] for m in listed] == [first.json()["message_id"]]
    assert answered < 3


def _commitlog_sync(url: str) -> str:
    cluster = _admin_cluster(CassandraAddress.parse(url))
    try:
        row = (
            cluster.connect()
            .execute("SELECT value FROM system_views.settings WHERE name = 'commitlog_sync'")
            .one()
        )
    finally:
        cluster.shutdown()
    return str(row.value)


async def test_a_node_that_acknowledges_before_its_disk_is_named_at_open(
    url: str, caplog: pytest.LogCaptureFixture
) -> None:
    store = CassandraStore(url)
    with caplog.at_level(logging.WARNING, logger="whatslike.store.cassandra"):
        await store.open()
    await store.close()
    warned = any("commitlog_sync: periodic" in r.getMessage() for r in caplog.records)
    assert warned == (await asyncio.to_thread(_commitlog_sync, url) == "periodic")


async def test_the_node_make_test_starts_syncs_its_commit_log_before_it_answers(
    url: str,
) -> None:
    """scripts/services/cassandra.sh: batch. (A node it started before this rule runs
    `periodic`: the script restarts it at its next run.)"""
    assert await asyncio.to_thread(_commitlog_sync, url) == "batch"


def test_the_compose_cassandra_syncs_its_commit_log_before_it_answers() -> None:
    compose = Path(__file__).parents[2] / "deploy" / "docker-compose.cassandra.yml"
    cassandra = yaml.safe_load(compose.read_text())["services"]["cassandra"]
    script = cassandra["entrypoint"][2]
    assert "s/^commitlog_sync: .*/commitlog_sync: batch/" in script
    assert "/^commitlog_sync_period:/d" in script
    assert script.endswith('exec docker-entrypoint.sh "$$@"')
    assert cassandra["command"] == ["cassandra", "-f"]
