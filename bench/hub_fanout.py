"""How the hub spreads one status to many sockets: a real `whatslike serve`, N WebSocket
subscribers of one conversation, M messages; prints when each status frame reached the
first and the last subscriber.

    .venv/bin/python -m bench.hub_fanout --subscribers 500 --messages 20
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from collections import defaultdict

import httpx
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from bench.serving import UNCAPPED, temporary_server


class Arrivals:
    """When each status frame (by seq) reached each subscriber; `done` once all did."""

    def __init__(self, frames: int, subscribers: int) -> None:
        self.times: dict[int, list[float]] = defaultdict(list)
        self.left = frames * subscribers
        self.done = asyncio.Event()

    def stamp(self, seq: int, at: float) -> None:
        self.times[seq].append(at)
        self.left -= 1
        if self.left <= 0:
            self.done.set()


async def subscriber(
    ws_url: str, token: str, conversation: str, arrivals: Arrivals
) -> tuple[ClientConnection, asyncio.Task[None]]:
    """A subscribed socket and the task that stamps each status frame's arrival."""
    ws = await connect(f"{ws_url}?access_token={token}", max_queue=None)
    await ws.recv()
    await ws.send(json.dumps({"type": "subscribe", "conversation_id": conversation}))
    await ws.recv()

    async def read() -> None:
        try:
            async for raw in ws:
                now = time.perf_counter()
                frame = json.loads(raw)
                for item in frame["frames"] if frame["type"] == "batch" else [frame]:
                    if item.get("type") == "status":
                        arrivals.stamp(item["seq"], now)
        except ConnectionClosed:
            return

    return ws, asyncio.create_task(read())


async def run(url: str, ws_url: str, token: str, *, subscribers: int, messages: int) -> None:
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=30) as client:
        conversation = (
            await client.post(
                "/api/conversations", json={"channel": "whatsapp", "contact": "5511900000001"}
            )
        ).json()["id"]
        arrivals = Arrivals(messages * 3, subscribers)
        sockets = [
            await subscriber(ws_url, token, conversation, arrivals) for _ in range(subscribers)
        ]
        for i in range(messages):
            await client.post(f"/api/conversations/{conversation}/messages", json={"text": f"{i}"})
            await asyncio.sleep(0.2)  # paced: measure the spread, not a queue
        await asyncio.wait_for(arrivals.done.wait(), timeout=60)
        for ws, reading in sockets:
            await ws.close()
            await reading
    times = arrivals.times
    spreads = [(max(stamps) - min(stamps)) * 1000 for stamps in times.values()]
    print(f"subscribers: {subscribers}, status frames: {len(times)}, each reached all of them")
    print(
        f"first→last subscriber per frame: p50 {statistics.median(spreads):.1f} ms, "
        f"max {max(spreads):.1f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--subscribers", type=int, default=500)
    parser.add_argument("--messages", type=int, default=20)
    args = parser.parse_args()
    with temporary_server({"WHATSLIKE_SIM_DELAY_MS": "20", **UNCAPPED}) as server:
        token = server.token("bench-org")
        asyncio.run(
            run(
                server.url,
                server.ws_url,
                token,
                subscribers=args.subscribers,
                messages=args.messages,
            )
        )


if __name__ == "__main__":
    main()
