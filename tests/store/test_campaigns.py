"""Campaigns in every store (SQLite, PostgreSQL, Cassandra): real databases. Cassandra's
own ways of keeping the contract without transactions (a create or a step that died
midway, concurrent creates) are tested at the end."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import timedelta
from typing import Any

import pytest
import pytest_asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.store.conftest import fresh_cassandra_keyspace
from tests.store.test_contract import ERROR, OBSERVATIONS, T0, TEMPLATE, at, status_event
from whatslike.campaigns import bucket_of, fingerprint
from whatslike.clock import new_id
from whatslike.errors import BackendUnavailable
from whatslike.events import TOPIC_MESSAGES, OutboundMessage
from whatslike.status.rules import ProviderError, Status
from whatslike.store import CassandraStore, common
from whatslike.store.base import Campaign, Message, NewCampaign, Store


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


async def test_a_campaign_message_goes_to_the_first_made_of_two_conversations_made_at_once(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Times are kept to the millisecond; ids are random: the first conversation is given
    # the larger id, so a tie broken by id would pick the second.
    with monkeypatch.context() as patch:
        ids = iter(["conv_2", "conv_1"])
        patch.setattr(common, "utcnow", lambda: T0)
        patch.setattr(common, "new_id", lambda prefix: next(ids))
        first = await store.create_conversation("acme", "whatsapp", "5511900000001")
        second = await store.create_conversation("acme", "whatsapp", "5511900000001")
    assert (first.id, second.id, first.created_at) == ("conv_2", "conv_1", second.created_at)
    campaign, _ = await store.create_campaign(asked(["5511900000001"]))
    assert await store.campaign_step(campaign.id, 10) == 1
    [message] = await messages_of(store, campaign)
    assert message.conversation_id == first.id


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
    # One step: one move of the counts (on Cassandra, one per message it made: each
    # message's row of the counts is written apart).
    assert version == (4 if isinstance(store, CassandraStore) else 1)
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


async def test_concurrent_creates_with_one_key_make_one_campaign(store: Store) -> None:
    contacts = [f"+5511{n:07}" for n in range(250)]
    made = await asyncio.gather(*(store.create_campaign(asked(contacts)) for _ in range(8)))
    assert sum(created for _, created in made) == 1
    assert len({campaign.id for campaign, _ in made}) == 1
    campaign = made[0][0]
    recipients = await store.campaign_recipients("acme", campaign.id, -1, 1000)
    assert recipients is not None
    assert [r.contact for r in recipients] == contacts
    assert [c.id for c in await store.campaigns_to_run(10)] == [campaign.id]


# -- Cassandra: no transaction across partitions -------------------------------------------

LEASE = timedelta(milliseconds=300)


@pytest_asyncio.fixture
async def cassandra() -> AsyncIterator[CassandraStore]:
    async with fresh_cassandra_keyspace() as url:
        opened = CassandraStore(url, pending_lease=LEASE)
        await opened.open()
        try:
            yield opened
        finally:
            await opened.close()


async def _dies(*args: object, **kwargs: object) -> None:
    raise BackendUnavailable("the process died here")


@pytest.mark.cassandra
async def test_a_create_that_died_after_claiming_its_key_is_completed_by_the_next(
    cassandra: CassandraStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    contacts = [f"+5511{n:07}" for n in range(150)]
    with monkeypatch.context() as patch:
        patch.setattr(cassandra, "_add_campaign", _dies)
        with pytest.raises(BackendUnavailable):
            await cassandra.create_campaign(asked(contacts))
    assert await cassandra.campaigns_to_run(10) == []  # its row was never written
    campaign, created = await cassandra.create_campaign(asked(contacts))
    assert not created and campaign.total == 150
    recipients = await cassandra.campaign_recipients("acme", campaign.id, -1, 1000)
    assert recipients is not None and [r.contact for r in recipients] == contacts
    assert [c.id for c in await cassandra.campaigns_to_run(10)] == [campaign.id]
    assert await cassandra.campaign_step(campaign.id, 200) == 150


@pytest.mark.cassandra
async def test_a_step_that_died_midway_is_completed_once_its_claim_lapses(
    cassandra: CassandraStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three of its ten messages were written; the others are written by a later step,
    after the lease, each once, with one hand-off each; the counts are exact."""
    campaign, _ = await cassandra.create_campaign(asked([f"+5511{n:07}" for n in range(10)]))
    batch = cassandra._batch
    begun = done = 0
    three_written = asyncio.Event()

    async def partly(steps: Any, *, logged: bool = True) -> None:
        nonlocal begun, done
        begun += 1
        if begun > 3:
            raise BackendUnavailable("the process died here")
        await batch(steps, logged=logged)
        done += 1
        if done == 3:
            three_written.set()

    with monkeypatch.context() as patch:
        patch.setattr(cassandra, "_batch", partly)
        with pytest.raises(BackendUnavailable):
            await cassandra.campaign_step(campaign.id, 10)
        # The step's messages are written side by side: its first failure is raised
        # while the three that got through may still be on their way.
        await asyncio.wait_for(three_written.wait(), 30)
    assert len(await messages_of(cassandra, campaign)) == 3
    assert await cassandra.campaign_step(campaign.id, 10) == 0  # its claim still holds
    await asyncio.sleep(LEASE.total_seconds())
    assert await cassandra.campaign_step(campaign.id, 10) == 10
    assert await cassandra.campaigns_to_run(10) == []
    messages = await messages_of(cassandra, campaign)
    assert len({m.id for m in messages}) == 10
    sends = [OutboundMessage.from_json(i.payload) for i in await cassandra.claim_outbox(100, 30)]
    assert sorted(e.message_id for e in sends) == sorted(m.id for m in messages)
    stored, tally = await tallied(cassandra, campaign)
    assert stored == tally == {"PENDING": 10}
    assert await cassandra.campaign_backlog("whatsapp") == 10


@pytest.mark.cassandra
async def test_a_status_change_that_died_before_its_move_is_completed_by_its_redelivery(
    cassandra: CassandraStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A change (SENT: the seq claimed, the move not written) and a silent one (a FAILED
    message's error replaced by an earlier one's): the redelivered event moves the count."""
    campaign, _ = await cassandra.create_campaign(asked(["+551", "+552"]))
    await cassandra.campaign_step(campaign.id, 2)
    first, second = await messages_of(cassandra, campaign)
    await cassandra.apply_statuses([status_event(second, Status.FAILED, at(2), error=ERROR)])
    version = await version_of(cassandra, campaign)
    sent = status_event(first, Status.SENT, at(1))
    earlier = status_event(second, Status.FAILED, at(1), error=ProviderError("131047", "Window"))
    for event in (sent, earlier):
        with monkeypatch.context() as patch:
            patch.setattr(cassandra, "_move_campaign", _dies)
            with pytest.raises(BackendUnavailable):
                await cassandra.apply_statuses([event])
    await asyncio.sleep(LEASE.total_seconds())
    stored, tally = await tallied(cassandra, campaign)
    assert stored != tally
    await cassandra.apply_statuses([sent, earlier])
    stored, tally = await tallied(cassandra, campaign)
    assert stored == tally == {"SENT": 1, "FAILED:131047": 1}
    assert await version_of(cassandra, campaign) > version
    assert await cassandra.campaign_backlog("whatsapp") == 0
    # Redelivered again, nothing moves.
    version = await version_of(cassandra, campaign)
    await cassandra.apply_statuses([sent, earlier])
    assert await version_of(cassandra, campaign) == version
