"""The contract of customers' messages (direction "in") in every store: SQLite, PostgreSQL
and Cassandra, through the fixtures of tests/store/conftest.py."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import timedelta

import pytest

from tests.store.test_contract import T0, at, decoded, status_event
from whatslike.clock import utcnow
from whatslike.status.rules import Status
from whatslike.store import common
from whatslike.store.base import InboundMedia, InboundMessage, Message, Store

CONTACT = "+5511988877665"


def inbound(provider_id: str, org_id: str = "org_a", contact: str = CONTACT) -> InboundMessage:
    return InboundMessage(org_id, "whatsapp", contact, provider_id, f"text of {provider_id}", T0)


async def listed(store: Store, org_id: str, conversation_id: str) -> list[Message]:
    messages = await store.list_messages(org_id, conversation_id)
    assert messages is not None
    return messages


async def test_a_customers_message_goes_once_into_its_organizations_latest_conversation(
    store: Store,
) -> None:
    await store.create_conversation("org_a", "whatsapp", CONTACT)
    latest = await store.create_conversation("org_a", "whatsapp", CONTACT)
    await store.create_conversation("org_a", "instagram", CONTACT)
    other = await store.create_conversation("org_b", "whatsapp", CONTACT)

    message = await store.receive_message(inbound("wamid.1"))
    assert (message.conversation_id, message.org_id, message.direction) == (
        latest.id,
        "org_a",
        "in",
    )
    assert (message.status, message.seq, message.provider_message_id) == (
        Status.PENDING,
        None,
        "wamid.1",
    )
    assert message.text == "text of wamid.1"
    again = await store.receive_message(inbound("wamid.1"))
    assert again == message
    assert await store.get_message(message.id) == message
    assert [m.id for m in await listed(store, "org_a", latest.id)] == [message.id]
    assert await listed(store, "org_b", other.id) == []


async def test_of_two_conversations_made_in_one_millisecond_the_later_gets_the_message(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Times are kept to the millisecond; ids are random: the second conversation is given
    # the smaller id, so a tie broken by id would pick the first.
    ids = iter(["conv_2", "conv_1"])
    monkeypatch.setattr(common, "utcnow", lambda: T0)
    monkeypatch.setattr(common, "new_id", lambda prefix: next(ids))
    first = await store.create_conversation("org_a", "whatsapp", CONTACT)
    later = await store.create_conversation("org_a", "whatsapp", CONTACT)
    assert (first.id, later.id, first.created_at) == ("conv_2", "conv_1", later.created_at)

    message = await store.receive_message(inbound("wamid.tie"))
    assert message.conversation_id == later.id


async def test_a_contacts_first_messages_at_once_open_one_conversation(store: Store) -> None:
    received = await asyncio.gather(
        *(store.receive_message(inbound(f"wamid.{i % 3}", contact="+551100")) for i in range(9))
    )
    assert len({m.conversation_id for m in received}) == 1
    assert len({m.id for m in received}) == 3
    conversation = await store.get_conversation("org_a", received[0].conversation_id)
    assert conversation is not None
    assert (conversation.channel, conversation.contact, conversation.last_seq) == (
        "whatsapp",
        "+551100",
        0,
    )
    assert await store.get_conversation("org_b", conversation.id) is None
    assert len(await listed(store, "org_a", conversation.id)) == 3


async def test_its_arrival_takes_the_next_seq_as_a_message_frame_then_reads_as_status(
    store: Store,
) -> None:
    conversation = await store.create_conversation("org_a", "whatsapp", CONTACT)
    ours, _ = await store.create_message(conversation, "hello", "")
    [sent] = await store.apply_statuses([status_event(ours, Status.SENT, at(1))])
    theirs = await store.receive_message(inbound("wamid.in"))

    [arrival] = await store.apply_statuses([status_event(theirs, Status.DELIVERED, at(2))])
    assert decoded(arrival.frames) == [
        {
            "type": "message",
            "conversation_id": conversation.id,
            "message_id": theirs.id,
            "direction": "in",
            "text": "text of wamid.in",
            "status": "DELIVERED",
            "seq": 2,
            "occurred_at": "2026-01-01T12:00:00.002Z",
        }
    ]
    [read] = await store.apply_statuses([status_event(theirs, Status.READ, at(3))])
    assert decoded(read.frames)[0]["type"] == "status"
    assert decoded(read.frames)[0]["seq"] == 3
    changes = await store.changes_since(conversation.id, 0, 100)
    assert changes.frames == (*sent.frames, *arrival.frames, *read.frames)
    both = await listed(store, "org_a", conversation.id)
    assert {(m.id, m.direction, m.status) for m in both} == {
        (ours.id, "out", Status.SENT),
        (theirs.id, "in", Status.READ),
    }


async def test_customers_messages_are_never_sent_nor_read_by_the_customer(store: Store) -> None:
    conversation = await store.create_conversation("org_a", "whatsapp", CONTACT)
    ours, _ = await store.create_message(conversation, "hello", "")
    await store.link_provider_id("whatsapp", "wamid.ours", ours.id)
    await store.apply_statuses([status_event(ours, Status.SENT, at(1))])
    theirs = await store.receive_message(inbound("wamid.theirs"))
    later, _ = await store.create_message(conversation, "later", "")
    await store.link_provider_id("whatsapp", "wamid.later", later.id)

    # The customer's read receipts mark our messages READ, never the customer's own.
    assert theirs.id not in {m.id for m in await store.unread_up_to(later.id)}
    unread = await store.unread_sent_to("whatsapp", CONTACT, utcnow() + timedelta(1), 100)
    assert ours.id in {m.id for m in unread}
    assert theirs.id not in {m.id for m in unread}
    # Nor is the watchdog's PENDING-with-no-send one of ours to send.
    future = utcnow() + timedelta(hours=1)
    stuck = await store.stuck(future, future, future, 100)
    assert theirs.id not in {m.id for m in (*stuck.pending, *stuck.unknown)}
    assert not await store.redrive(theirs.id)


async def test_the_last_inbound_time_is_the_latest_customers_message(store: Store) -> None:
    conversation = await store.create_conversation("org_a", "whatsapp", CONTACT)
    assert await store.last_inbound_at(conversation.id) is None
    later = InboundMessage("org_a", "whatsapp", CONTACT, "wamid.later", "b", at(5000))
    await store.receive_message(later)
    # An earlier one arriving after it (Meta does not keep order) moves nothing back.
    await store.receive_message(inbound("wamid.earlier"))
    await store.create_message(conversation, "ours", "")
    assert await store.last_inbound_at(conversation.id) == at(5000)
    assert await store.last_inbound_at("conv_none") is None


async def test_a_customers_medium_is_kept_with_its_fetchs_state_and_announced_with_it(
    store: Store,
) -> None:
    """Meta's descriptor is stored with the message; the fetch's outcome (its media id)
    is written in place, with no change of the seq stream; the arrival's `message` frame
    then carries the medium as stored, never Meta's source."""
    described = InboundMedia("image", "1234567890", "image/jpeg", "ab" * 32, "")
    received = await store.receive_message(
        replace(inbound("wamid.photo"), text="a caption", media=described)
    )
    assert (received.inbound_media, received.media_id) == (described, None)
    assert (await store.get_message(received.id)) == received
    stored = replace(described, state="stored")
    await store.set_inbound_media(received.id, stored, "med_" + "1" * 32)
    message = await store.get_message(received.id)
    assert message is not None
    assert (message.inbound_media, message.media_id, message.seq) == (
        stored,
        "med_" + "1" * 32,
        None,
    )
    [listed_one] = await listed(store, "org_a", message.conversation_id)
    assert listed_one == message
    [arrival] = await store.apply_statuses([status_event(message, Status.DELIVERED, at(2))])
    [frame] = decoded(arrival.frames)
    assert (frame["type"], frame["text"]) == ("message", "a caption")
    assert frame["media"] == {
        "kind": "image",
        "content_type": "image/jpeg",
        "filename": "",
        "state": "stored",
        "media_id": "med_" + "1" * 32,
        "error": None,
    }
    failed = replace(described, state="failed", error="http_404: gone")
    other = await store.receive_message(replace(inbound("wamid.gone"), media=described))
    await store.set_inbound_media(other.id, failed, None)
    found = await store.get_message(other.id)
    assert found is not None and (found.inbound_media, found.media_id) == (failed, None)
    text = await store.get_message((await store.receive_message(inbound("wamid.t"))).id)
    assert text is not None and text.inbound_media is None
