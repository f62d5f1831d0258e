"""A hub's campaign subscriptions (whatslike/hub/campaigns.py) against a real SQLite store
and the in-process fan-out: the snapshot, a frame per hint that moved the counts (none for
one that did not), a re-read after a fan-out gap, and the refusals. The hints are
published here as the status worker publishes them."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from websockets.asyncio.client import ClientConnection

from tests.hub.test_server import Frame, Harness, connected, receive, running_hub, send
from whatslike.campaigns import fingerprint
from whatslike.clock import new_id
from whatslike.events import CAMPAIGN_HINT, campaign_channel
from whatslike.hub.campaigns import MAX_CAMPAIGNS
from whatslike.store.base import Campaign, NewCampaign


@pytest.fixture
async def hub(tmp_path: Path) -> AsyncIterator[Harness]:
    async with running_hub(tmp_path) as harness:
        yield harness


async def a_campaign(hub: Harness, org: str = "org-a", contacts: int = 4) -> Campaign:
    made = [f"+5511{n:07}" for n in range(contacts)]
    campaign, _ = await hub.store.create_campaign(
        NewCampaign(org, new_id("key"), fingerprint({"c": made}), "whatsapp", "Promo", tuple(made))
    )
    return campaign


async def until_pong(ws: ClientConnection) -> list[Frame]:
    """Every frame before the pong of a ping sent now (frames on a connection are ordered)."""
    await send(ws, type="ping", ts="end")
    seen = []
    while (frame := await receive(ws))["type"] != "pong":
        seen.append(frame)
    return seen


async def test_a_snapshot_then_a_frame_per_move_and_none_without_one(hub: Harness) -> None:
    campaign = await a_campaign(hub)
    async with hub.client() as ws:
        await connected(ws)
        await send(ws, type="subscribe_campaign", campaign_id=campaign.id, ref="c")
        snapshot = await receive(ws)
        assert snapshot == {
            "type": "campaign",
            "campaign_id": campaign.id,
            "version": 0,
            "total": 4,
            "counts": {
                "waiting": 4,
                "queued": 0,
                "sent": 0,
                "delivered": 0,
                "read": 0,
                "failed": 0,
                "failed_by_code": {},
            },
            "finished": False,
            "ref": "c",
        }
        await hub.store.campaign_step(campaign.id, 3)
        await hub.fanout.publish(campaign_channel(campaign.id), CAMPAIGN_HINT)
        moved = await receive(ws)
        assert moved["version"] == 1 and "ref" not in moved
        assert (moved["counts"]["waiting"], moved["counts"]["queued"]) == (1, 3)
        # A hint that moved nothing (a redelivered status) sends nothing.
        await hub.fanout.publish(campaign_channel(campaign.id), CAMPAIGN_HINT)
        assert await until_pong(ws) == []
        # Counts moved while hints were lost (a fan-out outage): the gap reads them again.
        await hub.store.campaign_step(campaign.id, 3)
        hub.hub.on_gap()
        again = await receive(ws)
        assert again["version"] == 2 and again["counts"]["queued"] == 4
        await send(ws, type="unsubscribe_campaign", campaign_id=campaign.id, ref=5)
        assert await receive(ws) == {
            "type": "campaign_unsubscribed",
            "campaign_id": campaign.id,
            "ref": 5,
        }


async def test_another_organizations_campaign_is_refused_like_an_unknown_one(
    hub: Harness,
) -> None:
    theirs = await a_campaign(hub, org="org-b")
    async with hub.client() as ws:
        await connected(ws)
        answers = []
        for campaign_id in (theirs.id, "cmp_none"):
            await send(ws, type="subscribe_campaign", campaign_id=campaign_id, ref=1)
            answers.append(await receive(ws))
        assert answers == [
            {
                "type": "error",
                "code": "forbidden",
                "message": f"campaign {campaign_id!r} is not available",
                "ref": 1,
            }
            for campaign_id in (theirs.id, "cmp_none")
        ]
        # Its counts moving tells this connection nothing.
        await hub.store.campaign_step(theirs.id, 2)
        await hub.fanout.publish(campaign_channel(theirs.id), CAMPAIGN_HINT)
        assert await until_pong(ws) == []


async def test_a_connection_follows_at_most_max_campaigns(hub: Harness) -> None:
    campaigns = [await a_campaign(hub, contacts=1) for _ in range(MAX_CAMPAIGNS + 1)]
    async with hub.client() as ws:
        await connected(ws)
        for campaign in campaigns[:MAX_CAMPAIGNS]:
            await send(ws, type="subscribe_campaign", campaign_id=campaign.id)
            assert (await receive(ws))["type"] == "campaign"
        await send(ws, type="subscribe_campaign", campaign_id=campaigns[-1].id, ref="x")
        refused = await receive(ws)
        assert (refused["type"], refused["code"]) == ("error", "too_many_subscriptions")
