"""Every role its own `whatslike serve` process: 2 api processes (hub + HTTP), 2 status
workers, a router, a connector and a simulator, on Kafka + Redis + a shared database;
a load of messages from two organizations through both api processes; WebSocket clients
of both organizations on both hubs; and the durability oracle over what they saw.

Used by tests/scale and by bench/scale.py (the measurements of bench/README.md)."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from websockets.asyncio.client import ClientConnection, connect

from tests.e2e.conftest import OWN_SECRETS, Server, free_port, start_server, stop_server
from whatslike.auth import TokenService

TERMINAL = ("READ", "FAILED")
RANK = {"PENDING": 0, "SENT": 1, "DELIVERED": 2, "READ": 3, "FAILED": 3}
#: Seconds a whole load may take to reach READ/FAILED once sent (faults included).
SETTLE_S = 90.0
REQUEST_TIMEOUT_S = 10.0
ORGS = ("org-scale-a", "org-scale-b")
#: Seconds between a socket's pings (the hub closes a client silent for 3 heartbeats).
PING_INTERVAL_S = 10.0

#: (process name, roles) of the multi-process deployment, the simulator apart.
PROCESSES = (
    ("api-1", "api"),
    ("api-2", "api"),
    ("worker-1", "status-worker"),
    ("worker-2", "status-worker"),
    ("router", "router"),
    ("connector", "connector"),
)


@dataclass
class Cluster:
    """The running processes, by name, and what they were started with."""

    servers: dict[str, Server]
    jwt_secret: str
    started_in_s: float
    #: How each process was started (its data directory, environment and port), to
    #: start it again.
    plans: dict[str, tuple[Path, dict[str, str], int]] = field(default_factory=dict)
    #: Processes replaced by a restart: their logs are still checked at the end.
    retired: list[Server] = field(default_factory=list)

    @property
    def hubs(self) -> list[Server]:
        return [self.servers["api-1"], self.servers["api-2"]]

    def token(self, org: str) -> str:
        return TokenService(self.jwt_secret).mint("agent-scale", org, 3600)

    def kill(self, name: str) -> None:
        """kill -9 one process; its log is still checked for secrets at the end."""
        server = self.servers[name]
        server.process.kill()
        server.process.wait(timeout=15)

    def restart(self, name: str) -> float:
        """Start a process again as it was first started (the connector on its own port,
        where the simulator sends webhooks); answer how long its start took. Its start
        must succeed: `start_server` fails if it exits or is not ready in time."""
        data_dir, env, port = self.plans[name]
        began = time.monotonic()
        self.retired.append(self.servers[name])
        self.servers[name] = start_server(data_dir, env, port)
        return time.monotonic() - began


def cluster_env(bus_url: str, fanout_url: str, database_url: str, prefix: str) -> dict[str, str]:
    """What every pipeline process shares: the backends, the JWT secret, Meta's
    credentials; the per-organization request limit is raised so the load measures the
    pipeline, not the limiter."""
    return {
        "WHATSLIKE_BUS_URL": bus_url,
        "WHATSLIKE_FANOUT_URL": fanout_url,
        "WHATSLIKE_DATABASE_URL": database_url,
        "WHATSLIKE_KAFKA_TOPIC_PREFIX": prefix,
        "WHATSLIKE_JWT_SECRET": secrets.token_urlsafe(32),
        "WHATSLIKE_ORG_REQUESTS_PER_S": "2000",
        "WHATSLIKE_ORG_REQUEST_BURST": "2000",
        **OWN_SECRETS,
    }


@contextmanager
def running_cluster(
    workdir: Path,
    env: dict[str, str],
    sim_delay_ms: int = 100,
    processes: tuple[tuple[str, str], ...] = PROCESSES,
) -> Iterator[Cluster]:
    """Start the simulator and every role's process (`processes`) at once (each on its
    own free port with its own data directory, its output read continuously), wait for
    each one's /readyz; stop them all afterwards and check no log line carries a secret."""
    connector_port, simulator_port = free_port(), free_port()
    simulator_env = {
        "WHATSLIKE_ROLES": "simulator",
        "WHATSLIKE_SIM_DELAY_MS": str(sim_delay_ms),
        "WHATSLIKE_SIM_WEBHOOK_URL": f"http://127.0.0.1:{connector_port}",
        **OWN_SECRETS,
    }
    plans: list[tuple[str, dict[str, str], int]] = [("simulator", simulator_env, simulator_port)]
    for name, roles in processes:
        own = {**env, "WHATSLIKE_ROLES": roles}
        if roles == "connector":
            own["WHATSLIKE_GRAPH_URL"] = f"http://127.0.0.1:{simulator_port}/simulator"
        plans.append((name, own, connector_port if roles == "connector" else 0))

    servers: dict[str, Server] = {}
    began = time.monotonic()
    with ThreadPoolExecutor(len(plans)) as pool:
        futures = {
            name: pool.submit(start_server, workdir / name, own, port) for name, own, port in plans
        }
        failures = []
        for name, future in futures.items():
            try:
                servers[name] = future.result()
            except AssertionError as exc:
                failures.append(f"{name}: {exc}")
    cluster = Cluster(
        servers,
        env["WHATSLIKE_JWT_SECRET"],
        time.monotonic() - began,
        {name: (workdir / name, own, port) for name, own, port in plans},
    )
    try:
        assert not failures, "\n".join(failures)
        yield cluster
    finally:
        leaks = []
        retired = [(f"{s.url} (before a restart)", s) for s in cluster.retired]
        for name, server in [*servers.items(), *retired]:
            try:
                stop_server(server)
            except AssertionError as exc:
                leaks.append(f"{name}: {exc}")
        assert not leaks, "\n".join(leaks)


# -- the load ------------------------------------------------------------------------


@dataclass
class Sent:
    org: str
    conversation: str
    client_message_id: str
    message_id: str = ""
    posted_at: float = 0.0
    accepted_at: float = 0.0


@dataclass
class Load:
    """Messages posted to both api processes in turn, retried with the same
    `client_message_id` on a transport error, a 429 or a 503."""

    cluster: Cluster
    conversations: dict[str, list[str]]
    sent: list[Sent] = field(default_factory=list)

    async def run(self, messages: int, rate: float) -> None:
        orgs = list(self.conversations)
        clients = {
            (org, hub.url): httpx.AsyncClient(
                base_url=hub.url,
                headers={"Authorization": f"Bearer {self.cluster.token(org)}"},
                timeout=REQUEST_TIMEOUT_S,
            )
            for org in orgs
            for hub in self.cluster.hubs
        }
        try:
            tasks = []
            start = time.monotonic()
            for n in range(messages):
                await asyncio.sleep(max(0.0, start + n / rate - time.monotonic()))
                org = orgs[n % len(orgs)]
                chosen = self.conversations[org]
                item = Sent(org, chosen[(n // len(orgs)) % len(chosen)], uuid.uuid4().hex)
                self.sent.append(item)
                hubs = self.cluster.hubs
                first = clients[(org, hubs[(n // len(orgs)) % 2].url)]
                other = clients[(org, hubs[(n // len(orgs) + 1) % 2].url)]
                tasks.append(asyncio.create_task(self._post(item, first, other)))
            await asyncio.gather(*tasks)
        finally:
            for client in clients.values():
                await client.aclose()

    async def _post(self, item: Sent, first: httpx.AsyncClient, other: httpx.AsyncClient) -> None:
        deadline = time.monotonic() + SETTLE_S
        item.posted_at = time.monotonic()
        attempt = 0
        last = ""
        while time.monotonic() < deadline:
            client = first if attempt % 2 == 0 else other
            attempt += 1
            try:
                response = await client.post(
                    f"/api/conversations/{item.conversation}/messages",
                    json={"text": "scale", "client_message_id": item.client_message_id},
                )
            except httpx.TransportError as exc:
                last = repr(exc)
            else:
                if response.status_code in (200, 202):
                    item.message_id = response.json()["message_id"]
                    item.accepted_at = time.monotonic()
                    return
                last = f"{response.status_code} {response.text[:200]}"
                assert response.status_code in (429, 503), last
            await asyncio.sleep(0.2)
        raise AssertionError(f"message never accepted: {last}")


async def create_conversations(cluster: Cluster, per_org: int) -> dict[str, list[str]]:
    made: dict[str, list[str]] = {}
    for org in ORGS:
        headers = {"Authorization": f"Bearer {cluster.token(org)}"}
        async with httpx.AsyncClient(
            base_url=cluster.hubs[0].url, headers=headers, timeout=REQUEST_TIMEOUT_S
        ) as client:
            made[org] = []
            for n in range(per_org):
                response = await client.post(
                    "/api/conversations",
                    json={"channel": "whatsapp", "contact": f"55119888{n:05d}"},
                )
                assert response.status_code == 201, response.text
                made[org].append(response.json()["id"])
    return made


# -- the clients ---------------------------------------------------------------------


@dataclass
class Watcher:
    """One agent's WebSocket on one hub, subscribed (since 0) to its organization's
    conversations. Keeps every status frame in arrival order, with its arrival time."""

    hub: Server
    org: str
    conversations: list[str]
    token: str
    frames: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    arrived: dict[tuple[str, str], float] = field(default_factory=dict)
    foreign: list[dict[str, Any]] = field(default_factory=list)
    task: asyncio.Task[None] | None = None
    connection: ClientConnection | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def start(self) -> None:
        url = self.hub.ws_url + f"?access_token={self.token}"
        self.connection = await connect(url, open_timeout=REQUEST_TIMEOUT_S)
        hello = json.loads(await asyncio.wait_for(self.connection.recv(), REQUEST_TIMEOUT_S))
        assert hello["type"] == "connected", hello
        for conversation in self.conversations:
            self.frames[conversation] = []
            await self.connection.send(
                json.dumps({"type": "subscribe", "conversation_id": conversation, "since": 0})
            )
        subscribed = 0
        while subscribed < len(self.conversations):
            frame = json.loads(await asyncio.wait_for(self.connection.recv(), REQUEST_TIMEOUT_S))
            self._take(frame)
            subscribed += frame.get("type") == "subscribed"
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.connection is not None
        pinging = asyncio.create_task(self._ping(self.connection))
        try:
            async for raw in self.connection:
                self._take(json.loads(raw))
        finally:
            pinging.cancel()

    @staticmethod
    async def _ping(connection: ClientConnection) -> None:
        """The protocol's ping now and then: the hub closes a silent client as idle."""
        while True:
            await asyncio.sleep(PING_INTERVAL_S)
            await connection.send(json.dumps({"type": "ping", "ts": int(time.time())}))

    def _take(self, frame: dict[str, Any]) -> None:
        for one in frame["frames"] if frame["type"] == "batch" else [frame]:
            if one["type"] != "status":
                assert one["type"] in ("subscribed", "pong"), one
                continue
            if one["conversation_id"] not in self.frames:
                self.foreign.append(one)
                continue
            self.frames[one["conversation_id"]].append(one)
            self.arrived.setdefault((one["message_id"], one["status"]), time.monotonic())
        self.changed.set()

    def terminal(self) -> set[str]:
        return {
            frame["message_id"]
            for frames in self.frames.values()
            for frame in frames
            if frame["status"] in TERMINAL
        }

    def healthy(self) -> str:
        """Empty while the reader runs, else why it ended."""
        if self.task is not None and self.task.done():
            closed = self.connection.close_code if self.connection is not None else None
            reason = self.connection.close_reason if self.connection is not None else ""
            return (
                f"the socket on {self.hub.url} ended: {self.task.exception()!r}, "
                f"close code {closed} {reason!r}"
            )
        return ""

    async def close(self) -> None:
        if self.connection is not None:
            await self.connection.close()
        if self.task is not None:
            await asyncio.gather(self.task, return_exceptions=True)


async def open_watchers(cluster: Cluster, conversations: dict[str, list[str]]) -> list[Watcher]:
    """Per organization one agent on each hub."""
    watchers = [
        Watcher(hub, org, chosen, cluster.token(org))
        for org, chosen in conversations.items()
        for hub in cluster.hubs
    ]
    for watcher in watchers:
        await watcher.start()
    return watchers


async def until(
    condition: Callable[[], bool], what: Callable[[], str], timeout_s: float = SETTLE_S
) -> None:
    """Poll `condition` until it holds, failing with `what()` at the deadline."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s} s: {what()}")
        await asyncio.sleep(0.05)


async def settle(load: Load, watchers: list[Watcher]) -> None:
    """Wait until every accepted message is READ or FAILED on every watcher of its org."""

    def missing() -> dict[str, int]:
        gaps = {}
        for watcher in watchers:
            wanted = {s.message_id for s in load.sent if s.org == watcher.org}
            short = len(wanted - watcher.terminal())
            if short:
                gaps[f"{watcher.org}@{watcher.hub.url}"] = short
        return gaps

    def broken() -> str:
        return "; ".join(filter(None, (w.healthy() for w in watchers)))

    await until(
        lambda: not missing() or bool(broken()),
        lambda: f"messages not READ/FAILED per socket: {missing()}",
    )
    assert not broken(), broken()


# -- the oracle ----------------------------------------------------------------------


@dataclass
class Verdict:
    statuses: int
    #: How many messages ended in each status.
    finals: Counter[str]
    repeated: int
    sends: dict[str, Any]
    #: Messages that ended FAILED `send_outcome_unknown`.
    unknown: int = 0


async def oracle(
    cluster: Cluster,
    load: Load,
    watchers: list[Watcher],
    *,
    exact: bool,
    unknown_outcomes: bool = False,
) -> Verdict:
    """Every 202 reached READ/FAILED; each conversation's seqs are 1..N without a gap;
    each socket saw, in seq order, exactly the frames of /changes (a repeated seq is
    dropped as a client does, and refused when `exact`); no socket saw a frame of a
    conversation it did not subscribe to; no status went backwards; the simulator
    was sent no message twice, and every message once — except, with
    `unknown_outcomes` (a connector killed mid-send), messages that ended FAILED
    `send_outcome_unknown`, which may never have reached it."""
    changes: dict[str, list[dict[str, Any]]] = {}
    for org, chosen in load.conversations.items():
        headers = {"Authorization": f"Bearer {cluster.token(org)}"}
        async with httpx.AsyncClient(
            base_url=cluster.hubs[1].url, headers=headers, timeout=REQUEST_TIMEOUT_S
        ) as client:
            for conversation in chosen:
                response = await client.get(f"/api/conversations/{conversation}/changes")
                assert response.status_code == 200, response.text
                body = response.json()
                assert body["complete"], body
                changes[conversation] = body["frames"]

    statuses = 0
    for conversation, frames in changes.items():
        seqs = [frame["seq"] for frame in frames]
        assert seqs == list(range(1, len(seqs) + 1)), f"{conversation}: seqs {seqs}"
        statuses += len(frames)
        reached: dict[str, int] = {}
        for frame in frames:
            rank = RANK[frame["status"]]
            assert rank > reached.get(frame["message_id"], 0), f"regression: {frame}"
            reached[frame["message_id"]] = rank

    last = {frame["message_id"]: frame for frames in changes.values() for frame in frames}
    final = {message_id: frame["status"] for message_id, frame in last.items()}
    unknown = sum(
        1
        for item in load.sent
        if (last.get(item.message_id, {}).get("error") or {}).get("code") == "send_outcome_unknown"
    )
    for item in load.sent:
        assert final.get(item.message_id) in TERMINAL, f"lost: {item}, {final.get(item.message_id)}"

    repeated = 0
    for watcher in watchers:
        assert not watcher.foreign, f"{watcher.org} saw another tenant: {watcher.foreign[:3]}"
        for conversation in watcher.conversations:
            kept: list[dict[str, Any]] = []
            for frame in watcher.frames[conversation]:
                if kept and frame["seq"] <= kept[-1]["seq"]:
                    repeated += 1
                    continue
                kept.append(frame)
            stored = changes[conversation]
            assert kept == stored, (
                f"{watcher.org} on {watcher.hub.url}, {conversation}: socket seqs "
                f"{[f['seq'] for f in kept]} != /changes {[f['seq'] for f in stored]}"
            )
    if exact:
        assert repeated == 0, f"{repeated} seqs delivered twice"

    async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S) as client:
        response = await client.get(cluster.servers["simulator"].url + "/simulator/sends")
    assert response.status_code == 200, response.text
    sends: dict[str, Any] = response.json()
    assert not sends["duplicates"], f"sent twice: {sends['duplicates']}"
    unsent = len(load.sent) - sends["keys"]
    assert unsent == 0 or (unknown_outcomes and 0 < unsent <= unknown), (sends, unknown)
    finals = Counter(final[s.message_id] for s in load.sent)
    return Verdict(statuses, finals, repeated, sends, unknown)


def latencies(load: Load, watchers: list[Watcher]) -> list[float]:
    """POST → READ frame, per message and socket of its org, in seconds, sorted."""
    found = []
    for watcher in watchers:
        for item in load.sent:
            at = watcher.arrived.get((item.message_id, "READ"))
            if at is not None:
                found.append(at - item.posted_at)
    return sorted(found)


def percentile(values: list[float], fraction: float) -> float:
    return values[min(len(values) - 1, int(fraction * len(values)))]
