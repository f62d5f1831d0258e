"""The whole send job, end to end (issue 13): messages POSTed → sent to the provider
stand-in → its status webhooks → applied → READ frames on subscribed sockets.

    python -m bench.send --runs 3                       # S1 embedded + S3/S4, 10,000 msgs
    python -m bench.send --layout scaled --runs 3       # S2: Kafka + Redis + PostgreSQL
    python -m bench.send --layout scaled --connectors 2 --workers 2
    python -m bench.send --layout scaled --store cassandra   # Kafka + Redis + Cassandra

Each run starts fresh processes: the simulator in a process of its own (`SIM_DELAY_MS=0`)
and either the embedded pipeline (one `whatslike serve`, SQLite, in-process bus) or the
scaled-out one (api, router, connector(s), status worker(s) as separate processes on the
local Kafka, Redis and PostgreSQL of `scripts/services.sh`, or Cassandra with `--store
cassandra`: a fresh keyspace on `--cassandra-url`, default the node of
`scripts/services.sh cassandra`). It then

1. *throughput*: POSTs `--messages` over `--conversations` as fast as the API takes them
   (`--inflight` requests at once) and times the first POST to the last READ frame;
2. *latency*: POSTs at `--latency-rate` (Meta's default tier, 80/s) for
   `--latency-seconds` and reports POST → READ frame p50/p99;

while it reads the CPU time (utime + stime) of every process: ours, the simulator's,
and the servers' (PostgreSQL, Kafka, Redis) apart, and the load generator's own. It
prints a line per phase as it goes and a table at the end (min / median / max of the
runs), then the verdicts of S1 to S4.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import httpx

from bench.chaos import fresh_database, fresh_keyspace
from bench.cpucap import capped, parse_caps
from bench.timeline import print_hops, print_slowest, timeline
from tests.e2e.conftest import OWN_SECRETS, Server, free_port, start_server, stop_server
from tests.scale.harness import Watcher, percentile
from whatslike.auth import TokenService

REPO = Path(__file__).resolve().parent.parent
ORG = "org-send"
#: Subscriptions per WebSocket (the hub's MAX_SUBSCRIPTIONS default is 200).
PER_SOCKET = 200
SETTLE_S = 300.0
#: Meta's default per-number tier: the rate of the latency phase and S1/S2's p99 target.
DEFAULT_TIER = 80.0
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process and its waited-for children (/proc/<pid>/stat)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return sum(int(value) for value in fields[11:15]) / TICKS


def pids_of(pattern: str) -> list[int]:
    done = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True, check=False)
    return [int(pid) for pid in done.stdout.split()]


@dataclass
class Processes:
    """Who is measured: our roles, the stand-in, the servers (by command line)."""

    ours: dict[str, int]
    simulator: int
    servers: dict[str, list[int]] = field(default_factory=dict)

    def sample(self) -> dict[str, float]:
        taken = {name: cpu_seconds(pid) for name, pid in self.ours.items()}
        taken["simulator"] = cpu_seconds(self.simulator)
        for name, pids in self.servers.items():
            taken[name] = sum(cpu_seconds(pid) for pid in pids)
        taken["generator"] = time.process_time()
        return taken


def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {name: after[name] - before.get(name, 0.0) for name in after}


@dataclass
class Deployment:
    servers: dict[str, Server]
    jwt_secret: str
    processes: Processes
    #: The Kafka topics' prefix (scaled layout), for `--trace`.
    topic_prefix: str = ""

    @property
    def api(self) -> list[Server]:
        return [s for name, s in self.servers.items() if name.startswith("api")]


def simulator_env(connector_urls: list[str]) -> dict[str, str]:
    return {
        "WHATSLIKE_ROLES": "simulator",
        "WHATSLIKE_SIM_DELAY_MS": "0",
        "WHATSLIKE_SIM_WEBHOOK_URL": ",".join(connector_urls),
        "WHATSLIKE_SIM_QUEUE_SIZE": "200000",
        "WHATSLIKE_HOST": "127.0.0.1",
        **OWN_SECRETS,
    }


def shared_env(jwt_secret: str, simulator_url: str) -> dict[str, str]:
    return {
        "WHATSLIKE_JWT_SECRET": jwt_secret,
        "WHATSLIKE_GRAPH_URL": f"{simulator_url}/simulator",
        # The load measures the pipeline, not the per-organization API budget.
        "WHATSLIKE_ORG_REQUESTS_PER_S": "100000",
        "WHATSLIKE_ORG_REQUEST_BURST": "100000",
        # A number on Meta's upgraded tier (1,000/s): the default (80/s) would pace the
        # throughput phase at 80 msg/s by design.
        "WHATSLIKE_WHATSAPP_SENDS_PER_S": "1000",
        "WHATSLIKE_MAX_SUBSCRIPTIONS": str(PER_SOCKET),
        # A watcher subscribes to its 200 conversations at once.
        "WHATSLIKE_CLIENT_FRAMES_PER_S": "1000",
        "WHATSLIKE_CLIENT_FRAME_BURST": str(PER_SOCKET),
        **OWN_SECRETS,
    }


@contextmanager
def servers_stopped(servers: dict[str, Server]) -> Iterator[None]:
    try:
        yield
    finally:
        for server in servers.values():
            stop_server(server)


@asynccontextmanager
async def embedded(workdir: Path, extra: dict[str, str]) -> AsyncIterator[Deployment]:
    jwt_secret = uuid.uuid4().hex * 2
    port, sim_port = free_port(), free_port()
    servers: dict[str, Server] = {}
    with servers_stopped(servers):
        servers["simulator"] = start_server(
            workdir / "simulator", simulator_env([f"http://127.0.0.1:{port}"]), sim_port
        )
        env = {
            **shared_env(jwt_secret, servers["simulator"].url),
            "WHATSLIKE_ROLES": "api,router,connector,status-worker",
            **extra,
        }
        servers["api"] = start_server(workdir / "embedded", env, port)
        processes = Processes(
            {"whatslike": servers["api"].process.pid}, servers["simulator"].process.pid
        )
        yield Deployment(servers, jwt_secret, processes)


@asynccontextmanager
async def store_url(store: str, cassandra_url: str) -> AsyncIterator[str]:
    """A fresh database on the local PostgreSQL (dropped afterwards), or a fresh keyspace
    on Cassandra (left in place)."""
    if store == "cassandra":
        yield await fresh_keyspace(cassandra_url or os.environ["WHATSLIKE_TEST_CASSANDRA_URL"])
        return
    admin_url = os.environ["WHATSLIKE_TEST_POSTGRES_URL"]
    async with fresh_database(admin_url) as name:
        yield urlsplit(admin_url)._replace(path=f"/{name}").geturl()


#: The store's server processes, by command line (for Cassandra: every node on the
#: machine, the one measured and any other).
STORE_PROCESSES = {
    "postgres": ("postgresql", "postgres"),
    "cassandra": ("cassandra", "CassandraDaemon"),
}


@asynccontextmanager
async def scaled(
    workdir: Path, args: argparse.Namespace, extra: dict[str, str]
) -> AsyncIterator[Deployment]:
    connectors, workers = args.connectors, args.workers
    kafka = os.environ["WHATSLIKE_TEST_KAFKA_URL"]
    jwt_secret = uuid.uuid4().hex * 2
    prefix = f"send-{uuid.uuid4().hex[:8]}."
    async with store_url(args.store, args.cassandra_url) as database:
        connector_ports = [free_port() for _ in range(connectors)]
        servers: dict[str, Server] = {}
        # The caps' groups are removed once the servers in them have stopped.
        with ExitStack() as caps, servers_stopped(servers):
            servers["simulator"] = start_server(
                workdir / "simulator",
                simulator_env([f"http://127.0.0.1:{p}" for p in connector_ports]),
                free_port(),
            )
            env = {
                **shared_env(jwt_secret, servers["simulator"].url),
                "WHATSLIKE_BUS_URL": kafka,
                "WHATSLIKE_FANOUT_URL": os.environ["WHATSLIKE_TEST_REDIS_URL"],
                "WHATSLIKE_DATABASE_URL": database,
                "WHATSLIKE_KAFKA_TOPIC_PREFIX": prefix,
                **extra,
            }
            plans = [("api-1", "api", 0), ("router", "router", 0)]
            plans += [(f"connector-{n + 1}", "connector", p) for n, p in enumerate(connector_ports)]
            plans += [(f"worker-{n + 1}", "status-worker", 0) for n in range(workers)]
            for process_name, roles, port in plans:
                own = {**env, "WHATSLIKE_ROLES": roles}
                servers[process_name] = start_server(workdir / process_name, own, port)
                if roles in args.cpu_cap:
                    caps.enter_context(
                        capped(servers[process_name].process.pid, args.cpu_cap[roles])
                    )
                    print(f"  {process_name}: capped at {args.cpu_cap[roles]:g} of a core")
            ours = {n: s.process.pid for n, s in servers.items() if n != "simulator"}
            store_name, store_pattern = STORE_PROCESSES[args.store]
            processes = Processes(
                ours,
                servers["simulator"].process.pid,
                {
                    store_name: pids_of(store_pattern),
                    "kafka": pids_of("kafka.Kafka"),
                    "redis": pids_of("redis-server"),
                },
            )
            yield Deployment(servers, jwt_secret, processes, prefix)


async def create_conversations(deployment: Deployment, count: int) -> list[str]:
    token = TokenService(deployment.jwt_secret).mint("bench", ORG, 3600)
    made: list[str] = []
    async with httpx.AsyncClient(
        base_url=deployment.api[0].url, headers={"Authorization": f"Bearer {token}"}, timeout=30
    ) as client:
        for n in range(count):
            response = await client.post(
                "/api/conversations", json={"channel": "whatsapp", "contact": f"5511{n:09d}"}
            )
            response.raise_for_status()
            made.append(response.json()["id"])
    return made


async def open_watchers(deployment: Deployment, conversations: list[str]) -> list[Watcher]:
    token = TokenService(deployment.jwt_secret).mint("bench-watcher", ORG, 3600)
    watchers = [
        Watcher(deployment.api[0], ORG, conversations[n : n + PER_SOCKET], token)
        for n in range(0, len(conversations), PER_SOCKET)
    ]
    for watcher in watchers:
        await watcher.start()
    return watchers


@dataclass
class Phase:
    messages: int
    seconds: float
    cpu: dict[str, float]
    latencies: list[float]
    #: Each message's POST and READ frame, wall-clock seconds (for `--trace`).
    posted: dict[str, float] = field(default_factory=dict)
    read: dict[str, float] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.messages / self.seconds

    def cpu_ms_per_message(self, names: list[str]) -> float:
        return 1000 * sum(self.cpu[n] for n in names if n in self.cpu) / self.messages


async def post_all(
    deployment: Deployment,
    conversations: list[str],
    count: int,
    *,
    inflight: int,
    rate: float | None,
) -> dict[str, float]:
    """POST `count` messages round-robin over the conversations; their POST times."""
    token = TokenService(deployment.jwt_secret).mint("bench", ORG, 3600)
    posted: dict[str, float] = {}
    # aiohttp: the generator shares the two cores with what it measures, and httpx
    # costs several times its CPU per request.
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=inflight),
        headers={"Authorization": f"Bearer {token}"},
        timeout=aiohttp.ClientTimeout(total=30),
    )
    urls = [api.url for api in deployment.api]
    gate = asyncio.Semaphore(inflight)
    began = time.monotonic()

    async def one(n: int) -> None:
        url = f"{urls[n % len(urls)]}/api/conversations/{conversations[n % len(conversations)]}"
        body = {"text": f"bench {n}", "client_message_id": uuid.uuid4().hex}
        try:
            for _ in range(100):
                at = time.monotonic()
                async with session.post(f"{url}/messages", json=body) as response:
                    answer = await response.json()
                    if response.status in (200, 202):
                        posted.setdefault(answer["message_id"], at)
                        return
                    assert response.status in (429, 503), answer
                await asyncio.sleep(0.2)
            raise AssertionError("a message was never accepted")
        finally:
            gate.release()

    tasks = []
    try:
        for n in range(count):
            if rate is not None:
                await asyncio.sleep(max(0.0, began + n / rate - time.monotonic()))
            await gate.acquire()
            tasks.append(asyncio.create_task(one(n)))
        await asyncio.gather(*tasks)
    finally:
        await session.close()
    return posted


async def phase(
    deployment: Deployment,
    conversations: list[str],
    watchers: list[Watcher],
    count: int,
    *,
    inflight: int,
    rate: float | None,
    profile: Path | None = None,
) -> Phase:
    before = deployment.processes.sample()
    began = time.monotonic()
    with profiled(deployment, profile):
        posted = await post_all(deployment, conversations, count, inflight=inflight, rate=rate)

    def read_at(message_id: str) -> float | None:
        for watcher in watchers:
            at = watcher.arrived.get((message_id, "READ"))
            if at is not None:
                return at
        return None

    deadline = time.monotonic() + SETTLE_S
    waiting = set(posted)
    while waiting:
        waiting = {m for m in waiting if read_at(m) is None}
        broken = "; ".join(filter(None, (w.healthy() for w in watchers)))
        assert not broken, broken
        if time.monotonic() > deadline:
            raise AssertionError(f"{len(waiting)} messages not READ within {SETTLE_S} s")
        if waiting:
            await asyncio.sleep(0.05)
    reads = {m: read_at(m) for m in posted}
    last = max(at for at in reads.values() if at is not None)
    cpu = delta(before, deployment.processes.sample())
    lat = sorted((reads[m] or 0.0) - posted[m] for m in posted)
    wall = time.time() - time.monotonic()
    return Phase(
        len(posted),
        last - began,
        cpu,
        lat,
        {m: at + wall for m, at in posted.items()},
        {m: (at or 0.0) + wall for m, at in reads.items()},
    )


async def send_outcomes(deployment: Deployment) -> dict[str, float]:
    """`whatslike_provider_sends_total` by outcome, summed over the processes: an outcome
    `unknown` in a run without faults would be a false one (issue 17)."""
    found: dict[str, float] = {}
    pattern = re.compile(r'^whatslike_provider_sends_total\{[^}]*outcome="([^"]+)"[^}]*\} (\S+)$')
    async with httpx.AsyncClient(timeout=30) as client:
        for name, server in deployment.servers.items():
            if name == "simulator":
                continue
            text = (await client.get(server.url + "/metrics")).text
            for line in text.splitlines():
                match = pattern.match(line)
                if match:
                    found[match[1]] = found.get(match[1], 0.0) + float(match[2])
    return found


@contextmanager
def profiled(deployment: Deployment, where: Path | None) -> Iterator[None]:
    """py-spy (all threads, collapsed stacks) on each of our processes and the stand-in
    while the block runs; files `<where>/<process>.txt`."""
    if where is None:
        yield
        return
    spy = Path(sys.executable).parent / "py-spy"
    if not spy.exists():
        raise SystemExit(f"--profile needs py-spy: {spy.parent}/pip install py-spy")
    where.mkdir(parents=True, exist_ok=True)
    pids = {**deployment.processes.ours, "simulator": deployment.processes.simulator}
    spies = [
        subprocess.Popen(
            [
                str(Path(sys.executable).parent / "py-spy"),
                "record",
                "--pid",
                str(pid),
                "--rate",
                "200",
                "--format",
                "raw",
                "--nonblocking",
                "--output",
                str(where / f"{name}.txt"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for name, pid in pids.items()
    ]
    try:
        yield
    finally:
        for watcher in spies:
            watcher.send_signal(signal.SIGINT)
        for watcher in spies:
            watcher.wait(timeout=60)


@contextmanager
def kept_logs(deployment: Deployment, where: Path | None) -> Iterator[None]:
    """Each process's output so far in `<where>/<process>.log` when the block ends (the
    run's directory is removed after it)."""
    try:
        yield
    finally:
        if where is not None:
            where.mkdir(parents=True, exist_ok=True)
            for name, server in deployment.servers.items():
                (where / f"{name}.log").write_text("".join(server.output))


@dataclass
class Run:
    throughput: Phase
    latency: Phase
    #: Provider send calls by outcome (ok, unknown, retry, throttled_*), all connectors.
    sends: dict[str, float]


async def one_run(args: argparse.Namespace, extra: dict[str, str]) -> Run:
    with tempfile.TemporaryDirectory(prefix="bench-send-") as tmp:
        workdir = Path(tmp)
        context = (
            embedded(workdir, extra) if args.layout == "embedded" else scaled(workdir, args, extra)
        )
        async with context as deployment:
            with kept_logs(deployment, args.logs):
                conversations = await create_conversations(deployment, args.conversations)
                watchers = await open_watchers(deployment, conversations)
                try:
                    print(f"  ready: {len(conversations)} conversations, {len(watchers)} sockets")
                    throughput = await phase(
                        deployment,
                        conversations,
                        watchers,
                        args.messages,
                        inflight=args.inflight,
                        rate=None,
                        profile=args.profile,
                    )
                    print_phase("throughput", throughput, deployment)
                    latency = await phase(
                        deployment,
                        conversations,
                        watchers,
                        int(args.latency_rate * args.latency_seconds),
                        inflight=args.inflight,
                        rate=args.latency_rate,
                        profile=args.profile_latency,
                    )
                    print_phase(f"at {args.latency_rate:g}/s", latency, deployment)
                    if args.trace:
                        kafka = os.environ["WHATSLIKE_TEST_KAFKA_URL"]
                        found = await timeline(
                            kafka, deployment.topic_prefix, latency.posted, latency.read
                        )
                        print_hops(found.hops(latency.posted), print)
                        print_slowest(found, 10, print)
                finally:
                    for watcher in watchers:
                        await watcher.close()
                    sends = await send_outcomes(deployment)
                    print(f"  provider sends by outcome: {sends}")
                return Run(throughput, latency, sends)


def ours(deployment_cpu: dict[str, float]) -> list[str]:
    others = {"simulator", "postgresql", "cassandra", "kafka", "redis", "generator"}
    return [name for name in deployment_cpu if name not in others]


def print_phase(label: str, result: Phase, deployment: Deployment) -> None:
    names = ours(result.cpu)
    cpu = ", ".join(f"{n} {result.cpu[n]:.1f}" for n in sorted(result.cpu))
    print(
        f"  {label}: {result.messages} messages in {result.seconds:.1f} s = "
        f"{result.rate:.0f} msg/s; POST→READ p50 {percentile(result.latencies, 0.5) * 1000:.0f}"
        f" ms p99 {percentile(result.latencies, 0.99) * 1000:.0f} ms; our CPU "
        f"{result.cpu_ms_per_message(names):.2f} ms/msg; CPU s: {cpu}",
        flush=True,
    )


def spread(values: list[float], fmt: str = "{:.0f}") -> str:
    return " / ".join(fmt.format(v) for v in (min(values), statistics.median(values), max(values)))


def report(args: argparse.Namespace, runs: list[Run]) -> None:
    names = ours(runs[0].throughput.cpu)
    rates = [r.throughput.rate for r in runs]
    cpu = [r.throughput.cpu_ms_per_message(names) for r in runs]
    sim = [r.throughput.cpu_ms_per_message(["simulator"]) for r in runs]
    sim_busy = [r.throughput.cpu["simulator"] / r.throughput.seconds for r in runs]
    p99 = [percentile(r.latency.latencies, 0.99) * 1000 for r in runs]
    p50 = [percentile(r.latency.latencies, 0.5) * 1000 for r in runs]
    layout = args.layout
    if layout == "scaled":
        layout += f" ({args.connectors} connector, {args.workers} worker, {args.store})"
    print(f"\n{layout}, {args.messages} messages over {args.conversations} conversations,")
    print(f"{len(runs)} runs (min / median / max):")
    print(f"  throughput, 202 → READ frame:   {spread(rates)} msg/s")
    print(f"  status changes (x3):            {spread([3 * r for r in rates])} /s")
    print(f"  our CPU per message:            {spread(cpu, '{:.2f}')} ms")
    for server in ("postgresql", "cassandra", "kafka", "redis"):
        if server in runs[0].throughput.cpu:
            values = [r.throughput.cpu_ms_per_message([server]) for r in runs]
            print(
                f"  {server} CPU per message:{' ' * (14 - len(server))}"
                f"{spread(values, '{:.2f}')} ms"
            )
    print(f"  stand-in CPU per message:       {spread(sim, '{:.2f}')} ms")
    print(f"  stand-in busy (share of a core): {spread(sim_busy, '{:.2f}')}")
    print(f"  at {args.latency_rate:g}/s POST → READ p50:   {spread(p50)} ms")
    print(f"  at {args.latency_rate:g}/s POST → READ p99:   {spread(p99)} ms")
    unknown = [r.sends.get("unknown", 0.0) for r in runs]
    print(f"  sends of unknown outcome:       {spread(unknown)}")
    target_p99 = 100 if args.layout == "embedded" else 250
    median_rate = statistics.median(rates)
    verdicts = [
        (
            "S1" if args.layout == "embedded" else "S2",
            f"≥ 300 msg/s: {median_rate:.0f}",
            median_rate >= 300,
        ),
        (
            "S1" if args.layout == "embedded" else "S2",
            f"p99 ≤ {target_p99} ms at {args.latency_rate:g}/s: {statistics.median(p99):.0f}",
            statistics.median(p99) <= target_p99,
        ),
        ("S3", f"≤ 2 ms CPU/msg: {statistics.median(cpu):.2f}", statistics.median(cpu) <= 2),
        # The stand-in can take twice the rate if it used under half a core at this one.
        (
            "S4",
            f"stand-in below half a core: {statistics.median(sim_busy):.2f}",
            statistics.median(sim_busy) < 0.5,
        ),
    ]
    for name, text, met in verdicts:
        print(f"  {name} {'met' if met else 'NOT met'}: {text}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layout", choices=("embedded", "scaled"), default="embedded")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--conversations", type=int, default=1_000)
    parser.add_argument("--inflight", type=int, default=64)
    parser.add_argument("--latency-rate", type=float, default=DEFAULT_TIER)
    parser.add_argument("--latency-seconds", type=float, default=15.0)
    parser.add_argument("--connectors", type=int, default=1)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--store", choices=("postgres", "cassandra"), default="postgres")
    parser.add_argument("--cassandra-url", default="", help="default: WHATSLIKE_TEST_CASSANDRA_URL")
    parser.add_argument("--profile", type=Path, help="py-spy profiles of the throughput phase")
    parser.add_argument(
        "--profile-latency", type=Path, help="py-spy profiles of the latency phase (80/s)"
    )
    parser.add_argument(
        "--trace",
        action="store_true",
        help="scaled: the latency phase's messages hop by hop (bench/timeline.py)",
    )
    parser.add_argument("--logs", type=Path, help="each process's output, DIR/<process>.log")
    parser.add_argument(
        "--cpu-cap",
        action="append",
        default=[],
        metavar="ROLE=CORES",
        help="scaled: each process of ROLE (api, router, connector, status-worker) limited"
        " to CORES of one core, in a cgroup of its own (bench/cpucap.py; needs root)",
    )
    parser.add_argument(
        "--env", action="append", default=[], help="NAME=VALUE for our processes (repeatable)"
    )
    args = parser.parse_args()
    if args.trace and args.layout != "scaled":
        parser.error("--trace needs --layout scaled (it reads the Kafka topics)")
    extra = dict(item.split("=", 1) for item in args.env)
    try:
        args.cpu_cap = parse_caps(args.cpu_cap)
    except ValueError as exc:
        parser.error(str(exc))
    if args.cpu_cap and args.layout != "scaled":
        parser.error("--cpu-cap needs --layout scaled (one process per role)")
    if unknown := set(args.cpu_cap) - {"api", "router", "connector", "status-worker"}:
        parser.error(f"--cpu-cap: no such role {', '.join(sorted(unknown))}")
    if args.layout == "scaled":
        load_services()
    runs = []
    for n in range(args.runs):
        print(f"run {n + 1}/{args.runs} ({args.layout})", flush=True)
        runs.append(asyncio.run(one_run(args, extra)))
    report(args, runs)


def load_services() -> None:
    for env_file in sorted((REPO / ".services").glob("*.env")):
        for line in env_file.read_text().splitlines():
            name, sep, value = line.partition("=")
            if sep and name.startswith("WHATSLIKE_TEST_"):
                os.environ.setdefault(name, value)


if __name__ == "__main__":
    main()
