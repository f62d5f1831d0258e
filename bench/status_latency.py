"""How fast a status reaches a browser: a real `whatslike serve` (simulator delay 0),
one WebSocket subscriber, N messages; prints latency percentiles and throughput.

    .venv/bin/python -m bench.status_latency --messages 300 [--rate 20] [--database-url …]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

import httpx
from websockets.asyncio.client import connect

from bench.serving import UNCAPPED, temporary_server
from tests.e2e.conftest import OWN_SECRETS


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


async def run(
    url: str, ws_url: str, token: str, *, messages: int, concurrency: int, rate: float
) -> None:
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=30) as client:
        conversation = (
            await client.post(
                "/api/conversations", json={"channel": "whatsapp", "contact": "5511900000000"}
            )
        ).json()["id"]
        posted: dict[str, float] = {}
        sent_at: dict[str, float] = {}
        read_at: dict[str, float] = {}
        async with connect(f"{ws_url}?access_token={token}") as ws:
            await ws.recv()
            await ws.send(json.dumps({"type": "subscribe", "conversation_id": conversation}))
            await ws.recv()

            async def reader() -> None:
                while len(read_at) < messages:
                    frame = json.loads(await ws.recv())
                    frames = frame["frames"] if frame["type"] == "batch" else [frame]
                    now = time.perf_counter()
                    for item in frames:
                        if item.get("type") != "status":
                            continue
                        target = sent_at if item["status"] == "SENT" else read_at
                        if item["status"] in ("SENT", "READ"):
                            target.setdefault(item["message_id"], now)

            limit = asyncio.Semaphore(concurrency)

            async def post(i: int) -> None:
                if rate:
                    await asyncio.sleep(i / rate)
                async with limit:
                    started = time.perf_counter()
                    response = await client.post(
                        f"/api/conversations/{conversation}/messages", json={"text": f"m{i}"}
                    )
                    posted[response.json()["message_id"]] = started

            reading = asyncio.create_task(reader())
            began = time.perf_counter()
            await asyncio.gather(*(post(i) for i in range(messages)))
            await asyncio.wait_for(reading, timeout=120)
            elapsed = time.perf_counter() - began

    to_sent = [(sent_at[m] - posted[m]) * 1000 for m in posted if m in sent_at]
    to_read = [(read_at[m] - posted[m]) * 1000 for m in posted]
    pace = f"{rate:.0f}/s" if rate else "as fast as possible"
    print(
        f"messages: {messages}, posted {pace}, concurrency: {concurrency}, wall: {elapsed:.2f} s, "
        f"{messages / elapsed:.0f} messages/s to READ"
    )
    for name, values in (("POST→SENT frame", to_sent), ("POST→READ frame", to_read)):
        print(
            f"{name}: p50 {statistics.median(values):.1f} ms, p95 {percentile(values, 0.95):.1f}"
            f" ms, p99 {percentile(values, 0.99):.1f} ms, max {max(values):.1f} ms"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--rate", type=float, default=0, help="messages per second (0: max)")
    parser.add_argument("--database-url", default="")
    args = parser.parse_args()
    env = {"WHATSLIKE_SIM_DELAY_MS": "0", **UNCAPPED}
    if args.database_url:
        # Not the embedded mode: the simulator is named, and the credentials are our own.
        env["WHATSLIKE_DATABASE_URL"] = args.database_url
        env["WHATSLIKE_ROLES"] = "api,router,connector,status-worker,simulator"
        env.update(OWN_SECRETS)
    with temporary_server(env) as server:
        token = server.token("bench-org")
        asyncio.run(
            run(
                server.url,
                server.ws_url,
                token,
                messages=args.messages,
                concurrency=args.concurrency,
                rate=args.rate,
            )
        )


if __name__ == "__main__":
    main()
