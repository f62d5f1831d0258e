"""The status path at scale (issue 9): status events fed open-loop into Kafka's
`msg.status` topic, as the connector publishes them, → status-worker processes (group
commit per partition batch on PostgreSQL) → Redis Pub/Sub → 2 hub processes (`serve
--roles api`) → WebSocket clients held by one node process (bench/wsload/clients.mjs).

    python -m bench.scale_status --sockets 10000 --conversations 5000 \\
        --rates 250,500,1000,1500 --seconds 10 --runs 3

The feed is Kafka, not signed webhooks into connector processes: the target is the
status path, and on this 2-core machine the connector's HTTP + HMAC + parsing (measured by
bench/ingest.py) would take the CPU the path under test needs. Each event carries its
produce time as `received_at` and `occurred_at`; the frame carries `occurred_at` (in ms),
so each client measures produce → frame arrival itself (same host clock; the ms
truncation adds up to 1 ms). Each message gets SENT, DELIVERED and READ, one per third of
the step, so every event changes a message and yields one frame per socket of its
conversation (each conversation has a socket on each hub by default).

Per rate step it prints events produced, frames expected and received (lost must be 0),
p50/p99/p99.9/max latency, and the CPU seconds each process used in the step.
`--profile-rate R --profile-dir D` runs py-spy on every Python process during step R.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import httpx
from aiokafka import AIOKafkaProducer

from bench.chaos import fresh_database
from bench.scale import delete_topics, start_services
from tests.e2e.conftest import Server, start_server, stop_server
from tests.scale.harness import cluster_env, percentile
from whatslike.auth import TokenService
from whatslike.bus.kafka import bootstrap_servers
from whatslike.events import TOPIC_STATUS, StatusEvent
from whatslike.status.rules import Status
from whatslike.store.base import Message
from whatslike.store.postgres import PostgresStore

REPO = Path(__file__).resolve().parent.parent
CLIENTS = REPO / "bench" / "wsload" / "clients.mjs"
ORG = "org-bench"
PHASES = (Status.SENT, Status.DELIVERED, Status.READ)
#: Sockets per user (the hub allows 50) and per loopback address (it allows 500).
PER_USER = 25
PER_ADDRESS = 400
SETTLE_S = 60.0
TICKS = os.sysconf("SC_CLK_TCK")
PY_SPY = Path(sys.executable).parent / "py-spy"  # .venv/bin/pip install py-spy


@dataclass
class Step:
    rate: int
    produced: int = 0
    produce_s: float = 0.0
    expected: int = 0
    received: int = 0
    duplicates: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    cpu_s: dict[str, float] = field(default_factory=dict)
    host_busy: float = 0.0  # the machine's busy fraction during the step (all sessions)
    #: The workers' histograms over the step: name → (p50, p99) by bucket upper bound.
    stages: dict[str, tuple[float, float]] = field(default_factory=dict)

    @property
    def lost(self) -> int:
        return self.expected - (self.received - self.duplicates)


class Clients:
    """The node process holding every socket; one command line at a time."""

    def __init__(self, plan: list[dict[str, str]]) -> None:
        self.process = subprocess.Popen(
            ["node", str(CLIENTS)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self._send(json.dumps({"sockets": plan}))
        ready = self._line()
        if not ready.startswith("ready"):
            raise RuntimeError(f"the clients did not open their sockets: {ready!r}")

    def _send(self, line: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()

    def _line(self) -> str:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError("the clients process ended")
        return line.strip()

    def count(self) -> tuple[int, int]:
        self._send("count")
        _, received, _, closed = self._line().split()
        return int(received), int(closed)

    def dump(self) -> list[tuple[int, str, str, float]]:
        self._send("dump")
        frames = []
        while (line := self._line()) != "end":
            if line:
                index, message_id, status, latency = line.split()
                frames.append((int(index), message_id, status, float(latency)))
        return frames

    def close(self) -> None:
        self._send("quit")
        self.process.wait(timeout=15)


#: The status workers' histograms that say where an event's time goes (bucket bounds).
STAGES = {
    "produce->worker take s": "whatslike_status_bus_lag_seconds",
    "produce->Redis publish s": "whatslike_status_fanout_seconds",
    "apply_statuses s": 'whatslike_store_seconds{op="apply_statuses"',
    "statuses per transaction": "whatslike_status_batch_size",
}


def buckets(servers: dict[str, Server]) -> dict[str, dict[float, float]]:
    """Every worker's cumulative bucket counts of STAGES, summed over workers."""
    summed: dict[str, dict[float, float]] = {stage: {} for stage in STAGES}
    for name, server in servers.items():
        if not name.startswith("worker"):
            continue
        text = httpx.get(server.url + "/metrics", timeout=10).text
        for line in text.splitlines():
            for stage, series in STAGES.items():
                head = series.split("{")[0] + "_bucket{"
                if line.startswith(head) and all(part in line for part in series.split("{")[1:]):
                    bound = line.split('le="')[1].split('"')[0]
                    key = float(bound)
                    summed[stage][key] = summed[stage].get(key, 0.0) + float(line.split()[-1])
    return summed


def stage_quantiles(
    before: dict[str, dict[float, float]], after: dict[str, dict[float, float]]
) -> dict[str, tuple[float, float]]:
    """(p50, p99) of each histogram over the step: the first bucket bound holding them."""
    out = {}
    for stage in STAGES:
        bounds = sorted(after[stage])
        counts = [after[stage][b] - before[stage].get(b, 0.0) for b in bounds]
        total = counts[-1] if counts else 0
        picks = []
        for fraction in (0.5, 0.99):
            picks.append(
                next(
                    (b for b, c in zip(bounds, counts, strict=True) if c >= fraction * total),
                    float("nan"),
                )
                if total
                else float("nan")
            )
        out[stage] = (picks[0], picks[1])
    return out


def cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:  # a PostgreSQL backend that ended meanwhile
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICKS


def host_busy() -> tuple[float, float]:
    """(busy, all) CPU seconds of the whole machine so far (every session on it)."""
    ticks = [int(f) for f in Path("/proc/stat").read_text().split("\n")[0].split()[1:9]]
    return (sum(ticks) - ticks[3] - ticks[4]) / TICKS, sum(ticks) / TICKS


def server_pids(postmaster: int) -> dict[str, list[int]]:
    """The backends' processes: Kafka and Redis by their pid files, PostgreSQL's server
    and all its children (its backends serve every client of the cluster, not only us)."""
    services = REPO / ".services"
    pids = {
        name: [int((services / name / f"{name}.pid").read_text())] for name in ("kafka", "redis")
    }
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == postmaster:
                children.append(int(stat.parent.name))
        except (OSError, ValueError):
            continue
    pids["postgres"] = [postmaster, *children]
    return pids


@contextmanager
def processes(workdir: Path, env: dict[str, str], workers: int) -> Iterator[dict[str, Server]]:
    plans = [(f"hub-{n}", "api") for n in (1, 2)]
    plans += [(f"worker-{n}", "status-worker") for n in range(1, workers + 1)]
    servers: dict[str, Server] = {}
    with ThreadPoolExecutor(len(plans)) as pool:
        futures = {
            name: pool.submit(start_server, workdir / name, {**env, "WHATSLIKE_ROLES": roles})
            for name, roles in plans
        }
        for name, future in futures.items():
            servers[name] = future.result()
    try:
        yield servers
    finally:
        for server in servers.values():
            stop_server(server)


async def seed(database: str, conversations: int, messages: int) -> tuple[list[str], list[Message]]:
    """The conversations, and the PENDING messages the steps will take to READ (their
    send hand-offs are dropped from the outbox: no router runs, the bench is the provider)."""
    store = PostgresStore(database, max_size=8)
    await store.open()
    try:
        convs = [
            await store.create_conversation(ORG, "whatsapp", f"+1555{n:07d}")
            for n in range(conversations)
        ]
        made: list[Message] = []
        for start in range(0, messages, 64):
            chunk = range(start, min(messages, start + 64))
            made += [
                message
                for message, _ in await asyncio.gather(
                    *(store.create_message(convs[n % len(convs)], "bench", f"b{n}") for n in chunk)
                )
            ]
    finally:
        await store.close()
    connection = await asyncpg.connect(database)
    try:
        await connection.execute("DELETE FROM outbox")
    finally:
        await connection.close()
    return [c.id for c in convs], made


async def produce(kafka: str, topic: str, messages: list[Message], rate: int) -> float:
    """Every message SENT, then DELIVERED, then READ, open loop at `rate` events/s."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap_servers(kafka), enable_idempotence=True, acks="all"
    )
    await producer.start()
    try:
        pending = []
        began = time.monotonic()
        n = 0
        for status in PHASES:
            for message in messages:
                delay = began + n / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                now = datetime.now(UTC)
                event = StatusEvent(
                    event_id=f"evt_{uuid.uuid4().hex}",
                    message_id=message.id,
                    conversation_id=message.conversation_id,
                    org_id=message.org_id,
                    channel=message.channel,
                    status=status,
                    provider_message_id=f"wamid.{message.id}",
                    occurred_at=now,
                    received_at=now,
                )
                key = message.conversation_id.encode()
                pending.append(await producer.send(topic, event.to_json(), key=key))
                n += 1
        await asyncio.gather(*pending)
        return time.monotonic() - began
    finally:
        await producer.stop()


@asynccontextmanager
async def deployment(
    workdir: Path, workers: int, conversations: int, messages: int
) -> AsyncIterator[tuple[dict[str, Server], list[str], list[Message], str, str]]:
    kafka = os.environ["WHATSLIKE_TEST_KAFKA_URL"]
    prefix = f"bench-{uuid.uuid4().hex[:10]}."
    admin_url = os.environ["WHATSLIKE_TEST_POSTGRES_URL"]
    async with fresh_database(admin_url) as name:
        database = urlsplit(admin_url)._replace(path=f"/{name}").geturl()
        env = cluster_env(kafka, os.environ["WHATSLIKE_TEST_REDIS_URL"], database, prefix)
        began = time.monotonic()
        conversation_ids, made = await seed(database, conversations, messages)
        print(
            f"seeded {conversations} conversations, {messages} messages in "
            f"{time.monotonic() - began:.0f} s"
        )
        try:
            with processes(workdir, env, workers) as servers:
                yield servers, conversation_ids, made, env["WHATSLIKE_JWT_SECRET"], prefix
        finally:
            await delete_topics(kafka, prefix)


async def postmaster_pid() -> int:
    connection = await asyncpg.connect(os.environ["WHATSLIKE_TEST_POSTGRES_URL"])
    try:
        data = str(await connection.fetchval("SHOW data_directory"))
    finally:
        await connection.close()
    return int((Path(data) / "postmaster.pid").read_text().split()[0])


def socket_plan(
    servers: dict[str, Server], conversations: list[str], sockets: int, secret: str
) -> list[dict[str, str]]:
    """Socket j: hub j % 2, conversation (j // 2) % C: each conversation followed on both
    hubs (when sockets ≥ 2 C); 25 sockets per user, 400 per loopback address."""
    tokens = TokenService(secret)
    hubs = [servers["hub-1"].ws_url, servers["hub-2"].ws_url]
    users: dict[int, str] = {}
    plan = []
    for j in range(sockets):
        user = j // PER_USER
        if user not in users:
            users[user] = tokens.mint(f"agent-{user}", ORG, 6 * 3600)
        address = j // PER_ADDRESS
        plan.append(
            {
                "url": hubs[j % 2],
                "token": users[user],
                "conversation": conversations[(j // 2) % len(conversations)],
                "local": f"127.0.{address // 250}.{address % 250 + 2}",
            }
        )
    return plan


@dataclass
class Pipeline:
    """What a step runs against: the topic to feed, the processes, the sockets."""

    kafka: str
    topic: str
    servers: dict[str, Server]
    clients: Clients
    followers: Counter[str]  # conversation id → sockets following it
    postmaster: int

    async def run_step(self, step: Step, messages: list[Message], profile: Path | None) -> None:
        pids = {name: [server.process.pid] for name, server in self.servers.items()}
        pids["clients"] = [self.clients.process.pid]
        pids["producer"] = [os.getpid()]  # this process: the feed, and the bench itself
        pids.update(server_pids(self.postmaster))
        cpu_before = {name: sum(map(cpu_seconds, group)) for name, group in pids.items()}
        busy_before, all_before = host_busy()
        histograms = buckets(self.servers)
        step.produced = len(messages) * len(PHASES)
        spies = []
        if profile is not None:
            for name, server in self.servers.items():
                out = profile / f"{name}-{step.rate}.txt"
                spies.append(
                    await asyncio.create_subprocess_exec(
                        *(str(PY_SPY), "record", "-r", "50", "-f", "raw", "-o", str(out)),
                        *("-d", str(step.produced // step.rate), "-p", str(server.process.pid)),
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                )
        seen, _ = self.clients.count()
        step.produce_s = await produce(self.kafka, self.topic, messages, step.rate)
        step.expected = sum(self.followers[m.conversation_id] for m in messages) * len(PHASES)
        deadline = time.monotonic() + SETTLE_S
        while time.monotonic() < deadline:
            received, _ = self.clients.count()
            if received - seen >= step.expected:
                break
            await asyncio.sleep(0.2)
        for spy in spies:
            await spy.wait()
        step.cpu_s = {
            name: sum(map(cpu_seconds, group)) - cpu_before[name] for name, group in pids.items()
        }
        busy_after, all_after = host_busy()
        step.host_busy = (busy_after - busy_before) / max(all_after - all_before, 1e-9)
        step.stages = stage_quantiles(histograms, buckets(self.servers))
        frames = self.clients.dump()
        step.received = len(frames)
        unique = {(index, message_id, status) for index, message_id, status, _ in frames}
        step.duplicates = len(frames) - len(unique)
        step.latencies_ms = sorted(latency for *_, latency in frames)


async def one_run(args: argparse.Namespace, workdir: Path) -> list[Step]:
    kafka = os.environ["WHATSLIKE_TEST_KAFKA_URL"]
    per_step = [rate * args.seconds // len(PHASES) for rate in args.rates]
    async with deployment(workdir, args.workers, args.conversations, sum(per_step)) as (
        servers,
        conversations,
        made,
        secret,
        prefix,
    ):
        plan = socket_plan(servers, conversations, args.sockets, secret)
        followers = Counter(spec["conversation"] for spec in plan)
        began = time.monotonic()
        clients = Clients(plan)
        print(f"{args.sockets} sockets open and subscribed in {time.monotonic() - began:.0f} s")
        pipeline = Pipeline(
            kafka, prefix + TOPIC_STATUS, servers, clients, followers, await postmaster_pid()
        )
        steps = []
        try:
            offset = 0
            for rate, count in zip(args.rates, per_step, strict=True):
                step = Step(rate)
                profile = args.profile_dir if rate == args.profile_rate else None
                await pipeline.run_step(step, made[offset : offset + count], profile)
                offset += count
                steps.append(step)
                report(step)
            _, closed = clients.count()
            print(f"sockets closed by the hubs during the run: {closed}")
        finally:
            clients.close()
        return steps


def quantile(values: list[float], fraction: float) -> float:
    """Of sorted values; NaN when there are none."""
    return percentile(values, fraction) if values else float("nan")


def report(step: Step) -> None:
    lat = step.latencies_ms
    cpu = ", ".join(f"{name} {seconds:.1f}" for name, seconds in sorted(step.cpu_s.items()))
    print(
        f"{step.rate:>5}/s: {step.produced} events in {step.produce_s:.1f} s "
        f"({step.produced / step.produce_s:.0f}/s offered); frames {step.received}/"
        f"{step.expected} (lost {step.lost}, duplicates {step.duplicates}); "
        f"p50 {quantile(lat, 0.5):.0f} ms, p99 {quantile(lat, 0.99):.0f} ms, "
        f"p99.9 {quantile(lat, 0.999):.0f} ms, max {max(lat, default=0):.0f} ms; "
        f"CPU s: {cpu}; host busy {step.host_busy:.0%}"
    )
    stages = "; ".join(
        f"{name} p50 ≤{p50:g} p99 ≤{p99:g}" for name, (p50, p99) in step.stages.items()
    )
    print(f"        workers: {stages}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sockets", type=int, default=10_000)
    parser.add_argument("--conversations", type=int, default=5_000)
    parser.add_argument("--workers", type=int, default=2, help="status-worker processes")
    parser.add_argument(
        "--rates",
        type=lambda s: [int(r) for r in s.split(",")],
        default=[250, 500, 1000, 1500],
        help="events/s, one step each",
    )
    parser.add_argument("--seconds", type=int, default=10, help="seconds per step")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--profile-rate", type=int, default=0)
    parser.add_argument("--profile-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.profile_dir is not None:
        args.profile_dir.mkdir(parents=True, exist_ok=True)
    print(f"scripts/services.sh postgres redis kafka: {start_services():.1f} s")
    runs = []
    with tempfile.TemporaryDirectory(prefix="whatslike-scale-status-") as workdir:
        for run in range(args.runs):
            print(f"-- run {run + 1} of {args.runs}")
            runs.append(asyncio.run(one_run(args, Path(workdir) / f"run-{run}")))
    if args.runs > 1:
        print("rate | p50 ms | p99 ms | p99.9 ms | lost  (min / median / max over runs)")
        for index, rate in enumerate(args.rates):
            cells = []
            for column in (0.5, 0.99, 0.999, None):
                values = [
                    float(steps[index].lost)
                    if column is None
                    else quantile(steps[index].latencies_ms, column)
                    for steps in runs
                ]
                cells.append(
                    f"{min(values):.0f} / {statistics.median(values):.0f} / {max(values):.0f}"
                )
            print(f"{rate} | " + " | ".join(cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
