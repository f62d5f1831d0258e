"""Embedded status ingest: signed WhatsApp status webhooks posted straight into a real
`whatslike serve` at increasing open-loop rates, 1 and 10 statuses per POST; per status,
the time from its POST to its status frame on one WebSocket subscribed to every
conversation.

    .venv/bin/python -m bench.ingest [--runs 3] [--rates 100,250,500,1000,2000,3000]
    .venv/bin/python -m bench.ingest --database-url postgresql://postgres@127.0.0.1:5432/postgres

The store is prepared before the server starts (conversations, messages whose provider
ids are linked and whose send hand-offs are done), so every webhook applies and nothing
else runs. With `--database-url` a fresh database is created next to the one named (and
dropped after); the server then runs every role but the simulator, with its own Meta
credentials. Latency is counted from the time a POST was due (open loop: a slow server
does not slow the sender down), so queueing shows up in it.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
from websockets.asyncio.client import ClientConnection, connect

from bench.serving import UNCAPPED
from tests.e2e.conftest import OWN_SECRETS, Server, start_server, stop_server
from whatslike.events import TOPIC_MESSAGES
from whatslike.settings import DEV_SECRETS, Settings
from whatslike.store import open_store
from whatslike.store.sqlite import SQLiteStore

ORG = "bench-org"
#: One socket subscribes to every conversation at once: no frame rate limit for that.
SUBSCRIBE_ALL = {
    **UNCAPPED,
    "WHATSLIKE_CLIENT_FRAMES_PER_S": "1000000",
    "WHATSLIKE_CLIENT_FRAME_BURST": "1000000",
}
CONVERSATIONS = 100
#: Every message takes three statuses: sent, delivered, read.
KINDS = ("sent", "delivered", "read")
PHONE_NUMBER_ID = str(Settings.model_fields["whatsapp_phone_number_id"].default)
#: HTTP keep-alive connections the sender spreads its POSTs over.
CONNECTIONS = 64
#: A step ends when every frame came, or when none came for this long (the rest is lost).
DRAIN_IDLE_S = 10.0
#: A step whose p99 passes this ends the ladder: the server is saturated.
SATURATED_P99_MS = 1000.0


@dataclass(frozen=True)
class Target:
    message_id: str
    provider_id: str


@dataclass
class Step:
    per_post: int
    rate: int
    statuses: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    delivered_per_s: float = 0.0
    lost: int = 0
    #: Statuses overtaken by a later one of the same message (a READ applied before its
    #: DELIVERED: the late DELIVERED only fills its time, protocol.md §1): no frame.
    overtaken: int = 0
    errors: int = 0

    def p(self, share: float) -> float:
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(share * len(ordered)))] if ordered else 0.0

    @property
    def ok(self) -> bool:
        return self.lost == 0 and self.errors == 0 and self.p(0.99) <= 50.0


# -- preparing the store ------------------------------------------------------------------


async def prepare(database_url: str, messages: int) -> tuple[list[str], list[Target]]:
    """Conversations and messages, every message linked to a provider id and its send
    done: each can take SENT, DELIVERED and READ."""
    # Only for the preparation: commits need not wait for the disk (the server's own
    # connections keep their settings). asyncpg takes unknown URL parameters as settings.
    postgres = database_url.startswith("postgres")
    store = open_store(f"{database_url}?synchronous_commit=off" if postgres else database_url)
    await store.open()
    if isinstance(store, SQLiteStore):
        # Only for the preparation (this connection): the server opens its own.
        await store._connection().execute("PRAGMA synchronous = OFF")
    try:
        conversations = [
            await store.create_conversation(ORG, "whatsapp", f"55119{i:08d}")
            for i in range(CONVERSATIONS)
        ]
        limit = asyncio.Semaphore(16)

        async def one(i: int) -> Target:
            async with limit:
                message, _ = await store.create_message(
                    conversations[i % CONVERSATIONS], f"m{i}", ""
                )
                provider_id = f"wamid.bench{i:07d}"
                await store.link_provider_id("whatsapp", provider_id, message.id)
                await store.handoff(done=[(TOPIC_MESSAGES, message.id)])
                return Target(message.id, provider_id)

        targets = list(await asyncio.gather(*(one(i) for i in range(messages))))
        if isinstance(store, SQLiteStore):
            # The server starts on an empty write-ahead log, not on the preparation's.
            await store._connection().execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return [c.id for c in conversations], targets
    finally:
        await store.close()


@contextmanager
def fresh_postgres(url: str, name: str) -> Iterator[str]:
    """A new, empty database on the server of `url`, dropped afterwards."""

    async def admin(sql: str) -> None:
        connection = await asyncpg.connect(url)
        try:
            await connection.execute(sql)
        finally:
            await connection.close()

    asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}"'))
    asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    parts = urlsplit(url)
    try:
        yield urlunsplit(parts._replace(path=f"/{name}"))
    finally:
        asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


# -- the webhooks -------------------------------------------------------------------------


def webhook_body(statuses: list[tuple[Target, str, int]]) -> bytes:
    return json.dumps(
        {
            "object": "whatsapp_business_account",
            "entry": [
                {
                    "id": "bench-waba",
                    "changes": [
                        {
                            "field": "messages",
                            "value": {
                                "messaging_product": "whatsapp",
                                "metadata": {
                                    "display_phone_number": "15550000000",
                                    "phone_number_id": PHONE_NUMBER_ID,
                                },
                                "statuses": [
                                    {
                                        "id": target.provider_id,
                                        "status": kind,
                                        "timestamp": str(at),
                                        "recipient_id": "5511900000000",
                                        "biz_opaque_callback_data": target.message_id,
                                    }
                                    for target, kind, at in statuses
                                ],
                            },
                        }
                    ],
                }
            ],
        },
        separators=(",", ":"),
    ).encode()


def signed_request(host: str, body: bytes, secret: str) -> bytes:
    signature = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    head = (
        f"POST /webhooks/whatsapp HTTP/1.1\r\nHost: {host}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        f"X-Hub-Signature-256: sha256={signature}\r\n\r\n"
    )
    return head.encode() + body


class Sender:
    """Keep-alive HTTP/1.1 connections, one request at a time each; raw bytes, so the
    sender costs little CPU next to the server it measures."""

    def __init__(self, host: str, port: int) -> None:
        self._host, self._port = host, port
        self._idle: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = (
            asyncio.Queue(maxsize=CONNECTIONS)
        )

    async def open(self) -> None:
        for _ in range(CONNECTIONS):
            self._idle.put_nowait(await asyncio.open_connection(self._host, self._port))

    async def close(self) -> None:
        while not self._idle.empty():
            _, writer = self._idle.get_nowait()
            writer.close()

    async def reopen(self) -> None:
        """Fresh connections: the server closes idle keep-alive ones (after 10 s)."""
        await self.close()
        await self.open()

    async def post(self, request: bytes) -> int:
        reader, writer = await self._idle.get()
        try:
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split(" ", 2)[1])
            length = 0
            for line in lines[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            if length:
                await reader.readexactly(length)
        except BaseException:
            writer.close()
            self._idle.put_nowait(await asyncio.open_connection(self._host, self._port))
            raise
        self._idle.put_nowait((reader, writer))
        return status


# -- one run --------------------------------------------------------------------------------


RANK = {kind.upper(): n for n, kind in enumerate(KINDS)}


class Frames:
    """Reads the socket: the arrival time of each (message id, status) frame."""

    def __init__(self, ws: ClientConnection) -> None:
        self._ws = ws
        self.arrived: dict[tuple[str, str], float] = {}
        #: The furthest status seen per message.
        self.furthest: dict[str, int] = {}
        self.last = time.perf_counter()

    def overtaken(self, key: tuple[str, str]) -> bool:
        return self.furthest.get(key[0], -1) > RANK[key[1]]

    async def read(self) -> None:
        async for raw in self._ws:
            now = time.perf_counter()
            frame = json.loads(raw)
            frames = frame["frames"] if frame.get("type") == "batch" else [frame]
            for item in frames:
                if item.get("type") == "status":
                    self.arrived.setdefault((item["message_id"], item["status"]), now)
                    rank = RANK[item["status"]]
                    if rank > self.furthest.get(item["message_id"], -1):
                        self.furthest[item["message_id"]] = rank
                    self.last = now
        # The server closed the socket (e.g. 4009: this reader fell behind): what follows
        # would all count as lost, so the run stops here and says why.
        raise RuntimeError(f"the server closed the socket: {self._ws.close_code}")


async def run_step(
    step: Step,
    *,
    targets: list[Target],
    sender: Sender,
    frames: Frames,
    reading: asyncio.Task[None],
    host: str,
    secret: str,
) -> None:
    at = int(time.time())
    # Each message's statuses a third of the step apart: sent for all, then delivered...
    statuses = [(t, kind, at + k) for k, kind in enumerate(KINDS) for t in targets]
    step.statuses = len(statuses)
    requests = [
        (signed_request(host, webhook_body(statuses[i : i + step.per_post]), secret), i)
        for i in range(0, len(statuses), step.per_post)
    ]
    posted: dict[tuple[str, str], float] = {}
    interval = step.per_post / step.rate
    began = time.perf_counter()

    async def fire(request: bytes, first: int, due: float) -> None:
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        for target, kind, _ in statuses[first : first + step.per_post]:
            posted[(target.message_id, kind.upper())] = due
        try:
            code = await sender.post(request)
        except (OSError, asyncio.IncompleteReadError):
            code = 0
        if code != 200:
            step.errors += 1

    await asyncio.gather(
        *(fire(request, first, began + n * interval) for n, (request, first) in enumerate(requests))
    )
    expected = set(posted)
    missing = expected
    while not reading.done():
        missing = {key for key in expected - frames.arrived.keys() if not frames.overtaken(key)}
        if not missing or time.perf_counter() - frames.last > DRAIN_IDLE_S:
            break
        await asyncio.sleep(0.05)
    if reading.done():
        reading.result()  # raises why the socket closed
    step.lost = len(missing)
    step.overtaken = len([k for k in expected - frames.arrived.keys() if frames.overtaken(k)])
    arrivals = [frames.arrived[key] for key in expected if key in frames.arrived]
    step.latencies_ms = [
        (frames.arrived[key] - posted[key]) * 1000 for key in expected if key in frames.arrived
    ]
    if arrivals:
        step.delivered_per_s = len(arrivals) / max(max(arrivals) - began, 1e-9)


async def drive(
    server: Server,
    *,
    conversations: list[str],
    targets: list[Target],
    plan: list[Step],
    secret: str,
    seconds: float,
) -> list[Step]:
    token = server.token(ORG)
    parts = urlsplit(server.url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    sender = Sender(host, port)
    await sender.open()
    done: list[Step] = []
    try:
        # The subprotocol way of docs/protocol.md §4, as the browser client connects.
        protocols = ["whatslike.v1", f"access_token.{token}"]
        async with connect(server.ws_url, subprotocols=protocols) as ws:  # type: ignore[arg-type]
            await ws.recv()
            for conversation_id in conversations:
                await ws.send(json.dumps({"type": "subscribe", "conversation_id": conversation_id}))
                answer = json.loads(await ws.recv())
                if answer.get("type") != "subscribed":
                    raise RuntimeError(f"subscribe refused: {answer}")
            frames = Frames(ws)
            reading = asyncio.create_task(frames.read())
            offset = 0
            for per_post in dict.fromkeys(s.per_post for s in plan):
                for step in (s for s in plan if s.per_post == per_post):
                    count = max(1, int(step.rate * seconds / len(KINDS)))
                    chosen = targets[offset : offset + count]
                    offset += count
                    await sender.reopen()
                    await run_step(
                        step,
                        targets=chosen,
                        sender=sender,
                        frames=frames,
                        reading=reading,
                        host=host,
                        secret=secret,
                    )
                    done.append(step)
                    _progress(step)
                    if step.p(0.99) > SATURATED_P99_MS or step.lost:
                        break  # saturated: the next rates only queue longer
            reading.cancel()
    finally:
        await sender.close()
    return done


def _progress(step: Step) -> None:
    print(
        f"  {step.per_post:>2}/POST {step.rate:>5}/s: {step.statuses} statuses,"
        f" p50 {step.p(0.5):.1f} ms, p99 {step.p(0.99):.1f} ms, max {step.p(1.0):.1f} ms,"
        f" delivered {step.delivered_per_s:.0f}/s, lost {step.lost}, errors {step.errors},"
        f" overtaken {step.overtaken}",
        flush=True,
    )


def one_run(run: int, database_url: str, plan: list[Step], seconds: float) -> list[Step]:
    messages = sum(max(1, int(s.rate * seconds / len(KINDS))) for s in plan)
    with tempfile.TemporaryDirectory() as data_dir, _database(database_url, run) as url:
        if url:
            env = {
                **SUBSCRIBE_ALL,
                **OWN_SECRETS,
                "WHATSLIKE_DATABASE_URL": url,
                "WHATSLIKE_ROLES": "api,router,connector,status-worker",
            }
            secret = OWN_SECRETS["WHATSLIKE_META_APP_SECRET"]
            store_url = url
        else:
            env = {**SUBSCRIBE_ALL}
            secret = DEV_SECRETS["meta_app_secret"]
            store_url = f"sqlite:///{Path(data_dir) / 'whatslike.db'}"
        print(f"run {run}: preparing {messages} messages", flush=True)
        conversations, targets = asyncio.run(prepare(store_url, messages))
        server = start_server(Path(data_dir), env)
        steps: list[Step] = []
        try:
            steps = asyncio.run(
                drive(
                    server,
                    conversations=conversations,
                    targets=targets,
                    plan=plan,
                    secret=secret,
                    seconds=seconds,
                )
            )
            return steps
        finally:
            if not steps or any(s.lost or s.errors for s in steps):
                problems = [line for line in server.output if " ERROR " in line or "WARN" in line]
                print("".join(problems[-20:]) or "".join(server.output[-20:]), end="")
            stop_server(server)


@contextmanager
def _database(database_url: str, run: int) -> Iterator[str]:
    if not database_url:
        yield ""
        return
    with fresh_postgres(database_url, f"whatslike_bench_ingest_{os.getpid()}_{run}") as url:
        yield url


def _spread(values: list[float], digits: int = 1) -> str:
    if not values:
        return "-"
    return (
        f"{min(values):.{digits}f} / {statistics.median(values):.{digits}f}"
        f" / {max(values):.{digits}f}"
    )


#: Issue 9's P5: status changes per second applied and delivered with p99 <= 50 ms.
P5_RATE = 2000


def table(runs: list[list[Step]], label: str) -> str:
    """Markdown: each step's figures as min / median / max over the runs that reached it."""
    lines = [
        f"| {label} | statuses/POST | offered/s | p50 ms | p99 ms | max ms |"
        " delivered/s | lost | overtaken | errors | runs |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    keys = sorted({(s.per_post, s.rate) for steps in runs for s in steps})
    for per_post, rate in keys:
        steps = [s for steps in runs for s in steps if (s.per_post, s.rate) == (per_post, rate)]
        lines.append(
            f"| | {per_post} | {rate} | {_spread([s.p(0.5) for s in steps])}"
            f" | {_spread([s.p(0.99) for s in steps])} | {_spread([s.p(1.0) for s in steps])}"
            f" | {_spread([s.delivered_per_s for s in steps], 0)}"
            f" | {sum(s.lost for s in steps)} | {sum(s.overtaken for s in steps)}"
            f" | {sum(s.errors for s in steps)} | {len(steps)} |"
        )
    for per_post in sorted({s.per_post for steps in runs for s in steps}):
        best = [
            max((s.rate for s in steps if s.per_post == per_post and s.ok), default=0)
            for steps in runs
        ]
        peak = [
            max((s.delivered_per_s for s in steps if s.per_post == per_post), default=0.0)
            for steps in runs
        ]
        lines.append(
            f"\nHighest offered rate with p99 <= 50 ms and 0 lost, {per_post}/POST:"
            f" {_spread([float(b) for b in best], 0)} (min / median / max);"
            f" peak delivered/s {_spread(peak, 0)}"
        )
        held = statistics.median(best)
        verdict = "met" if held >= P5_RATE else "not met"
        lines.append(
            f"P5 target ({label}, {per_post}/POST): >= {P5_RATE} changes/s with p99 <= 50 ms"
            f" and 0 lost; median of the runs held {held:g}/s -> {verdict}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rates", default="100,250,500,1000,2000,3000")
    parser.add_argument("--seconds", type=float, default=3.0, help="length of each step")
    parser.add_argument("--per-post", default="1,10")
    parser.add_argument("--database-url", default="", help="postgresql://… (default: SQLite)")
    args = parser.parse_args()
    rates = [int(r) for r in args.rates.split(",")]
    sizes = [int(n) for n in args.per_post.split(",")]
    label = "PostgreSQL" if args.database_url else "SQLite"
    runs: list[list[Step]] = []
    for run in range(1, args.runs + 1):
        plan = [Step(per_post, rate) for per_post in sizes for rate in rates]
        runs.append(one_run(run, args.database_url, plan, args.seconds))
    print()
    print(table(runs, label))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
