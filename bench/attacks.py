"""Issue 8's attacks, measured against a default `whatslike serve`: how the caps, the
head and body limits and the frame budget answer, and how long they take to.

    .venv/bin/python -m bench.attacks
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from urllib.parse import urlsplit

import httpx
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from bench.serving import temporary_server
from tests.e2e.conftest import Server

UPGRADE = (
    "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
)


async def _raw(server: Server, request: bytes) -> tuple[str, float]:
    """Send raw bytes, answer the status line and the seconds until it came."""
    address = urlsplit(server.url)
    started = time.perf_counter()
    reader, writer = await asyncio.open_connection(address.hostname, address.port)
    writer.write(request)
    await writer.drain()
    line = await asyncio.wait_for(reader.readline(), 30)
    writer.close()
    return line.decode().strip(), time.perf_counter() - started


async def sockets_of_one_user(server: Server, count: int) -> None:
    token = server.token("org-a", "ana")
    held: list[ClientConnection] = []
    refused: dict[int, int] = {}
    for _ in range(count):
        try:
            held.append(await connect(f"{server.ws_url}?access_token={token}"))
        except InvalidStatus as exc:
            status = exc.response.status_code
            refused[status] = refused.get(status, 0) + 1
    started = time.perf_counter()
    async with httpx.AsyncClient() as client:
        await client.get(f"{server.url}/healthz", timeout=30)
    healthz_ms = (time.perf_counter() - started) * 1000
    print(
        f"{count} upgrades by one user: {len(held)} accepted, refused {refused}; "
        f"/healthz meanwhile {healthz_ms:.1f} ms"
    )
    for ws in held:
        await ws.close()


async def slowloris(server: Server, count: int) -> None:
    address = urlsplit(server.url)
    started = time.perf_counter()

    async def one() -> float:
        reader, writer = await asyncio.open_connection(address.hostname, address.port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        await writer.drain()
        await asyncio.wait_for(reader.read(), 120)  # until the server closes
        writer.close()
        return time.perf_counter() - started

    closed = await asyncio.gather(*(one() for _ in range(count)))
    print(f"{count} slowloris connections: all closed after {max(closed):.1f} s (408)")


async def oversized(server: Server) -> None:
    token, big = "e" * 65_536, "a" * 10_000
    requests = {
        "upgrade, 10 KB of headers": f"GET /ws/status HTTP/1.1\r\n{UPGRADE}X: {big}\r\n\r\n",
        "upgrade, 64 KB token": f"GET /ws/status?access_token={token} HTTP/1.1\r\n{UPGRADE}\r\n",
        "12 MB body announced": "POST /api/conversations HTTP/1.1\r\n"
        "Content-Length: 12000000\r\n\r\n",
    }
    for name, request in requests.items():
        line, seconds = await _raw(server, request.encode())
        print(f"{name}: {line!r} after {seconds * 1000:.1f} ms")


async def interleaved_flood(server: Server, rate: float, seconds: float) -> None:
    token = server.token("org-a", "flooder")
    refusals = 0
    started = time.perf_counter()
    async with connect(f"{server.ws_url}?access_token={token}") as ws:
        await ws.recv()

        async def read() -> None:
            nonlocal refusals
            try:
                async for raw in ws:
                    refusals += json.loads(raw).get("code") == "rate_limited"
            except ConnectionClosed:
                pass

        reader = asyncio.create_task(read())
        try:
            while time.perf_counter() - started < seconds:
                await ws.send(json.dumps({"type": "ping", "ts": 1}))
                await asyncio.sleep(1 / rate)
        except ConnectionClosed:
            pass
        await asyncio.wait_for(reader, 10)
        print(
            f"interleaved flood at {rate:.0f} frames/s: closed {ws.close_code} after "
            f"{time.perf_counter() - started:.2f} s, {refusals} rate_limited answers"
        )


async def main(args: argparse.Namespace) -> None:
    with temporary_server({}) as server:
        await sockets_of_one_user(server, args.sockets)
        await oversized(server)
        await interleaved_flood(server, args.rate, 10)
        await slowloris(server, args.slowloris)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sockets", type=int, default=200)
    parser.add_argument("--slowloris", type=int, default=500)
    parser.add_argument("--rate", type=float, default=180)
    asyncio.run(main(parser.parse_args()))
