"""The hub's own WebSocket protocol on a real socket, byte by byte where a real client
library would not misbehave: the handshake's refusals, control frames, the closing
handshake, protocol errors, messages behind a subscribe, proxies' addresses."""

from __future__ import annotations

import asyncio
import json
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from websockets.frames import Close, Opcode

from tests.hub.test_server import TIMEOUT_S, Harness, connected, eventually, hub, running_hub
from tests.hub.test_wire import client_frame
from whatslike.hub import transport
from whatslike.hub.transport import WebSocketProtocol

__all__ = ["hub"]  # the fixture, used by name

KEY = "dGhlIHNhbXBsZSBub25jZQ=="


class RawClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    def send(self, opcode: Opcode, payload: bytes, fin: bool = True) -> None:
        self.writer.write(client_frame(opcode, payload, fin=fin))

    def json(self, **frame: object) -> None:
        self.send(Opcode.TEXT, json.dumps(frame).encode())

    async def frame(self) -> tuple[int, bytes]:
        async with asyncio.timeout(TIMEOUT_S):
            first, second = await self.reader.readexactly(2)
            size = second & 0x7F
            if size == 126:
                (size,) = struct.unpack("!H", await self.reader.readexactly(2))
            elif size == 127:
                (size,) = struct.unpack("!Q", await self.reader.readexactly(8))
            return first & 0x0F, await self.reader.readexactly(size)

    async def message(self) -> dict[str, object]:
        opcode, payload = await self.frame()
        assert opcode == Opcode.TEXT
        decoded: dict[str, object] = json.loads(payload)
        return decoded

    async def close_code(self) -> tuple[int, str]:
        """Read until the server's close frame; answer its code and reason."""
        while True:
            opcode, payload = await self.frame()
            if opcode == Opcode.CLOSE:
                close = Close.parse(payload)
                return close.code, close.reason


async def upgrade(url: str, path: str, headers: dict[str, str]) -> tuple[int, bytes, RawClient]:
    where = urlsplit(url)
    assert where.hostname is not None and where.port is not None
    reader, writer = await asyncio.open_connection(where.hostname, where.port)
    lines = [f"GET {path} HTTP/1.1", f"Host: {where.netloc}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    async with asyncio.timeout(TIMEOUT_S):
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ")[1])
        body = b"" if status == 101 else await reader.read()
    return status, body, RawClient(reader, writer)


def upgrade_headers(**extra: str) -> dict[str, str]:
    return {
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": KEY,
        "Sec-WebSocket-Version": "13",
        **extra,
    }


@asynccontextmanager
async def raw_client(harness: Harness, **extra: str) -> AsyncIterator[RawClient]:
    path = f"/ws/status?access_token={harness.token()}"
    status, _, client = await upgrade(harness.url, path, upgrade_headers(**extra))
    assert status == 101
    try:
        assert (await client.message())["type"] == "connected"
        yield client
    finally:
        client.writer.close()


async def test_the_handshake_answers_the_accept_key(hub: Harness) -> None:
    path = f"/ws/status?access_token={hub.token()}"
    where = urlsplit(hub.url)
    reader, writer = await asyncio.open_connection(where.hostname, where.port)
    head = "\r\n".join(
        [f"GET {path} HTTP/1.1", f"Host: {where.netloc}"]
        + [f"{name}: {value}" for name, value in upgrade_headers().items()]
    )
    writer.write(head.encode() + b"\r\n\r\n")
    answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT_S)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 101 ")
    assert b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n" in answer
    assert b"Sec-WebSocket-Protocol" not in answer  # none was offered


async def test_other_paths_bad_keys_and_versions_are_refused(hub: Harness) -> None:
    token = hub.token()
    status, body, _ = await upgrade(hub.url, f"/ws/other?access_token={token}", upgrade_headers())
    assert (status, json.loads(body)["error"]["code"]) == (404, "not_found")
    bad_key = upgrade_headers(**{"Sec-WebSocket-Key": "short"})
    status, body, _ = await upgrade(hub.url, f"/ws/status?access_token={token}", bad_key)
    assert (status, json.loads(body)["error"]["message"]) == (
        400,
        "Sec-WebSocket-Key is missing or malformed",
    )
    old = upgrade_headers(**{"Sec-WebSocket-Version": "8"})
    status, _, _ = await upgrade(hub.url, f"/ws/status?access_token={token}", old)
    assert status == 426
    assert hub.hub.connection_count == 0


async def test_a_ping_is_answered_with_its_payload(hub: Harness) -> None:
    async with raw_client(hub) as client:
        client.send(Opcode.PING, b"are you there")
        assert await client.frame() == (Opcode.PONG, b"are you there")


async def test_a_fragmented_message_with_a_ping_inside_is_assembled(hub: Harness) -> None:
    async with raw_client(hub) as client:
        whole = json.dumps({"type": "ping", "ts": "split"}).encode()
        client.send(Opcode.TEXT, whole[:7], fin=False)
        client.send(Opcode.PING, b"mid")
        client.send(Opcode.CONT, whole[7:12], fin=False)
        client.send(Opcode.CONT, whole[12:])
        assert await client.frame() == (Opcode.PONG, b"mid")
        assert await client.message() == {"type": "pong", "ts": "split"}


async def test_the_clients_close_is_echoed_and_the_connection_leaves(hub: Harness) -> None:
    async with raw_client(hub) as client:
        client.send(Opcode.CLOSE, Close(1000, "bye").serialize())
        assert await client.close_code() == (1000, "")
        assert await asyncio.wait_for(client.reader.read(), TIMEOUT_S) == b""  # hung up
    await eventually(lambda: hub.hub.connection_count == 0, "the connection left")
    assert hub.closes(1000) == 0  # not a close of the server's


async def test_protocol_errors_close_with_their_codes(hub: Harness) -> None:
    async with raw_client(hub) as client:
        client.writer.write(client_frame(Opcode.TEXT, b"{}", mask=None))
        assert await client.close_code() == (1002, "client frames must be masked")
    async with raw_client(hub) as client:
        client.send(Opcode.TEXT, b"\xff\xfe")
        assert await client.close_code() == (1007, "text frame is not UTF-8")
    await eventually(lambda: hub.hub.connection_count == 0, "both left")


async def test_messages_behind_a_subscribe_are_answered_after_it(hub: Harness) -> None:
    conversation = await hub.conversation()
    hub.store.gate = asyncio.Event()
    async with raw_client(hub) as client:
        client.json(type="subscribe", conversation_id=conversation.id, ref="s")
        client.json(type="ping", ts=1)
        client.json(type="unsubscribe", conversation_id=conversation.id, ref="u")
        await asyncio.wait_for(hub.store.replay_started.wait(), TIMEOUT_S)
        hub.store.gate.set()
        answers = [await client.message() for _ in range(3)]
    assert [answer["type"] for answer in answers] == ["subscribed", "pong", "unsubscribed"]


async def test_subscriptions_gauge(hub: Harness) -> None:
    def gauge() -> float | None:
        return hub.metrics.registry.get_sample_value("whatslike_ws_subscriptions")

    first, second = await hub.conversation(), await hub.conversation()
    async with hub.client() as ws:
        await connected(ws)
        for conversation in (first, second):
            await ws.send(json.dumps({"type": "subscribe", "conversation_id": conversation.id}))
            await ws.recv()
        assert gauge() == 2
        await ws.send(json.dumps({"type": "unsubscribe", "conversation_id": first.id}))
        await ws.recv()
        assert gauge() == 1
    await eventually(lambda: gauge() == 0, "the closed connection's subscription is gone")


async def test_addresses_come_from_x_forwarded_for_of_a_trusted_proxy(tmp_path: Path) -> None:
    # uvicorn trusts 127.0.0.1 (where the test connects from) by default.
    async with (
        running_hub(tmp_path, max_connections_per_ip=1) as harness,
        raw_client(harness, **{"X-Forwarded-For": "10.0.0.1"}),
        raw_client(harness, **{"X-Forwarded-For": "10.0.0.2"}),
    ):
        path = f"/ws/status?access_token={harness.token()}"
        headers = upgrade_headers(**{"X-Forwarded-For": "10.9.9.9, 10.0.0.1"})
        status, body, _ = await upgrade(harness.url, path, headers)
    assert (status, json.loads(body)["error"]["code"]) == (429, "too_many_connections")


# -- control frames (issue 14) ---------------------------------------------------------------


async def test_pings_take_from_the_frame_budget_and_a_flood_closes_4008(tmp_path: Path) -> None:
    """Every ping was answered, outside the budget, however many came (400 MiB of them
    took the process from 118 to 679 MB): now each takes a token like a message, one
    over the budget is dropped unanswered, and past the strikes the socket is closed."""
    limits: dict[str, Any] = {
        "client_frame_burst": 5,
        "rate_limit_strikes": 3,
        "client_frames_per_s": 0.1,
    }
    async with running_hub(tmp_path, **limits) as harness, raw_client(harness) as client:
        for index in range(200):
            client.send(Opcode.PING, str(index).encode())
        pongs = 0
        while True:
            opcode, payload = await client.frame()
            if opcode == Opcode.CLOSE:
                break
            assert opcode == Opcode.PONG
            pongs += 1
        assert Close.parse(payload).code == 4008
        assert pongs == 5  # the burst; then 3 strikes are allowed, and the 4th closes
        assert harness.closes(4008) == 1


async def test_a_client_still_flooding_after_the_servers_close_is_cut(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After its close frame the server reads on only for the client's: every byte of a
    flood that goes on was parsed until the close timeout (5 s of a socket's worth kept
    /healthz waiting over a second). Past CLOSING_READ_BYTES the connection is cut."""
    monkeypatch.setattr(transport, "CLOSE_TIMEOUT_S", 60.0)  # only the cut can end it
    limits: dict[str, Any] = {"client_frame_burst": 1, "rate_limit_strikes": 1}
    async with running_hub(tmp_path, **limits) as harness, raw_client(harness) as client:
        flood = client_frame(Opcode.PING, b"p" * 125) * 1000  # 131 KB
        for _ in range(3):  # the close comes in the first
            client.writer.write(flood)
        await eventually(lambda: harness.closes(4008) == 1, "the flood is refused")
        await eventually(lambda: harness.hub._closing == 0, "the socket is cut")


class _Transport(asyncio.Transport):
    """What a socket that takes no writes looks like to a protocol: writes pile up."""

    def __init__(self) -> None:
        super().__init__()
        self.written: list[bytes] = []

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written.append(bytes(data))

    def get_write_buffer_size(self) -> int:
        return sum(map(len, self.written))

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default

    def is_closing(self) -> bool:
        return False


class _Plain(WebSocketProtocol):
    def control(self) -> bool:
        return True


def test_behind_a_socket_that_does_not_read_only_the_latest_ping_is_answered() -> None:
    """RFC 6455 §5.5.3: a pong may answer only the most recent ping. While the transport
    is over its high-water mark no pong is written (they piled up in its buffer, one per
    ping); the latest waits, counted in `unsent`, and is written when the socket drains."""
    protocol = _Plain(4096)
    transport = _Transport()
    protocol.connection_made(transport)
    protocol.accept(KEY, None, b"")
    transport.written.clear()
    protocol.pause_writing()
    protocol.data_received(b"".join(client_frame(Opcode.PING, b"p%d" % i) for i in range(1000)))
    assert transport.written == []
    assert protocol.unsent == len(b"p999") + 2
    protocol.resume_writing()
    assert transport.written == [client_frame(Opcode.PONG, b"p999", mask=None)]
    protocol.data_received(client_frame(Opcode.PING, b"now"))  # taking writes: at once
    assert transport.written[1:] == [client_frame(Opcode.PONG, b"now", mask=None)]
