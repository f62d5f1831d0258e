"""A `kill -9` of a separate webhook-sender process on the scaled-out layout (Kafka,
Redis, PostgreSQL; the sender its own process, as in supervisord and Compose): every
change still reaches the receiver, signed, in seq order per conversation. The killed
sender's lease of the endpoint holds the restarted one off until it lapses
(`WEBHOOK_LEASE_S`, short here): the restart is a new sender, so nothing can tell it that
the old holder is dead rather than slow."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx

from tests.e2e.conftest import Server
from tests.e2e.test_webhooks_out import ENV, Org, Receiver, complete, until
from tests.scale.harness import PROCESSES, Cluster, cluster_env, running_cluster

LEASE_S = 8


class ClusterOrg(Org):
    """An organization's API client on one api process of the cluster."""

    # Not Org's constructor: it mints with the `whatslike token` CLI, which does not know
    # the cluster's JWT secret.
    def __init__(self, server: Server, token: str) -> None:
        self.server = server
        self.http = httpx.Client(
            base_url=server.url, headers={"Authorization": f"Bearer {token}"}, timeout=30
        )


async def test_nothing_is_lost_across_a_kill_9_of_the_webhook_sender_scaled_out(
    tmp_path: Path, kafka_url: str, redis_url: str, postgres_url: str, prefix: str
) -> None:
    env = {
        **cluster_env(kafka_url, redis_url, postgres_url, prefix),
        **ENV,
        "WHATSLIKE_WEBHOOK_LEASE_S": str(LEASE_S),
        "WHATSLIKE_WEBHOOK_TIMEOUT_S": "5",
    }
    processes = (*PROCESSES, ("webhooks", "webhook-sender"))
    receiver = Receiver()
    try:
        with running_cluster(tmp_path, env, sim_delay_ms=20, processes=processes) as cluster:
            await asyncio.to_thread(_kill_the_sender_mid_delivery, cluster, receiver)
    finally:
        receiver.close()


def _kill_the_sender_mid_delivery(cluster: Cluster, receiver: Receiver) -> None:
    org = ClusterOrg(cluster.hubs[0], cluster.token("org-scale-hooks"))
    url, target = receiver.target("/scaled")
    endpoint = org.add_endpoint(url)
    # Every status applied first, the deliveries held back (503); then the receiver comes
    # up and the sender process is killed mid-delivery, its POSTs hanging.
    target.answer = 503
    conversations = org.send(conversations=4, messages=5)
    until(lambda: org.all_read(conversations), "the statuses")
    target.answer = 200
    until(lambda: len(target.delivered) >= 5, "the first deliveries")
    target.open.clear()
    cluster.kill("webhooks")
    target.epoch += 1  # what the killed sender had under way never counted
    cluster.restart("webhooks")
    restarted = time.monotonic()
    target.open.set()
    until(lambda: complete(org, target, conversations, endpoint["secret"]), "every change")
    print(f"\nevery change delivered {time.monotonic() - restarted:.1f} s after the restart")
