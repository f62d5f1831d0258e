"""The hub as an attacker meets it (issue 8), behind a real uvicorn server: connection caps
per user, per address and in all; the rate limit against interleaving; a client that
stops reading; lone surrogates and ids outside the pattern; tokens in every place a
client may put them, the subprotocol included."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jwt
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus
from websockets.frames import Opcode
from websockets.typing import Origin, Subprotocol

from tests.hub.test_server import (
    SECRET,
    Harness,
    closed,
    connected,
    eventually,
    receive,
    running_hub,
    send,
)
from tests.hub.test_wire import client_frame


async def _status_of_upgrade(url: str, **options: Any) -> int:
    """The HTTP status an upgrade is refused with (101 when it is accepted)."""
    try:
        async with connect(url, **options):
            return 101
    except InvalidStatus as refused:
        return refused.response.status_code


@pytest.fixture
async def hub(tmp_path: Path) -> AsyncIterator[Harness]:
    async with running_hub(tmp_path) as harness:
        yield harness


# -- tokens, over each way of carrying one ---------------------------------------------


def _odd_tokens(harness: Harness) -> dict[str, str]:
    now = int(time.time())
    good = {"sub": "u", "org_id": "org-a", "exp": now + 600}
    return {
        "garbage": "not-a-jwt",
        "three-dots": "a.b.c",
        "wrong-secret": jwt.encode(good, "w" * 40, "HS256"),
        "alg-none": jwt.encode(good, None, "none"),
        "expired": harness.tokens.mint("u", "org-a", 10, now=now - 200),
        "exp-string": jwt.encode({**good, "exp": str(now + 600)}, SECRET, "HS256"),
        "exp-year-5000": jwt.encode({**good, "exp": 95_617_584_000}, SECRET, "HS256"),
        "no-exp": jwt.encode({"sub": "u", "org_id": "org-a"}, SECRET, "HS256"),
        "foreign-aud": jwt.encode({**good, "aud": "billing"}, SECRET, "HS256"),
        "typ-dpop": jwt.encode(good, SECRET, "HS256", headers={"typ": "dpop+jwt"}),
        "no-org": jwt.encode({"sub": "u", "exp": now + 600}, SECRET, "HS256"),
        "HS512": jwt.encode(good, SECRET + SECRET, "HS512"),
    }


TOKEN_KINDS = [
    "garbage",
    "three-dots",
    "wrong-secret",
    "alg-none",
    "expired",
    "exp-string",
    "exp-year-5000",
    "no-exp",
    "foreign-aud",
    "typ-dpop",
    "no-org",
    "HS512",
]
CARRIERS = ["query", "subprotocol", "header"]


def _carry(harness: Harness, token: str, carrier: str) -> tuple[str, dict[str, Any]]:
    if carrier == "query":
        return f"{harness.url}?access_token={token}", {}
    if carrier == "subprotocol":
        offered = [Subprotocol("whatslike.v1"), Subprotocol(f"access_token.{token}")]
        return harness.url, {"subprotocols": offered}
    return harness.url, {"additional_headers": {"Authorization": f"Bearer {token}"}}


@pytest.mark.parametrize("carrier", CARRIERS)
async def test_odd_tokens_never_open_a_socket(tmp_path: Path, carrier: str) -> None:
    async with running_hub(tmp_path) as harness:
        tokens = _odd_tokens(harness)
        for kind in TOKEN_KINDS:
            url, options = _carry(harness, tokens[kind], carrier)
            assert await _status_of_upgrade(url, **options) == 401, kind
        assert harness.hub.connection_count == 0


async def test_odd_tokens_are_refused_by_the_auth_frame_too(hub: Harness) -> None:
    tokens = _odd_tokens(hub)
    async with hub.client() as ws:
        hello = await connected(ws)
        for kind in TOKEN_KINDS:
            await send(ws, type="auth", token=tokens[kind], ref=kind)
            answer = await receive(ws)
            assert (answer["type"], answer["code"], answer["ref"]) == (
                "error",
                "bad_request",
                kind,
            )
        await send(ws, type="ping", ts="still-open")
        assert await receive(ws) == {"type": "pong", "ts": "still-open"}
    assert hello["token_exp"] == hub.tokens.verify(hub.token()).exp


async def test_the_token_subprotocol_opens_and_only_whatslike_v1_is_echoed(hub: Harness) -> None:
    token = hub.token(user="agent-9")
    offered = [Subprotocol("whatslike.v1"), Subprotocol(f"access_token.{token}")]
    async with connect(hub.url, subprotocols=offered) as ws:
        assert ws.subprotocol == "whatslike.v1"
        assert (await connected(ws))["user_id"] == "agent-9"


# -- cross-tenant subscribes -------------------------------------------------------------


async def test_another_organizations_conversations_are_forbidden(hub: Harness) -> None:
    theirs = await hub.conversation("org-b")
    async with hub.client(hub.token(org="org-a")) as ws:
        await connected(ws)
        attempts: list[dict[str, Any]] = [
            {"type": "subscribe", "conversation_id": theirs.id},
            {"type": "subscribe", "conversation_id": theirs.id, "since": 0},
            {"type": "subscribe", "conversation_id": "conv_does_not_exist"},
        ]
        for ref, frame in enumerate(attempts):
            await send(ws, **frame, ref=ref)
            answer = await receive(ws)
            assert (answer["type"], answer["code"], answer["ref"]) == ("error", "forbidden", ref)
        # Nothing published for their conversation reaches this socket.
        frames = await hub.changes(theirs, 1)
        await hub.publish(theirs, *frames)
        await send(ws, type="ping", ts=1)
        assert await receive(ws) == {"type": "pong", "ts": 1}


# -- caps --------------------------------------------------------------------------------


async def _open(harness: Harness, token: str) -> ClientConnection:
    ws = await connect(f"{harness.url}?access_token={token}")
    await connected(ws)
    return ws


async def test_connections_per_user_are_capped_with_429(tmp_path: Path) -> None:
    async with running_hub(tmp_path, max_connections_per_user=2) as harness:
        ana = harness.token(user="ana")
        held = [await _open(harness, ana), await _open(harness, ana)]
        assert await _status_of_upgrade(f"{harness.url}?access_token={ana}") == 429
        # Another user of the same organization is not affected.
        other = await _open(harness, harness.token(user="bia"))
        await held.pop().close()
        await eventually(lambda: harness.hub.connection_count == 2, "a place is free")
        held.append(await _open(harness, ana))
        for ws in [*held, other]:
            await ws.close()


async def test_connections_per_address_are_capped_with_429(tmp_path: Path) -> None:
    async with running_hub(tmp_path, max_connections_per_ip=2) as harness:
        held = [await _open(harness, harness.token(user=f"u{n}")) for n in range(2)]
        url = f"{harness.url}?access_token={harness.token(user='u9')}"
        assert await _status_of_upgrade(url) == 429
        for ws in held:
            await ws.close()


async def test_connections_in_all_are_capped_with_503(tmp_path: Path) -> None:
    async with running_hub(tmp_path, max_connections=2) as harness:
        held = [await _open(harness, harness.token(org=f"o{n}")) for n in range(2)]
        url = f"{harness.url}?access_token={harness.token(org='o9')}"
        try:
            async with connect(url):
                pytest.fail("a third connection was accepted")
        except InvalidStatus as refused:
            assert refused.response.status_code == 503
            assert json.loads(refused.response.body or b"{}")["error"]["code"] == (
                "too_many_connections"
            )
        for ws in held:
            await ws.close()


# -- rate limit evasion ---------------------------------------------------------------------


async def test_interleaving_allowed_frames_does_not_escape_4008(tmp_path: Path) -> None:
    """The evasion of issue 8: a client that lets a token come back between refusals
    never has two refusals in a row; counted in a window, it is closed all the same."""
    limits: dict[str, Any] = {
        "client_frame_burst": 2,
        "client_frames_per_s": 20,
        "rate_limit_strikes": 3,
    }
    async with running_hub(tmp_path, **limits) as harness, harness.client() as ws:
        await connected(ws)
        answers: list[str] = []
        for ts in range(200):
            if ws.close_code is not None:
                break
            await asyncio.sleep(0.06)  # one token back: the next frame is allowed ...
            try:
                await send(ws, type="ping", ts=ts)
                await send(ws, type="ping", ts=ts)  # ... and this one refused
                answers += [(await receive(ws))["type"], (await receive(ws))["type"]]
            except Exception:
                break
        assert await closed(ws) == (4008, "rate limit exceeded repeatedly")
        assert "pong" in answers and "error" in answers
    assert harness.closes(4008) == 1


# -- a client that stops reading -------------------------------------------------------------


async def test_a_client_that_stops_reading_gets_4009_and_the_metric(tmp_path: Path) -> None:
    """The queue is large enough never to overflow here: only the hub's own write timeout
    can end this connection (before, uvicorn's keepalive did, with 1011)."""
    limits: dict[str, Any] = {"connection_queue_size": 100_000, "write_timeout_s": 0.5}
    async with running_hub(tmp_path, **limits) as harness:
        conversation = await harness.conversation()
        stalled = await harness.client(max_queue=1, max_size=None, compression=None)
        await connected(stalled)
        await send(stalled, type="subscribe", conversation_id=conversation.id)
        await receive(stalled)
        padding = "x" * 64 * 1024
        seq = 0
        while harness.closes(4009) == 0:
            seq += 1
            assert seq < 2000, "the stalled client was never closed"
            await harness.publish(
                conversation, json.dumps({"type": "status", "seq": seq, "pad": padding})
            )
            await asyncio.sleep(0.005)
        assert harness.closes(1011) == 0
        await eventually(lambda: harness.hub.connection_count == 0, "the connection is gone")
        stalled.transport.abort()


# -- input --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "frame",
    [
        '{"type":"subscribe","conversation_id":"c\\ud800","ref":"x"}',
        '{"type":"subscribe","conversation_id":"\\udfff","ref":"x"}',
        '{"type":"unsubscribe","conversation_id":"a\\udc00b","ref":"x"}',
        '{"type":"auth","token":"\\ud83d","ref":"x"}',
        '{"type":"subscribe","conversation_id":"../../etc","ref":"x"}',
        '{"type":"subscribe","conversation_id":"' + "c" * 129 + '","ref":"x"}',
        '{"type":"subscribe","conversation_id":"c1 OR 1=1","ref":"x"}',
    ],
)
async def test_lone_surrogates_and_odd_ids_are_bad_requests_not_1011(
    hub: Harness, frame: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with hub.client() as ws:
        await connected(ws)
        await ws.send(frame)
        answer = await receive(ws)
        assert (answer["type"], answer["code"], answer["ref"]) == ("error", "bad_request", "x")
        await send(ws, type="ping", ts=1)
        assert await receive(ws) == {"type": "pong", "ts": 1}
    assert hub.closes(1011) == 0
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_refused_upgrades_are_logged_at_info_at_most_once_per_interval(
    hub: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="whatslike.hub.admission")
    for _ in range(20):
        assert await _status_of_upgrade(f"{hub.url}?access_token=forged") == 401
    lines = [r for r in caplog.records if r.name == "whatslike.hub.admission"]
    assert len(lines) == 1
    assert lines[0].levelno == logging.INFO
    assert "forged" not in lines[0].getMessage()


async def test_the_embedded_mode_allows_only_the_served_origin_by_default(hub: Harness) -> None:
    """Settings() here is the embedded mode (SQLite, in-process bus, simulator role), whose
    served origin is http://127.0.0.1:8000: a page elsewhere cannot open a socket."""
    url = f"{hub.url}?access_token={hub.token()}"
    for evil in ("https://evil.example", "http://127.0.0.1:8001", "null"):
        assert await _status_of_upgrade(url, origin=Origin(evil)) == 403, evil
    for served in ("http://127.0.0.1:8000", "http://localhost:8000"):
        async with connect(url, origin=Origin(served)) as ws:
            await connected(ws)


async def test_a_ping_nested_a_thousand_deep_is_a_bad_request_not_1011(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Around 950 levels a `ts` parsed, then broke the pong's serializer: 1011 and an
    ERROR traceback (the exact depth depends on the stack; every one near it is tried)."""
    limits: dict[str, Any] = {"bad_frame_tolerance": 1000, "client_frame_burst": 1000}
    async with running_hub(tmp_path, **limits) as harness:
        async with harness.client() as ws:
            await connected(ws)
            for depth in range(900, 1000):
                await ws.send('{"type":"ping","ts":' + "[" * depth + "]" * depth + "}")
                answer = await receive(ws)
                assert (answer["type"], answer["code"]) == ("error", "bad_request"), depth
                assert "deeper than" in answer["message"]
            await send(ws, type="ping", ts=[[1]])
            assert await receive(ws) == {"type": "pong", "ts": [[1]]}
        assert harness.closes(1011) == 0
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


# -- a client that asks for replays and never reads them (issue 14) ------------------------


async def _never_reading(harness: Harness) -> tuple[asyncio.StreamWriter, socket.socket]:
    """An upgraded socket that reads nothing (a small receive buffer, so the kernel
    holds little of what is sent to it)."""
    where = urlsplit(harness.url)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (where.hostname, where.port))
    _, writer = await asyncio.open_connection(sock=sock)
    writer.write(
        f"GET /ws/status?access_token={harness.token()} HTTP/1.1\r\nHost: x\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n".encode()
    )
    return writer, sock


async def test_replays_to_a_socket_that_never_reads_are_bounded_in_bytes(tmp_path: Path) -> None:
    """Each `subscribe … since` answers a replay (here 300 frames, ~65 KB) as one queued
    item: a socket that never read held ~44 MB before the item bound closed it. Now what
    waits for it (queued and in the socket's own buffer) stays within
    CONNECTION_QUEUE_BYTES, and past it the socket is closed with 4009. Neither the item
    bound nor the write timeout can close it here."""
    bound = 256 * 1024
    limits: dict[str, Any] = {
        "connection_queue_size": 100_000,
        "connection_queue_bytes": bound,
        "write_timeout_s": 60,
        "client_frame_burst": 100_000,
    }
    async with running_hub(tmp_path, **limits) as harness:
        conversation = await harness.conversation()
        replay = await harness.changes(conversation, 300)
        replay_bytes = sum(map(len, replay))
        writer, sock = await _never_reading(harness)
        await eventually(lambda: harness.hub.connection_count == 1, "it is connected")
        (conn,) = harness.hub.connections.values()
        subscribe = json.dumps(
            {"type": "subscribe", "conversation_id": conversation.id, "since": 0}
        )
        sent = 0
        while harness.closes(4009) == 0:
            assert sent < 300, f"{sent * replay_bytes} bytes of replays asked, not closed"
            held = conn.backlog_bytes + conn.unsent if conn.open else 0
            assert held <= bound + replay_bytes  # the bound, and one answer written whole
            writer.write(client_frame(Opcode.TEXT, subscribe.encode()))
            sent += 1
            await asyncio.sleep(0.01)
        assert harness.closes(1011) == 0
        writer.close()
        sock.close()
