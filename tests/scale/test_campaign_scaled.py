"""A campaign of 1,000 contacts on the scaled-out layout (every role its own process,
Kafka, Redis, PostgreSQL; two api processes both creating its messages): under the
simulator's disorder and failures, its counts end exactly equal to its messages' statuses,
and a WebSocket client on each hub follows them live (the hints cross Redis) to the same
final counts (the scenario of tests/e2e/test_campaigns.py)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
from websockets.asyncio.client import connect

from tests.e2e.campaign_checks import (
    check_counts,
    contacts,
    follow_live,
    start_campaign,
    wait_quiescent,
)
from tests.e2e.conftest import Socket
from tests.scale.harness import cluster_env, running_cluster

ORG = "org-scale-campaign"


async def test_a_campaign_of_1000_contacts_counts_exactly_its_messages_scaled_out(
    tmp_path: Path, kafka_url: str, redis_url: str, postgres_url: str, prefix: str
) -> None:
    env = cluster_env(kafka_url, redis_url, postgres_url, prefix)
    env["WHATSLIKE_WHATSAPP_SENDS_PER_S"] = "400"
    recipients = contacts(1000, first=40_000)
    with running_cluster(tmp_path, env, sim_delay_ms=20) as cluster:
        async with httpx.AsyncClient(base_url=cluster.servers["simulator"].url) as simulator:
            answer = await simulator.post(
                "/simulator/control", json={"disorder": True, "failure_rate": 0.1}
            )
            assert answer.status_code == 200, answer.text
        token = cluster.token(ORG)
        first, second = cluster.hubs
        sockets = []
        for hub in (first, second):
            connection = await connect(f"{hub.ws_url}?access_token={token}")
            socket = Socket(connection)
            assert (await socket.next())["type"] == "connected"
            sockets.append(socket)
        try:
            async with httpx.AsyncClient(
                base_url=first.url, headers={"Authorization": f"Bearer {token}"}, timeout=10
            ) as client:
                accepted = await start_campaign(client, recipients, "thousand-scaled")
                seen = await asyncio.gather(
                    *(follow_live(socket, accepted["id"], within_s=180) for socket in sockets)
                )
                campaign = await wait_quiescent(client, accepted["id"], within_s=10)
                await check_counts(client, campaign, recipients)
        finally:
            for socket in sockets:
                await socket.connection.close()
    assert campaign["counts"]["failed"] > 0
    for frames in seen:  # each hub's client, the one of the other hub's process included
        assert frames[-1]["counts"] == campaign["counts"] and frames[-1]["finished"]
        assert len(frames) > 2
