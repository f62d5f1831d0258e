"""What the campaign tests share: start one over HTTP, wait until it is quiescent, and
check its counts against its messages."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

import httpx

#: The simulator ends every WhatsApp message READ or FAILED (sent, then failed; or sent,
#: delivered, read): a campaign is quiescent once every recipient is in one of those.
FINAL = ("read", "failed")


def contacts(count: int, first: int = 0) -> list[str]:
    return [f"55119{n:08}" for n in range(first, first + count)]


async def start_campaign(
    client: httpx.AsyncClient, recipients: list[str], key: str, text: str = "Promo de verão"
) -> dict[str, Any]:
    answer = await client.post(
        "/api/campaigns",
        json={
            "client_campaign_id": key,
            "channel": "whatsapp",
            "message": {"type": "text", "text": text},
            "contacts": recipients,
        },
    )
    assert answer.status_code == 202, answer.text
    campaign: dict[str, Any] = answer.json()
    return campaign


async def campaign_now(client: httpx.AsyncClient, campaign_id: str) -> dict[str, Any]:
    answer = await client.get(f"/api/campaigns/{campaign_id}")
    assert answer.status_code == 200, answer.text
    campaign: dict[str, Any] = answer.json()
    return campaign


async def wait_quiescent(
    client: httpx.AsyncClient, campaign_id: str, within_s: float
) -> dict[str, Any]:
    deadline = time.monotonic() + within_s
    while True:
        campaign = await campaign_now(client, campaign_id)
        if sum(campaign["counts"][name] for name in FINAL) == campaign["total"]:
            return campaign
        assert time.monotonic() < deadline, f"the campaign did not finish: {campaign}"
        await asyncio.sleep(0.2)


async def recipients_of(client: httpx.AsyncClient, campaign_id: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    after: int | None = -1
    while after is not None:
        page = await client.get(f"/api/campaigns/{campaign_id}/messages", params={"after": after})
        assert page.status_code == 200, page.text
        found += page.json()["recipients"]
        after = page.json()["next_after"]
    return found


def tally(recipients: list[dict[str, Any]]) -> dict[str, Any]:
    """The counts the messages' statuses add up to, shaped as the campaign's."""
    statuses = Counter(r["message"]["status"] for r in recipients if r["message"])
    failed = Counter(
        r["message"]["error"]["code"]
        for r in recipients
        if r["message"] and r["message"]["status"] == "FAILED"
    )
    return {
        "waiting": sum(r["message"] is None for r in recipients),
        "queued": statuses["PENDING"],
        "sent": statuses["SENT"],
        "delivered": statuses["DELIVERED"],
        "read": statuses["READ"],
        "failed": statuses["FAILED"],
        "failed_by_code": dict(failed),
    }


async def check_counts(
    client: httpx.AsyncClient, campaign: dict[str, Any], recipients: list[str]
) -> list[dict[str, Any]]:
    """The counts are exactly the messages' statuses; each contact has one message, in a
    conversation of its own that holds no other message of the campaign."""
    listed = await recipients_of(client, campaign["id"])
    assert [r["contact"] for r in listed] == recipients
    assert campaign["counts"] == tally(listed)
    assert campaign["finished"]
    ids = [r["message"]["id"] for r in listed]
    assert len(set(ids)) == len(recipients)
    conversations = {r["message"]["conversation_id"] for r in listed}
    assert len(conversations) == len(recipients)
    return listed


#: A hub reads a campaign's counts at most once per this many seconds (FRAME_INTERVAL_S).
FRAME_INTERVAL_S = 0.25


async def follow_live(socket: Any, campaign_id: str, within_s: float) -> list[dict[str, Any]]:
    """Subscribe `socket` (tests.e2e.conftest.Socket) to the campaign and read its
    `campaign` frames until one shows every recipient READ or FAILED; check on the way
    that the versions only grow and that the frames came no faster than the hub's bound.
    Answers the frames, the snapshot first."""
    subscribed_at = time.monotonic()
    await socket.send({"type": "subscribe_campaign", "campaign_id": campaign_id, "ref": "live"})
    snapshot = await socket.next_of("campaign")
    assert snapshot["ref"] == "live" and snapshot["campaign_id"] == campaign_id
    seen = [snapshot]
    deadline = subscribed_at + within_s
    while sum(seen[-1]["counts"][name] for name in FINAL) < seen[-1]["total"]:
        frame = await socket.next_of("campaign", wait_s=max(0.1, deadline - time.monotonic()))
        assert frame["campaign_id"] == campaign_id and "ref" not in frame
        assert frame["version"] > seen[-1]["version"], (frame, seen[-1])
        assert (
            sum(n for name, n in frame["counts"].items() if name != "failed_by_code")
            == (frame["total"])
        )
        seen.append(frame)
    # After the snapshot, reads start FRAME_INTERVAL_S apart at least (each frame was sent
    # no earlier than its read began, and received no earlier than it was sent).
    live = len(seen) - 1
    assert live <= 1 + (time.monotonic() - subscribed_at) / FRAME_INTERVAL_S, live
    return seen
