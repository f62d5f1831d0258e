"""Chaos harness: nothing acknowledged is ever lost (issue 6).

Runs the simulator and the pipeline as two real `whatslike serve` processes, sends
messages from a client that retries with the same `client_message_id`, follows every
conversation over a WebSocket that resubscribes with `since`, and meanwhile `kill -9`s
the pipeline and the simulator (and, on PostgreSQL, cuts the database through a TCP proxy
run here) at moments drawn from a seeded RNG. After quiescence an oracle checks that every
message answered 202 reached READ or FAILED, that nothing was sent twice to the provider,
that every conversation's seqs are 1..N without a gap, that the WebSocket saw exactly the
stored changes, that no request was answered 500, and that every customer's reply (made
by the simulator during the faults, `--replies`) whose webhook was answered 200 is stored
once.

    python -m bench.chaos --kills 20 --database postgres --seed 7 --messages 500

`--layout scaled` runs the pipeline as four processes instead (api, router, connector,
status worker) on Kafka, Redis and PostgreSQL or Cassandra, kept running by a supervisor
(the harness starts again a role that exits, and counts it), and can fault the servers
themselves: `kill -9` of a Cassandra node or of the Kafka broker that leads a partition,
started again `--node-down-s` later with the command line it ran with, or SIGSTOP of a
node for as long. `--cluster` takes the three-node Cassandra cluster and the three Kafka
brokers of `scripts/services.sh cassandra-cluster kafka-cluster`:

    python -m bench.chaos --layout scaled --database cassandra --cluster --kills 0 \
        --leader-kills 1 --messages 500 --rate 20

The same seed replays the same fault schedule and the same load (the moments at which
processes die relative to the work in flight still vary with the machine's timing).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import asyncpg
import httpx
from aiokafka.admin import AIOKafkaAdminClient
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from whatslike.auth import TokenService
from whatslike.errors import BackendUnavailable
from whatslike.events import TOPIC_MESSAGES
from whatslike.store.cassandra import CassandraStore

Database = Literal["sqlite", "postgres", "cassandra"]
Layout = Literal["single", "scaled"]
FaultKind = Literal[
    "kill-pipeline",
    "stop-pipeline",
    "kill-simulator",
    "cut-database",
    "kill-store-node",
    "stop-store-node",
    "kill-bus-leader",
]
Output = Callable[[str], None]

PIPELINE_ROLES = "api,router,connector,status-worker"
#: The scaled layout's processes, one role each (the first serves the API).
SCALED_ROLES = ("api", "router", "connector", "status-worker")
#: Faults of the servers (not of our processes): one at a time, `node_down_s` each.
NODE_FAULTS: tuple[FaultKind, ...] = ("kill-store-node", "stop-store-node", "kill-bus-leader")
TERMINAL = ("READ", "FAILED")
RANK = {"PENDING": 0, "SENT": 1, "DELIVERED": 2, "READ": 3}
#: Seconds between two process kills at least, so each restart finishes before the next.
MIN_FAULT_SPACING_S = 2.5
START_DEADLINE_S = 60.0
#: How long a new keyspace's tables may take to be made (a busy three-node cluster).
KEYSPACE_SETUP_S = 120.0
REQUEST_TIMEOUT_S = 5.0
EXAMPLES = 5
ORG = "chaos-org"


#: The pipeline's watchdog, fast enough for a run of minutes (ignored by a pipeline without
#: one): a PENDING message with no send under way is handed off again after 5 s, and a send
#: whose outcome is unknown (a kill between the provider call and its answer) that no
#: webhook settled becomes FAILED `send_outcome_unknown` after 15 s.
WATCHDOG_ENV = {
    "WHATSLIKE_WATCHDOG_INTERVAL_S": "1",
    "WHATSLIKE_STUCK_PENDING_S": "5",
    "WHATSLIKE_SEND_UNKNOWN_FAIL_S": "15",
}


class ChaosSetupError(Exception):
    """The harness could not set up what it runs (a server missing, a process that never
    starts); the message says what."""


@dataclass(frozen=True)
class ChaosConfig:
    seed: int
    database: Database = "sqlite"
    messages: int = 500
    #: Customers' replies, made by the simulator (`POST /simulator/reply`) during the load.
    replies: int = 50
    conversations: int = 20
    #: Messages per second; default: spread the messages over the fault window.
    rate: float | None = None
    pipeline_kills: int = 5
    #: Graceful stops (SIGTERM) of the pipeline under load, restarted at once.
    pipeline_stops: int = 1
    simulator_kills: int = 2
    #: Database outages (PostgreSQL only; SQLite is a file inside the pipeline).
    database_cuts: int = 1
    cut_s: float = 10.0
    sim_delay_ms: int = 300
    sim_failure_rate: float = 0.05
    #: Scales the simulator's webhook retry back-off (WHATSLIKE_SIM_TIME_SCALE).
    sim_time_scale: float = 0.05
    #: How long one message may take to get its 202 (retrying) before it is given up.
    send_deadline_s: float = 60.0
    #: Quiescence: at most this long, and over once nothing changed for `settle_s`.
    quiesce_s: float = 90.0
    settle_s: float = 30.0
    #: Admin URL of the PostgreSQL server (a fresh database is created on it per run).
    postgres_url: str = ""
    #: Where processes keep their data and logs; default: a temporary directory.
    workdir: Path | None = None
    #: WHATSLIKE_* settings of the pipeline.
    pipeline_env: dict[str, str] = field(default_factory=lambda: dict(WATCHDOG_ENV))
    #: One `whatslike serve` with every role, or one process per role (SCALED_ROLES) on
    #: `bus_url` and `fanout_url`.
    layout: Layout = "single"
    bus_url: str = ""
    fanout_url: str = ""
    #: Replicas of the run's Kafka topics (the pipeline creates them).
    kafka_replication: int = 1
    #: Cassandra's URL (a fresh keyspace is made on it per run).
    cassandra_url: str = ""
    #: Pid files of the store's nodes (Cassandra) and of the brokers by node id: the
    #: servers the node faults act on.
    store_nodes: tuple[Path, ...] = ()
    bus_nodes: dict[int, Path] = field(default_factory=dict)
    store_node_kills: int = 0
    store_node_stops: int = 0
    bus_leader_kills: int = 0
    #: How long a node killed stays down before it is started again, or a node stopped
    #: (SIGSTOP) stays stopped.
    node_down_s: float = 10.0


@dataclass(frozen=True)
class Fault:
    at: float
    kind: FaultKind


def plan_faults(config: ChaosConfig) -> tuple[float, float, list[Fault]]:
    """The fault window (s), the load rate (msg/s) and the faults, all from the seed.
    No process is killed shortly before or during the first half of a database cut, so
    the pipeline is up and answering while its store is unreachable (a kill in the second
    half then checks a start against a missing database)."""
    rng = random.Random(f"faults-{config.seed}")
    kills: list[FaultKind] = ["kill-pipeline"] * config.pipeline_kills
    kills += ["stop-pipeline"] * config.pipeline_stops
    kills += ["kill-simulator"] * config.simulator_kills
    rng.shuffle(kills)
    cuts = config.database_cuts if config.database == "postgres" else 0
    node_faults = config.store_node_kills + config.store_node_stops + config.bus_leader_kills
    needed = max(
        MIN_FAULT_SPACING_S * len(kills) + config.cut_s * cuts + 2,
        # Node faults one after the other within the first two thirds of the window.
        (config.node_down_s + MIN_FAULT_SPACING_S) * node_faults * 1.5,
    )
    window = max(needed, config.messages / config.rate if config.rate else 0.0)
    rate = config.rate or config.messages / window
    cut_starts: list[float] = []
    if cuts:
        width = (window - config.cut_s) / cuts
        cut_starts = [round(n * width + rng.uniform(0.15, 0.6) * width, 2) for n in range(cuts)]
    quiet = MIN_FAULT_SPACING_S + config.cut_s / 2  # from this long before a cut starts

    def skip_quiet(at: float) -> float:
        for start in cut_starts:
            if at >= start - MIN_FAULT_SPACING_S:
                at += quiet
        return round(at, 2)

    faults = [Fault(at, "cut-database") for at in cut_starts]
    if kills:
        width = (window - quiet * cuts) / len(kills)
        faults += [
            Fault(skip_quiet(n * width + rng.uniform(0.25, 0.75) * width), kind)
            for n, kind in enumerate(kills)
        ]
    faults += plan_node_faults(config, window)
    return window, rate, sorted(faults, key=lambda fault: fault.at)


def plan_node_faults(config: ChaosConfig, window: float) -> list[Fault]:
    """The faults of the servers, from a seed of their own (the rest of the plan stays as
    it was without them): spread over the window's first two thirds, one at a time, so
    each is over (the node back) while messages still flow."""
    kinds: list[FaultKind] = ["kill-store-node"] * config.store_node_kills
    kinds += ["stop-store-node"] * config.store_node_stops
    kinds += ["kill-bus-leader"] * config.bus_leader_kills
    if not kinds:
        return []
    rng = random.Random(f"node-faults-{config.seed}")
    rng.shuffle(kinds)
    width = window * 2 / 3 / len(kinds)
    return [
        Fault(round(n * width + rng.uniform(0.2, 0.5) * width, 2), kind)
        for n, kind in enumerate(kinds)
    ]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# -- processes ------------------------------------------------------------------------


class Service:
    """One `whatslike serve` subprocess that can be killed and started again on the same
    port and data directory; its output goes to a log file (never to an undrained pipe)."""

    def __init__(self, name: str, roles: str, data_dir: Path, env: dict[str, str]) -> None:
        self.name = name
        self.roles = roles
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.data_dir = data_dir
        self.env = env
        self.log_path = data_dir.parent / f"{name}.log"
        self.process: asyncio.subprocess.Process | None = None
        self.starts = 0
        self.failed_starts = 0
        #: Exits nobody asked for (the supervisor started it again).
        self.exits = 0
        #: A fault or the supervisor is stopping or starting it.
        self.busy = False

    def _open_log(self) -> int:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        return os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    async def start(self) -> float:
        """Start it and wait until it serves `/healthz`; retried while it exits early (a
        pipeline cannot open its store while the database is cut). Seconds it took."""
        began = time.monotonic()
        async with httpx.AsyncClient(timeout=1) as client:
            while time.monotonic() - began < START_DEADLINE_S:
                log = self._open_log()
                try:
                    self.process = await asyncio.create_subprocess_exec(
                        sys.executable,
                        *("-m", "whatslike", "serve", "--roles", self.roles),
                        *("--port", str(self.port), "--data-dir", str(self.data_dir)),
                        *("--log-level", "warning"),
                        stdin=asyncio.subprocess.DEVNULL,
                        stdout=log,
                        stderr=asyncio.subprocess.STDOUT,
                        env={**os.environ, **self.env},
                    )
                finally:
                    os.close(log)
                if await self._healthy(client, self.process):
                    self.starts += 1
                    return time.monotonic() - began
                self.failed_starts += 1
                await asyncio.sleep(0.5)
        raise ChaosSetupError(
            f"{self.name} did not start within {START_DEADLINE_S:.0f} s; see {self.log_path}"
        )

    async def _healthy(
        self, client: httpx.AsyncClient, process: asyncio.subprocess.Process
    ) -> bool:
        while process.returncode is None:
            with contextlib.suppress(httpx.TransportError):
                if (await client.get(self.url + "/healthz")).status_code == 200:
                    return True
            await asyncio.sleep(0.1)
        return False

    async def kill(self) -> int:
        """`kill -9`; the pid it killed."""
        assert self.process is not None
        pid = self.process.pid
        with contextlib.suppress(ProcessLookupError):
            self.process.kill()
        await self.process.wait()
        return pid

    async def stop(self) -> int:
        """SIGTERM, and `kill -9` if it has not exited after 20 s; the pid it stopped."""
        if self.process is None or self.process.returncode is not None:
            return 0
        self.process.terminate()
        try:
            await asyncio.wait_for(self.process.wait(), 20)
        except TimeoutError:
            await self.kill()
        return self.process.pid

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""


class DatabaseProxy:
    """A TCP proxy in front of PostgreSQL that can cut it: every proxied connection is
    aborted and new ones are closed at once until the cut is over."""

    def __init__(self, host: str, port: int) -> None:
        self._target = (host, port)
        self._cut = False
        self._open: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None
        self.port = 0
        self.connections = 0
        self.refused = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        self._abort_all()

    async def cut(self, seconds: float) -> None:
        self._cut = True
        self._abort_all()
        await asyncio.sleep(seconds)
        self._cut = False

    def _abort_all(self) -> None:
        for writer in list(self._open):
            writer.transport.abort()
        self._open.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._cut:
            self.refused += 1
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._target)
        except OSError:
            writer.transport.abort()
            return
        self.connections += 1
        self._open |= {writer, up_writer}
        try:
            await asyncio.gather(_pump(reader, up_writer), _pump(up_reader, writer))
        finally:
            for end in (writer, up_writer):
                self._open.discard(end)
                end.transport.abort()


class Node:
    """A server process of the store or the bus (a Cassandra node, a Kafka broker) named
    by its pid file. `kill` is `kill -9`, then, after the down time, the same command line
    started again in the same directory with the same environment (as a supervisor would
    start it), its output appended to `<pid file's directory>/restarts.log`; `pause` is
    SIGSTOP, then SIGCONT."""

    def __init__(self, pid_file: Path) -> None:
        self.pid_file = pid_file
        self.name = pid_file.parent.name

    def pid(self) -> int:
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError) as exc:
            raise ChaosSetupError(f"no running server behind {self.pid_file}: {exc}") from None
        if not Path(f"/proc/{pid}").exists():
            raise ChaosSetupError(f"{self.pid_file} names pid {pid}, which does not run")
        return pid

    async def kill(self, down_s: float) -> tuple[int, int]:
        """The pid killed and the pid started again."""
        pid = self.pid()
        proc = Path(f"/proc/{pid}")
        argv = [arg.decode() for arg in (proc / "cmdline").read_bytes().split(b"\0") if arg]
        environ = dict(
            item.decode().split("=", 1)
            for item in (proc / "environ").read_bytes().split(b"\0")
            if b"=" in item
        )
        cwd = os.readlink(proc / "cwd")
        os.kill(pid, signal.SIGKILL)
        await asyncio.to_thread(_wait_gone, pid)
        await asyncio.sleep(down_s)
        log = os.open(
            self.pid_file.parent / "restarts.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600
        )
        try:
            started = await asyncio.create_subprocess_exec(
                *argv,
                cwd=cwd,
                env=environ,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            os.close(log)
        self.pid_file.write_text(f"{started.pid}\n")
        return pid, started.pid

    async def pause(self, down_s: float) -> int:
        pid = self.pid()
        os.kill(pid, signal.SIGSTOP)
        try:
            await asyncio.sleep(down_s)
        finally:
            os.kill(pid, signal.SIGCONT)
        return pid


def _wait_gone(pid: int) -> None:
    """Until the process no longer runs (a killed one waiting to be reaped does not)."""
    while True:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            return
        time.sleep(0.05)


async def partition_leader(bus_url: str, topic: str) -> int:
    """The node id of the broker that leads partition 0 of `topic`."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bus_url.removeprefix("kafka://").split(","))
    await admin.start()
    try:
        [described] = await admin.describe_topics([topic])
    finally:
        await admin.close()
    for partition in described["partitions"]:
        if partition["partition"] == 0:
            return int(partition["leader"])
    raise ChaosSetupError(f"Kafka describes no partition 0 of {topic}: {described}")


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        writer.transport.abort()


class WebhookTap:
    """Where the simulator posts its webhooks: forwards each to the pipeline and writes
    down what the pipeline answered, so the oracle can check that every status answered
    200 is in the store. It lives in the harness, which is never killed."""

    def __init__(self, target: str) -> None:
        self._target = target
        self._http = httpx.AsyncClient(timeout=15)
        self._server: asyncio.Server | None = None
        self.url = ""
        self.answers: Counter[str] = Counter()
        #: (message id from biz_opaque_callback_data, status) of WhatsApp statuses answered 200.
        self.whatsapp_acked: list[tuple[str, str]] = []
        #: The WhatsApp statuses of every message that were posted at all, answered or not.
        self.whatsapp_posted: dict[str, set[str]] = {}
        self.instagram_reads_acked = 0
        #: Meta's ids of the customers' messages whose webhook was answered 200.
        self.customer_acked: list[str] = []

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        await self._http.aclose()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while request_line := await reader.readline():
                method, path, _ = request_line.decode("latin-1").split(" ", 2)
                headers: dict[str, str] = {}
                while (line := await reader.readline()).strip():
                    name, _, value = line.decode("latin-1").partition(":")
                    headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                code, answer = await self._forward(method, path, headers, body)
                head = (
                    f"HTTP/1.1 {code} {http.HTTPStatus(code).phrase}\r\n"
                    f"Content-Type: application/json\r\nContent-Length: {len(answer)}\r\n\r\n"
                )
                writer.write(head.encode() + answer)
                await writer.drain()
        except (OSError, ValueError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def _forward(
        self, method: str, path: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, bytes]:
        kept = ("content-type", "user-agent", "x-hub-signature-256")
        statuses, reads, customers = _webhook_contents(path, body)
        for message_id, status in statuses:
            self.whatsapp_posted.setdefault(message_id, set()).add(status)
        try:
            response = await self._http.request(
                method,
                self._target + path,
                content=body,
                headers={name: headers[name] for name in kept if name in headers},
            )
        except httpx.HTTPError:
            self.answers["unreachable"] += 1
            return 502, b'{"error":{"code":"unreachable","message":"pipeline down"}}'
        self.answers[str(response.status_code)] += 1
        if response.status_code == 200:
            self.whatsapp_acked += statuses
            self.instagram_reads_acked += reads
            self.customer_acked += customers
        return response.status_code, response.content


def _webhook_contents(path: str, body: bytes) -> tuple[list[tuple[str, str]], int, list[str]]:
    """The (message id, STATUS) pairs of a WhatsApp webhook (the message id is our own,
    echoed in biz_opaque_callback_data), the number of reads in an Instagram one, and
    Meta's ids of the customers' messages in either."""
    statuses: list[tuple[str, str]] = []
    reads = 0
    customers: list[str] = []
    for entry in json.loads(body).get("entry", []):
        if path.endswith("/whatsapp"):
            for change in entry.get("changes", []):
                value = change.get("value", {})
                for item in value.get("statuses", []):
                    message_id = item.get("biz_opaque_callback_data", "")
                    statuses.append((message_id, item["status"].upper()))
                customers += [item["id"] for item in value.get("messages", [])]
        else:
            reads += sum(1 for item in entry.get("messaging", []) if "read" in item)
            customers += [
                item["message"]["mid"] for item in entry.get("messaging", []) if "message" in item
            ]
    return statuses, reads, customers


# -- clients --------------------------------------------------------------------------


class HttpLog:
    """Every answer the harness got from the pipeline's API, by code."""

    def __init__(self) -> None:
        self.codes: Counter[str] = Counter()
        self.examples_500: list[str] = []

    def note(self, what: str, response: httpx.Response | None, error: str = "") -> None:
        if response is None:
            self.codes[error] += 1
            return
        self.codes[str(response.status_code)] += 1
        if response.status_code == 500 and len(self.examples_500) < EXAMPLES:
            example = f"{what} → 500 {response.text[:200]}"
            if example not in self.examples_500:
                self.examples_500.append(example)


@dataclass
class Sent:
    """One message of the load and what became of its POST."""

    index: int
    conversation: str
    channel: str
    client_message_id: str
    text: str
    message_id: str | None = None
    attempts: int = 0
    answers: list[str] = field(default_factory=list)


class Load:
    """Posts the messages at a steady rate; each one is retried with the same
    `client_message_id` on connection errors, timeouts, 429 and 5xx until it gets 202."""

    def __init__(self, api: httpx.AsyncClient, log: HttpLog, deadline_s: float) -> None:
        self._api = api
        self._log = log
        self._deadline_s = deadline_s
        self.sent: list[Sent] = []

    async def run(self, plan: list[Sent], rate: float) -> None:
        began = time.monotonic()
        tasks: list[asyncio.Task[None]] = []
        for n, item in enumerate(plan):
            await asyncio.sleep(max(0.0, began + n / rate - time.monotonic()))
            self.sent.append(item)
            tasks.append(asyncio.create_task(self._send(item)))
        await asyncio.gather(*tasks)

    async def _send(self, item: Sent) -> None:
        began = time.monotonic()
        backoff = 0.1
        path = f"/api/conversations/{item.conversation}/messages"
        body = {"text": item.text, "client_message_id": item.client_message_id}
        while time.monotonic() - began < self._deadline_s:
            item.attempts += 1
            try:
                response = await self._api.post(path, json=body)
            except httpx.TransportError as exc:
                item.answers.append(type(exc).__name__)
                self._log.note("POST message", None, type(exc).__name__)
            else:
                item.answers.append(str(response.status_code))
                self._log.note(f"POST {path} {item.client_message_id}", response)
                if response.status_code == 202:
                    item.message_id = str(response.json()["message_id"])
                    return
                if response.status_code != 429 and response.status_code < 500:
                    return  # a refusal retrying cannot change; reported by the oracle
            await asyncio.sleep(random.uniform(0, backoff))
            backoff = min(2.0, backoff * 2)


class Replies:
    """The customers answer: each reply is asked of the simulator (which stores its
    webhook, then delivers it through the tap) and retried until it answers 202; the
    simulator may be down meanwhile."""

    def __init__(self, simulator: str, token: str, deadline_s: float) -> None:
        self._simulator = simulator
        self._headers = {"Authorization": f"Bearer {token}"}
        self._deadline_s = deadline_s
        #: Meta's ids of the replies the simulator took; how many were never taken.
        self.made: list[str] = []
        self.never = 0

    async def run(self, plan: list[tuple[str, str, str]], rate: float) -> None:
        began = time.monotonic()
        async with httpx.AsyncClient(base_url=self._simulator, timeout=REQUEST_TIMEOUT_S) as sim:
            for n, (channel, contact, text) in enumerate(plan):
                await asyncio.sleep(max(0.0, began + n / rate - time.monotonic()))
                await self._reply(sim, {"channel": channel, "contact": contact, "text": text})

    async def _reply(self, sim: httpx.AsyncClient, body: dict[str, str]) -> None:
        began = time.monotonic()
        while time.monotonic() - began < self._deadline_s:
            try:
                response = await sim.post("/simulator/reply", json=body, headers=self._headers)
            except httpx.TransportError:
                pass
            else:
                if response.status_code == 202:
                    self.made.append(str(response.json()["provider_message_id"]))
                    return
            await asyncio.sleep(random.uniform(0.1, 0.5))
        self.never += 1


class Watcher:
    """One WebSocket subscribed to every conversation; whenever it drops, it reconnects
    and resubscribes with `since` = the last seq it saw in each conversation."""

    def __init__(self, ws_url: str, conversations: list[str]) -> None:
        self._ws_url = ws_url
        self.frames: dict[str, list[dict[str, Any]]] = {c: [] for c in conversations}
        self.duplicates = 0
        self.conflicts: list[str] = []  # a seq seen twice with different contents
        self.not_recovered: list[str] = []
        self.errors: list[str] = []
        self.connects = 0

    def last_seq(self, conversation: str) -> int:
        frames = self.frames[conversation]
        return int(frames[-1]["seq"]) if frames else 0

    async def run(self) -> None:
        backoff = 0.1
        while True:
            try:
                async with connect(self._ws_url, open_timeout=5, close_timeout=1) as ws:
                    self.connects += 1
                    backoff = 0.1
                    await self._follow(ws)
            except InvalidStatus as exc:  # 503 while it stops is fine, a 500 is not
                if exc.response.status_code == 500:
                    self.errors.append(f"websocket upgrade answered 500: {exc}")
            except (OSError, TimeoutError, ConnectionClosed, InvalidHandshake):
                pass  # the pipeline is down or restarting: reconnect
            except Exception as exc:  # anything else is reported, and the client goes on
                self.errors.append(f"websocket client: {exc!r}")
            await asyncio.sleep(random.uniform(0, backoff))
            backoff = min(1.0, backoff * 2)

    async def _follow(self, ws: ClientConnection) -> None:
        hello = json.loads(await ws.recv())
        if hello.get("type") != "connected":
            self.errors.append(f"first frame {hello}")
            return
        for conversation in self.frames:
            since = self.last_seq(conversation)
            frame = {"type": "subscribe", "conversation_id": conversation, "since": since}
            await ws.send(json.dumps(frame))
        pinger = asyncio.create_task(self._ping(ws))
        try:
            async for raw in ws:
                frame = json.loads(raw)
                for one in frame["frames"] if frame.get("type") == "batch" else [frame]:
                    self._take(one)
        finally:
            pinger.cancel()

    async def _ping(self, ws: ClientConnection) -> None:
        while True:
            await asyncio.sleep(10)
            await ws.send(json.dumps({"type": "ping", "ts": int(time.time())}))

    def _take(self, frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        if kind == "subscribed" and not frame.get("recovered", True):
            self.not_recovered.append(frame["conversation_id"])
        elif kind == "error":
            self.errors.append(json.dumps(frame))
        elif kind in ("status", "message"):  # one seq stream
            frames = self.frames[frame["conversation_id"]]
            seq = int(frame["seq"])
            if frames and seq <= int(frames[-1]["seq"]):
                self.duplicates += 1  # allowed: clients drop a repeated seq
                earlier = [f for f in frames if f["seq"] == seq]
                if earlier and earlier[0] != frame:
                    self.conflicts.append(f"seq {seq}: {earlier[0]} then {frame}")
                return
            frames.append(frame)


# -- the run --------------------------------------------------------------------------


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    examples: list[str] = field(default_factory=list)


@dataclass
class ChaosResult:
    seed: int
    database: Database
    checks: list[Check]
    report: str

    @property
    def passed(self) -> bool:
        return all(check.ok for check in self.checks)

    @property
    def failures(self) -> list[Check]:
        return [check for check in self.checks if not check.ok]


@dataclass
class Observed:
    """What the store, the simulator and the logs say once the run is quiet."""

    messages: dict[str, dict[str, Any]]  # message id → the API's message object
    stored: dict[str, list[dict[str, Any]]]  # conversation → its messages
    changes: dict[str, dict[str, Any]]  # conversation → {"last_seq", "frames"}
    sends: dict[str, Any] | None
    sends_problem: str
    pipeline_log: str
    simulator_log: str


@contextlib.asynccontextmanager
async def fresh_database(admin_url: str) -> AsyncIterator[str]:
    """A new, empty database on the PostgreSQL server of `admin_url`, dropped afterwards."""
    name = f"whatslike_chaos_{uuid.uuid4().hex[:12]}"
    try:
        admin = await asyncpg.connect(admin_url, timeout=10)
    except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
        where = urlsplit(admin_url)
        raise ChaosSetupError(
            f"PostgreSQL at {where.hostname}:{where.port or 5432} is unreachable ({exc}); "
            "run ./scripts/services.sh postgres"
        ) from None
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        yield name
    finally:
        admin = await asyncpg.connect(admin_url, timeout=10)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


class Run:
    """One chaos run: its processes, clients and fault schedule."""

    def __init__(self, config: ChaosConfig, workdir: Path, out: Output) -> None:
        self.config = config
        self.out = out
        self.began = time.monotonic()
        secret = uuid.uuid4().hex
        self.token = TokenService(secret).mint("chaos-agent", ORG, 4 * 3600)
        self.proxy: DatabaseProxy | None = None
        # The pipeline's processes: one with every role, or one per role; the first
        # serves the API, the webhooks go (through the tap) to the connector's.
        if config.layout == "scaled":
            self.roles = [Service(role, role, workdir / role, {}) for role in SCALED_ROLES]
            webhooks = self.roles[SCALED_ROLES.index("connector")]
        else:
            self.roles = [Service("pipeline", PIPELINE_ROLES, workdir / "pipeline", {})]
            webhooks = self.roles[0]
        self.pipeline = self.roles[0]
        self.tap = WebhookTap(webhooks.url)
        self.simulator = Service("simulator", "simulator", workdir / "simulator", {})
        self.victims = random.Random(f"victims-{config.seed}")
        self.store_nodes = [Node(path) for path in config.store_nodes]
        self.bus_nodes = {node_id: Node(path) for node_id, path in config.bus_nodes.items()}
        self.prefix = f"chaos-{uuid.uuid4().hex[:8]}."
        # Outside the embedded mode the development Meta credentials are refused: this
        # run's own, shared by the simulator and the pipeline.
        meta = {
            f"WHATSLIKE_META_{name}": uuid.uuid4().hex
            for name in ("APP_SECRET", "VERIFY_TOKEN", "ACCESS_TOKEN")
        }
        self.pipeline.env = {
            "WHATSLIKE_JWT_SECRET": secret,
            "WHATSLIKE_GRAPH_URL": f"{self.simulator.url}/simulator",
            # The customers' replies go to the organization of this run.
            "WHATSLIKE_WHATSAPP_ORG_ID": ORG,
            "WHATSLIKE_INSTAGRAM_ORG_ID": ORG,
            **meta,
            **config.pipeline_env,
        }
        if config.layout == "scaled":
            self.pipeline.env |= {
                "WHATSLIKE_BUS_URL": config.bus_url,
                "WHATSLIKE_FANOUT_URL": config.fanout_url,
                "WHATSLIKE_KAFKA_TOPIC_PREFIX": self.prefix,
                "WHATSLIKE_KAFKA_REPLICATION_FACTOR": str(config.kafka_replication),
            }
        for role in self.roles:
            role.env = self.pipeline.env  # one dict: the database URL is added later
        self.control_token = uuid.uuid4().hex
        self.simulator.env = {
            "WHATSLIKE_JWT_SECRET": secret,
            "WHATSLIKE_SIM_CONTROL_TOKEN": self.control_token,
            **meta,
            "WHATSLIKE_SIM_DELAY_MS": str(config.sim_delay_ms),
            "WHATSLIKE_SIM_FAILURE_RATE": str(config.sim_failure_rate),
            "WHATSLIKE_SIM_SEED": str(config.seed),
            "WHATSLIKE_SIM_TIME_SCALE": str(config.sim_time_scale),
        }
        self.http_log = HttpLog()
        self.api = httpx.AsyncClient(
            base_url=self.pipeline.url,
            headers={"Authorization": f"Bearer {self.token}"},
            timeout=REQUEST_TIMEOUT_S,
        )
        self.fault_log: list[str] = []
        #: Conversation id → (channel, contact).
        self.contacts: dict[str, tuple[str, str]] = {}

    async def use_database(self, database: str) -> None:
        """Point the pipeline at its store: Cassandra's keyspace URL as given, PostgreSQL's
        database through the proxy that can cut it, SQLite (nothing given) in its data
        directory."""
        if self.config.database == "cassandra":
            self.pipeline.env["WHATSLIKE_DATABASE_URL"] = database
        elif database:
            admin = urlsplit(self.config.postgres_url)
            self.proxy = DatabaseProxy(admin.hostname or "127.0.0.1", admin.port or 5432)
            await self.proxy.start()
            user = admin.username or "postgres"
            auth = f"{user}:{admin.password}" if admin.password else user
            url = f"postgresql://{auth}@127.0.0.1:{self.proxy.port}/{database}"
            self.pipeline.env["WHATSLIKE_DATABASE_URL"] = url

    def say(self, line: str) -> None:
        self.out(f"[{time.monotonic() - self.began:6.1f}s] {line}")

    async def fault(self, fault: Fault) -> None:
        if fault.kind == "cut-database":
            assert self.proxy is not None
            self.say(f"cut the database for {self.config.cut_s:.0f} s")
            await self.proxy.cut(self.config.cut_s)
            self.say("database back")
            self.fault_log.append(f"cut-database {self.config.cut_s:.0f}s")
            return
        if fault.kind in NODE_FAULTS:
            await self.node_fault(fault.kind)
            return
        if fault.kind == "kill-simulator":
            service = self.simulator
        else:
            service = self.victims.choice(self.roles)
        service.busy = True
        try:
            if fault.kind == "stop-pipeline":
                self.say(f"SIGTERM {service.name}")
                began = time.monotonic()
                pid = await service.stop()
                took = time.monotonic() - began
                self.say(f"{service.name} (pid {pid}) exited after {took:.1f} s")
            else:
                pid = await service.kill()
                self.say(f"kill -9 {service.name} (pid {pid})")
            took = await service.start()
        finally:
            service.busy = False
        self.say(f"{service.name} serving again after {took:.1f} s")
        self.fault_log.append(f"{fault.kind} {service.name} restart {took:.1f}s")

    async def node_fault(self, kind: FaultKind) -> None:
        down = self.config.node_down_s
        if kind == "kill-bus-leader":
            topic = self.prefix + TOPIC_MESSAGES
            leader = await partition_leader(self.config.bus_url, topic)
            node = self.bus_nodes.get(leader)
            if node is None:
                raise ChaosSetupError(f"broker {leader} leads {topic}; no pid file given for it")
            what = f"broker {leader} (leader of {topic} partition 0)"
        else:
            if not self.store_nodes:
                raise ChaosSetupError(f"{kind} needs the store's nodes (--store-node)")
            node = self.victims.choice(self.store_nodes)
            what = f"store node {node.name}"
        if kind == "stop-store-node":
            self.say(f"SIGSTOP {what} for {down:g} s")
            pid = await node.pause(down)
            self.say(f"SIGCONT {what} (pid {pid})")
            self.fault_log.append(f"{kind} {node.name} {down:g}s")
            return
        self.say(f"kill -9 {what}")
        pid, again = await node.kill(down)
        self.say(f"{what} (pid {pid}) started again after {down:g} s as pid {again}")
        self.fault_log.append(f"{kind} {node.name} down {down:g}s")

    async def supervise(self) -> None:
        """Start again any process of the pipeline that exited on its own (the scaled
        layout's supervisor, as supervisord in deploy/): counted in the report."""
        while True:
            await asyncio.sleep(0.5)
            for service in self.roles:
                process = service.process
                if service.busy or process is None or process.returncode is None:
                    continue
                service.busy = True
                try:
                    service.exits += 1
                    self.say(f"{service.name} exited ({process.returncode}); starting it again")
                    took = await service.start()
                    self.say(f"{service.name} serving again after {took:.1f} s")
                except ChaosSetupError as exc:  # e.g. the store still away: next turn
                    self.say(f"{service.name} not started yet: {exc}")
                finally:
                    service.busy = False

    async def faults(self, schedule: list[Fault], kinds: tuple[FaultKind, ...]) -> None:
        for fault in schedule:
            if fault.kind in kinds:
                await asyncio.sleep(max(0.0, self.began + fault.at - time.monotonic()))
                await self.fault(fault)

    async def create_conversations(self) -> dict[str, str]:
        """Conversation id → channel, half of them WhatsApp, half Instagram."""
        rng = random.Random(f"contacts-{self.config.seed}")
        ids = {}
        for n in range(self.config.conversations):
            channel = "whatsapp" if n % 2 == 0 else "instagram"
            contact = (
                f"55119{rng.randrange(10**8):08d}"
                if channel == "whatsapp"
                else f"17841{rng.randrange(10**10):010d}"
            )
            response = await self.api.post(
                "/api/conversations", json={"channel": channel, "contact": contact}
            )
            if response.status_code != 201:
                raise ChaosSetupError(f"creating a conversation answered {response.text}")
            ids[str(response.json()["id"])] = channel
            self.contacts[str(response.json()["id"])] = (channel, contact)
        return ids

    def reply_plan(self) -> list[tuple[str, str, str]]:
        """(channel, contact, text) of each customer's reply."""
        rng = random.Random(f"replies-{self.config.seed}")
        conversations = sorted(self.contacts)
        return [
            (*self.contacts[rng.choice(conversations)], f"chaos reply {self.config.seed}-{n}")
            for n in range(self.config.replies)
        ]

    def load_plan(self, conversations: dict[str, str]) -> list[Sent]:
        rng = random.Random(f"load-{self.config.seed}")
        plan = []
        for n in range(self.config.messages):
            cmid = f"chaos-{self.config.seed}-{n:05d}"
            conversation = rng.choice(sorted(conversations))
            channel = conversations[conversation]
            plan.append(Sent(n, conversation, channel, cmid, f"chaos message {cmid}"))
        return plan

    async def get(self, path: str) -> httpx.Response | None:
        try:
            response = await self.api.get(path)
        except httpx.TransportError as exc:
            self.http_log.note(f"GET {path}", None, type(exc).__name__)
            return None
        self.http_log.note(f"GET {path}", response)
        return response

    async def snapshot(self, conversations: list[str]) -> dict[str, list[dict[str, Any]]] | None:
        stored = {}
        for conversation in conversations:
            response = await self.get(f"/api/conversations/{conversation}/messages")
            if response is None or response.status_code != 200:
                return None
            stored[conversation] = response.json()["messages"]
        return stored

    async def quiesce(self, conversations: list[str], accepted: set[str]) -> None:
        """Wait until every accepted message is terminal, or nothing moved for settle_s."""
        began = time.monotonic()
        last: Any = None
        last_change = began
        while time.monotonic() - began < self.config.quiesce_s:
            stored = await self.snapshot(conversations)
            if stored is not None:
                state = sorted(
                    (m["id"], m["status"], m["seq"]) for ms in stored.values() for m in ms
                )
                if state != last:
                    last, last_change = state, time.monotonic()
                waiting = [m for ms in stored.values() for m in ms if m["status"] not in TERMINAL]
                if not [m for m in waiting if m["id"] in accepted]:
                    self.say("quiet: every accepted message is READ or FAILED")
                    return
                if time.monotonic() - last_change >= self.config.settle_s:
                    self.say(
                        f"quiet: nothing changed for {self.config.settle_s:.0f} s, "
                        f"{len(waiting)} messages not terminal"
                    )
                    return
            await asyncio.sleep(1)
        self.say(f"still moving after {self.config.quiesce_s:.0f} s; checking anyway")

    async def catch_up(self, watcher: Watcher, changes: dict[str, dict[str, Any]]) -> None:
        """Give the WebSocket a bounded moment to receive what /changes already has."""
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if all(watcher.last_seq(c) >= v["last_seq"] for c, v in changes.items()):
                return
            await asyncio.sleep(0.2)

    async def all_changes(self, conversation: str) -> dict[str, Any]:
        frames: list[dict[str, Any]] = []
        last_seq = -1
        while last_seq < 0 or (frames and frames[-1]["seq"] < last_seq):
            since = frames[-1]["seq"] if frames else 0
            path = f"/api/conversations/{conversation}/changes?since={since}"
            response = await self.get(path)
            for _ in range(12):  # as in `observe`
                if response is not None and response.status_code == 200:
                    break
                await asyncio.sleep(5)
                response = await self.get(path)
            if response is None or response.status_code != 200:
                raise ChaosSetupError(f"/changes of {conversation} unavailable after the run")
            body = response.json()
            last_seq = int(body["last_seq"])
            if not body["frames"]:
                break
            frames += body["frames"]
        return {"last_seq": last_seq, "frames": frames}

    async def observe(self, conversations: list[str]) -> Observed:
        stored = await self.snapshot(conversations)
        for _ in range(12):  # a busy machine: a minute for the API to answer in full
            if stored is not None:
                break
            await asyncio.sleep(5)
            stored = await self.snapshot(conversations)
        if stored is None:
            raise ChaosSetupError("the pipeline's API did not answer after the run")
        changes = {c: await self.all_changes(c) for c in conversations}
        sends: dict[str, Any] | None = None
        problem = ""
        try:
            async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S) as client:
                response = await client.get(
                    self.simulator.url + "/simulator/sends",
                    headers={"Authorization": f"Bearer {self.control_token}"},
                )
            if response.status_code == 200:
                sends = response.json()
            else:
                problem = f"GET /simulator/sends answered {response.status_code}"
        except httpx.HTTPError as exc:
            problem = f"GET /simulator/sends failed: {exc!r}"
        return Observed(
            messages={m["id"]: m for ms in stored.values() for m in ms},
            stored=stored,
            changes=changes,
            sends=sends,
            sends_problem=problem,
            pipeline_log="".join(role.log_text() for role in self.roles),
            simulator_log=self.simulator.log_text(),
        )


async def run_chaos(config: ChaosConfig, out: Output = print) -> ChaosResult:
    """Run the whole scenario and return the oracle's verdict (never raises on a failed
    check; raises ChaosSetupError when the scenario itself could not be set up)."""
    with tempfile.TemporaryDirectory(prefix="whatslike-chaos-") as scratch:
        workdir = config.workdir or Path(scratch)
        if config.database == "postgres":
            if not config.postgres_url:
                raise ChaosSetupError(
                    "no PostgreSQL URL: set WHATSLIKE_TEST_POSTGRES_URL "
                    "(./scripts/services.sh postgres writes it to .services/postgres.env)"
                )
            async with fresh_database(config.postgres_url) as name:
                return await _run(config, workdir, out, name)
        if config.database == "cassandra":
            return await _run(config, workdir, out, await fresh_keyspace(config.cassandra_url))
        return await _run(config, workdir, out, "")


async def fresh_keyspace(cassandra_url: str) -> str:
    """The URL of a new keyspace on the Cassandra of `cassandra_url`, its tables made (with
    three replicas that takes longer than a process is given to start). Left in place."""
    if not cassandra_url:
        raise ChaosSetupError(
            "no Cassandra URL: set WHATSLIKE_TEST_CASSANDRA_URL (./scripts/services.sh "
            "cassandra writes it to .services/cassandra.env) or give --cassandra-url"
        )
    url = urlsplit(cassandra_url)._replace(path=f"/chaos_{uuid.uuid4().hex[:12]}").geturl()
    # On a busy machine a schema change or the schema version's lightweight transaction can
    # time out on three replicas (WriteTimeout); the migrations are idempotent and the
    # version only moves forward, so making them again is safe.
    deadline = time.monotonic() + KEYSPACE_SETUP_S
    while True:
        store = CassandraStore(url)
        try:
            await store.open()
            return url
        except BackendUnavailable as exc:
            if time.monotonic() >= deadline:
                raise ChaosSetupError(
                    f"Cassandra at {cassandra_url} is unreachable ({exc}), "
                    f"tried for {KEYSPACE_SETUP_S:.0f} s"
                ) from None
            print(f"chaos: keyspace not made yet ({exc}); trying again", file=sys.stderr)
        except Exception as exc:
            raise ChaosSetupError(f"Cassandra at {cassandra_url} refused ({exc})") from None
        finally:
            await store.close()
        await asyncio.sleep(2)


async def _run(config: ChaosConfig, workdir: Path, out: Output, database: str) -> ChaosResult:
    run = Run(config, workdir, out)
    window, rate, schedule = plan_faults(config)
    out(
        f"chaos: seed={config.seed} database={config.database} messages={config.messages} "
        f"conversations={config.conversations} rate={rate:.1f}/s window={window:.1f}s "
        f"workdir={workdir}"
    )
    out("faults: " + ", ".join(f"{f.at:.1f}s {f.kind}" for f in schedule))
    if config.layout == "scaled" and not (config.bus_url and config.fanout_url):
        raise ChaosSetupError("the scaled layout needs Kafka and Redis (--bus-url, --fanout-url)")
    await run.use_database(database)
    await run.tap.start()
    run.simulator.env["WHATSLIKE_SIM_WEBHOOK_URL"] = run.tap.url
    watcher_task: asyncio.Task[None] | None = None
    supervisor: asyncio.Task[None] | None = None
    try:
        await run.simulator.start()
        for role in reversed(run.roles):  # the API last: it serves once the rest runs
            await role.start()
        if config.layout == "scaled":
            supervisor = asyncio.create_task(run.supervise())
        channels = await run.create_conversations()
        conversations = sorted(channels)
        watcher = Watcher(
            run.pipeline.url.replace("http://", "ws://") + f"/ws/status?access_token={run.token}",
            conversations,
        )
        watcher_task = asyncio.create_task(watcher.run())
        load = Load(run.api, run.http_log, config.send_deadline_s)
        replies = Replies(run.simulator.url, run.control_token, config.send_deadline_s)
        run.began = time.monotonic()
        await asyncio.gather(
            load.run(run.load_plan(channels), rate),
            replies.run(run.reply_plan(), rate * config.replies / max(1, config.messages)),
            run.faults(schedule, ("kill-pipeline", "stop-pipeline", "kill-simulator")),
            run.faults(schedule, ("cut-database",)),
            run.faults(schedule, NODE_FAULTS),
        )
        accepted = {s.message_id for s in load.sent if s.message_id}
        run.say(f"load and faults done: {len(accepted)}/{len(load.sent)} messages got 202")
        await run.quiesce(conversations, accepted)
        observed = await run.observe(conversations)
        await run.catch_up(watcher, observed.changes)
        checks = [
            *oracle(load.sent, observed, watcher, run.http_log, run.tap),
            _inbound(replies, observed, run.tap),
        ]
    finally:
        for task in (watcher_task, supervisor):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        await run.api.aclose()
        for role in run.roles:
            await role.stop()
        await run.simulator.stop()
        await run.tap.close()
        if run.proxy is not None:
            await run.proxy.close()
    report = render(config, run, sent=load.sent, seen=observed, watcher=watcher, checks=checks)
    out(report)
    return ChaosResult(config.seed, config.database, checks, report)


# -- the oracle -----------------------------------------------------------------------


def oracle(
    sent: list[Sent], seen: Observed, watcher: Watcher, http_log: HttpLog, tap: WebhookTap
) -> list[Check]:
    return [
        _accepted(sent),
        _terminal(sent, seen, tap),
        _idempotent(sent, seen),
        _provider_sends(sent, seen),
        _acked_webhooks(seen, tap),
        _gap_free(seen),
        _websocket(seen, watcher),
        _no_500(http_log, tap),
    ]


def _accepted(sent: list[Sent]) -> Check:
    never = [s for s in sent if s.message_id is None]
    return Check(
        "every POST eventually got 202 (same client_message_id retried)",
        not never,
        f"{len(sent) - len(never)}/{len(sent)} accepted, {len(never)} never",
        [f"{s.client_message_id}: answers {s.answers[-6:]}" for s in never[:EXAMPLES]],
    )


def _terminal(sent: list[Sent], seen: Observed, tap: WebhookTap) -> Check:
    acked: dict[str, list[str]] = {}
    for message_id, status in tap.whatsapp_acked:
        acked.setdefault(message_id, []).append(status)
    statuses: Counter[str] = Counter()
    causes: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    stuck = []
    for s in sent:
        if s.message_id is None:
            continue
        message = seen.messages.get(s.message_id)
        status = message["status"] if message else "MISSING"
        error = (message or {}).get("error")
        bad_failure = status == "FAILED" and not error
        statuses[status + (" without error" if bad_failure else "")] += 1
        if status == "FAILED" and error:
            errors[f"{s.channel} {error['code']}"] += 1
        if status not in TERMINAL or bad_failure:
            posted = tap.whatsapp_posted.get(s.message_id, set())
            cause = _why_stuck(s.channel, status, posted, set(acked.get(s.message_id, [])))
            causes[f"{status}: {cause}"] += 1
            stuck.append(
                f"{s.message_id} ({s.client_message_id}, {s.channel}) {status}; webhooks "
                f"posted {sorted(posted)}, answered 200 {acked.get(s.message_id, [])}"
            )
    detail = ", ".join(f"{k} {v}" for k, v in sorted(statuses.items()))
    if errors:
        detail += " (FAILED: " + ", ".join(f"{k} {v}" for k, v in sorted(errors.items())) + ")"
    if causes:
        detail += "; stuck: " + "; ".join(f"{v} {k}" for k, v in sorted(causes.items()))
    return Check(
        "every 202 reached READ or FAILED (with its error); none stuck",
        not stuck,
        detail,
        stuck[:EXAMPLES],
    )


def _why_stuck(channel: str, status: str, posted: set[str], acked: set[str]) -> str:
    """Where a message stopped, as far as the webhooks seen at the tap tell."""
    if channel != "whatsapp":
        return "instagram (webhooks carry no message id of ours)"
    later = {s for s in posted if s == "FAILED" or RANK.get(s, 0) > RANK.get(status, 0)}
    if later & acked:
        return "a later status was answered 200 but is not in the store"
    if later:
        return "a later webhook was posted but never answered 200"
    if status == "PENDING":
        return "no webhook at all (never sent, or sent and its webhooks lost)"
    return "the simulator never posted a later webhook"


def _idempotent(sent: list[Sent], seen: Observed) -> Check:
    ours = {s.client_message_id for s in sent}
    # The agents' messages (the customers' have no client id: see `_inbound`).
    agents = [m for m in seen.messages.values() if m.get("direction", "out") == "out"]
    by_cmid = Counter(m["client_message_id"] for m in agents)
    twice = [f"{cmid} stored {n} times" for cmid, n in by_cmid.items() if n > 1]
    strangers = [m["id"] for m in agents if m["client_message_id"] not in ours]
    unanswered = [s for s in sent if s.message_id is None and by_cmid[s.client_message_id]]
    return Check(
        "one stored message per client_message_id",
        not twice and not strangers,
        f"{len(agents)} stored, {len(twice)} client_message_ids stored twice, "
        f"{len(strangers)} unknown, {len(unanswered)} stored without ever getting a 202",
        (twice + strangers)[:EXAMPLES],
    )


def _provider_sends(sent: list[Sent], seen: Observed) -> Check:
    if seen.sends is None:
        return Check(
            "0 messages sent twice to the provider",
            False,
            f"cannot tell: {seen.sends_problem} (the simulator does not count sends)",
        )
    by_text = {s.client_message_id: s for s in sent}
    examples = []
    for key, count in list(seen.sends.get("duplicates", {}).items())[:EXAMPLES]:
        found = next((cmid for cmid in by_text if cmid in key), None)
        message = seen.messages.get(key)
        who = message["client_message_id"] if message else (found or "unknown")
        examples.append(f"{key} sent {count} times ({who})")
    duplicates = len(seen.sends.get("duplicates", {}))
    keys = int(seen.sends.get("keys", 0))
    known = _known_sent(sent, seen)
    undercounted = keys < known
    detail = (
        f"simulator: {seen.sends.get('sends')} sends of {keys} messages, {duplicates} sent "
        f"more than once; the store knows {known} messages as sent"
    )
    if undercounted:
        detail += " (more than the simulator counted: its counts did not survive its restarts)"
    elif keys > known:
        detail += (
            f" ({keys - known} sent that the store lost track of: shown FAILED "
            "send_outcome_unknown or still PENDING)"
        )
    extra = {k: v for k, v in seen.sends.items() if k not in ("sends", "keys", "duplicates")}
    if extra:
        detail += f"; the simulator also says {json.dumps(extra)}"
    return Check(
        "0 messages sent twice to the provider",
        not duplicates and not undercounted,
        detail,
        examples,
    )


def _known_sent(sent: list[Sent], seen: Observed) -> int:
    """Messages the store knows reached the provider: SENT or later, or a WhatsApp
    FAILED with the provider's error (an Instagram failure is a refused send)."""
    channel = {s.message_id: s.channel for s in sent}
    known = 0
    for message in seen.messages.values():
        if message.get("direction", "out") != "out":
            continue  # a customer's message: never sent by us
        code = str((message["error"] or {}).get("code", ""))
        failed_after_send = (
            message["status"] == "FAILED"
            and channel.get(message["id"]) == "whatsapp"
            and not code.startswith("send_")
        )
        known += message["status"] in ("SENT", "DELIVERED", "READ") or failed_after_send
    return known


def _acked_webhooks(seen: Observed, tap: WebhookTap) -> Check:
    lost = []
    for message_id, status in tap.whatsapp_acked:
        message = seen.messages.get(message_id)
        final = message["status"] if message else "MISSING"
        if status == "FAILED":
            covered = final in ("FAILED", "DELIVERED", "READ")
        else:
            covered = final != "MISSING" and (
                RANK.get(final, -1) >= RANK.get(status, 9)
                or (final == "FAILED" and status == "SENT")
            )
        if not covered:
            lost.append(f"{message_id}: webhook {status} answered 200, store says {final}")
    answers = ", ".join(f"{k} {v}" for k, v in sorted(tap.answers.items()))
    return Check(
        "every WhatsApp status whose webhook was answered 200 is in the store",
        not lost,
        f"webhook POSTs by answer: {answers or 'none'}; WhatsApp statuses acked "
        f"{len(tap.whatsapp_acked)}, {len(lost)} not in the store; Instagram reads acked "
        f"{tap.instagram_reads_acked}",
        lost[:EXAMPLES],
    )


def _inbound(replies: Replies, seen: Observed, tap: WebhookTap) -> Check:
    """Every customer's message whose webhook was answered 200 is stored, once."""
    stored = Counter(
        m["provider_message_id"]
        for ms in seen.stored.values()
        for m in ms
        if m["direction"] == "in"
    )
    acked = set(tap.customer_acked)
    lost = sorted(acked - set(stored))
    twice = sorted(mid for mid, n in stored.items() if n > 1)
    bad = [f"{mid}: answered 200, not stored" for mid in lost]
    bad += [f"{mid}: stored {stored[mid]} times" for mid in twice]
    return Check(
        "every customer's message answered 200 is stored, once",
        not bad,
        f"{len(replies.made)} replies made ({replies.never} never taken), {len(acked)} "
        f"answered 200 ({len(tap.customer_acked)} times), {sum(stored.values())} stored",
        bad[:EXAMPLES],
    )


def _gap_free(seen: Observed) -> Check:
    bad = []
    for conversation, changes in seen.changes.items():
        seqs = [int(f["seq"]) for f in changes["frames"]]
        if seqs != list(range(1, changes["last_seq"] + 1)):
            bad.append(f"{conversation}: last_seq {changes['last_seq']}, seqs {_ranges(seqs)}")
        last_by_message = {f["message_id"]: f["status"] for f in changes["frames"]}
        for message in seen.stored[conversation]:
            if last_by_message.get(message["id"], "PENDING") != message["status"]:
                bad.append(
                    f"{message['id']}: status {message['status']}, last change "
                    f"{last_by_message.get(message['id'])}"
                )
    total = sum(c["last_seq"] for c in seen.changes.values())
    return Check(
        "seqs 1..N gap-free in every conversation, agreeing with the messages",
        not bad,
        f"{len(seen.changes)} conversations, {total} changes",
        bad[:EXAMPLES],
    )


def _websocket(seen: Observed, watcher: Watcher) -> Check:
    bad = []
    for conversation, changes in seen.changes.items():
        got = watcher.frames[conversation]
        if got != changes["frames"]:
            got_seqs = [int(f["seq"]) for f in got]
            want = [int(f["seq"]) for f in changes["frames"]]
            same = got_seqs == want
            bad.append(
                f"{conversation}: websocket seqs {_ranges(got_seqs)} vs /changes {_ranges(want)}"
                + (" (same seqs, different frames)" if same else "")
            )
    bad += [f"conflict {c}" for c in watcher.conflicts]
    bad += [f"not recovered: {c}" for c in watcher.not_recovered]
    bad += [f"error frame: {e}" for e in watcher.errors]
    frames = sum(len(f) for f in watcher.frames.values())
    return Check(
        "the WebSocket client's frames equal /changes in every conversation",
        not bad,
        f"{frames} frames over {watcher.connects} connections, "
        f"{watcher.duplicates} repeated seqs dropped",
        bad[:EXAMPLES],
    )


def _no_500(http_log: HttpLog, tap: WebhookTap) -> Check:
    codes = ", ".join(f"{k} {v}" for k, v in sorted(http_log.codes.items()))
    webhook_500 = tap.answers["500"]
    examples = list(http_log.examples_500)
    if webhook_500:
        examples.append(f"{webhook_500} webhook POSTs answered 500")
    return Check(
        "no 500 from the API or the webhooks (503 is fine)",
        not http_log.codes["500"] and not webhook_500,
        f"API answers: {codes}",
        examples[:EXAMPLES],
    )


def _ranges(seqs: list[int]) -> str:
    """1-5,7,9-12: short enough to read in a report."""
    parts: list[str] = []
    for seq in seqs:
        if parts and re.fullmatch(rf"(\d+-)?{seq - 1}", parts[-1]):
            parts[-1] = f"{parts[-1].split('-')[0]}-{seq}"
        else:
            parts.append(str(seq))
    return ",".join(parts) or "none"


def render(
    config: ChaosConfig,
    run: Run,
    *,
    sent: list[Sent],
    seen: Observed,
    watcher: Watcher,
    checks: list[Check],
) -> str:
    retried = sum(1 for s in sent if s.attempts > 1)
    lines = [
        f"== chaos report: seed {config.seed}, {config.database}, {config.layout} layout ==",
        "faults done: " + (", ".join(run.fault_log) or "none"),
        "starts: "
        + ", ".join(
            f"{s.name} {s.starts} (+{s.failed_starts} failed"
            + (f", {s.exits} after exiting on its own)" if s.exits else ")")
            for s in [*run.roles, run.simulator]
        ),
        f"load: {len(sent)} messages, {sum(s.attempts for s in sent)} POSTs, {retried} retried",
        f"websocket: {watcher.connects} connections",
        "logs: pipeline "
        + _log_counts(seen.pipeline_log)
        + "; simulator "
        + _log_counts(seen.simulator_log),
    ]
    if run.proxy is not None:
        lines.append(
            f"database proxy: {run.proxy.connections} connections, {run.proxy.refused} refused"
        )
    for check in checks:
        lines.append(f"{'PASS' if check.ok else 'FAIL'}  {check.name}: {check.detail}")
        lines += [f"        e.g. {example}" for example in check.examples]
    failed = sum(1 for check in checks if not check.ok)
    verdict = "PASS" if not failed else f"FAIL ({failed} of {len(checks)} checks)"
    lines.append(f"== {verdict}; replay: {replay_command(config)} ==")
    return "\n".join(lines)


def replay_command(config: ChaosConfig) -> str:
    """The command line that runs the same scenario with the same seed."""
    words = [
        "python -m bench.chaos",
        f"--seed {config.seed} --database {config.database} --messages {config.messages}",
        f"--conversations {config.conversations} --kills {config.pipeline_kills}",
        f"--stops {config.pipeline_stops} --sim-kills {config.simulator_kills}",
        f"--cuts {config.database_cuts}",
        f"--cut-s {config.cut_s:g} --settle-s {config.settle_s:g} --quiesce-s {config.quiesce_s:g}",
    ]
    if config.rate:
        words.append(f"--rate {config.rate:g}")
    if config.layout == "scaled":
        words.append(f"--layout scaled --kafka-replication {config.kafka_replication}")
    nodes = config.store_node_kills + config.store_node_stops + config.bus_leader_kills
    if nodes:
        words.append(
            f"--node-kills {config.store_node_kills} --node-stops {config.store_node_stops} "
            f"--leader-kills {config.bus_leader_kills} --node-down-s {config.node_down_s:g}"
        )
    if config.send_deadline_s != ChaosConfig.send_deadline_s:
        words.append(f"--send-deadline-s {config.send_deadline_s:g}")
    words += [
        f"--pipeline-env {name}={value}"
        for name, value in config.pipeline_env.items()
        if WATCHDOG_ENV.get(name) != value
    ]
    return " ".join(words)


def _log_counts(text: str) -> str:
    patterns = {
        "tracebacks": "Traceback",
        "errors": " ERROR ",
        "'they are lost'": "they are lost",
        "gave up": "gave up",
    }
    return ", ".join(f"{name} {text.count(p)}" for name, p in patterns.items())


# -- command line ---------------------------------------------------------------------


def from_services(variable: str, service: str) -> str:
    """WHATSLIKE_TEST_<…>, or the value scripts/services.sh wrote to .services/<service>.env."""
    if value := os.environ.get(variable):
        return value
    env_file = Path(__file__).resolve().parent.parent / ".services" / f"{service}.env"
    if env_file.exists():
        for line in env_file.read_text().splitlines():
            name, _, value = line.partition("=")
            if name == variable:
                return value
    return ""


def postgres_url_from_services() -> str:
    """WHATSLIKE_TEST_POSTGRES_URL, or the one scripts/services.sh wrote."""
    return from_services("WHATSLIKE_TEST_POSTGRES_URL", "postgres")


def cluster_nodes(directory: str, pid_file: str) -> list[Path]:
    """The pid files of a cluster's nodes (node1, node2, …) under `directory`."""
    found = sorted(Path(directory).glob(f"node*/{pid_file}")) if directory else []
    if not found:
        raise ChaosSetupError(
            f"no nodes under {directory or '(unset)'}: run "
            "./scripts/services.sh cassandra-cluster kafka-cluster"
        )
    return found


@dataclass(frozen=True)
class Servers:
    """Kafka and Cassandra as the command line names them, or the clusters (`--cluster`)."""

    bus_url: str
    cassandra_url: str
    replication: int
    store_nodes: tuple[Path, ...]
    bus_nodes: dict[int, Path]

    @classmethod
    def of(cls, args: argparse.Namespace) -> Servers:
        if not args.cluster:
            return cls(
                args.bus_url or from_services("WHATSLIKE_TEST_KAFKA_URL", "kafka"),
                args.cassandra_url or from_services("WHATSLIKE_TEST_CASSANDRA_URL", "cassandra"),
                args.kafka_replication,
                tuple(args.store_node),
                {},
            )
        brokers = cluster_nodes(
            from_services("WHATSLIKE_TEST_KAFKA_CLUSTER_DIR", "kafka-cluster"), "kafka.pid"
        )
        return cls(
            from_services("WHATSLIKE_TEST_KAFKA_CLUSTER_URL", "kafka-cluster"),
            from_services("WHATSLIKE_TEST_CASSANDRA_CLUSTER_URL", "cassandra-cluster"),
            3,
            tuple(
                cluster_nodes(
                    from_services("WHATSLIKE_TEST_CASSANDRA_CLUSTER_DIR", "cassandra-cluster"),
                    "cassandra.pid",
                )
            ),
            # node<N> runs the broker of node id N (scripts/services/kafka-cluster.sh).
            {int(path.parent.name.removeprefix("node")): path for path in brokers},
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else "")
    parser.add_argument("--database", choices=["sqlite", "postgres", "cassandra"], default="sqlite")
    parser.add_argument("--seed", type=int, default=None, help="default: random (printed)")
    parser.add_argument("--messages", type=int, default=500)
    parser.add_argument("--replies", type=int, default=50, help="customers' replies")
    parser.add_argument("--conversations", type=int, default=20)
    parser.add_argument("--rate", type=float, default=None, help="msg/s (default: fit window)")
    parser.add_argument("--kills", type=int, default=5, help="kill -9 of the pipeline")
    parser.add_argument("--stops", type=int, default=1, help="SIGTERM of the pipeline")
    parser.add_argument("--sim-kills", type=int, default=None, help="default max(2, kills/4)")
    parser.add_argument("--cuts", type=int, default=1, help="database cuts (PostgreSQL)")
    parser.add_argument("--cut-s", type=float, default=10.0)
    parser.add_argument("--quiesce-s", type=float, default=90.0)
    parser.add_argument("--settle-s", type=float, default=30.0)
    parser.add_argument("--workdir", type=Path, help="keep data and logs here (default: temp)")
    parser.add_argument("--postgres-url", default="", help="default: WHATSLIKE_TEST_POSTGRES_URL")
    parser.add_argument("--send-deadline-s", type=float, default=60.0)
    parser.add_argument("--layout", choices=["single", "scaled"], default="single")
    parser.add_argument("--bus-url", default="", help="default: WHATSLIKE_TEST_KAFKA_URL")
    parser.add_argument("--fanout-url", default="", help="default: WHATSLIKE_TEST_REDIS_URL")
    parser.add_argument("--kafka-replication", type=int, default=1)
    parser.add_argument("--cassandra-url", default="", help="default: WHATSLIKE_TEST_CASSANDRA_URL")
    parser.add_argument(
        "--cluster",
        action="store_true",
        help="the 3-node Cassandra and Kafka clusters of scripts/services.sh (their URLs, "
        "their nodes, 3 replicas)",
    )
    parser.add_argument(
        "--store-node",
        action="append",
        default=[],
        type=Path,
        metavar="PIDFILE",
        help="a Cassandra node the node faults may act on (repeatable)",
    )
    parser.add_argument("--node-kills", type=int, default=0, help="kill -9 of a store node")
    parser.add_argument("--node-stops", type=int, default=0, help="SIGSTOP of a store node")
    parser.add_argument(
        "--leader-kills", type=int, default=0, help="kill -9 of a partition's Kafka leader"
    )
    parser.add_argument("--node-down-s", type=float, default=10.0)
    parser.add_argument(
        "--pipeline-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a pipeline setting (repeatable; WATCHDOG_ENV by default)",
    )
    args = parser.parse_args(argv)
    try:
        servers = Servers.of(args)
    except ChaosSetupError as exc:
        print(f"chaos: {exc}", file=sys.stderr)
        return 2
    config = ChaosConfig(
        seed=args.seed if args.seed is not None else random.randrange(10**6),
        database=args.database,
        messages=args.messages,
        replies=args.replies,
        conversations=args.conversations,
        rate=args.rate,
        pipeline_kills=args.kills,
        pipeline_stops=args.stops,
        simulator_kills=args.sim_kills if args.sim_kills is not None else max(2, args.kills // 4),
        database_cuts=args.cuts,
        cut_s=args.cut_s,
        quiesce_s=args.quiesce_s,
        settle_s=args.settle_s,
        postgres_url=args.postgres_url or postgres_url_from_services(),
        workdir=args.workdir,
        pipeline_env={**WATCHDOG_ENV, **dict(item.split("=", 1) for item in args.pipeline_env)},
        send_deadline_s=args.send_deadline_s,
        layout=args.layout,
        bus_url=servers.bus_url,
        fanout_url=args.fanout_url or from_services("WHATSLIKE_TEST_REDIS_URL", "redis"),
        kafka_replication=servers.replication,
        cassandra_url=servers.cassandra_url,
        store_nodes=servers.store_nodes,
        bus_nodes=servers.bus_nodes,
        store_node_kills=args.node_kills,
        store_node_stops=args.node_stops,
        bus_leader_kills=args.leader_kills,
        node_down_s=args.node_down_s,
    )
    try:
        result = asyncio.run(run_chaos(config, out=lambda line: print(line, flush=True)))
    except ChaosSetupError as exc:
        print(f"chaos: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # the processes were stopped on the way out
        return 130
    return 0 if result.passed else 1


if __name__ == "__main__":
    sys.exit(main())
