"""PostgreSQL alone: a client stuck inside a transaction (paused, cut off) stalls only the
conversations whose rows it holds, and only until the server ends its session; waits
for locks and statements are bounded and end as `BackendUnavailable` (a retry)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
import zlib
from asyncio.subprocess import PIPE
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime

import asyncpg
import pytest

from whatslike.bus.memory import MemoryBus
from whatslike.errors import BackendUnavailable
from whatslike.events import TOPIC_MESSAGES, TOPIC_STATUS, StatusEvent
from whatslike.fanout.memory import MemoryFanout
from whatslike.http_client import AiohttpClient
from whatslike.metrics import Metrics
from whatslike.roles import Deps
from whatslike.roles.status_worker import StatusWorker
from whatslike.settings import load_settings
from whatslike.status.rules import Effect, Status
from whatslike.store.base import Message, OutboxEntry, SendClaim
from whatslike.store.common import status_entry
from whatslike.store.postgres import _CAMPAIGN_STEP_LOCK, SERVER_SETTINGS, PostgresStore

from .conftest import fresh_postgres_database
from .test_campaigns import asked, messages_of, tallied
from .test_contract import at, status_event

pytestmark = pytest.mark.postgres

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)

#: Holds a message's and its conversation's rows in an open transaction of our own store
#: (so with its server settings), says so on stdout, and waits to be paused.
HOLDER = """
import asyncio, sys
from whatslike.store.postgres import PostgresStore

async def main() -> None:
    store = PostgresStore(sys.argv[1])
    await store.open()
    async with store._connection() as conn, conn.transaction():
        await conn.execute(
            "SELECT 1 FROM messages WHERE id = $1 FOR UPDATE", sys.argv[2])
        await conn.execute(
            "SELECT 1 FROM conversations WHERE id = $1 FOR UPDATE", sys.argv[3])
        print("held", flush=True)
        await asyncio.sleep(3600)

asyncio.run(main())
"""


@pytest.fixture
async def url() -> AsyncIterator[str]:
    async with fresh_postgres_database() as made:
        yield made


@pytest.fixture
async def store(url: str) -> AsyncIterator[PostgresStore]:
    opened = PostgresStore(url)
    await opened.open()
    yield opened
    await opened.close()


async def new_message(store: PostgresStore) -> Message:
    conversation = await store.create_conversation("org_a", "whatsapp", "+5511999990000")
    message, _ = await store.create_message(conversation, "hello", "")
    return message


def sent(message: Message) -> StatusEvent:
    return StatusEvent(
        event_id=f"evt_sent_{message.id}",
        message_id=message.id,
        conversation_id=message.conversation_id,
        org_id=message.org_id,
        channel=message.channel,
        status=Status.SENT,
        provider_message_id=f"wamid.{message.id}",
        occurred_at=T0,
    )


async def holding(url: str, message: Message) -> asyncpg.Connection[asyncpg.Record]:
    """Another client's open transaction holding the message's and conversation's rows."""
    conn = await asyncpg.connect(url)
    await conn.execute("BEGIN")
    await conn.execute("SELECT 1 FROM messages WHERE id = $1 FOR UPDATE", message.id)
    await conn.execute(
        "SELECT 1 FROM conversations WHERE id = $1 FOR UPDATE", message.conversation_id
    )
    return conn


async def test_every_connection_bounds_locks_statements_and_idle_transactions(
    url: str, store: PostgresStore
) -> None:
    async with store._connection() as conn:  # the pool's own connections
        shown = {name: await conn.fetchval(f"SHOW {name}") for name in SERVER_SETTINGS}
    assert shown == SERVER_SETTINGS
    tuned = PostgresStore(f"{url}?lock_timeout=250ms")
    await tuned.open()
    try:
        async with tuned._connection() as conn:
            assert await conn.fetchval("SHOW lock_timeout") == "250ms"
            assert await conn.fetchval("SHOW statement_timeout") == "10s"
    finally:
        await tuned.close()


async def test_a_connection_goes_back_to_the_pool_without_a_reset_round_trip(
    url: str,
) -> None:
    store = PostgresStore(url, max_size=1)  # one connection: each acquire gets the same one
    await store.open()
    try:
        async with store._connection() as conn:
            await conn.execute("SET application_name = 'kept'")  # session state we never make
        async with store._connection() as conn:
            # No RESET ALL round trip on release: the session is as it was left.
            assert await conn.fetchval("SHOW application_name") == "kept"
            await conn.execute("BEGIN")  # a caller cancelled mid-transaction
        async with store._connection() as conn:
            assert not conn.is_in_transaction()  # rolled back on release
        conversation = await store.create_conversation("org_a", "whatsapp", "+55")
        assert (await store.create_message(conversation, "hello", ""))[1]
    finally:
        await store.close()


async def test_a_wait_for_a_held_row_ends_as_unavailable(url: str, store: PostgresStore) -> None:
    message = await new_message(store)
    holder = await holding(url, message)
    waiting = PostgresStore(f"{url}?lock_timeout=200ms")
    await waiting.open()
    try:
        started = time.monotonic()
        with pytest.raises(BackendUnavailable, match="LockNotAvailableError"):
            async with asyncio.timeout(10):
                await waiting.begin_send(message.id)
        assert time.monotonic() - started < 5
    finally:
        await holder.close()
        await waiting.close()
    # Nothing was recorded: the attempt can be made again.
    claim, _ = await store.begin_send(message.id)
    assert claim is SendClaim.GO


async def test_a_call_that_fails_in_a_group_fails_alone(store: PostgresStore) -> None:
    """Calls made at once share a transaction; one that cannot be made (here a link to
    no message: a foreign key) makes the group go call by call, and only it fails."""
    messages = [await new_message(store) for _ in range(4)]
    outcomes = await asyncio.gather(
        *(store.link_answer("whatsapp", f"wamid.{m.id}", m.id) for m in messages),
        store.link_answer("whatsapp", "wamid.nobody", "msg_missing"),
        return_exceptions=True,
    )
    assert outcomes[:4] == [([], None)] * 4
    assert isinstance(outcomes[4], asyncpg.ForeignKeyViolationError)
    for message in messages:
        found = await store.get_message(message.id)
        assert found is not None and found.provider_message_id == f"wamid.{message.id}"


async def test_hand_offs_made_at_once_have_the_effect_of_their_order(
    store: PostgresStore,
) -> None:
    """An entry completed by one hand-off and added again by a later one stays (as one
    after the other), though the group deletes after it adds."""
    message = await new_message(store)
    again = OutboxEntry(TOPIC_MESSAGES, message.conversation_id, b"again", message.id)
    await asyncio.gather(store.handoff(done=[(TOPIC_MESSAGES, message.id)]), store.handoff([again]))
    assert [item.payload for item in await store.outbox_batch("run", 10)] == [b"again"]
    # The other order: added, then completed.
    await asyncio.gather(store.handoff([again]), store.handoff(done=[(TOPIC_MESSAGES, message.id)]))
    assert await store.outbox_size() == 0


async def test_a_held_row_holds_up_only_its_own_call_of_a_group(
    url: str, store: PostgresStore
) -> None:
    """A send claim waiting for a row another transaction holds past `lock_timeout`
    fails alone: the claims grouped with it go on."""
    stuck, *free = [await new_message(store) for _ in range(3)]
    holder = await holding(url, stuck)
    waiting = PostgresStore(f"{url}?lock_timeout=200ms")
    await waiting.open()
    try:
        async with asyncio.timeout(10):
            outcomes = await asyncio.gather(
                *(waiting.begin_send(m.id) for m in [stuck, *free]), return_exceptions=True
            )
    finally:
        await holder.close()
        await waiting.close()
    assert isinstance(outcomes[0], BackendUnavailable)
    assert [claim for claim, _ in outcomes[1:]] == [SendClaim.GO] * 2  # type: ignore[misc]
    assert (await store.begin_send(stuck.id))[0] is SendClaim.GO


async def test_a_held_conversation_is_busy_and_the_others_are_applied(
    url: str, store: PostgresStore
) -> None:
    stuck, free = await new_message(store), await new_message(store)
    holder = await holding(url, stuck)
    try:
        async with asyncio.timeout(5):  # before: waited for the holder, for ever
            first, second = await store.apply_statuses([sent(stuck), sent(free)])
        assert first.busy
        assert (second.busy, second.effect) == (False, Effect.CHANGED)
        assert (await store.get_message(stuck.id)).status is Status.PENDING  # type: ignore[union-attr]
    finally:
        await holder.close()  # its transaction ends: the rows are free
    [again] = await store.apply_statuses([sent(stuck)])
    assert (again.busy, again.effect) == (False, Effect.CHANGED)
    assert json.loads(again.frames[0])["seq"] == 1


async def waiting_for_a_lock(conn: asyncpg.Connection[asyncpg.Record], query: str) -> None:
    """Until a session of this database whose statement is like `query` waits for a lock
    (`conn` outside a transaction: pg_stat_activity is read once per transaction)."""
    deadline = time.monotonic() + 10
    while not await conn.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
        " AND wait_event_type = 'Lock' AND query LIKE $1",
        query,
    ):
        assert time.monotonic() < deadline, f"no session waits for a lock in {query!r}"
        await asyncio.sleep(0.01)


async def test_published_hand_offs_and_their_statuses_applied_at_once_do_not_deadlock(
    url: str,
) -> None:
    """The publisher deletes the hand-offs Kafka took (`delete_outbox`, by id) while the
    status worker, which may have consumed them already, completes the same entries (by
    event id, in the status batch's transaction). Locked in two orders, the two
    deadlocked, and the deadlock error ended the connector's publisher (issue 13's ~30 s
    tails). A third session holds the first entry so the two meet as they did."""
    # Index scans, as on a busy outbox (on this tiny one the planner would scan it
    # whole); the session holding the entry is let to hold it past the usual 2 s.
    store = PostgresStore(f"{url}?enable_seqscan=off&lock_timeout=60s")
    await store.open()
    blocker, watcher = await asyncpg.connect(url), await asyncpg.connect(url)
    try:
        message = await new_message(store)
        await store.handoff(done=[(TOPIC_MESSAGES, message.id)])
        # The first entry's event id sorts after the second's.
        first = replace(sent(message), event_id="evt_2")
        second = replace(sent(message), event_id="evt_1", status=Status.DELIVERED)
        ids = await store.handoff([status_entry(first), status_entry(second)], claim_s=30.0)
        await blocker.execute("BEGIN")
        await blocker.execute("SELECT 1 FROM outbox WHERE id = $1 FOR UPDATE", ids[0])
        publishing = asyncio.create_task(store.delete_outbox(ids))
        await waiting_for_a_lock(watcher, "DELETE FROM outbox%")
        applying = asyncio.create_task(store.apply_statuses([first, second]))
        await waiting_for_a_lock(watcher, "%completed AS%")
        await blocker.execute("ROLLBACK")
        async with asyncio.timeout(10):
            await publishing
            applied = await applying
        assert [result.effect for result in applied] == [Effect.CHANGED, Effect.CHANGED]
        assert await store.outbox_size() == 0
    finally:
        await blocker.close()
        await watcher.close()
        await store.close()


async def test_a_paused_holder_loses_its_rows_when_its_session_times_out(
    url: str, store: PostgresStore
) -> None:
    """The issue's scenario at the store: a process of ours paused (SIGSTOP) inside a
    transaction. The other conversation is applied at once; the held one as soon as the
    server ended the paused session (idle_in_transaction_session_timeout, 5 s)."""
    stuck, free = await new_message(store), await new_message(store)
    holder = await asyncio.create_subprocess_exec(
        sys.executable, "-c", HOLDER, url, stuck.id, stuck.conversation_id, stdout=PIPE
    )
    try:
        assert holder.stdout is not None
        async with asyncio.timeout(30):
            assert await holder.stdout.readline() == b"held\n"
        os.kill(holder.pid, signal.SIGSTOP)
        paused = time.monotonic()
        async with asyncio.timeout(5):
            first, second = await store.apply_statuses([sent(stuck), sent(free)])
        assert first.busy and second.effect is Effect.CHANGED
        async with asyncio.timeout(15):  # before: held for as long as the pause lasts
            # Each try waits briefly (BRIEF_LOCK_WAIT_MS) for the rows before it answers.
            while (await store.apply_statuses([sent(stuck)]))[0].busy:
                pass
        waited = time.monotonic() - paused
        assert waited < 8  # the session timeout (5 s), not the pause
        assert (await store.get_message(stuck.id)).status is Status.SENT  # type: ignore[union-attr]
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        os.kill(holder.pid, signal.SIGCONT)
        await holder.wait()


class Frames(MemoryFanout):
    """Tells, per message, that a frame of it went out."""

    def __init__(self) -> None:
        super().__init__()
        self.frames: defaultdict[str, asyncio.Event] = defaultdict(asyncio.Event)

    async def publish(self, channel: str, payload: bytes) -> None:
        self.frames[json.loads(payload)["message_id"]].set()


def _partition(key: str, partitions: int) -> int:
    return zlib.crc32(key.encode()) % partitions


async def test_the_status_worker_retries_a_held_conversation_and_applies_the_others(
    url: str, store: PostgresStore
) -> None:
    stuck, free = await new_message(store), await new_message(store)
    settings = load_settings(
        bus_partitions=2,
        consumer_max_attempts=1000,
        consumer_backoff_base_s=0.01,
        consumer_backoff_cap_s=0.05,
    )
    # Keys on different partitions: one group commit takes both events.
    keys = ["a", next(k for k in "bcdefgh" if _partition(k, 2) != _partition("a", 2))]
    fanout, metrics = Frames(), Metrics()
    frames = fanout.frames
    wiring = Deps(
        settings=settings,
        store=store,
        bus=MemoryBus(settings, metrics, seed=3),
        fanout=fanout,
        http=AiohttpClient(connections=1, keepalive_s=1.0),
        metrics=metrics,
        jwt_secret="x",
    )
    worker = StatusWorker(wiring)
    holder = await holding(url, stuck)
    await worker.start()
    await wiring.bus.start()
    try:
        await wiring.bus.publish(TOPIC_STATUS, keys[0], sent(stuck).to_json())
        await wiring.bus.publish(TOPIC_STATUS, keys[1], sent(free).to_json())
        async with asyncio.timeout(5):
            await frames[free.id].wait()
        assert not frames[stuck.id].is_set()
        await holder.close()
        async with asyncio.timeout(5):
            await frames[stuck.id].wait()
    finally:
        if not holder.is_closed():
            await holder.close()
        await wiring.bus.stop()
        await worker.stop()
        await wiring.http.close()
    assert await store.dead_letter_count() == 0
    assert (await store.get_message(stuck.id)).status is Status.SENT  # type: ignore[union-attr]


async def test_a_campaign_step_in_progress_holds_up_no_status_change_of_its_messages(
    store: PostgresStore, url: str
) -> None:
    """A status change moves its campaign's counts, whose rows reference the campaign; a
    step holds the campaign's row for its whole transaction. The step's lock must not
    exclude the reference's key-share lock: with FOR UPDATE the change waited for the
    step (then failed after `lock_timeout`), and the two deadlocked when the step went on
    to move the same counts."""
    campaign, _ = await store.create_campaign(asked(["5511900000001", "5511900000002"]))
    assert await store.campaign_step(campaign.id, 1) == 1
    [message] = await messages_of(store, campaign)
    step = await asyncpg.connect(url)
    try:
        async with step.transaction():
            assert await step.fetchrow(_CAMPAIGN_STEP_LOCK, campaign.id) is not None
            [result] = await asyncio.wait_for(
                store.apply_statuses([status_event(message, Status.SENT, at(1))]), 30
            )
            assert result.effect is Effect.CHANGED
    finally:
        await step.close()
    stored, tally = await tallied(store, campaign)
    assert stored == tally == {"SENT": 1}


async def test_a_deadlock_is_answered_as_an_outage_to_retry(store: PostgresStore) -> None:
    """PostgreSQL rolls back one transaction of a deadlock (or a serialization failure) so
    that the other goes on: the same work done again succeeds, so the caller retries it
    (a status event waits, never counts toward a dead letter) as for an outage."""
    with pytest.raises(BackendUnavailable, match="DeadlockDetectedError"):
        async with store._connection() as conn:
            await conn.execute(
                "DO $$ BEGIN RAISE EXCEPTION 'deadlock detected' USING ERRCODE = '40P01'; END $$"
            )
