"""Several webhook senders on one PostgreSQL database (the scaled layout's processes,
each with its own pool): with a lease per endpoint, every delivery reaches the receiver
once, in seq order per conversation, though each sender polls for the same work."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator

import pytest

from tests.e2e.test_webhooks_out import Receiver
from tests.store.conftest import fresh_postgres_database
from tests.store.test_contract import applied, at, status_event
from whatslike.bus.memory import MemoryBus
from whatslike.clock import utcnow
from whatslike.fanout.memory import MemoryFanout
from whatslike.http_client import AiohttpClient
from whatslike.metrics import Metrics
from whatslike.roles import Deps
from whatslike.settings import load_settings
from whatslike.status.rules import Status
from whatslike.store import PostgresStore
from whatslike.store.base import WebhookEndpoint
from whatslike.webhooks.core import new_secret
from whatslike.webhooks.sender import WebhookSender

pytestmark = pytest.mark.postgres
SENDERS = 3
CONVERSATIONS = 6
WAIT_S = 60


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    running = Receiver()
    yield running
    running.close()


@pytest.fixture
async def database() -> AsyncIterator[str]:
    async with fresh_postgres_database() as url:
        yield url


async def test_senders_sharing_a_database_deliver_each_change_once_in_order(
    database: str, receiver: Receiver
) -> None:
    settings = load_settings(
        webhook_allow_private=True, webhook_poll_s=0.01, webhook_in_flight=2, webhook_batch=3
    )
    stores = [PostgresStore(database) for _ in range(SENDERS + 1)]
    for store in stores:
        await store.open()
    writer, *others = stores
    metrics = Metrics()
    senders = [
        WebhookSender(
            Deps(
                settings=settings,
                store=store,
                bus=MemoryBus(settings, metrics),
                fanout=MemoryFanout(),
                http=AiohttpClient(connections=1, keepalive_s=1.0),
                metrics=metrics,
                jwt_secret="x",
            )
        )
        for store in others
    ]
    try:
        endpoints = []
        for name in ("one", "two"):
            url, target = receiver.target(f"/{name}")
            endpoint = WebhookEndpoint(f"whe_{name}", "acme", url, new_secret(), utcnow())
            assert await writer.add_webhook_endpoint(endpoint, 5) is not None
            endpoints.append(target)
        for sender in senders:
            await sender.start()
        expected: dict[str, list[int]] = {}
        for n in range(CONVERSATIONS):
            conversation = await writer.create_conversation("acme", "whatsapp", f"+{n}")
            message, _ = await writer.create_message(conversation, "hi", "")
            statuses = [Status.SENT, Status.DELIVERED, Status.READ]
            await applied(writer, [status_event(message, s, at(i)) for i, s in enumerate(statuses)])
            expected[conversation.id] = [1, 2, 3]
        total = CONVERSATIONS * 3
        deadline = time.monotonic() + WAIT_S
        while not all(len(t.delivered) >= total for t in endpoints):
            assert time.monotonic() < deadline, [len(t.delivered) for t in endpoints]
            await asyncio.sleep(0.05)
        # Nothing more comes: the run's deliveries are all gone from the store.
        for name in ("one", "two"):
            assert await writer.due_webhook_deliveries(f"whe_{name}", utcnow(), 100) == []
        for target in endpoints:
            ids = [headers["webhook-id"] for headers, _ in target.delivered]
            assert len(ids) == len(set(ids)) == total  # each once: no two senders at once
            seqs: dict[str, list[int]] = {}
            for _, body in target.delivered:
                frame = json.loads(body)["data"]
                seqs.setdefault(frame["conversation_id"], []).append(frame["seq"])
            assert seqs == expected
    finally:
        for sender in senders:
            await sender.stop()
        for store in stores:
            await store.close()
