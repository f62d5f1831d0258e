"""Campaigns through a real `whatslike serve` (the embedded default: SQLite, in-process bus,
the simulator as Meta; and once on Cassandra): counts against the messages under disorder
and across a kill -9, the caller's key, and agents' messages not starved by a campaign."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.campaign_checks import (
    campaign_now,
    check_counts,
    contacts,
    follow_live,
    start_campaign,
    wait_quiescent,
)
from tests.e2e.conftest import OWN_SECRETS, Server, Socket, api, start_server, stop_server
from tests.store.conftest import fresh_cassandra_keyspace

#: Disorder on (duplicates, reordering, batches, a skipped DELIVERED), and failures.
DISORDER = {
    "WHATSLIKE_SIM_DISORDER": "true",
    "WHATSLIKE_SIM_FAILURE_RATE": "0.1",
    "WHATSLIKE_SIM_DELAY_MS": "20",
    "WHATSLIKE_WHATSAPP_SENDS_PER_S": "400",
}


@pytest.fixture(scope="module")
def disordered(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    running = start_server(tmp_path_factory.mktemp("campaigns"), DISORDER)
    yield running
    stop_server(running)


async def test_a_campaign_of_1000_contacts_counts_exactly_its_messages(
    disordered: Server, open_socket: Any
) -> None:
    """Its counts, live over the WebSocket and over HTTP, end exactly equal to its
    messages' statuses. Live: a snapshot at once, then frames whose version only grows,
    no faster than the hub's bound, the last one the final counts."""
    recipients = contacts(1000)
    socket: Socket = await open_socket(disordered, disordered.token("acme"))
    async with api(disordered, disordered.token("acme")) as client:
        accepted = await start_campaign(client, recipients, "thousand")
        assert accepted["total"] == 1000
        began = time.monotonic()
        seen = await follow_live(socket, accepted["id"], within_s=120)
        print(f"\n{len(seen)} campaign frames in {time.monotonic() - began:.1f} s")
        campaign = await wait_quiescent(client, accepted["id"], within_s=10)
        listed = await check_counts(client, campaign, recipients)
    assert campaign["counts"]["failed"] > 0  # the failures were counted by code too
    assert set(campaign["counts"]["failed_by_code"]) == {"131026"}
    assert {r["message"]["text"] for r in listed} == {"Promo de verão"}
    final = seen[-1]
    assert final["counts"] == campaign["counts"] and final["finished"]
    assert len(seen) > 2  # the counts were seen moving, not only at their end
    # Nothing more is said once the counts stopped moving.
    assert await socket.ping_barrier() == []
    # Unsubscribed, the campaign says no more (and the answer names it).
    await socket.send({"type": "unsubscribe_campaign", "campaign_id": accepted["id"], "ref": 9})
    assert await socket.next_of("campaign_unsubscribed") == {
        "type": "campaign_unsubscribed",
        "campaign_id": accepted["id"],
        "ref": 9,
    }


async def test_another_organizations_campaign_is_refused_like_an_unknown_one(
    disordered: Server, open_socket: Any
) -> None:
    async with api(disordered, disordered.token("acme")) as client:
        accepted = await start_campaign(client, contacts(2, first=9000), "private")
    socket: Socket = await open_socket(disordered, disordered.token("globex"))
    answers = []
    for campaign_id in (accepted["id"], "cmp_unknown"):
        await socket.send({"type": "subscribe_campaign", "campaign_id": campaign_id, "ref": 1})
        answers.append(await socket.next_of("error"))
    assert answers == [
        {
            "type": "error",
            "code": "forbidden",
            "message": f"campaign {campaign_id!r} is not available",
            "ref": 1,
        }
        for campaign_id in (accepted["id"], "cmp_unknown")
    ]
    # Nothing of it leaks later either.
    assert await socket.ping_barrier() == []


async def test_the_callers_key_answers_the_same_campaign_and_refuses_another_request(
    disordered: Server,
) -> None:
    recipients = contacts(3, first=5000)
    async with api(disordered, disordered.token("acme")) as client:
        first = await start_campaign(client, recipients, "once")
        again = await start_campaign(client, recipients, "once")
        assert again["id"] == first["id"]
        other = await client.post(
            "/api/campaigns",
            json={
                "client_campaign_id": "once",
                "channel": "whatsapp",
                "message": {"type": "text", "text": "another text"},
                "contacts": recipients,
            },
        )
        assert other.status_code == 409, other.text
        assert other.json()["error"]["code"] == "conflict"
        # A contact given twice gets one message.
        twice = await start_campaign(client, [recipients[0], recipients[0]], "twice")
        assert twice["total"] == 1
        campaign = await wait_quiescent(client, first["id"], within_s=60)
        await check_counts(client, campaign, recipients)
    # Another organization sees no such campaign, and has keys of its own.
    async with api(disordered, disordered.token("globex")) as client:
        assert (await client.get(f"/api/campaigns/{first['id']}")).status_code == 404
        assert (await client.get(f"/api/campaigns/{first['id']}/messages")).status_code == 404
        assert (await start_campaign(client, recipients, "once"))["id"] != first["id"]


async def test_a_campaign_body_may_hold_10000_contacts_and_no_more(disordered: Server) -> None:
    async with api(disordered, disordered.token("acme")) as client:
        body = {
            "client_campaign_id": "too-many",
            "channel": "whatsapp",
            "message": {"type": "text", "text": "x"},
            "contacts": contacts(10_001, first=20_000),
        }
        answer = await client.post("/api/campaigns", json=body)
        assert answer.status_code == 400, answer.text
        assert "contacts" in answer.json()["error"]["message"]
        # 10,000 of the longest contacts (~1.3 MB) fit in the campaign's 2 MiB body.
        body["contacts"] = [f"{n:0128}" for n in range(10_000)]
        body["client_campaign_id"] = "ten-thousand"
        answer = await client.post("/api/campaigns", json=body)
        assert answer.status_code == 202, answer.text
        assert answer.json()["total"] == 10_000


async def test_a_kill_9_mid_campaign_sends_no_contact_twice_and_counts_stay_exact(
    tmp_path: Path,
) -> None:
    # The sends in flight at the kill have an unknown outcome: they are not sent again,
    # and the watchdog fails them (send_outcome_unknown) after SEND_UNKNOWN_FAIL_S.
    env = {
        **DISORDER,
        "WHATSLIKE_WHATSAPP_SENDS_PER_S": "100",
        "WHATSLIKE_SEND_UNKNOWN_FAIL_S": "2",
        "WHATSLIKE_WATCHDOG_INTERVAL_S": "0.5",
    }
    server = start_server(tmp_path, env)
    recipients = contacts(600, first=1000)
    token = server.token("acme")
    try:
        async with api(server, token) as client:
            accepted = await start_campaign(client, recipients, "killed")
            deadline = time.monotonic() + 60
            while (await campaign_now(client, accepted["id"]))["counts"]["read"] < 100:
                assert time.monotonic() < deadline, "the campaign did not get going"
                await asyncio.sleep(0.1)
        server.process.kill()  # kill -9: mid-batch, mid-send, mid-status
        server.process.wait()
    finally:
        stop_server(server)
    server = start_server(tmp_path, env)
    try:
        async with api(server, token) as client:
            campaign = await wait_quiescent(client, accepted["id"], within_s=120)
            listed = await check_counts(client, campaign, recipients)
            # No contact got a second message of the campaign in its conversation.
            for recipient in listed:
                conversation = recipient["message"]["conversation_id"]
                messages = await client.get(f"/api/conversations/{conversation}/messages")
                assert len(messages.json()["messages"]) == 1
    finally:
        stop_server(server)


@pytest.mark.cassandra
async def test_on_cassandra_a_campaigns_counts_are_exactly_its_messages(
    tmp_path: Path, open_socket: Any
) -> None:
    """The same pipeline with the store on Cassandra, under the simulator's disorder
    (duplicates, reordering, failures): the counts, live and over HTTP, end equal to the
    messages' statuses, each contact with one message; the key answers the campaign again."""
    recipients = contacts(200, first=5000)
    async with fresh_cassandra_keyspace() as url:
        env = {
            **DISORDER,
            **OWN_SECRETS,
            "WHATSLIKE_ROLES": "api,router,connector,status-worker,simulator",
            "WHATSLIKE_DATABASE_URL": url,
        }
        running = start_server(tmp_path, env)
        try:
            socket: Socket = await open_socket(running, running.token("acme"))
            async with api(running, running.token("acme")) as client:
                accepted = await start_campaign(client, recipients, "on-cassandra")
                again = await start_campaign(client, recipients, "on-cassandra")
                assert again["id"] == accepted["id"]
                seen = await follow_live(socket, accepted["id"], within_s=120)
                campaign = await wait_quiescent(client, accepted["id"], within_s=30)
                await check_counts(client, campaign, recipients)
            assert seen[-1]["counts"] == campaign["counts"] and seen[-1]["finished"]
        finally:
            stop_server(running)


@pytest.mark.parametrize(("queue_s", "starved"), [(1.25, False), (1000.0, True)])
async def test_an_agents_message_is_not_starved_by_a_campaign(
    tmp_path: Path, queue_s: float, starved: bool
) -> None:
    """With the bound (`CAMPAIGN_QUEUE_S` = 1.25 s of the rate), an agent's message
    waits behind at most that many campaign messages; without it (a bound larger than
    the campaign) it waits behind the whole campaign. Measured in campaign messages sent
    meanwhile, not in seconds, so a slow machine does not change the outcome."""
    rate = 40
    env = {
        "WHATSLIKE_SIM_DELAY_MS": "20",
        "WHATSLIKE_WHATSAPP_SENDS_PER_S": str(rate),
        "WHATSLIKE_CAMPAIGN_QUEUE_S": str(queue_s),
    }
    server = start_server(tmp_path, env)
    try:
        async with api(server, server.token("acme")) as client:
            accepted = await start_campaign(client, contacts(400, first=3000), "big")
            # The campaign is under way: its first messages are out.
            deadline = time.monotonic() + 60
            while _done(await campaign_now(client, accepted["id"])) < 20:
                assert time.monotonic() < deadline, "the campaign did not get going"
                await asyncio.sleep(0.05)
            created = await client.post(
                "/api/conversations", json={"channel": "whatsapp", "contact": "5511900009999"}
            )
            conversation = created.json()["id"]
            before = _done(await campaign_now(client, accepted["id"]))
            await client.post(f"/api/conversations/{conversation}/messages", json={"text": "oi"})
            deadline = time.monotonic() + 60
            while (await client.get(f"/api/conversations/{conversation}/messages")).json()[
                "messages"
            ][0]["status"] == "PENDING":
                assert time.monotonic() < deadline, "the agent's message never went out"
                await asyncio.sleep(0.05)
            ahead = _done(await campaign_now(client, accepted["id"])) - before
    finally:
        stop_server(server)
    bound = rate * 1.25
    # Ahead of the agent: the queue's bound, what entered while it was measured (the
    # polls above take a few tenths of a second at 40/s), and the pacer's burst.
    if starved:
        assert ahead > 4 * bound, ahead
    else:
        assert ahead < 2 * bound, ahead


def _done(campaign: dict[str, object]) -> int:
    counts = campaign["counts"]
    assert isinstance(counts, dict)
    return int(counts["sent"] + counts["delivered"] + counts["read"] + counts["failed"])
