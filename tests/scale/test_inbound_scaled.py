"""A customer's reply on the scaled-out layout (every role its own process, Kafka, Redis,
PostgreSQL or Cassandra): the webhook reaches the connector process, the status workers
give it its seq, and the agent recovers it with `since` on one hub while the other
organization, on the other hub, sees nothing (the scenario of tests/e2e/test_inbound.py)."""

from __future__ import annotations

from pathlib import Path

from tests.e2e.conftest import OWN_SECRETS
from tests.e2e.test_inbound import customer_reply_is_recovered_with_since
from tests.scale.harness import cluster_env, running_cluster

OWNER = "org-scale-owner"


async def test_a_reply_while_the_agent_is_away_is_recovered_on_the_scaled_out_layout(
    tmp_path: Path, kafka_url: str, redis_url: str, database_url: str, prefix: str
) -> None:
    env = cluster_env(kafka_url, redis_url, database_url, prefix)
    env["WHATSLIKE_WHATSAPP_ORG_ID"] = OWNER
    with running_cluster(tmp_path, env) as cluster:
        first, second = cluster.hubs
        await customer_reply_is_recovered_with_since(
            (first, second),
            (cluster.token(OWNER), cluster.token("org-scale-other")),
            cluster.servers["connector"].url,
            OWN_SECRETS["WHATSLIKE_META_APP_SECRET"],
        )
