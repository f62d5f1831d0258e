"""Campaigns in the stores that have them (SQLite, PostgreSQL), and the clear refusal of
the one that has not (Cassandra). Real databases."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest
import pytest_asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.store.conftest import fresh_cassandra_keyspace, fresh_postgres_database
from tests.store.test_contract import ERROR, OBSERVATIONS, TEMPLATE, at, status_event
from whatslike.campaigns import CampaignsUnsupported, bucket_of, fingerprint
from whatslike.clock import new_id
from whatslike.events import TOPIC_MESSAGES, OutboundMessage
from whatslike.status.rules import Status
from whatslike.store import CassandraStore, PostgresStore, SQLiteStore
from whatslike.store.base import Campaign, Message, NewCampaign, Store


@pytest_asyncio.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    if request.param == "sqlite":
        opened: Store = SQLiteStore(tmp_path / "data" / "whatslike.db")
        await opened.open()
        try:
            yield opened
        finally:
            await opened.close()
        return
    async with fresh_postgres_database() as url:
        opened = PostgresStore(url)
        await opened.open()
        try:
            yield opened
        finally:
            await opened.close()


def asked(
    contacts: list[str], key: str = "spring-sale", org: str = "acme", text: str = "Promo"
) -> NewCampaign:
    return NewCampaign(
        org_id=org,
        client_campaign_id=key,
        fingerprint=fingerprint({"text": text, "contacts": contacts}),
        channel="whatsapp",
        text=text,
        contacts=tuple(contacts),
    )


async def messages_of(store: Store, campaign: Campaign) -> list[Message]:
    found = await store.campaign_recipients(campaign.org_id, campaign.id, -1, 100_000)
    assert found is not None
    return [r.message for r in found if r.message is not None]


async def tallied(store: Store, campaign: Campaign) -> tuple[dict[str, int], dict[str, int]]:
    """The stored counts (zeros left out) and the count of its messages' buckets."""
    again = await store.get_campaign(campaign.org_id, campaign.id)
    assert again is not None
    stored = {bucket: n for bucket, n in again.counts.items() if n}
    return stored, dict(Counter(bucket_of(m.state) for m in await messages_of(store, campaign)))


async def version_of(store: Store, campaign: Campaign) -> int:
    again = await store.get_campaign(campaign.org_id, campaign.id)
    assert again is not None
    return again.version


async def test_a_campaign_is_stored_with_its_recipients_and_its_key_answers_it_again(
    store: Store,
) -> None:
    campaign, created = await store.create_campaign(asked(["5511900000001", "5511900000002"]))
    assert created and campaign.total == 2 and campaign.created == 0
    again, created = await store.create_campaign(asked(["5511900000001"], text="other"))
    assert not created
    assert again.id == campaign.id and again.fingerprint == campaign.fingerprint
    recipients = await store.campaign_recipients("acme", campaign.id, -1, 10)
    assert recipients is not None
    assert [(r.position, r.contact, r.message) for r in recipients] == [
        (0, "5511900000001", None),
        (1, "5511900000002", None),
    ]
    # Another organization's campaign does not exist for it, and its key is its own.
    assert await store.get_campaign("globex", campaign.id) is None
    assert await store.campaign_recipients("globex", campaign.id, -1, 10) is None
    _, created = await store.create_campaign(asked(["5511900000001"], org="globex"))
    assert created


async def test_a_template_campaigns_messages_are_that_template(store: Store) -> None:
    """The campaign keeps its template; each recipient's message is it, and so is its
    send hand-off."""
    new = asked(["5511900000001", "5511900000002"], text="")
    campaign, _ = await store.create_campaign(replace(new, template=TEMPLATE))
    again = await store.get_campaign("acme", campaign.id)
    assert again is not None and (again.template, again.text) == (TEMPLATE, "")
    assert await store.campaign_step(campaign.id, 10) == 2
    messages = await messages_of(store, campaign)
    assert [(m.template, m.text) for m in messages] == [(TEMPLATE, "")] * 2
    events = [OutboundMessage.from_json(i.payload) for i in await store.outbox_batch("r", 10)]
    assert {(e.message_id, e.template) for e in events} == {(m.id, TEMPLATE) for m in messages}


async def test_steps_create_each_recipients_message_once_through_the_outbox(
    store: Store,
) -> None:
    earlier = await store.create_conversation("acme", "whatsapp", "5511900000002")
    contacts = [f"55119000000{n:02}" for n in range(1, 8)]
    campaign, _ = await store.create_campaign(asked(contacts))
    assert [c.id for c in await store.campaigns_to_run(10)] == [campaign.id]
    assert await store.campaign_step(campaign.id, 3) == 3
    assert await store.campaign_backlog("whatsapp") == 3
    assert await store.campaign_backlog("instagram") == 0
    assert await store.campaign_step(campaign.id, 10) == 4
    assert await store.campaign_step(campaign.id, 10) == 0
    assert await store.campaigns_to_run(10) == []
    messages = await messages_of(store, campaign)
    assert len({m.id for m in messages}) == 7
    assert all(m.status is Status.PENDING and m.text == "Promo" for m in messages)
    # The organization's conversation with a contact is used; the others are made.
    assert messages[1].conversation_id == earlier.id
    conversations = [await store.get_conversation("acme", m.conversation_id) for m in messages]
    assert [c.contact for c in conversations if c is not None] == contacts
    # Each message went through the normal send path: its outbox entry.
    entries = await store.claim_outbox(100, 30)
    assert sorted(e.topic for e in entries) == [TOPIC_MESSAGES] * 7
    stored, tally = await tallied(store, campaign)
    assert stored == tally == {"PENDING": 7}
    got = await store.get_campaign("acme", campaign.id)
    assert got is not None and got.created == 7


async def test_concurrent_steps_never_give_a_recipient_two_messages(store: Store) -> None:
    campaign, _ = await store.create_campaign(asked([f"+5511{n:07}" for n in range(300)]))
    while await store.campaigns_to_run(1):
        await asyncio.gather(*(store.campaign_step(campaign.id, 25) for _ in range(4)))
    messages = await messages_of(store, campaign)
    assert len(messages) == len({m.id for m in messages}) == 300
    assert len({m.conversation_id for m in messages}) == 300
    stored, tally = await tallied(store, campaign)
    assert stored == tally == {"PENDING": 300}


async def test_a_message_of_no_campaign_moves_no_count(store: Store) -> None:
    campaign, _ = await store.create_campaign(asked(["5511900000001"]))
    await store.campaign_step(campaign.id, 10)
    conversation = await store.create_conversation("acme", "whatsapp", "5511900000001")
    other, _ = await store.create_message(conversation, "hi", "")
    await store.apply_statuses([status_event(other, Status.SENT, at(1))])
    stored, tally = await tallied(store, campaign)
    assert stored == tally == {"PENDING": 1}


@settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
async def test_counts_equal_the_messages_statuses_under_any_order_and_batching(
    store: Store, data: st.DataObject
) -> None:
    """The simulator's disorder, redeliveries and group commits of any size: after every
    batch, each count is exactly the number of the campaign's messages in that bucket, and
    the counts' version grew when (and only when) a count moved (so a client keeping the
    highest version never goes back to older counts)."""
    # A new campaign each example (the store outlives them).
    campaign, _ = await store.create_campaign(asked([f"+55{n}" for n in range(4)], key=new_id("k")))
    assert campaign.version == 0
    await store.campaign_step(campaign.id, 4)
    messages = await messages_of(store, campaign)
    version = await version_of(store, campaign)
    assert version == 1  # one step: one move of the counts
    buckets = {m.id: bucket_of(m.state) for m in messages}
    events = [
        status_event(message, obs.status, obs.occurred_at, error=obs.error)
        for message in messages
        for obs in data.draw(OBSERVATIONS)
    ]
    events += data.draw(st.lists(st.sampled_from(events), max_size=4))  # redeliveries
    shuffled = data.draw(st.permutations(events))
    cuts = sorted(data.draw(st.sets(st.integers(1, max(1, len(shuffled) - 1)), max_size=4)))
    for start, end in zip([0, *cuts], [*cuts, len(shuffled)], strict=True):
        await store.apply_statuses(shuffled[start:end])
        stored, tally = await tallied(store, campaign)
        assert stored == tally
        now = {m.id: bucket_of(m.state) for m in await messages_of(store, campaign)}
        moved = sum(now[m] != buckets[m] for m in now)
        later = await version_of(store, campaign)
        # At least one per message moved (SQLite counts a message's each move in a batch,
        # PostgreSQL its move over the batch); none when nothing moved.
        assert later >= version + moved if moved else later == version
        version, buckets = later, now


async def test_failed_messages_are_counted_by_error_code(store: Store) -> None:
    campaign, _ = await store.create_campaign(asked(["+551", "+552", "+553"]))
    await store.campaign_step(campaign.id, 3)
    first, second, third = await messages_of(store, campaign)
    await store.apply_statuses(
        [
            status_event(first, Status.FAILED, at(1), error=ERROR),
            status_event(second, Status.READ, at(1)),
            status_event(third, Status.SENT, at(1)),
        ]
    )
    stored, tally = await tallied(store, campaign)
    assert stored == tally == {f"FAILED:{ERROR.code}": 1, "READ": 1, "SENT": 1}
    # Delivered after all: the device proves it arrived, and the counts follow.
    await store.apply_statuses([status_event(first, Status.DELIVERED, at(2))])
    stored, tally = await tallied(store, campaign)
    assert stored == tally == {"DELIVERED": 1, "READ": 1, "SENT": 1}
    assert await store.campaign_backlog("whatsapp") == 0


@pytest.mark.cassandra
async def test_cassandra_refuses_campaigns_clearly() -> None:
    async with fresh_cassandra_keyspace() as url:
        store = CassandraStore(url)
        await store.open()
        try:
            with pytest.raises(CampaignsUnsupported, match="Cassandra"):
                await store.create_campaign(asked(["+551"]))
            assert await store.campaigns_to_run(10) == []
        finally:
            await store.close()
