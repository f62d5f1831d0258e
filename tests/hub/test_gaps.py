"""The hub after a fan-out gap (the link to Redis broke, so statuses may have been missed):
it re-reads its live subscriptions from the store and sends what each client missed, in
seq order, or tells it to reload. The gap is announced here by calling `on_gap` as the
fan-out adapter does (tests/fanout/test_redis.py does it with a real Redis restart)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from websockets.asyncio.client import ClientConnection

from tests.hub.test_server import (
    TIMEOUT_S,
    Frame,
    Harness,
    connected,
    eventually,
    receive,
    running_hub,
    send,
    seqs,
    statuses_until_pong,
)


@pytest.fixture
async def hub(tmp_path: Path) -> AsyncIterator[Harness]:
    async with running_hub(tmp_path) as harness:
        yield harness


async def statuses(ws: ClientConnection, count: int) -> list[Frame]:
    """The next `count` status frames (batches unpacked); anything else fails."""
    seen: list[Frame] = []
    while len(seen) < count:
        frame = await receive(ws)
        seen.extend(frame["frames"] if frame["type"] == "batch" else [frame])
    assert all(frame["type"] == "status" for frame in seen)
    return seen


async def test_a_gap_sends_each_subscriber_what_it_missed_in_order(hub: Harness) -> None:
    conversation = await hub.conversation()
    async with hub.client() as ws:
        await connected(ws)
        await send(ws, type="subscribe", conversation_id=conversation.id, ref="s")
        assert (await receive(ws))["seq"] == 0
        await hub.publish(conversation, *await hub.changes(conversation, 1))
        assert seqs(await statuses_until_pong(ws, 1)) == [1]
        missed = await hub.changes(conversation, 3)  # applied, never heard
        hub.hub.on_gap()
        assert seqs(await statuses(ws, 3)) == [2, 3, 4]
        # Late copies of what was recovered are dropped; what is new passes.
        await hub.publish(conversation, *missed, *await hub.changes(conversation, 1))
        assert seqs(await statuses_until_pong(ws, 2)) == [5]


async def test_a_live_frame_past_a_lost_one_fills_the_hole_from_the_store(hub: Harness) -> None:
    """A publish lost without the hub's link breaking (the worker published while the
    hub was still resubscribing): the next live frame shows the hole."""
    conversation = await hub.conversation()
    async with hub.client() as ws:
        await connected(ws)
        await send(ws, type="subscribe", conversation_id=conversation.id, ref="s")
        assert (await receive(ws))["seq"] == 0
        lost, heard = await hub.changes(conversation, 2)
        await hub.publish(conversation, heard)
        assert seqs(await statuses(ws, 2)) == [1, 2]
        await hub.publish(conversation, lost, *await hub.changes(conversation, 1))
        assert seqs(await statuses_until_pong(ws, 1)) == [3]


async def test_a_gap_beyond_the_replay_limit_tells_the_client_to_reload(tmp_path: Path) -> None:
    async with running_hub(tmp_path, replay_limit=2) as harness, harness.client() as ws:
        conversation = await harness.conversation()
        await connected(ws)
        await send(ws, type="subscribe", conversation_id=conversation.id, ref="s")
        assert (await receive(ws))["seq"] == 0
        await harness.changes(conversation, 5)  # applied, never heard
        harness.hub.on_gap()
        assert await receive(ws) == {
            "type": "subscribed",
            "conversation_id": conversation.id,
            "seq": 5,
            "recovered": False,
        }
        await harness.publish(conversation, *await harness.changes(conversation, 1))
        assert seqs(await statuses_until_pong(ws)) == [6]


async def test_a_gap_during_a_subscribes_store_read_is_read_again(hub: Harness) -> None:
    """The subscribe's read may predate the gap's end: it must not be taken as enough."""
    release = hub.store.lookup_gate = asyncio.Event()  # held after the read
    conversation = await hub.conversation()
    async with hub.client() as ws:
        await connected(ws)
        await send(ws, type="subscribe", conversation_id=conversation.id, ref="s")
        await asyncio.wait_for(hub.store.lookup_done.wait(), TIMEOUT_S)
        await hub.changes(conversation, 2)  # after the read, never heard
        hub.hub.on_gap()
        # Released once the gap met the read in flight (private: nothing else shows it).
        await eventually(lambda: _gap_noted(hub, conversation.id), "the gap meets the read")
        release.set()
        subscribed = await receive(ws)
        assert (subscribed["type"], subscribed["seq"]) == ("subscribed", 0)
        assert seqs(await statuses(ws, 2)) == [1, 2]


def _gap_noted(harness: Harness, conversation_id: str) -> bool:
    for conn in harness.hub.connections.values():
        subscription = conn.subscriptions.get(conversation_id)
        if subscription is not None and subscription.gap:
            return True
    return False
