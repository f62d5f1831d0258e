"""How many statements, and how many lightweight transactions (Paxos rounds), one message
costs on the Cassandra store: its whole life as the scaled layout drives it, from the
202 to READ, counted at the driver (a request listener of the session).

    python -m bench.cassandra_statements [--cassandra-url URL] [--messages N]

The store steps follow the pipeline on a durable bus: the API's `create_message`, the
relay's claim and delete of each hand-off, the connector's `begin_send`, `link_answer`
and hand-off of SENT (completing the send's entry), each webhook's hand-off of a status
and the status worker's `apply_statuses`. `--messages` messages go through each step
together (one relay pass, one status batch), as they do under load; the figures are per
message. Runs on a fresh keyspace of `--cassandra-url` (default
WHATSLIKE_TEST_CASSANDRA_URL), left in place.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import uuid
from collections import Counter
from datetime import timedelta
from typing import Any

from cassandra import ConsistencyLevel
from cassandra.cluster import ResponseFuture
from cassandra.query import BatchStatement, BatchType, BoundStatement

from bench.chaos import fresh_keyspace
from whatslike.clock import utcnow
from whatslike.events import TOPIC_MESSAGES, StatusEvent
from whatslike.status.rules import Status
from whatslike.store import common
from whatslike.store.base import Conversation, Message
from whatslike.store.cassandra import CassandraStore

CHANNEL = "whatsapp"


class Tally:
    """Statements seen by the session, by kind: ``lwt``, ``batch`` or ``plain``."""

    def __init__(self) -> None:
        self.kinds: Counter[str] = Counter()
        self.names: Counter[str] = Counter()

    def __call__(self, future: ResponseFuture) -> None:
        query: Any = future.query
        if isinstance(query, BatchStatement):
            logged = query.batch_type == BatchType.LOGGED
            # A conditional batch (one partition) is one Paxos round.
            kind = "lwt" if query.serial_consistency_level else "batch"
            kind = kind if kind == "lwt" or logged else "unlogged batch"
            self.kinds[kind] += 1
            self.names[f"({kind}, {len(query)} statements)"] += 1
            return
        text = (
            query.prepared_statement.query_string
            if isinstance(query, BoundStatement)
            else str(query)
        )
        serial = query.consistency_level in (ConsistencyLevel.SERIAL, ConsistencyLevel.LOCAL_SERIAL)
        kind = "lwt" if " IF " in text else "serial read" if serial else "plain"
        self.kinds[kind] += 1
        self.names[f"{kind:11} " + " ".join(text.split()[:4])] += 1


def status_event(message: Message, status: Status, provider_id: str) -> StatusEvent:
    return StatusEvent(
        event_id=f"evt_{uuid.uuid4().hex}",
        message_id=message.id,
        conversation_id=message.conversation_id,
        org_id=message.org_id,
        channel=CHANNEL,
        status=status,
        provider_message_id=provider_id,
        occurred_at=utcnow(),
        received_at=utcnow(),
    )


async def relay_pass(store: CassandraStore) -> None:
    items = await store.claim_outbox(200, 30.0)
    await store.delete_outbox([item.id for item in items])


async def lifecycle(store: CassandraStore, conversations: list[Conversation]) -> None:
    created = [
        (await store.create_message(conversation, "hi", f"c-{uuid.uuid4().hex}"))[0]
        for conversation in conversations
    ]
    await relay_pass(store)
    provider_ids = {message.id: f"wamid.{uuid.uuid4().hex}" for message in created}
    for message in created:
        await store.begin_send(message.id)
        await store.link_answer(CHANNEL, provider_ids[message.id], message.id)
        sent = status_event(message, Status.SENT, provider_ids[message.id])
        await store.handoff([common.status_entry(sent)], done=[(TOPIC_MESSAGES, message.id)])
    await relay_pass(store)
    events = [status_event(m, Status.SENT, provider_ids[m.id]) for m in created]
    await store.apply_statuses(events)
    for status in (Status.DELIVERED, Status.READ):
        events = [status_event(m, status, provider_ids[m.id]) for m in created]
        await store.handoff([common.status_entry(event) for event in events])
        await relay_pass(store)
        await store.apply_statuses(events)
    for message in created:
        found = await store.get_message(message.id)
        assert found is not None and found.status is Status.READ, found


async def main(url: str, messages: int) -> None:
    store = CassandraStore(await fresh_keyspace(url), pending_lease=timedelta(seconds=10))
    await store.open()
    conversations = [
        await store.create_conversation("org", CHANNEL, f"+1555{n:07d}") for n in range(messages)
    ]
    tally = Tally()
    session = store._session  # the benchmark listens to the store's own session
    assert session is not None
    session.add_request_init_listener(tally)
    try:
        await lifecycle(store, conversations)
    finally:
        await store.close()
    per = {kind: n / messages for kind, n in tally.kinds.items()}
    print(f"{messages} messages, per message: " + ", ".join(f"{k} {v:.1f}" for k, v in per.items()))
    for name, n in tally.names.most_common():
        print(f"  {n / messages:6.2f}  {name}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cassandra-url", default=os.environ.get("WHATSLIKE_TEST_CASSANDRA_URL"))
    parser.add_argument("--messages", type=int, default=10)
    args = parser.parse_args()
    asyncio.run(main(args.cassandra_url, args.messages))
