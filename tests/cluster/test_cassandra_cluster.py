"""Fault tests on the three-node Cassandra cluster (`make test-cluster`, which starts it
with `scripts/services.sh cassandra-cluster`; `make test` runs it last): the store with
replication factor 3, QUORUM writes and SERIAL lightweight transactions loses a node
under load and nothing else."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from tests.e2e.conftest import OWN_SECRETS, Server, api, start_server, stop_server
from tests.store.test_contract import seqs
from whatslike.store.cassandra import CassandraStore

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(1500)]

#: Written by scripts/services/cassandra-cluster.sh (.services/cassandra-cluster.env).
CLUSTER_URL = os.environ.get("WHATSLIKE_TEST_CASSANDRA_CLUSTER_URL", "")
CLUSTER_DIR = os.environ.get("WHATSLIKE_TEST_CASSANDRA_CLUSTER_DIR", "")
ROOT = Path(__file__).resolve().parents[2]

MESSAGES = 200
PER_SECOND = 8.0
KILL_AFTER_S = 8.0
CONVERSATIONS = 8
#: The simulator's sends are counted only for this token (they name every recipient).
SIM_CONTROL_TOKEN = secrets.token_hex(16)
#: The node killed: not the seed, one of the three contact points.
VICTIM = 2
#: After the load, how long the statuses may take to settle in all, and how long they may
#: stand still before the test looks (a fixed 180 s flaked on a loaded machine).
QUIESCE_S = 600.0
SETTLE_S = 60.0


@pytest.fixture
async def cluster_url() -> AsyncIterator[str]:
    if not CLUSTER_URL or not CLUSTER_DIR:
        pytest.fail(
            "WHATSLIKE_TEST_CASSANDRA_CLUSTER_URL is not set: run"
            " scripts/services.sh cassandra-cluster (make test-cluster does)",
            pytrace=False,
        )
    keyspace = f"whatslike_c_{uuid.uuid4().hex[:16]}"
    url = urlsplit(CLUSTER_URL)._replace(path=f"/{keyspace}").geturl()
    # The keyspace and its tables first (with three replicas that takes longer than a
    # server is given to start).
    store = CassandraStore(url)
    await store.open()
    await store.close()
    yield url
    # Whatever the test did, the cluster is whole again for the next one.
    await asyncio.to_thread(
        subprocess.run,
        [str(ROOT / "scripts" / "services" / "cassandra-cluster.sh")],
        check=True,
        timeout=600,
        capture_output=True,
    )


@pytest.fixture
def server(cluster_url: str, tmp_path: Path) -> Iterator[Server]:
    env = {
        "WHATSLIKE_ROLES": "api,router,connector,status-worker,simulator",
        "WHATSLIKE_DATABASE_URL": cluster_url,
        "WHATSLIKE_SIM_DELAY_MS": "30",
        "WHATSLIKE_SIM_CONTROL_TOKEN": SIM_CONTROL_TOKEN,
        **OWN_SECRETS,
    }
    started = start_server(tmp_path, env)
    yield started
    stop_server(started)


def kill_node(number: int) -> int:
    pid = int((Path(CLUSTER_DIR) / f"node{number}" / "cassandra.pid").read_text())
    os.kill(pid, signal.SIGKILL)
    return pid


class Load:
    """Messages at `PER_SECOND`, each repeated (same client_message_id) after a 503 or no
    answer until it gets its 202; every answer counted."""

    def __init__(self, client: httpx.AsyncClient, conversations: list[str]) -> None:
        self.client = client
        self.conversations = conversations
        self.answers: Counter[int] = Counter()  # 0: no answer in time
        self.acked: dict[str, tuple[str, str]] = {}  # client id -> (conversation, message)

    async def send(self, i: int) -> None:
        conversation = self.conversations[i % CONVERSATIONS]
        for _ in range(120):
            try:
                answer = await self.client.post(
                    f"/api/conversations/{conversation}/messages",
                    json={"text": f"m{i}", "client_message_id": f"m-{i}"},
                )
            except httpx.TimeoutException:
                self.answers[0] += 1
                await asyncio.sleep(0.5)
                continue
            self.answers[answer.status_code] += 1
            if answer.status_code == 202:
                self.acked[f"m-{i}"] = (conversation, answer.json()["message_id"])
                return
            if answer.status_code != 503:
                return  # counted: must not happen
            await asyncio.sleep(0.5)

    async def run(self, during: float, fault: Callable[[], object]) -> None:
        """All the messages; `fault` once, `during` seconds in."""
        started = time.monotonic()
        sends = []
        done = False
        for i in range(MESSAGES):
            await asyncio.sleep(max(0.0, started + i / PER_SECOND - time.monotonic()))
            if not done and time.monotonic() - started >= during:
                fault()
                done = True
            sends.append(asyncio.create_task(self.send(i)))
        await asyncio.gather(*sends)
        assert done

    async def statuses(self) -> dict[str, str]:
        """Every message's status, once every acknowledged one is READ, or once nothing
        moved for `SETTLE_S` (a loaded machine catches up slowly but keeps moving), or
        after `QUIESCE_S` in all."""
        statuses: dict[str, str] = {}
        began = last_change = time.monotonic()
        while time.monotonic() - began < QUIESCE_S:
            seen, statuses = statuses, {}
            for conversation in self.conversations:
                listed = await self.client.get(f"/api/conversations/{conversation}/messages")
                self.answers[listed.status_code] += 1
                if listed.status_code == 200:
                    statuses |= {m["id"]: m["status"] for m in listed.json()["messages"]}
            if all(statuses.get(m) == "READ" for _, m in self.acked.values()):
                break
            if statuses != seen:
                last_change = time.monotonic()
            elif time.monotonic() - last_change >= SETTLE_S:
                break
            await asyncio.sleep(1)
        return statuses


async def test_a_node_killed_under_load_loses_nothing_acknowledged_and_never_answers_500(
    server: Server, cluster_url: str
) -> None:
    async with api(server, server.token("acme")) as client:
        conversations = []
        for n in range(CONVERSATIONS):
            created = await client.post(
                "/api/conversations", json={"channel": "whatsapp", "contact": f"55119{n:08d}"}
            )
            assert created.status_code == 201, created.text
            conversations.append(created.json()["id"])
        load = Load(client, conversations)
        await load.run(KILL_AFTER_S, lambda: kill_node(VICTIM))
        statuses = await load.statuses()
        guard = {"Authorization": f"Bearer {SIM_CONTROL_TOKEN}"}
        counted = await client.get("/simulator/sends", headers=guard)
        assert counted.status_code == 200, counted.text
        sends = counted.json()

    print(f"answers: {dict(load.answers)}")  # 0: none in time (counted, then retried)
    assert 500 not in load.answers and set(load.answers) <= {200, 202, 503, 0}, load.answers
    assert len(load.acked) == MESSAGES
    acked = [message for _, message in load.acked.values()]
    assert {m: statuses.get(m) for m in acked} == dict.fromkeys(acked, "READ")
    assert len(statuses) == MESSAGES  # nothing created twice
    assert (sends["sends"], sends["duplicates"]) == (MESSAGES, {}), sends  # none sent twice
    # Every conversation's seqs: 1, 2, … with none given twice (a change per status).
    store = CassandraStore(cluster_url)
    await store.open()
    try:
        for conversation in conversations:
            changes = await store.changes_since(conversation, 0, 10_000)
            assert seqs(changes.frames) == list(range(1, changes.last_seq + 1)), conversation
    finally:
        await store.close()
