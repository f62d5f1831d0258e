"""Issue 8's and issue 14's attacks, measured against a default `whatslike serve`: how the
caps, the head and body limits and the frame budget answer, and how long they take to;
for issue 14's (fragments, pings, replays nobody reads, trickled bodies) also how long
`/healthz` takes meanwhile and what the server's memory (RSS) became.

    .venv/bin/python -m bench.attacks            # everything
    .venv/bin/python -m bench.attacks --only 14  # issue 14's rows (or one of them:
                                                 # fragments, pings, replays, bodies)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

import httpx
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from bench.serving import UNCAPPED, temporary_server
from tests.e2e.conftest import Server, api

T = TypeVar("T")

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


# -- issue 14: one client or one payload must not stall everyone ----------------------------


def _rss_mb(server: Server) -> float:
    for line in Path(f"/proc/{server.process.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def _closes(server: Server) -> dict[str, int]:
    """The server's own count of the closes it made, by code (from /metrics)."""
    async with httpx.AsyncClient() as client:
        text = (await client.get(f"{server.url}/metrics", timeout=30)).text
    found = re.findall(r'^whatslike_ws_closes_total\{code="(\d+)"\} (\S+)$', text, re.M)
    return {code: int(float(count)) for code, count in found}


def _masked(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    """A client frame, masked with zeros (the payload is sent as is)."""
    first = (0x80 if fin else 0) | opcode
    size = len(payload)
    if size < 126:
        head = bytes((first, 0x80 | size))
    elif size < 1 << 16:
        head = struct.pack("!BBH", first, 0x80 | 126, size)
    else:
        head = struct.pack("!BBQ", first, 0x80 | 127, size)
    return head + b"\0\0\0\0" + payload


async def _upgraded(
    server: Server, user: str, receive_buffer: int | None = None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A WebSocket opened by hand (its 101 read, nothing after it)."""
    address = urlsplit(server.url)
    sock = socket.socket()
    if receive_buffer is not None:  # a client that reads nothing: the kernel holds little
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (address.hostname, address.port))
    reader, writer = await asyncio.open_connection(sock=sock)
    token = server.token("org-a", user)
    writer.write(
        f"GET /ws/status?access_token={token} HTTP/1.1\r\nHost: x\r\n{UPGRADE}\r\n".encode()
    )
    await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
    return reader, writer


async def _close_code(reader: asyncio.StreamReader, within_s: float) -> str:
    """Read frames until the server's close frame: its code (or why there was none)."""
    try:
        async with asyncio.timeout(within_s):
            while True:
                first, second = await reader.readexactly(2)
                size = second & 0x7F
                if size == 126:
                    (size,) = struct.unpack("!H", await reader.readexactly(2))
                elif size == 127:
                    (size,) = struct.unpack("!Q", await reader.readexactly(8))
                payload = await reader.readexactly(size)
                if first & 0x0F == 0x8:
                    return str(struct.unpack("!H", payload[:2])[0])
    except TimeoutError:
        return f"none within {within_s:.0f} s"
    except (asyncio.IncompleteReadError, ConnectionError):
        return "none (connection cut)"


async def _healthz_during(server: Server, attack: Awaitable[T]) -> tuple[T, float]:
    """Run `attack` while `/healthz` is asked every 50 ms: its result and the slowest
    `/healthz` answer meanwhile, in ms."""
    slowest = 0.0
    done = asyncio.Event()

    async def probe() -> None:
        nonlocal slowest
        async with httpx.AsyncClient() as client:
            while not done.is_set():
                started = time.perf_counter()
                await client.get(f"{server.url}/healthz", timeout=600)
                slowest = max(slowest, (time.perf_counter() - started) * 1000)
                await asyncio.sleep(0.05)

    prober = asyncio.create_task(probe())
    try:
        result = await attack
    finally:
        done.set()
        await prober
    return result, slowest


async def empty_continuations(server: Server, kilobytes: int) -> None:
    """Item 1: a message begun, then nothing but empty continuation frames."""
    reader, writer = await _upgraded(server, "fragmenter")

    async def attack() -> str:
        writer.write(_masked(0x1, b"{", fin=False))
        empty = _masked(0x0, b"", fin=False)
        stream = empty * (kilobytes * 1024 // len(empty))
        try:
            for start in range(0, len(stream), 16 * 1024):
                writer.write(stream[start : start + 16 * 1024])
                await writer.drain()
        except ConnectionError:
            pass
        return await _close_code(reader, 300)

    code, slowest = await _healthz_during(server, attack())
    writer.close()
    print(
        f"{kilobytes} KB of empty continuation frames: close {code}; "
        f"/healthz meanwhile at most {slowest:.1f} ms"
    )


async def ping_flood(server: Server, mebibytes: int) -> None:
    """Item 2: pings (125 bytes each) from a client that never reads the pongs."""
    before = _rss_mb(server)
    _, writer = await _upgraded(server, "pinger", receive_buffer=4096)

    async def attack() -> int:
        chunk = _masked(0x9, b"p" * 125) * (1024 * 1024 // 131)
        sent = 0
        try:
            while sent < mebibytes * 1024 * 1024:
                writer.write(chunk)
                await asyncio.wait_for(writer.drain(), 60)
                sent += len(chunk)
        except (ConnectionError, TimeoutError):
            pass
        return sent

    sent, slowest = await _healthz_during(server, attack())
    after = _rss_mb(server)
    closes = await _closes(server)
    writer.transport.abort()
    print(
        f"ping flood, {sent / 2**20:.0f} of {mebibytes} MiB taken by the server: its "
        f"closes {closes}; RSS {before:.0f} -> {after:.0f} MB; /healthz meanwhile at most "
        f"{slowest:.1f} ms"
    )


async def _conversation_with_changes(server: Server, changes: int) -> tuple[str, int]:
    """A conversation with at least `changes` status changes (3 per message: SENT,
    DELIVERED, READ, through the simulator), and its last seq."""
    async with api(server, server.token("org-a", "sender")) as client:
        created = await client.post(
            "/api/conversations", json={"channel": "whatsapp", "contact": "+5511999990000"}
        )
        conversation_id: str = created.json()["id"]
        for index in range(changes // 3 + 1):
            answer = await client.post(
                f"/api/conversations/{conversation_id}/messages",
                json={"text": f"m{index}", "client_message_id": f"bench-{index}"},
            )
            assert answer.status_code == 202, answer.text
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            found = await client.get(f"/api/conversations/{conversation_id}")
            last_seq: int = found.json()["last_seq"]
            if last_seq >= changes:
                return conversation_id, last_seq
            await asyncio.sleep(0.5)
    raise AssertionError(f"the conversation did not reach {changes} changes")


async def replay_hoarders(server: Server, sockets: int, changes: int, asks: int) -> None:
    """Item 3: sockets that ask for the whole history, again and again, and read none."""
    conversation_id, last_seq = await _conversation_with_changes(server, changes)
    before = _rss_mb(server)
    subscribe = _masked(
        0x1,
        json.dumps(
            {
                "type": "subscribe",
                "conversation_id": conversation_id,
                "since": last_seq - changes,  # exactly `changes` frames to replay
            }
        ).encode(),
    )
    hoarders = [
        await _upgraded(server, f"hoarder-{n}", receive_buffer=4096) for n in range(sockets)
    ]

    async def attack() -> float:
        peak = before
        for _ in range(asks):
            for _, writer in hoarders:
                if not writer.is_closing():
                    writer.write(subscribe)
            await asyncio.sleep(0.05)  # within the default frame budget (20/s)
            peak = max(peak, _rss_mb(server))
        return peak

    peak, slowest = await _healthz_during(server, attack())
    closes = await _closes(server)
    for _, writer in hoarders:
        writer.transport.abort()
    print(
        f"{sockets} sockets asking {asks} times for a {changes}-frame replay, reading none: "
        f"the server's closes {closes}; RSS {before:.0f} -> at most {peak:.0f} MB; "
        f"/healthz meanwhile at most {slowest:.1f} ms"
    )


async def trickled_bodies(server: Server, count: int, watch_s: float) -> None:
    """Item 4: webhook bodies announced, then sent a byte a second."""
    address = urlsplit(server.url)
    peers: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    for _ in range(count):
        reader, writer = await asyncio.open_connection(address.hostname, address.port)
        writer.write(
            b"POST /webhooks/whatsapp HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
            b"\r\nContent-Length: 1000\r\n\r\n"
        )
        peers.append((reader, writer))

    async def attack() -> None:
        started = time.monotonic()
        while time.monotonic() - started < watch_s:
            for _, writer in peers:
                if not writer.is_closing():
                    try:
                        writer.write(b" ")
                    except ConnectionError:
                        writer.close()
            await asyncio.sleep(1)

    async def still_open(reader: asyncio.StreamReader) -> bool:
        try:
            await asyncio.wait_for(reader.read(), 1)  # the server's answer and its close
        except TimeoutError:
            return True
        except ConnectionError:
            pass
        return False

    _, slowest = await _healthz_during(server, attack())
    held = sum(await asyncio.gather(*(still_open(reader) for reader, _ in peers)))
    for _, writer in peers:
        writer.transport.abort()
    print(
        f"{count} webhook bodies trickled at 1 B/s: {held} still open after {watch_s:.0f} s; "
        f"/healthz meanwhile at most {slowest:.1f} ms"
    )


async def issue_14(args: argparse.Namespace) -> None:
    """Each attack on a server of its own, so one's aftermath does not weigh on the next."""
    rows: dict[str, Callable[[Server], Awaitable[None]]] = {
        "fragments": lambda server: empty_continuations(server, args.continuation_kb),
        "pings": lambda server: ping_flood(server, args.ping_mib),
        "replays": lambda server: replay_hoarders(
            server, args.hoarders, args.replay_frames, args.asks
        ),
        "bodies": lambda server: trickled_bodies(server, args.trickles, args.trickle_watch_s),
    }
    for name, row in rows.items():
        if args.only in (None, "14", name):
            with temporary_server({**UNCAPPED, "WHATSLIKE_SIM_DELAY_MS": "5"}) as server:
                await row(server)


async def main(args: argparse.Namespace) -> None:
    if args.only is not None:
        await issue_14(args)
        return
    with temporary_server({}) as server:
        await sockets_of_one_user(server, args.sockets)
        await oversized(server)
        await interleaved_flood(server, args.rate, 10)
        await slowloris(server, args.slowloris)
    await issue_14(args)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sockets", type=int, default=200)
    parser.add_argument("--slowloris", type=int, default=500)
    parser.add_argument("--rate", type=float, default=180)
    parser.add_argument(
        "--only", choices=["14", "fragments", "pings", "replays", "bodies"], default=None
    )
    parser.add_argument("--continuation-kb", type=int, default=180)
    parser.add_argument("--ping-mib", type=int, default=400)
    parser.add_argument("--hoarders", type=int, default=4)
    parser.add_argument("--replay-frames", type=int, default=1000)
    parser.add_argument("--asks", type=int, default=300)
    parser.add_argument("--trickles", type=int, default=300)
    parser.add_argument("--trickle-watch-s", type=float, default=15)
    asyncio.run(main(parser.parse_args()))
