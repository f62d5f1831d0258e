"""The Redis fan-out against real Redis servers: the one `scripts/services.sh redis` started
(WHATSLIKE_TEST_REDIS_URL), and, for outages, a redis-server of each test's own that the
test kills and starts again."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import redis.asyncio
from websockets.asyncio.client import connect as ws_connect

from tests.e2e import test_pipeline as pipeline
from tests.e2e.conftest import Socket, api, start_server, stop_server
from tests.hub.test_server import TIMEOUT_S, connected, eventually, receive, running_hub, send
from whatslike.clock import new_id
from whatslike.errors import BackendUnavailable, ConfigError
from whatslike.events import status_channel
from whatslike.fanout.factory import open_fanout
from whatslike.fanout.memory import MemoryFanout
from whatslike.fanout.redis import RedisFanout, redis_address
from whatslike.settings import load_settings


def fast_fanout(url: str) -> RedisFanout:
    """Short back-off and liveness, so that an outage in a test ends in well under 1 s."""
    return RedisFanout(url, timeout_s=2.0, ping_interval_s=0.5, liveness_s=2.0, backoff_cap_s=0.3)


@pytest.fixture
def redis_url() -> str:
    url = os.environ.get("WHATSLIKE_TEST_REDIS_URL")
    if not url:
        pytest.fail("WHATSLIKE_TEST_REDIS_URL is not set: run ./scripts/services.sh redis")
    try:
        redis.Redis.from_url(url, socket_connect_timeout=2).ping()
    except redis.RedisError as exc:
        pytest.fail(
            f"Redis at {redis_address(url)} does not answer ({exc}):"
            " run ./scripts/services.sh redis"
        )
    return url


@dataclass
class OwnRedis:
    """A redis-server of the test's own on a free loopback port, to kill and restart."""

    directory: Path
    port: int = 0
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed: run ./scripts/services.sh redis")
        if not self.port:
            self.port = _free_port()
        self.process = subprocess.Popen(
            [binary, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
             "--appendonly", "no", "--dir", str(self.directory)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        client = redis.Redis(port=self.port, socket_connect_timeout=1)
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            try:
                client.ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    pytest.fail(f"redis-server did not come up on 127.0.0.1:{self.port}")
                time.sleep(0.02)

    def pause(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()
            self.process = None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[OwnRedis]:
    server = OwnRedis(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.kill()


@dataclass
class Heard:
    """What one fan-out instance (a "hub") heard, and its gaps."""

    messages: list[tuple[str, bytes]] = field(default_factory=list)
    gaps: int = 0

    def on_message(self, channel: str, payload: bytes) -> None:
        self.messages.append((channel, payload))

    def on_gap(self) -> None:
        self.gaps += 1

    def payloads(self, channel: str) -> list[bytes]:
        return [payload for heard, payload in self.messages if heard == channel]


@asynccontextmanager
async def hub_fanout(url: str) -> AsyncIterator[tuple[RedisFanout, Heard]]:
    fanout = fast_fanout(url)
    heard = Heard()
    fanout.listen(heard.on_message)
    fanout.on_gap(heard.on_gap)
    await fanout.start()
    try:
        yield fanout, heard
    finally:
        await fanout.stop()


@asynccontextmanager
async def publisher(url: str) -> AsyncIterator[RedisFanout]:
    fanout = fast_fanout(url)
    try:
        yield fanout
    finally:
        await fanout.stop()


def unique(prefix: str) -> str:
    return f"{prefix}_{new_id('t')}"


async def test_two_hubs_hear_the_conversations_they_follow(redis_url: str) -> None:
    c1, c2 = unique("c1"), unique("c2")
    async with (
        hub_fanout(redis_url) as (hub_a, heard_a),
        hub_fanout(redis_url) as (hub_b, heard_b),
        publisher(redis_url) as pub,
    ):
        await hub_a.add(status_channel(c1))
        await hub_b.add(status_channel(c1))
        await hub_b.add(status_channel(c2))
        await pub.publish(status_channel(c2), b"two")
        await pub.publish(status_channel(c1), b"one")
        await eventually(lambda: len(heard_a.messages) == 1, "hub A hears c1")
        await eventually(lambda: len(heard_b.messages) == 2, "hub B hears c1 and c2")
        # Redis delivers one publisher's messages in order: c2 came first, A never got it.
        assert heard_a.messages == [(status_channel(c1), b"one")]
        assert heard_b.messages == [(status_channel(c2), b"two"), (status_channel(c1), b"one")]

        hub_b.discard(status_channel(c1))
        await hub_b.add(status_channel(c2))  # a barrier: the UNSUBSCRIBE before it is in effect too
        await pub.publish(status_channel(c1), b"one again")
        await pub.publish(status_channel(c2), b"two again")
        await eventually(lambda: len(heard_b.messages) == 3, "hub B hears c2 again")
        await eventually(lambda: len(heard_a.messages) == 2, "hub A hears c1 again")
        assert heard_b.messages[2:] == [(status_channel(c2), b"two again")]
        assert heard_a.messages[1:] == [(status_channel(c1), b"one again")]
        assert heard_a.gaps == heard_b.gaps == 0


async def test_ten_thousand_conversations(redis_url: str) -> None:
    prefix = unique("many")
    conversations = [f"{prefix}_{n}" for n in range(10_000)]
    async with hub_fanout(redis_url) as (hub, heard):
        await asyncio.gather(*(hub.add(status_channel(cid)) for cid in conversations))
        check = redis.asyncio.Redis.from_url(redis_url)
        try:
            channels = await check.pubsub_channels(f"status:{prefix}_*")
            assert len(channels) == 10_000
            async with check.pipeline(transaction=False) as pipe:
                for cid in conversations:
                    pipe.publish(status_channel(cid), cid.encode())
                receivers = await pipe.execute()
            assert receivers == [1] * 10_000
            await eventually(lambda: len(heard.messages) == 10_000, "every conversation heard")
            assert heard.messages == [(status_channel(c), c.encode()) for c in conversations]

            for cid in conversations[::2]:
                hub.discard(status_channel(cid))
            await hub.add(status_channel(conversations[1]))  # a barrier after the UNSUBSCRIBEs
            channels = await check.pubsub_channels(f"status:{prefix}_*")
            assert sorted(channels) == sorted(
                status_channel(c).encode() for c in conversations[1::2]
            )
        finally:
            await check.aclose()


async def test_publish_and_ping_while_redis_is_down_raise_backend_unavailable(
    own_redis: OwnRedis,
) -> None:
    async with publisher(own_redis.url) as pub:
        await pub.publish(status_channel("c"), b"up")
        await pub.ping()
        own_redis.kill()
        with pytest.raises(BackendUnavailable, match=r"Redis at 127\.0\.0\.1:\d+/0"):
            await pub.publish(status_channel("c"), b"down")
        with pytest.raises(BackendUnavailable):
            await pub.ping()
        own_redis.start()
        await pub.publish(status_channel("c"), b"up again")
        await pub.ping()


async def test_reconnects_resubscribes_and_announces_the_gap(own_redis: OwnRedis) -> None:
    before, during = unique("before"), unique("during")
    async with hub_fanout(own_redis.url) as (hub, heard), publisher(own_redis.url) as pub:
        await hub.add(status_channel(before))
        await pub.publish(status_channel(before), b"1")
        await eventually(lambda: heard.payloads(status_channel(before)) == [b"1"], "heard 1")

        own_redis.kill()
        await link_down(hub)
        await hub.add(
            status_channel(during)
        )  # while Redis is down: subscribed once the link is back
        own_redis.start()
        await eventually(lambda: heard.gaps == 1, "the gap is announced")
        await hub.ping()

        # The gap is announced once both subscriptions are in effect again.
        await pub.publish(status_channel(before), b"2")
        await pub.publish(status_channel(during), b"3")
        await eventually(lambda: len(heard.messages) == 3, "heard 2 and 3")
        assert heard.messages[1:] == [
            (status_channel(before), b"2"),
            (status_channel(during), b"3"),
        ]
        assert heard.gaps == 1


async def test_a_redis_that_stops_answering_is_left_and_found_again(
    own_redis: OwnRedis, caplog: pytest.LogCaptureFixture
) -> None:
    """SIGSTOP: the TCP connection stays open but nothing answers (a half-open link)."""
    conversation = unique("c")
    async with hub_fanout(own_redis.url) as (hub, heard), publisher(own_redis.url) as pub:
        await hub.add(status_channel(conversation))
        own_redis.pause()
        try:
            await eventually(
                lambda: "no PONG for 2 s" in caplog.text, "the silent link is given up"
            )
        finally:
            own_redis.resume()
        await eventually(lambda: heard.gaps == 1, "the gap is announced")
        await pub.publish(status_channel(conversation), b"after")
        expected = [(status_channel(conversation), b"after")]
        await eventually(lambda: heard.messages == expected, "heard after the pause")


async def link_down(fanout: RedisFanout) -> None:
    """Wait until the fan-out says its link is down (its `ping` fails)."""
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        try:
            await fanout.ping()
        except BackendUnavailable:
            return
        if time.monotonic() > deadline:
            pytest.fail("the fan-out never noticed that Redis is gone")
        await asyncio.sleep(0.01)


async def numsub(url: str, conversation_id: str) -> int:
    client = redis.asyncio.Redis.from_url(url)
    try:
        [(_, count)] = await client.pubsub_numsub(status_channel(conversation_id))
        return int(count)
    finally:
        await client.aclose()


def test_the_fanout_url_selects_the_adapter(tmp_path: Path) -> None:
    def chosen(url: str) -> object:
        return open_fanout(load_settings(fanout_url=url, data_dir=tmp_path))

    assert isinstance(chosen("memory://"), MemoryFanout)
    assert isinstance(chosen("redis://127.0.0.1:6379/0"), RedisFanout)
    with pytest.raises(ConfigError, match="fanout_url"):
        load_settings(fanout_url="nats://127.0.0.1:4222")


async def test_whatslike_serve_fans_out_through_redis(redis_url: str, tmp_path: Path) -> None:
    env = {"WHATSLIKE_FANOUT_URL": redis_url, "WHATSLIKE_SIM_DELAY_MS": "10"}
    server = start_server(tmp_path, env)
    try:
        async with httpx.AsyncClient(base_url=server.url) as probe:
            ready = (await probe.get("/readyz")).json()
        assert ready["checks"]["fanout"] == "ok"
        token = server.token("org-a")
        url = f"{server.ws_url}?access_token={token}"
        async with api(server, token) as client, ws_connect(url) as ws:
            socket = Socket(ws)
            await socket.next_of("connected")
            conversation = await pipeline.new_conversation(client)
            await socket.subscribe(conversation)
            assert await numsub(redis_url, conversation) == 1  # heard through Redis
            message = await pipeline.send(client, conversation)
            frames = await pipeline.statuses_until_final(socket, {message})
        # Webhooks 10 ms apart may be applied in any order (a READ that overtakes makes
        # the earlier ones no-ops): gap-free seqs, statuses only forward, ending READ.
        ranks = {"SENT": 1, "DELIVERED": 2, "READ": 3}
        assert [f["seq"] for f in frames] == list(range(1, len(frames) + 1))
        assert [ranks[f["status"]] for f in frames] == sorted({ranks[f["status"]] for f in frames})
        assert frames[-1]["status"] == "READ"
    finally:
        stop_server(server)


# The hub on a real uvicorn server, hearing Redis.


async def test_hub_hears_exactly_the_conversations_it_has_subscribers_for(
    redis_url: str, tmp_path: Path
) -> None:
    fanout = fast_fanout(redis_url)
    async with running_hub(tmp_path, fanout=fanout) as harness:
        conversation = await harness.conversation()
        assert await numsub(redis_url, conversation.id) == 0
        async with harness.client() as first, harness.client() as second:
            for n, ws in enumerate((first, second)):
                await connected(ws)
                await send(ws, type="subscribe", conversation_id=conversation.id, ref=f"s{n}")
                assert (await receive(ws))["type"] == "subscribed"
            assert await numsub(redis_url, conversation.id) == 1
            await send(first, type="unsubscribe", conversation_id=conversation.id, ref="u")
            assert (await receive(first))["type"] == "unsubscribed"
            await fanout.add(
                status_channel(new_id("barrier"))
            )  # what was asked before it is in effect
            assert await numsub(redis_url, conversation.id) == 1  # the second still follows
        # Both sockets closed: the hub's last subscriber left.
        await eventually(lambda: harness.hub.connection_count == 0, "both sockets gone")
        await fanout.add(status_channel(new_id("barrier")))
        assert await numsub(redis_url, conversation.id) == 0


async def test_hub_clients_get_every_status_across_a_redis_restart(
    own_redis: OwnRedis, tmp_path: Path
) -> None:
    """Statuses 11-20 are applied while Redis is down (never published), 21-30 while the
    hub reconnects: the client still ends with 1..30, each once, in order."""
    total = 30
    fanout = fast_fanout(own_redis.url)
    heard = Heard()
    fanout.on_gap(heard.on_gap)
    async with (
        running_hub(tmp_path, fanout=fanout) as harness,
        publisher(own_redis.url) as pub,
        harness.client() as ws,
    ):
        await connected(ws)
        conversation = await harness.conversation()
        await send(ws, type="subscribe", conversation_id=conversation.id, ref="s")
        assert (await receive(ws))["type"] == "subscribed"
        unpublished = 0
        for n in range(1, total + 1):
            if n == 11:
                own_redis.kill()
            if n == 21:
                own_redis.start()
            for text in await harness.changes(conversation, 1):
                try:
                    await pub.publish(status_channel(conversation.id), text.encode())
                except BackendUnavailable:
                    unpublished += 1
        seen: list[dict[str, Any]] = []
        while not seen or seen[-1]["seq"] < total:
            frame = await receive(ws)
            seen.extend(frame["frames"] if frame["type"] == "batch" else [frame])
        assert [frame["seq"] for frame in seen] == list(range(1, total + 1))
        assert all(frame["type"] == "status" for frame in seen)
        assert unpublished == 10
        assert heard.gaps >= 1
