"""How hubs should hear Redis: one pattern (`PSUBSCRIBE status:*`) or one channel per
conversation they have a local subscriber for (`SUBSCRIBE status:<id>`, what
whatslike/fanout/redis.py does). A redis-server of its own on a free loopback port, H hub
processes, C conversations of which a fraction has a subscriber on some hub (spread over
the hubs), M statuses published round-robin over all C conversations by a pipelined
publisher; prints, per mode and fraction, Redis CPU and each hub's CPU per published
status, what the hubs read and what they could deliver.

    .venv/bin/python -m bench.redis_fanout --conversations 10000 --hubs 4 --messages 40000

A channels-mode hub is the real RedisFanout; a pattern-mode hub reads with the same loop
(one raw redis-py connection, hiredis, `read_response`), so they differ only in what they
subscribe to. Each hub hands every message to a listener that does what `Hub.on_fanout`
does first: find the conversation's local subscribers, and stop when there are none.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

import redis
import redis.asyncio
from redis.asyncio import ConnectionPool
from redis.asyncio.client import PubSub
from redis.asyncio.connection import AbstractConnection

from whatslike.events import status_channel
from whatslike.fanout.redis import RedisFanout

PREFIX = status_channel("")


class Counter:
    """The listener: what `Hub.on_fanout` does before any socket work."""

    def __init__(self, local: set[str]) -> None:
        self.local = local
        self.received = 0
        self.delivered = 0

    def __call__(self, channel: str, payload: bytes) -> None:
        self.received += 1
        if channel[len(PREFIX) :] in self.local:
            self.delivered += 1


async def pattern_link(url: str) -> AbstractConnection:
    """A connection subscribed to `status:*`."""
    make: Callable[[], AbstractConnection] = ConnectionPool.from_url(url).make_connection
    conn = make()
    await conn.connect()  # type: ignore[no-untyped-call]
    await conn.send_packed_command(conn.pack_command("PSUBSCRIBE", PREFIX + "*"))
    await conn.read_response()  # the confirmation
    return conn


async def pattern_reader(conn: AbstractConnection, listener: Callable[[str, bytes], None]) -> None:
    """The adapter's read loop, on pmessage replies."""
    while True:
        reply = await conn.read_response()
        if type(reply) is list and reply[0] == b"pmessage":
            listener(reply[2].decode(), reply[3])


async def pubsub_link(url: str) -> PubSub:
    """For comparison: redis-py's own PubSub, subscribed to `status:*`."""
    pubsub = redis.asyncio.Redis.from_url(url).pubsub()
    await pubsub.psubscribe(PREFIX + "*")
    await pubsub.get_message(timeout=None)  # the confirmation
    return pubsub


async def pubsub_reader(pubsub: PubSub, listener: Callable[[str, bytes], None]) -> None:
    while True:
        message = await pubsub.get_message(timeout=None)
        if message is not None and message["type"] == "pmessage":
            listener(message["channel"].decode(), message["data"])


async def hub(spec: dict[str, Any]) -> None:
    """One hub process: subscribe, say `ready`, answer `report` lines with its counters."""
    local = set(spec["conversations"])
    counter = Counter(local)
    started = time.perf_counter()
    reader: asyncio.Task[None] | None = None
    fanout: RedisFanout | None = None
    if spec["mode"] == "pattern":
        reader = asyncio.create_task(pattern_reader(await pattern_link(spec["url"]), counter))
    elif spec["mode"] == "pubsub":
        reader = asyncio.create_task(pubsub_reader(await pubsub_link(spec["url"]), counter))
    else:
        fanout = RedisFanout(spec["url"])
        fanout.listen(counter)
        await fanout.start()
        await asyncio.gather(*(fanout.add(status_channel(cid)) for cid in local))
    subscribe_s = time.perf_counter() - started
    print("ready", flush=True)
    cpu_ready: float | None = None
    while True:
        line = await asyncio.to_thread(sys.stdin.readline)
        if line.strip() == "start":
            cpu_ready = time.process_time()
            continue
        if line.strip() != "report":
            break
        cpu = time.process_time() - (cpu_ready or 0.0)
        report = {"received": counter.received, "delivered": counter.delivered, "cpu_s": cpu}
        print(json.dumps({**report, "subscribe_s": subscribe_s}), flush=True)
    if reader is not None:
        reader.cancel()
    if fanout is not None:
        await fanout.stop()


@dataclass
class HubProcess:
    process: subprocess.Popen[str]
    expected: int

    def ask(self, line: str) -> str:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()
        return self.process.stdout.readline() if line == "report" else ""


@contextmanager
def own_redis() -> Iterator[str]:
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("redis-server is not installed: run ./scripts/services.sh redis")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as directory:
        server = subprocess.Popen(
            [binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "",
             "--appendonly", "no", "--dir", directory],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        client = redis.Redis(port=port)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    sys.exit("redis-server did not start")
                time.sleep(0.05)
        try:
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            server.terminate()
            server.wait()


def redis_cpu_s(client: redis.Redis) -> float:
    info = cast(dict[str, Any], client.info("cpu"))
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def payload(conversation: str, seq: int) -> bytes:
    """About the size of a real status frame."""
    return json.dumps(
        {
            "type": "status",
            "conversation_id": conversation,
            "message_id": f"msg_{seq:026d}",
            "status": "DELIVERED",
            "seq": seq,
            "occurred_at": "2026-12-01T21:00:00.000Z",
            "error": None,
        }
    ).encode()


def run(
    url: str, mode: str, conversations: list[str], *, hubs: int, fraction: float, messages: int
) -> dict[str, Any]:
    followed = conversations[: round(len(conversations) * fraction)]
    owned = [followed[h::hubs] for h in range(hubs)]
    per_conversation = {cid: 0 for cid in conversations}
    for n in range(messages):
        per_conversation[conversations[n % len(conversations)]] += 1
    processes: list[HubProcess] = []
    for local in owned:
        process = subprocess.Popen(
            [sys.executable, "-m", "bench.redis_fanout", "--hub"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert process.stdin is not None and process.stdout is not None
        process.stdin.write(json.dumps({"mode": mode, "url": url, "conversations": local}) + "\n")
        process.stdin.flush()
        if process.stdout.readline().strip() != "ready":
            sys.exit("a hub did not start")
        heard = messages if mode != "channels" else sum(per_conversation[c] for c in local)
        processes.append(HubProcess(process, heard))
    client = redis.Redis.from_url(url)
    for hub_process in processes:
        hub_process.ask("start")
    redis_before = redis_cpu_s(client)
    started = time.perf_counter()
    pipe = client.pipeline(transaction=False)
    for n in range(messages):
        cid = conversations[n % len(conversations)]
        pipe.publish(status_channel(cid), payload(cid, n))
        if len(pipe) >= 1000:
            pipe.execute()
    pipe.execute()
    publish_s = time.perf_counter() - started
    reports = []
    for hub_process in processes:
        deadline = time.monotonic() + 120
        while True:
            report = json.loads(hub_process.ask("report"))
            if report["received"] >= hub_process.expected:
                break
            if time.monotonic() > deadline:
                sys.exit(f"a hub heard {report['received']} of {hub_process.expected}")
            time.sleep(0.05)
        reports.append(report)
    redis_s = redis_cpu_s(client) - redis_before
    for hub_process in processes:
        hub_process.ask("stop")
        hub_process.process.wait()
    client.close()
    received = sum(r["received"] for r in reports)
    delivered = sum(r["delivered"] for r in reports)
    hub_cpu = sum(r["cpu_s"] for r in reports)
    return {
        "mode": mode,
        "followed": fraction,
        "channels": len(followed),
        "publish_per_s": messages / publish_s,
        "redis_us": redis_s / messages * 1e6,
        "hub_us": hub_cpu / hubs / messages * 1e6,
        "hub_us_per_delivered": hub_cpu / delivered * 1e6 if delivered else float("nan"),
        "received": received,
        "delivered": delivered,
        "subscribe_s": max(r["subscribe_s"] for r in reports),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--conversations", type=int, default=10_000)
    parser.add_argument("--hubs", type=int, default=4)
    parser.add_argument("--messages", type=int, default=40_000)
    parser.add_argument("--followed", default="1,0.1,0.01", help="fractions, comma-separated")
    parser.add_argument(
        "--modes",
        default="pattern,channels",
        help="pattern (PSUBSCRIBE, the adapter's reader), channels (the adapter), pubsub"
        " (PSUBSCRIBE through redis-py's PubSub.get_message)",
    )
    parser.add_argument("--hub", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.hub:
        asyncio.run(hub(json.loads(sys.stdin.readline())))
        return
    conversations = [f"conv_{n:05d}" for n in range(args.conversations)]
    print(
        f"{args.conversations} conversations, {args.hubs} hubs, {args.messages} statuses "
        "published round-robin over all conversations\n"
    )
    header = (
        f"{'mode':<9}{'followed':>9}{'channels':>9}{'publish/s':>11}{'Redis µs/pub':>14}"
        f"{'hub µs/pub':>12}{'µs/deliv':>10}{'read':>9}{'deliv':>8}{'sub s':>7}"
    )
    print(header)
    with own_redis() as url:
        for fraction in (float(part) for part in args.followed.split(",")):
            for mode in args.modes.split(","):
                sizes = {"hubs": args.hubs, "fraction": fraction, "messages": args.messages}
                r = run(url, mode, conversations, **sizes)
                print(
                    f"{r['mode']:<9}{r['followed']:>9.0%}{r['channels']:>9}"
                    f"{r['publish_per_s']:>11,.0f}{r['redis_us']:>14.2f}{r['hub_us']:>12.2f}"
                    f"{r['hub_us_per_delivered']:>10.2f}{r['received']:>9}{r['delivered']:>8}"
                    f"{r['subscribe_s']:>7.2f}",
                    flush=True,
                )
    print(
        "\nRedis µs/pub: Redis CPU per published status (INFO cpu). hub µs/pub: one hub's CPU"
        " per published status (mean over hubs). µs/deliv: all hubs' CPU per status that had a"
        " local subscriber. read/deliv: statuses all hubs read / could deliver. sub s: time to"
        " subscribe a hub's share."
    )


if __name__ == "__main__":
    main()
