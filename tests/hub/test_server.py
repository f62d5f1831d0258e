"""The hub behind a real uvicorn server, with a real SQLite store and the in-process
fan-out, driven by `websockets` clients: every promise of protocol.md §4."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest
import uvicorn
from starlette.applications import Starlette
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.typing import Origin

from whatslike.auth import TokenService
from whatslike.bus import Bus
from whatslike.clock import new_id, utcnow
from whatslike.events import StatusEvent, status_channel
from whatslike.fanout import Fanout
from whatslike.fanout.memory import MemoryFanout
from whatslike.http_client import AiohttpClient
from whatslike.hub.connection import Reply
from whatslike.hub.delivery import MAX_BATCH, coalesce, status_seq
from whatslike.hub.server import Hub
from whatslike.metrics import Metrics
from whatslike.roles import Deps
from whatslike.settings import Settings
from whatslike.status.rules import Status
from whatslike.store.base import Changes, Conversation, SubscriptionRead
from whatslike.store.sqlite import SQLiteStore

SECRET = "hub-test-secret-long-enough-for-hs256"
TIMEOUT_S = 10.0
Frame = dict[str, Any]


class GatedStore(SQLiteStore):
    """SQLite, with ways to hold the hub's store reads open (to publish meanwhile): `gate`
    before a read, `lookup_gate` after it; and to make them fail like a broken backend."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.gate: asyncio.Event | None = None
        self.replay_started = asyncio.Event()
        self.lookup_gate: asyncio.Event | None = None
        self.lookup_done = asyncio.Event()
        self.broken = False

    async def changes_since(self, conversation_id: str, since: int, limit: int) -> Changes:
        self.replay_started.set()
        if self.gate is not None:
            await self.gate.wait()
        return await super().changes_since(conversation_id, since, limit)

    async def subscription_changes(
        self, reads: Sequence[SubscriptionRead], limit: int
    ) -> list[Changes | None]:
        if self.broken:
            raise RuntimeError("secret internal detail")
        self.replay_started.set()
        if self.gate is not None:
            await self.gate.wait()
        found = await super().subscription_changes(reads, limit)
        self.lookup_done.set()
        if self.lookup_gate is not None:
            await self.lookup_gate.wait()
        return found


@dataclass
class Harness:
    url: str
    hub: Hub
    store: GatedStore
    fanout: Fanout
    metrics: Metrics
    tokens: TokenService

    def token(self, org: str = "org-a", user: str = "agent-1", ttl: int = 3600) -> str:
        return self.tokens.mint(user, org, ttl)

    def client(self, token: str | None = None, **options: Any) -> connect:
        chosen = self.token() if token is None else token
        return connect(f"{self.url}?access_token={chosen}", **options)

    async def conversation(self, org: str = "org-a") -> Conversation:
        return await self.store.create_conversation(org, "whatsapp", "+5511999990000")

    async def changes(self, conversation: Conversation, count: int) -> list[str]:
        """Make `count` status changes (seq +1 each) and answer their frames."""
        made: list[str] = []
        while len(made) < count:
            message, _ = await self.store.create_message(conversation, "hi", new_id("cm"))
            for status in (Status.SENT, Status.DELIVERED, Status.READ)[: count - len(made)]:
                result = await self.store.apply_status(
                    StatusEvent(
                        event_id=new_id("ev"),
                        message_id=message.id,
                        conversation_id=conversation.id,
                        org_id=conversation.org_id,
                        channel="whatsapp",
                        status=status,
                        provider_message_id="",
                        occurred_at=utcnow(),
                    )
                )
                made.extend(result.frames)
        return made

    async def publish(self, conversation: Conversation, *frames: str) -> None:
        for frame in frames:
            await self.fanout.publish(status_channel(conversation.id), frame.encode())

    def closes(self, code: int) -> float:
        value = self.metrics.registry.get_sample_value(
            "whatslike_ws_closes_total", {"code": str(code)}
        )
        return value or 0.0


def _free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


async def eventually(condition: Callable[[], bool], what: str) -> None:
    """Wait until `condition` holds (checked every few ms), failing after TIMEOUT_S."""
    deadline = time.monotonic() + TIMEOUT_S
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting until {what}")
        await asyncio.sleep(0.01)


@asynccontextmanager
async def running_hub(
    tmp_path: Path,
    fanout: Fanout | None = None,
    *,
    ws: str | None = None,
    **overrides: Any,
) -> AsyncIterator[Harness]:
    """The hub on its own uvicorn server; with the in-process fan-out unless one is given
    (the harness starts and stops it)."""
    settings = Settings(jwt_secret=SECRET, data_dir=tmp_path, **overrides)
    store = GatedStore(tmp_path / "hub.db")
    await store.open()
    fanout = MemoryFanout() if fanout is None else fanout
    metrics = Metrics()
    http = AiohttpClient(connections=1, keepalive_s=1.0)  # the hub never calls out
    deps = Deps(
        settings=settings,
        store=store,
        bus=cast(Bus, None),  # the hub never uses the bus
        fanout=fanout,
        http=http,
        metrics=metrics,
        jwt_secret=SECRET,
    )
    hub = Hub(deps)
    app = Starlette(routes=hub.routes())
    protocol: Any = hub.protocol if ws is None else ws
    config = uvicorn.Config(app, lifespan="off", log_level="warning", ws=protocol)
    server = uvicorn.Server(config)
    sock = _free_socket()
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    await eventually(lambda: server.started or serving.done(), "uvicorn serves")
    host, port = sock.getsockname()
    await hub.start()
    await fanout.start()
    try:
        yield Harness(
            f"ws://{host}:{port}/ws/status", hub, store, fanout, metrics, TokenService(SECRET)
        )
    finally:
        await fanout.stop()
        await hub.stop()
        server.should_exit = True
        await serving
        sock.close()
        await store.close()


async def receive(ws: ClientConnection) -> Frame:
    frame: Frame = json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT_S))
    return frame


async def connected(ws: ClientConnection) -> Frame:
    frame = await receive(ws)
    assert frame["type"] == "connected"
    return frame


async def send(ws: ClientConnection, **frame: Any) -> None:
    await ws.send(json.dumps(frame))


async def statuses_until_pong(ws: ClientConnection, ts: object = "end") -> list[Frame]:
    """Ping, then collect the status frames (unpacking batches) that arrive before the
    pong: anything the hub queued before the ping comes first, so this is exact."""
    await send(ws, type="ping", ts=ts)
    seen: list[Frame] = []
    while True:
        frame = await receive(ws)
        if frame["type"] == "pong" and frame["ts"] == ts:
            return seen
        seen.extend(frame["frames"] if frame["type"] == "batch" else [frame])


async def closed(ws: ClientConnection) -> tuple[int | None, str | None]:
    """Read until the server closes; answer its close code and reason."""
    try:
        async with asyncio.timeout(TIMEOUT_S):
            while True:
                await ws.recv()
    except ConnectionClosed:
        pass
    return ws.close_code, ws.close_reason


def seqs(frames: list[Frame]) -> list[int]:
    return [frame["seq"] for frame in frames]


@pytest.fixture
async def hub(tmp_path: Path) -> AsyncIterator[Harness]:
    async with running_hub(tmp_path) as harness:
        yield harness


# The writer's coalescing, without sockets.


def test_coalesce_batches_runs_of_status_frames_around_replies() -> None:
    a, b, c, d = (f'{{"seq":{n}}}' for n in range(1, 5))
    replay = Reply('{"type":"subscribed"}', (c,))
    assert coalesce([a, b, replay, d, Reply('{"type":"pong"}')]) == [
        f'{{"type":"batch","frames":[{a},{b}]}}',
        '{"type":"subscribed"}',
        f'{{"type":"batch","frames":[{c},{d}]}}',
        '{"type":"pong"}',
    ]
    assert coalesce([a]) == [a]


def test_coalesce_splits_long_runs() -> None:
    run = [f'{{"seq":{n}}}' for n in range(MAX_BATCH + 1)]
    sent = coalesce([Reply("{}", tuple(run))])
    assert len(sent) == 3
    assert sent[0] == "{}"
    assert json.loads(sent[1])["frames"] == [json.loads(frame) for frame in run[:-1]]
    assert sent[2] == run[-1]


@pytest.mark.parametrize(
    ("frame", "seq"),
    [(b'{"seq":4}', 4), (b'{"seq":true}', None), (b"[]", None), (b"\xff", None), ("{}", None)],
)
def test_status_seq(frame: str | bytes, seq: int | None) -> None:
    assert status_seq(frame) == seq


# Upgrade.


async def _refused(url: str, **options: Any) -> tuple[int, Frame]:
    with pytest.raises(InvalidStatus) as caught:
        async with connect(url, **options):
            pass
    response = caught.value.response
    return response.status_code, json.loads(response.body or b"{}")


async def test_upgrade_without_token_is_refused_with_401(hub: Harness) -> None:
    status, body = await _refused(hub.url)
    assert status == 401
    assert body == {"error": {"code": "unauthorized", "message": "a token is required"}}


async def test_hub_behind_another_websocket_protocol_refuses_upgrades_with_500(
    tmp_path: Path,
) -> None:
    async with running_hub(tmp_path, ws="websockets-sansio") as harness:
        status, body = await _refused(f"{harness.url}?access_token={harness.token()}")
    assert status == 500
    assert body["error"]["code"] == "internal"


async def test_upgrade_with_bad_token_is_refused_with_401(hub: Harness) -> None:
    other = TokenService("some-other-secret-of-enough-length").mint("u", "org-a", 60)
    status, body = await _refused(f"{hub.url}?access_token={other}")
    assert (status, body["error"]["message"]) == (401, "token signature is invalid")


async def test_upgrade_with_expired_token_is_refused_with_401(hub: Harness) -> None:
    expired = hub.tokens.mint("u", "org-a", 10, now=int(time.time()) - 100)
    status, body = await _refused(f"{hub.url}?access_token={expired}")
    assert (status, body["error"]["message"]) == (401, "token expired")


async def test_connected_frame_first(hub: Harness) -> None:
    token = hub.token(org="org-a", user="agent-7")
    async with hub.client(token) as ws:
        frame = await connected(ws)
    assert frame["connection_id"].startswith("conn_")
    assert frame["user_id"] == "agent-7"
    assert frame["org_id"] == "org-a"
    assert frame["heartbeat_s"] == 25
    assert frame["token_exp"] == hub.tokens.verify(token).exp


async def test_bearer_header_is_accepted(hub: Harness) -> None:
    headers = {"Authorization": f"Bearer {hub.token()}"}
    async with connect(hub.url, additional_headers=headers) as ws:
        await connected(ws)


async def test_origin_allow_list(tmp_path: Path) -> None:
    async with running_hub(tmp_path, allowed_origins=("https://app.example",)) as harness:
        url = f"{harness.url}?access_token={harness.token()}"
        status, body = await _refused(url, origin=Origin("https://evil.example"))
        assert (status, body["error"]["code"]) == (403, "forbidden_origin")
        async with connect(url, origin=Origin("https://app.example")) as ws:
            await connected(ws)
        # Only browsers send Origin, and only browsers can be lured into connecting.
        async with connect(url) as ws:
            await connected(ws)


# Subscriptions and delivery.


async def test_subscribe_then_live_frames(hub: Harness) -> None:
    conversation = await hub.conversation()
    async with hub.client() as ws:
        await connected(ws)
        await send(ws, type="subscribe", conversation_id=conversation.id, ref="r1")
        assert await receive(ws) == {
            "type": "subscribed",
            "conversation_id": conversation.id,
            "seq": 0,
            "recovered": True,
            "ref": "r1",
        }
        frames = await hub.changes(conversation, 2)
        for frame in frames:
            await hub.publish(conversation, frame)
            assert json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT_S)) == json.loads(frame)


async def test_live_frame_bytes_are_forwarded_verbatim(hub: Harness) -> None:
    conversation = await hub.conversation()
    async with hub.client() as ws:
        await connected(ws)
        await send(ws, type="subscribe", conversation_id=conversation.id)
        await receive(ws)
        frame = '{"type":"status",  "seq":1, "note":"spacing kept"}'
        await hub.publish(conversation, frame)
        assert await asyncio.wait_for(ws.recv(), TIMEOUT_S) == frame


async def test_other_organization_and_unknown_are_forbidden_alike(hub: Harness) -> None:
    foreign = await hub.conversation(org="org-b")
    async with hub.client(hub.token(org="org-a")) as ws:
        await connected(ws)
        await send(ws, type="subscribe", conversation_id=foreign.id, ref="x")
        refused = await receive(ws)
        await send(ws, type="subscribe", conversation_id="conv_nope", ref="y")
        unknown = await receive(ws)
        await hub.publish(foreign, *await hub.changes(foreign, 1))
        assert await statuses_until_pong(ws) == []
    assert refused["type"] == unknown["type"] == "error"
    assert refused["code"] == unknown["code"] == "forbidden"
    assert refused["ref"] == "x"
    assert refused["message"].replace(foreign.id, "?") == unknown["message"].replace(
        "conv_nope", "?"
    )


async def test_since_replays_missed_frames_then_live_ones(hub: Harness) -> None:
    conversation = await hub.conversation()
    frames = await hub.changes(conversation, 4)
    async with hub.client() as ws:
        await connected(ws)
        await send(ws, type="subscribe", conversation_id=conversation.id, since=1, ref="s")
        assert await receive(ws) == {
            "type": "subscribed",
            "conversation_id": conversation.id,
            "seq": 4,
            "recovered": True,
            "ref": "s",
        }
        assert seqs(await statuses_until_pong(ws, 1)) == [2, 3, 4]
        # Duplicate deliveries of frames already sent are dropped; new ones pass.
        await hub.publish(conversation, frames[3], frames[1], *await hub.changes(conversation, 1))
        await hub.publish(conversation, frames[3])
        assert seqs(await statuses_until_pong(ws, 2)) == [5]


async def test_frames_published_during_the_replay_are_sent_once_in_order(
    hub: Harness,
) -> None:
    conversation = await hub.conversation()
    await hub.changes(conversation, 2)
    hub.store.gate = asyncio.Event()
    async with hub.client() as ws:
        await connected(ws)
        await send(ws, type="subscribe", conversation_id=conversation.id, since=0)
        await asyncio.wait_for(hub.store.replay_started.wait(), TIMEOUT_S)
        # The hub registered the subscription before reading: these must not be lost,
        # and must not come twice even though the replay will include them too.
        racing = await hub.changes(conversation, 2)
        await hub.publish(conversation, racing[1], racing[0], racing[1])
        hub.store.gate.set()
        subscribed = await receive(ws)
        assert (subscribed["seq"], subscribed["recovered"]) == (4, True)
        assert seqs(await statuses_until_pong(ws)) == [1, 2, 3, 4]


async def test_a_frame_published_while_a_plain_subscribe_looks_up_is_not_lost(
    hub: Harness,
) -> None:
    conversation = await hub.conversation()
    hub.store.lookup_gate = asyncio.Event()
    async with hub.client() as ws:
        await connected(ws)
        await send(ws, type="subscribe", conversation_id=conversation.id)
        await asyncio.wait_for(hub.store.lookup_done.wait(), TIMEOUT_S)
        # The hub read last_seq 0; seq 1 is committed and fanned out before it answers:
        # held while the read is answered, and sent after it.
        await hub.publish(conversation, *await hub.changes(conversation, 1))
        hub.store.lookup_gate.set()
        subscribed = await receive(ws)
        assert (subscribed["seq"], subscribed["recovered"]) == (0, True)
        assert seqs(await statuses_until_pong(ws)) == [1]


async def test_frames_after_the_replay_snapshot_follow_it(hub: Harness) -> None:
    conversation = await hub.conversation()
    await hub.changes(conversation, 1)
    hub.store.gate = asyncio.Event()
    async with hub.client() as ws:
        await connected(ws)
        await send(ws, type="subscribe", conversation_id=conversation.id, since=0)
        await asyncio.wait_for(hub.store.replay_started.wait(), TIMEOUT_S)
        # A frame the replay cannot know about: published before the read, with a seq the
        # store does not have (the store's read happens after the gate opens).
        late = '{"type":"status","conversation_id":"x","seq":9}'
        await hub.publish(conversation, late)
        hub.store.gate.set()
        assert (await receive(ws))["seq"] == 1
        assert seqs(await statuses_until_pong(ws)) == [1, 9]


async def test_replay_beyond_the_limit_is_not_recovered(tmp_path: Path) -> None:
    async with running_hub(tmp_path, replay_limit=2) as harness:
        conversation = await harness.conversation()
        await harness.changes(conversation, 5)
        async with harness.client() as ws:
            await connected(ws)
            await send(ws, type="subscribe", conversation_id=conversation.id, since=0)
            subscribed = await receive(ws)
            assert (subscribed["seq"], subscribed["recovered"]) == (5, False)
            assert await statuses_until_pong(ws) == []
            await harness.publish(conversation, *await harness.changes(conversation, 1))
            assert seqs(await statuses_until_pong(ws)) == [6]


async def test_since_beyond_the_store_is_not_recovered_and_live_frames_follow(
    hub: Harness,
) -> None:
    conversation = await hub.conversation()
    await hub.changes(conversation, 2)
    async with hub.client() as ws:
        await connected(ws)
        await send(ws, type="subscribe", conversation_id=conversation.id, since=50)
        subscribed = await receive(ws)
        assert (subscribed["seq"], subscribed["recovered"]) == (2, False)
        await hub.publish(conversation, *await hub.changes(conversation, 1))
        assert seqs(await statuses_until_pong(ws)) == [3]


async def test_unsubscribe_stops_delivery(hub: Harness) -> None:
    conversation = await hub.conversation()
    async with hub.client() as ws:
        await connected(ws)
        await send(ws, type="subscribe", conversation_id=conversation.id)
        await receive(ws)
        await send(ws, type="unsubscribe", conversation_id=conversation.id, ref="u")
        assert await receive(ws) == {
            "type": "unsubscribed",
            "conversation_id": conversation.id,
            "ref": "u",
        }
        await hub.publish(conversation, *await hub.changes(conversation, 2))
        assert await statuses_until_pong(ws) == []


async def test_too_many_subscriptions(tmp_path: Path) -> None:
    async with running_hub(tmp_path, max_subscriptions=1) as harness:
        first, second = await harness.conversation(), await harness.conversation()
        async with harness.client() as ws:
            await connected(ws)
            await send(ws, type="subscribe", conversation_id=first.id)
            assert (await receive(ws))["type"] == "subscribed"
            await send(ws, type="subscribe", conversation_id=second.id, ref=3)
            error = await receive(ws)
            assert (error["type"], error["code"], error["ref"]) == (
                "error",
                "too_many_subscriptions",
                3,
            )


async def test_frames_are_written_one_by_one_to_a_socket_that_takes_them(hub: Harness) -> None:
    conversation = await hub.conversation()
    async with hub.client() as ws:
        await connected(ws)
        await send(ws, type="subscribe", conversation_id=conversation.id)
        await receive(ws)
        frames = await hub.changes(conversation, 3)
        await hub.publish(conversation, *frames)
        received = [await receive(ws) for _ in frames]
    assert received == [json.loads(frame) for frame in frames]


async def test_frames_queued_behind_a_slow_socket_are_sent_as_one_batch(hub: Harness) -> None:
    conversation = await hub.conversation()
    async with hub.client() as ws:
        await connected(ws)
        await send(ws, type="subscribe", conversation_id=conversation.id)
        await receive(ws)
        (conn,) = hub.hub.connections.values()
        # As the transport does when its buffer passes the high-water mark.
        conn.pause_writing()
        frames = await hub.changes(conversation, 3)
        await hub.publish(conversation, *frames)
        assert conn.backlog is not None and len(conn.backlog) == 3
        conn.resume_writing()
        batch = await receive(ws)
    assert batch == {"type": "batch", "frames": [json.loads(frame) for frame in frames]}


async def test_slow_consumer_is_closed_and_others_keep_receiving(tmp_path: Path) -> None:
    async with running_hub(tmp_path, connection_queue_size=2) as harness:
        conversation = await harness.conversation()
        # Without compression, so the padding really fills the socket buffers.
        slow = await harness.client(max_queue=1, max_size=None, compression=None)
        fast = await harness.client(max_size=None, compression=None)
        for ws in (slow, fast):
            await connected(ws)
            await send(ws, type="subscribe", conversation_id=conversation.id)
            await receive(ws)
        padding = "x" * 256 * 1024
        seq = 0
        # The slow client reads nothing: once the socket buffers are full its queue
        # overflows, while the fast one is handed every frame.
        while harness.closes(4009) == 0:
            seq += 1
            assert seq < 1000, "the slow consumer was never closed"
            await harness.publish(
                conversation, json.dumps({"type": "status", "seq": seq, "pad": padding})
            )
            assert seqs(await statuses_until_pong(fast, seq)) == [seq]
        assert await closed(slow) == (4009, "slow consumer")
        await harness.publish(conversation, json.dumps({"type": "status", "seq": seq + 1}))
        assert seqs(await statuses_until_pong(fast)) == [seq + 1]
        await fast.close()


# Control frames.


async def test_ping_pong_echoes_ts(hub: Harness) -> None:
    async with hub.client() as ws:
        await connected(ws)
        await send(ws, type="ping", ts={"t": [1, 2.5, "x"]})
        assert await receive(ws) == {"type": "pong", "ts": {"t": [1, 2.5, "x"]}}


async def test_binary_frames_are_read_as_utf8_text(hub: Harness) -> None:
    async with hub.client() as ws:
        await connected(ws)
        await ws.send(b'{"type":"ping","ts":5}')
        assert await receive(ws) == {"type": "pong", "ts": 5}
        await ws.send(b"\xff\xfe")
        assert await receive(ws) == {
            "type": "error",
            "code": "bad_request",
            "message": "frame is not valid UTF-8",
        }


async def test_auth_refresh_moves_the_expiry(hub: Harness) -> None:
    short = hub.token(ttl=2)
    old_exp = hub.tokens.verify(short).exp
    async with hub.client(short) as ws:
        await connected(ws)
        fresh = hub.token(ttl=3600)
        await send(ws, type="auth", token=fresh, ref="a")
        assert await receive(ws) == {
            "type": "auth_ok",
            "token_exp": hub.tokens.verify(fresh).exp,
            "ref": "a",
        }
        # Past the old expiry the connection still answers: the new one counts.
        await asyncio.sleep(max(0.0, old_exp + 1 - time.time()))
        await send(ws, type="ping", ts=1)
        assert await receive(ws) == {"type": "pong", "ts": 1}


async def test_auth_refresh_for_another_identity_is_refused(hub: Harness) -> None:
    async with hub.client(hub.token(org="org-a", user="u1")) as ws:
        await connected(ws)
        for token in (hub.token(org="org-b", user="u1"), hub.token(org="org-a", user="u2")):
            await send(ws, type="auth", token=token, ref="a")
            assert await receive(ws) == {
                "type": "error",
                "code": "bad_request",
                "message": "the token is for a different user or organization",
                "ref": "a",
            }
        await send(ws, type="auth", token="junk")
        assert (await receive(ws))["message"] == "token is malformed"


async def test_expired_token_closes_with_4001(hub: Harness) -> None:
    async with hub.client(hub.token(ttl=2)) as ws:
        await connected(ws)
        await asyncio.wait_for(ws.wait_closed(), TIMEOUT_S)
        assert (ws.close_code, ws.close_reason) == (4001, "token expired")
    assert hub.closes(4001) == 1


async def test_silent_client_is_closed_as_idle(tmp_path: Path) -> None:
    async with running_hub(tmp_path, heartbeat_s=1) as harness, harness.client() as ws:
        assert (await connected(ws))["heartbeat_s"] == 1
        await asyncio.wait_for(ws.wait_closed(), TIMEOUT_S)
        assert (ws.close_code, ws.close_reason) == (1000, "idle")


# Bad input and failures.


async def test_bad_frames_are_answered_then_closed_past_the_tolerance(tmp_path: Path) -> None:
    async with running_hub(tmp_path, bad_frame_tolerance=2) as harness:
        async with harness.client() as ws:
            await connected(ws)
            await ws.send("not json")
            assert await receive(ws) == {
                "type": "error",
                "code": "bad_request",
                "message": "frame is not valid JSON",
            }
            await send(ws, type="dance", ref="d")
            assert await receive(ws) == {
                "type": "error",
                "code": "bad_request",
                "message": "unknown frame type 'dance'",
                "ref": "d",
            }
            await send(ws, type="subscribe")
            assert await closed(ws) == (1008, "too many malformed frames")
        bad = harness.metrics.registry.get_sample_value(
            "whatslike_ws_bad_frames_total", {"code": "bad_request"}
        )
        assert bad == 3


async def test_a_flood_is_rate_limited_then_closed_with_4008(tmp_path: Path) -> None:
    # A rate so low that no token comes back while the test runs.
    limits: dict[str, Any] = {
        "client_frame_burst": 2,
        "client_frames_per_s": 0.001,
        "rate_limit_strikes": 2,
    }
    async with running_hub(tmp_path, **limits) as harness, harness.client() as ws:
        await connected(ws)
        for ts in (1, 2):
            await send(ws, type="ping", ts=ts)
            assert await receive(ws) == {"type": "pong", "ts": ts}
        await send(ws, type="unsubscribe", conversation_id="c", ref="u1")
        assert await receive(ws) == {
            "type": "error",
            "code": "rate_limited",
            "message": "too many frames; slow down",
            "ref": "u1",
        }
        await send(ws, type="ping", ts=3)
        assert (await receive(ws))["code"] == "rate_limited"
        await send(ws, type="ping", ts=4)
        assert await closed(ws) == (4008, "rate limit exceeded repeatedly")


async def test_oversized_frame_closes_with_1009(hub: Harness) -> None:
    async with hub.client() as ws:
        await connected(ws)
        await ws.send("x" * 4097)
        assert await closed(ws) == (1009, "frame is 4097 bytes; the limit is 4096")


async def test_unexpected_failure_closes_with_1011_without_details(hub: Harness) -> None:
    hub.store.broken = True
    async with hub.client() as ws:
        await connected(ws)
        await send(ws, type="subscribe", conversation_id="c1")
        assert await closed(ws) == (1011, "internal error")


async def test_a_store_outage_closes_with_1013_so_the_client_comes_back(hub: Harness) -> None:
    conversation = await hub.conversation()
    await hub.store.close()  # the database is out of reach
    async with hub.client() as ws:
        await connected(ws)
        await send(ws, type="subscribe", conversation_id=conversation.id)
        assert await closed(ws) == (1013, "store unavailable")


async def test_stop_closes_every_connection_with_1001(hub: Harness) -> None:
    async with hub.client() as first, hub.client() as second:
        await connected(first)
        await connected(second)
        await hub.hub.stop()
        assert await closed(first) == (1001, "server shutting down")
        assert await closed(second) == (1001, "server shutting down")


async def test_connection_gauge_follows_connections(hub: Harness) -> None:
    def gauge() -> float | None:
        return hub.metrics.registry.get_sample_value("whatslike_ws_connections")

    async with hub.client() as ws:
        await connected(ws)
        assert gauge() == 1
        assert hub.hub.connection_count == 1
    await eventually(lambda: gauge() == 0 and hub.hub.connection_count == 0, "gauge is 0")


async def test_fanout_on_other_channels_is_ignored(hub: Harness) -> None:
    conversation = await hub.conversation()
    async with hub.client() as ws:
        await connected(ws)
        await send(ws, type="subscribe", conversation_id=conversation.id)
        await receive(ws)
        hub.hub.on_fanout(f"other:{conversation.id}", b'{"seq":1}')
        hub.hub.on_fanout(status_channel(conversation.id), b"not json")
        hub.hub.on_fanout(status_channel(conversation.id), b'{"seq":"1"}')
        assert await statuses_until_pong(ws) == []
