"""The contract every `Store` adapter keeps, run against SQLite and the local PostgreSQL.
Real databases, no mocks: the seqs, idempotency and races are the database's job."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from whatslike.clock import new_id, utcnow
from whatslike.errors import BackendUnavailable, ConfigError
from whatslike.events import TOPIC_MESSAGES, TOPIC_STATUS, OutboundMessage, StatusEvent
from whatslike.status import rules
from whatslike.status.rules import (
    OBSERVABLE,
    Effect,
    MessageState,
    Observation,
    ProviderError,
    Status,
)
from whatslike.store import PostgresStore, SQLiteStore, open_store
from whatslike.store.base import (
    ApplyResult,
    Changes,
    Message,
    OutboxItem,
    ParkedStatus,
    SendClaim,
    Store,
    Stuck,
    SubscriptionRead,
)
from whatslike.store.common import status_entry
from whatslike.templates import Template, canonical

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
ERROR = ProviderError("131026", "Message undeliverable")

StoreFactory = Callable[[], Store]


def at(ms: int) -> datetime:
    return T0 + timedelta(milliseconds=ms)


def status_event(
    message: Message,
    status: Status,
    when: datetime,
    *,
    event_id: str | None = None,
    error: ProviderError | None = None,
) -> StatusEvent:
    return StatusEvent(
        event_id=event_id or new_id("evt"),
        message_id=message.id,
        conversation_id=message.conversation_id,
        org_id=message.org_id,
        channel=message.channel,
        status=status,
        provider_message_id=f"wamid.{message.id}",
        occurred_at=when,
        error=error,
    )


async def applied(store: Store, events: list[StatusEvent]) -> list[ApplyResult]:
    """`apply_statuses`, its `busy` answers (a conversation another of the test's own
    concurrent transactions held too long) applied again, in order, as the status
    worker's retries do."""
    results = await store.apply_statuses(events)
    for _ in range(100):
        held = [i for i, result in enumerate(results) if result.busy]
        if not held:
            return results
        again = await store.apply_statuses([events[i] for i in held])
        for i, result in zip(held, again, strict=True):
            results[i] = result
    raise AssertionError("still busy after 100 tries")


def decoded(frames: tuple[str, ...]) -> list[dict[str, Any]]:
    return [json.loads(frame) for frame in frames]


def seqs(frames: tuple[str, ...]) -> list[int]:
    return [frame["seq"] for frame in decoded(frames)]


async def new_message(store: Store, org_id: str = "org_a") -> Message:
    conversation = await store.create_conversation(org_id, "whatsapp", "+5511999990000")
    message, created = await store.create_message(conversation, "hello", "")
    assert created
    return message


async def current(store: Store, message: Message) -> Message:
    found = await store.get_message(message.id)
    assert found is not None
    return found


def expected_state(observations: list[Observation]) -> MessageState:
    state = MessageState()
    for observation in observations:
        state = rules.apply(state, observation).state
    return state


async def test_schema_is_idempotent(store_factory: StoreFactory, store: Store) -> None:
    conversation = await store.create_conversation("org_a", "whatsapp", "+1")
    await store.open()
    again = store_factory()
    await again.open()
    try:
        assert await again.get_conversation("org_a", conversation.id) == conversation
        await again.ping()
    finally:
        await again.close()


async def test_conversations_are_scoped_by_organization(store: Store) -> None:
    conversation = await store.create_conversation("org_a", "instagram", "igsid_1")
    assert conversation.last_seq == 0
    assert conversation.created_at.utcoffset() == timedelta(0)
    assert await store.get_conversation("org_a", conversation.id) == conversation
    assert await store.get_conversation("org_b", conversation.id) is None
    assert await store.get_conversation("org_a", "conv_missing") is None
    assert await store.list_messages("org_b", conversation.id) is None
    assert await store.list_messages("org_a", conversation.id) == []
    await store.create_conversation("org_b", "whatsapp", "+1")
    assert await store.get_conversation("org_b", conversation.id) is None


async def test_client_message_id_is_idempotent_per_conversation(store: Store) -> None:
    conversation = await store.create_conversation("org_a", "whatsapp", "+1")
    other = await store.create_conversation("org_a", "whatsapp", "+2")
    first, created = await store.create_message(conversation, "hi", "c-1")
    assert created
    assert first.status is Status.PENDING
    assert first.seq is None
    assert (first.org_id, first.channel) == ("org_a", "whatsapp")
    repeated, created = await store.create_message(conversation, "hi again", "c-1")
    assert (repeated, created) == (first, False)
    elsewhere, created = await store.create_message(other, "hi", "c-1")
    assert created
    assert elsewhere.id != first.id
    unkeyed = [await store.create_message(conversation, "x", "") for _ in range(2)]
    assert all(created for _, created in unkeyed)
    assert unkeyed[0][0].id != unkeyed[1][0].id
    raced = await asyncio.gather(
        *(store.create_message(conversation, "race", "c-race") for _ in range(10))
    )
    assert len({message.id for message, _ in raced}) == 1
    assert sum(created for _, created in raced) == 1
    listed = await store.list_messages("org_a", conversation.id)
    assert listed is not None
    assert first in listed
    assert len(listed) == 4


async def test_sent_delivered_read_take_seqs_one_two_three(store: Store) -> None:
    message = await new_message(store)
    results = [
        await store.apply_status(status_event(message, status, at(ms)))
        for status, ms in ((Status.SENT, 1000), (Status.DELIVERED, 2000), (Status.READ, 3000))
    ]
    assert [result.effect for result in results] == [Effect.CHANGED] * 3
    frames = tuple(frame for result in results for frame in result.frames)
    assert decoded(frames) == [
        {
            "type": "status",
            "conversation_id": message.conversation_id,
            "message_id": message.id,
            "status": status,
            "seq": seq,
            "occurred_at": occurred_at,
            "error": None,
        }
        for seq, status, occurred_at in (
            (1, "SENT", "2026-01-01T12:00:01.000Z"),
            (2, "DELIVERED", "2026-01-01T12:00:02.000Z"),
            (3, "READ", "2026-01-01T12:00:03.000Z"),
        )
    ]
    assert await store.changes_since(message.conversation_id, 0, 100) == Changes(frames, 3, True)
    assert await store.changes_since(message.conversation_id, 2, 100) == Changes(
        frames[2:], 3, True
    )
    assert await store.changes_since(message.conversation_id, 3, 100) == Changes((), 3, True)
    stored = await current(store, message)
    assert stored == results[-1].message
    assert stored.seq == 3
    assert stored.state == MessageState(Status.READ, at(1000), at(2000), at(3000))
    assert stored.state.read_at is not None
    assert stored.state.read_at.utcoffset() == timedelta(0)
    conversation = await store.get_conversation("org_a", message.conversation_id)
    assert conversation is not None
    assert conversation.last_seq == 3


async def test_times_are_kept_to_the_millisecond(store: Store) -> None:
    message = await new_message(store)
    precise = T0.replace(microsecond=123_456)
    result = await store.apply_status(status_event(message, Status.SENT, precise))
    assert result.message is not None
    assert result.message.state.sent_at == T0.replace(microsecond=123_000)
    assert (await current(store, message)).state == result.message.state


async def test_a_duplicate_takes_no_seq_and_a_redelivery_repeats_its_frames(
    store: Store,
) -> None:
    message = await new_message(store)
    sent = status_event(message, Status.SENT, at(1000))
    first = await store.apply_status(sent)
    assert (first.effect, seqs(first.frames)) == (Effect.CHANGED, [1])
    redelivered = await store.apply_status(sent)
    assert redelivered.effect is Effect.NOOP
    assert redelivered.frames == first.frames
    assert redelivered.message == first.message
    resent = await store.apply_status(status_event(message, Status.SENT, at(1000)))
    assert (resent.effect, resent.frames) == (Effect.NOOP, ())
    changes = await store.changes_since(message.conversation_id, 0, 100)
    assert changes == Changes(first.frames, 1, True)


async def test_a_late_delivered_after_read_only_fills_its_time(store: Store) -> None:
    message = await new_message(store)
    read = await store.apply_status(status_event(message, Status.READ, at(3000)))
    assert (read.effect, seqs(read.frames)) == (Effect.CHANGED, [1])
    late = await store.apply_status(status_event(message, Status.DELIVERED, at(2000)))
    assert (late.effect, late.frames) == (Effect.FILLED, ())
    stored = await current(store, message)
    assert stored == late.message
    assert stored.seq == 1
    assert stored.state == MessageState(Status.READ, at(2000), at(2000), at(3000))
    later = await store.apply_status(status_event(message, Status.DELIVERED, at(2500)))
    assert later.effect is Effect.NOOP
    assert (await store.changes_since(message.conversation_id, 0, 100)).last_seq == 1


async def test_failed_after_delivered_is_an_anomaly(store: Store) -> None:
    message = await new_message(store)
    await store.apply_status(status_event(message, Status.SENT, at(1000)))
    await store.apply_status(status_event(message, Status.DELIVERED, at(2000)))
    failed = await store.apply_status(status_event(message, Status.FAILED, at(2500), error=ERROR))
    assert (failed.effect, failed.frames) == (Effect.ANOMALY, ())
    stored = await current(store, message)
    assert stored == failed.message
    assert stored.status is Status.DELIVERED
    assert stored.seq == 2
    assert (stored.state.failed_at, stored.state.error) == (at(2500), ERROR)
    assert (await store.changes_since(message.conversation_id, 0, 100)).last_seq == 2


async def test_delivered_after_failed_moves_the_message_on(store: Store) -> None:
    message = await new_message(store)
    await store.apply_status(status_event(message, Status.SENT, at(1000)))
    failed = await store.apply_status(status_event(message, Status.FAILED, at(1500), error=ERROR))
    assert failed.effect is Effect.CHANGED
    [frame] = decoded(failed.frames)
    assert (frame["status"], frame["seq"]) == ("FAILED", 2)
    assert frame["error"] == {"code": ERROR.code, "title": ERROR.title}
    delivered = await store.apply_status(status_event(message, Status.DELIVERED, at(2000)))
    assert (delivered.effect, seqs(delivered.frames)) == (Effect.CHANGED, [3])
    assert decoded(delivered.frames)[0]["error"] is None
    stored = await current(store, message)
    assert (stored.status, stored.seq) == (Status.DELIVERED, 3)


async def test_an_unknown_message_is_reported(store: Store) -> None:
    conversation = await store.create_conversation("org_a", "whatsapp", "+1")
    ghost = Message(
        id="msg_missing",
        conversation_id=conversation.id,
        org_id="org_a",
        channel="whatsapp",
        text="",
        client_message_id="",
        created_at=T0,
        state=MessageState(),
        seq=None,
    )
    result = await store.apply_status(status_event(ghost, Status.SENT, at(1000)))
    assert result == ApplyResult(effect=Effect.NOOP, unknown_message=True)
    assert await store.get_message("msg_missing") is None


async def test_a_parked_status_is_returned_by_every_link_until_handed_off(store: Store) -> None:
    message = await new_message(store)
    parked = ParkedStatus("whatsapp", "wamid.1", b'{"status":"sent"}')
    assert await store.park_status(parked) is None
    assert await store.park_status(ParkedStatus("whatsapp", "wamid.1", b"second")) is None
    assert await store.find_by_provider_id("whatsapp", "wamid.1") is None
    linked = await store.link_provider_id("whatsapp", "wamid.1", message.id)
    assert linked == [parked, ParkedStatus("whatsapp", "wamid.1", b"second")]
    assert linked[0].payload == b'{"status":"sent"}'
    # A crash before they were handed on must not lose them: the next link returns them.
    assert await store.link_provider_id("whatsapp", "wamid.1", message.id) == linked
    await store.handoff([], parked=[("whatsapp", "wamid.1")])
    assert await store.link_provider_id("whatsapp", "wamid.1", message.id) == []
    found = await store.find_by_provider_id("whatsapp", "wamid.1")
    assert found is not None
    assert (found.id, found.provider_message_id) == (message.id, "wamid.1")
    assert await store.find_by_provider_id("instagram", "wamid.1") is None


async def test_the_send_answer_link_wins_over_a_callback_data_link(store: Store) -> None:
    """A signed status naming our message by callback data, with a wamid Meta never gave
    it, linked that wamid while the send was in flight; Meta's answer takes it back."""
    message = await new_message(store)
    assert await store.link_provider_id("whatsapp", "wamid.forged", message.id) == []
    early = ParkedStatus("whatsapp", "wamid.real", b"early")
    assert await store.park_status(early) is None
    assert await store.link_answer("whatsapp", "wamid.real", message.id) == (
        [early],
        "wamid.forged",
    )
    found = await store.find_by_provider_id("whatsapp", "wamid.real")
    assert found is not None
    assert (found.id, found.provider_message_id) == (message.id, "wamid.real")
    assert await store.find_by_provider_id("whatsapp", "wamid.forged") is None
    # A redelivered send finds it done: nothing replaced, the parked status still there.
    assert await store.link_answer("whatsapp", "wamid.real", message.id) == ([early], None)
    # With no earlier link it is `link_provider_id`.
    other = await new_message(store)
    assert await store.link_answer("whatsapp", "wamid.other", other.id) == ([], None)
    linked = await store.get_message(other.id)
    assert linked is not None and linked.provider_message_id == "wamid.other"


async def test_parked_statuses_nobody_claims_expire(store: Store) -> None:
    await store.park_status(ParkedStatus("whatsapp", "wamid.old", b"old"))
    cutoff = datetime.now(UTC) + timedelta(seconds=1)
    assert await store.expire_parked(cutoff - timedelta(hours=1)) == 0
    assert await store.expire_parked(cutoff) == 1
    message = await new_message(store)
    assert await store.link_provider_id("whatsapp", "wamid.old", message.id) == []


async def test_a_status_after_the_link_is_not_parked(store: Store) -> None:
    message = await new_message(store)
    assert await store.link_provider_id("whatsapp", "wamid.2", message.id) == []
    found = await store.park_status(ParkedStatus("whatsapp", "wamid.2", b"late"))
    assert found is not None
    assert found.id == message.id
    assert await store.link_provider_id("whatsapp", "wamid.2", message.id) == []


async def test_park_and_link_racing_hand_over_each_status_exactly_once(store: Store) -> None:
    message = await new_message(store)
    keys = [f"wamid.race.{n}" for n in range(20)]
    outcomes = await asyncio.gather(
        *(
            asyncio.gather(
                store.park_status(ParkedStatus("whatsapp", key, key.encode())),
                store.link_provider_id("whatsapp", key, message.id),
            )
            for key in keys
        )
    )
    for key, (found, handed_over) in zip(keys, outcomes, strict=True):
        if found is None:
            assert handed_over == [ParkedStatus("whatsapp", key, key.encode())]
            await store.handoff([], parked=[("whatsapp", key)])
        else:
            assert (found.id, handed_over) == (message.id, [])
        assert await store.link_provider_id("whatsapp", key, message.id) == []


async def test_concurrent_changes_of_one_conversation_take_gap_free_seqs(store: Store) -> None:
    conversation = await store.create_conversation("org_a", "whatsapp", "+1")
    messages = [(await store.create_message(conversation, f"m{n}", ""))[0] for n in range(10)]
    plan = [
        (Status.SENT, at(1000), None),
        (Status.DELIVERED, at(2000), None),
        (Status.READ, at(3000), None),
        (Status.SENT, at(1000), None),
        (Status.FAILED, at(1500), ERROR),
    ]
    events = [
        status_event(message, status, when, error=error)
        for message in messages
        for status, when, error in plan
    ]
    assert len(events) == 50
    answers = await asyncio.gather(*(applied(store, [event]) for event in events))
    results = [result for [result] in answers]
    taken = sorted(seq for result in results for seq in seqs(result.frames))
    assert taken == list(range(1, len(taken) + 1))
    assert len(taken) == sum(result.effect is Effect.CHANGED for result in results)
    changes = await store.changes_since(conversation.id, 0, 1000)
    assert seqs(changes.frames) == taken
    assert (changes.last_seq, changes.complete) == (len(taken), True)
    final = expected_state([Observation(status, when, error) for status, when, error in plan])
    for message in messages:
        stored = await current(store, message)
        assert stored.state == final
        assert stored.seq == max(
            frame["seq"] for frame in decoded(changes.frames) if frame["message_id"] == message.id
        )


OBSERVATIONS = st.lists(
    st.builds(
        Observation,
        status=st.sampled_from(OBSERVABLE),
        occurred_at=st.integers(0, 5_000).map(at),
        error=st.sampled_from([None, ERROR, ProviderError("130472", "User's number is part")]),
    ),
    min_size=1,
    max_size=6,
)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(observations=OBSERVATIONS, data=st.data())
async def test_any_order_with_duplicates_ends_in_the_same_state(
    store: Store, observations: list[Observation], data: st.DataObject
) -> None:
    message = await new_message(store)
    originals = [
        status_event(message, obs.status, obs.occurred_at, error=obs.error) for obs in observations
    ]
    duplicates = data.draw(st.lists(st.tuples(st.sampled_from(originals), st.booleans())))
    events = data.draw(st.permutations(originals)) + [
        # A redelivery keeps its event id; a provider's resend of the webhook does not.
        original
        if redelivery
        else status_event(message, original.status, original.occurred_at, error=original.error)
        for original, redelivery in duplicates
    ]
    shuffled = data.draw(st.permutations(events))
    results = [await store.apply_status(event) for event in shuffled]
    stored = await current(store, message)
    assert stored.state == expected_state(observations)
    changes = await store.changes_since(message.conversation_id, 0, 1000)
    changed = sum(result.effect is Effect.CHANGED for result in results)
    assert seqs(changes.frames) == list(range(1, changed + 1))
    assert changes.last_seq == changed
    assert stored.seq == (changed or None)
    if changes.frames:
        assert decoded(changes.frames)[-1]["status"] == stored.status.value


async def test_changes_since_says_when_it_cannot_answer_in_full(store: Store) -> None:
    message = await new_message(store)
    for status, ms in ((Status.SENT, 1000), (Status.DELIVERED, 2000), (Status.READ, 3000)):
        await store.apply_status(status_event(message, status, at(ms)))
    conversation_id = message.conversation_id
    assert await store.changes_since(conversation_id, 0, 2) == Changes((), 3, False)
    assert seqs((await store.changes_since(conversation_id, 1, 2)).frames) == [2, 3]
    assert await store.changes_since(conversation_id, 4, 100) == Changes((), 3, False)
    assert await store.changes_since("conv_missing", 0, 100) == Changes((), 0, True)
    assert await store.changes_since("conv_missing", 5, 100) == Changes((), 0, False)


async def test_subscription_changes_reads_many_and_checks_each_organization(
    store: Store,
) -> None:
    message = await new_message(store)
    for status, ms in ((Status.SENT, 1000), (Status.DELIVERED, 2000), (Status.READ, 3000)):
        await store.apply_status(status_event(message, status, at(ms)))
    conversation_id = message.conversation_id
    reads = [
        SubscriptionRead("org_b", conversation_id, None),
        SubscriptionRead("org_b", conversation_id, 0),
        SubscriptionRead("org_a", "conv_missing", None),
        # Without `since`: only where the conversation stands now.
        SubscriptionRead("org_a", conversation_id, None),
        SubscriptionRead("org_a", conversation_id, 0),
        SubscriptionRead("org_a", conversation_id, 1),
        SubscriptionRead("org_a", conversation_id, 4),
    ]
    everything = await store.changes_since(conversation_id, 0, 100)
    assert await store.subscription_changes(reads, 100) == [
        None,
        None,
        None,
        Changes((), 3, True),
        everything,
        Changes(everything.frames[1:], 3, True),
        Changes((), 3, False),
    ]
    assert await store.subscription_changes(reads[4:5], 2) == [Changes((), 3, False)]
    assert await store.subscription_changes([], 100) == []


async def test_unread_up_to_is_the_read_watermark(store: Store) -> None:
    conversation = await store.create_conversation("org_a", "instagram", "igsid_1")
    created = []
    for n in range(4):
        message = (await store.create_message(conversation, f"m{n}", ""))[0]
        created.append(message)
        # Distinct creation times, so the watermark falls between messages.
        await asyncio.sleep(0.005)
    for n in (0, 1, 2):  # m3 was never accepted by the provider: no provider id
        await store.link_provider_id("instagram", f"mid.{n}", created[n].id)
    await store.apply_status(status_event(created[0], Status.READ, at(1000)))
    ids = [m.id for m in created]
    assert [m.id for m in await store.unread_up_to(created[1].id)] == ids[1:2]
    assert [m.id for m in await store.unread_up_to(created[3].id)] == ids[1:3]
    assert await store.unread_up_to("msg_missing") == []


async def test_unread_sent_to_is_a_watermark_without_a_message_id(store: Store) -> None:
    """Messenger's read shape names a contact and a time: every organization's accepted,
    unread messages to that contact on that channel, SENT by then, oldest first."""
    ours = await store.create_conversation("org_a", "instagram", "igsid_1")
    theirs = await store.create_conversation("org_b", "instagram", "igsid_1")
    elsewhere = await store.create_conversation("org_a", "instagram", "igsid_2")
    whatsapp = await store.create_conversation("org_a", "whatsapp", "igsid_1")
    plan = [  # conversation, SENT (a millisecond after its creation), accepted
        (elsewhere, True, True),
        (whatsapp, True, True),
        (ours, True, True),
        (theirs, True, True),
        (ours, True, True),  # READ below
        (ours, True, True),  # the watermark falls before it
        (ours, False, True),  # accepted, its SENT not applied yet
        (ours, False, False),  # never accepted
    ]
    created = []
    for n, (conversation, sent, linked) in enumerate(plan):
        message = (await store.create_message(conversation, f"m{n}", ""))[0]
        created.append(message)
        if linked:
            await store.link_provider_id(conversation.channel, f"mid.{n}", message.id)
        if sent:
            when = message.created_at + timedelta(milliseconds=1)
            await store.apply_status(status_event(message, Status.SENT, when))
        await asyncio.sleep(0.005)  # distinct times: the watermark falls between them
    read_at = created[4].created_at + timedelta(milliseconds=2)
    await store.apply_status(status_event(created[4], Status.READ, read_at))
    watermark = created[5].created_at - timedelta(milliseconds=1)
    found = await store.unread_sent_to("instagram", "igsid_1", watermark, 100)
    assert [m.id for m in found] == [created[2].id, created[3].id]
    assert [m.provider_message_id for m in found] == ["mid.2", "mid.3"]
    assert [m.id for m in await store.unread_sent_to("instagram", "igsid_1", watermark, 1)] == [
        created[2].id
    ]
    before = created[0].created_at - timedelta(milliseconds=1)
    assert await store.unread_sent_to("instagram", "igsid_1", before, 100) == []
    assert await store.unread_sent_to("instagram", "igsid_9", utcnow(), 100) == []


# -- hand-offs: the transactional outbox, send claims, the watchdog's queries ----------


def outbox_json(items: list[OutboxItem]) -> list[dict[str, Any]]:
    return [json.loads(item.payload) for item in items]


async def test_a_new_message_and_its_send_hand_off_are_stored_together(store: Store) -> None:
    conversation = await store.create_conversation("org_a", "whatsapp", "+5511")
    message, created = await store.create_message(conversation, "hi", "c-1")
    assert created
    items = await store.outbox_batch("run-1", 10)
    assert [(i.topic, i.key) for i in items] == [(TOPIC_MESSAGES, conversation.id)]
    event = OutboundMessage.from_json(items[0].payload)
    assert (event.message_id, event.to, event.text, event.client_message_id) == (
        message.id,
        "+5511",
        "hi",
        "c-1",
    )
    # A retried request adds no second piece of work.
    again, created = await store.create_message(conversation, "hi", "c-1")
    assert (again.id, created) == (message.id, False)
    assert await store.outbox_size() == 1


async def test_a_message_with_a_medium_keeps_it_and_hands_it_on(store: Store) -> None:
    """The medium is stored with the message (every read has it, so a redrive sends it
    again) and goes in its send hand-off; the caption may be empty."""
    conversation = await store.create_conversation("org_a", "whatsapp", "+5511")
    plain, _ = await store.create_message(conversation, "hi", "")
    message, created = await store.create_message(conversation, "", "c-1", "med_1")
    assert created
    assert message.media_id == "med_1"
    stored = await store.get_message(message.id)
    assert stored is not None
    assert (stored.media_id, stored.text) == ("med_1", "")
    listed = await store.list_messages("org_a", conversation.id)
    # Both may be made in the same millisecond, where the list's order is not the test's.
    assert {m.id: m.media_id for m in listed or []} == {plain.id: None, message.id: "med_1"}
    events = [OutboundMessage.from_json(i.payload) for i in await store.outbox_batch("r", 10)]
    assert [(e.message_id, e.media_id, e.text) for e in events] == [
        (plain.id, None, "hi"),
        (message.id, "med_1", ""),
    ]


TEMPLATE = canonical(
    Template.model_validate(
        {
            "name": "order_update",
            "language": {"code": "pt_BR"},
            "components": [{"type": "body", "parameters": [{"type": "text", "text": "Ana"}]}],
        }
    )
)


async def test_a_template_and_a_tag_are_kept_and_a_redrive_sends_them_again(
    store: Store,
) -> None:
    """A template (and an Instagram message's tag) is stored with the message: every read
    has it, its send hand-off carries it, and a redrive of the lost hand-off carries it
    again, so the very same template is sent."""
    whatsapp = await store.create_conversation("org_a", "whatsapp", "+5511")
    instagram = await store.create_conversation("org_a", "instagram", "1789")
    message, created = await store.create_message(whatsapp, "", "c-1", template=TEMPLATE)
    assert created
    assert (message.template, message.text, message.tag) == (TEMPLATE, "", None)
    tagged, _ = await store.create_message(instagram, "oi", "", tag="HUMAN_AGENT")
    for made in (message, tagged):
        stored = await store.get_message(made.id)
        assert stored is not None
        assert (stored.template, stored.tag) == (made.template, made.tag)
    [listed] = await store.list_messages("org_a", whatsapp.id) or []
    assert listed.template == TEMPLATE
    again, created = await store.create_message(whatsapp, "", "c-1", template=TEMPLATE)
    assert (again.id, again.template, created) == (message.id, TEMPLATE, False)

    first = await store.outbox_batch("run-1", 10)
    events = {e.message_id: e for e in (OutboundMessage.from_json(i.payload) for i in first)}
    assert (events[message.id].template, events[message.id].text) == (TEMPLATE, "")
    assert (events[tagged.id].tag, events[tagged.id].template) == ("HUMAN_AGENT", None)
    await store.mark_relayed([i.id for i in first], "run-1")
    assert await store.redrive(message.id)
    assert await store.redrive(tagged.id)
    redriven = [OutboundMessage.from_json(i.payload) for i in await store.outbox_batch("run-1", 10)]
    assert {(e.message_id, e.template, e.tag) for e in redriven} == {
        (message.id, TEMPLATE, None),
        (tagged.id, None, "HUMAN_AGENT"),
    }


async def test_a_hand_off_is_relayed_by_every_run_until_done(store: Store) -> None:
    """On a bus that keeps nothing, an entry marked relayed by one run is relayed again by
    the next (a restart) until the work downstream completes it: never lost, never
    dropped while unfinished."""
    message = await new_message(store)
    first = await store.outbox_batch("run-1", 10)
    await store.mark_relayed([item.id for item in first], "run-1")
    assert await store.outbox_batch("run-1", 10) == []
    assert [i.id for i in await store.outbox_batch("run-2", 10)] == [i.id for i in first]
    await store.handoff(done=[(TOPIC_MESSAGES, message.id)])
    assert await store.outbox_batch("run-3", 10) == []


async def test_a_hand_off_added_as_relayed_waits_for_the_next_run(store: Store) -> None:
    """An entry its writer hands to the in-process bus itself is added as relayed by the
    writer's run: that run's relay passes it by, the next run relays it (a restart
    before its work was done), and applying it completes it as usual."""
    message = await new_message(store)
    await store.handoff(done=[(TOPIC_MESSAGES, message.id)])
    event = status_event(message, Status.SENT, at(1000))
    await store.handoff([status_entry(event)], relayed_run="run-1")
    assert await store.outbox_batch("run-1", 10) == []
    [item] = await store.outbox_batch("run-2", 10)
    assert outbox_json([item])[0]["event_id"] == event.event_id
    await store.apply_status(event)
    assert await store.outbox_size() == 0


async def test_relayed_entries_on_a_durable_bus_are_deleted(store: Store) -> None:
    for _ in range(3):
        await new_message(store)
    items = await store.outbox_batch("run-1", 2)
    assert len(items) == 2
    assert items[0].id < items[1].id
    await store.delete_outbox([item.id for item in items])
    assert await store.outbox_size() == 1


async def test_relays_share_the_outbox_by_claims_that_lapse(
    store_factory: StoreFactory, store: Store
) -> None:
    for _ in range(4):
        await new_message(store)
    other = store_factory()
    await other.open()
    try:
        mine, theirs = await asyncio.gather(
            store.claim_outbox(3, lease_s=60), other.claim_outbox(3, lease_s=60)
        )
        assert len(mine) + len(theirs) == 4  # each entry claimed once
        assert not {i.id for i in mine} & {i.id for i in theirs}
        assert await store.claim_outbox(3, lease_s=60) == []
        # Entries the bus did not take are given back at once.
        await other.unclaim_outbox([i.id for i in theirs])
        assert [i.id for i in await store.claim_outbox(10, lease_s=60)] == [i.id for i in theirs]
        # A relay that died with its claim: the entries come back once the lease lapses.
        await store.delete_outbox([i.id for i in mine])
        await asyncio.sleep(0.05)
        assert await other.claim_outbox(10, lease_s=0.01) == []  # still leased for 60 s
    finally:
        await other.close()
    lapsing = await new_message(store)
    [claimed] = await store.claim_outbox(10, lease_s=0.01)
    await asyncio.sleep(0.05)
    [again] = await store.claim_outbox(10, lease_s=60)
    assert claimed.id == again.id
    assert OutboundMessage.from_json(again.payload).message_id == lapsing.id


async def test_a_hand_off_added_claimed_is_its_writers_to_publish(store: Store) -> None:
    """A hand-off its writer publishes to a durable bus itself is added claimed: the
    relays pass it by while the claim holds, and the writer deletes it once published
    (or gives it back). Should the writer die between its commit and its publish, the
    claim lapses and a relay publishes the entries."""
    message = await new_message(store)
    [waiting] = await store.claim_outbox(10, lease_s=60)  # the message's own entry
    events = [status_event(message, Status.SENT, at(n)) for n in range(1, 6)]
    ids = await store.handoff([status_entry(e) for e in events[:2]], claim_s=60)
    assert len(ids) == 2 and ids[0] < ids[1] and waiting.id not in ids
    assert await store.claim_outbox(10, lease_s=60) == []  # nobody else publishes them
    await store.delete_outbox(ids)
    assert await store.outbox_size() == 1  # only the message's entry, still claimed
    # Without a claim no id is answered; the entry is free for the relays at once.
    assert await store.handoff([status_entry(events[2])]) == []
    [free] = await store.claim_outbox(10, lease_s=60)
    assert outbox_json([free])[0]["event_id"] == events[2].event_id
    # A writer that died before its publish: the relays take its entries once the
    # claim lapses, in order.
    crashed = await store.handoff([status_entry(e) for e in events[3:]], claim_s=0.01)
    await asyncio.sleep(0.05)
    relayed = await store.claim_outbox(10, lease_s=60)
    assert [item.id for item in relayed] == crashed
    assert [j["event_id"] for j in outbox_json(relayed)] == [e.event_id for e in events[3:]]


async def test_applying_a_status_completes_its_hand_off(store: Store) -> None:
    message = await new_message(store)
    await store.handoff(done=[(TOPIC_MESSAGES, message.id)])
    event = status_event(message, Status.SENT, at(1000))
    other = status_event(message, Status.DELIVERED, at(2000))
    await store.handoff([status_entry(event), status_entry(other)])
    assert [i.topic for i in await store.outbox_batch("run", 10)] == [TOPIC_STATUS] * 2
    await store.apply_status(event)
    assert outbox_json(await store.outbox_batch("run", 10))[0]["event_id"] == other.event_id
    # A redelivery of an applied event completes nothing twice and changes nothing.
    await store.apply_status(event)
    assert await store.outbox_size() == 1


async def test_a_hand_off_and_its_parked_statuses_go_together(store: Store) -> None:
    message = await new_message(store)
    await store.park_status(ParkedStatus("whatsapp", "wamid.p", b"parked"))
    parked = await store.link_provider_id("whatsapp", "wamid.p", message.id)
    assert len(parked) == 1
    entry = status_entry(status_event(message, Status.SENT, at(1)))
    await store.handoff(
        [entry], done=[(TOPIC_MESSAGES, message.id)], parked=[("whatsapp", "wamid.p")]
    )
    assert await store.link_provider_id("whatsapp", "wamid.p", message.id) == []
    assert [i.topic for i in await store.outbox_batch("run", 10)] == [TOPIC_STATUS]


async def test_a_send_is_claimed_once(store: Store) -> None:
    message = await new_message(store)
    claim, claimed = await store.begin_send(message.id)
    assert claim is SendClaim.GO
    assert claimed is not None and claimed.send_started_at is not None
    # A redelivery while the first attempt's outcome is unknown must not send again.
    assert (await store.begin_send(message.id))[0] is SendClaim.UNKNOWN
    # An attempt that certainly never reached the provider may be made again.
    await store.release_send(message.id)
    assert (await store.begin_send(message.id))[0] is SendClaim.GO
    await store.link_provider_id("whatsapp", "wamid.s", message.id)
    claim, linked = await store.begin_send(message.id)
    assert claim is SendClaim.LINKED
    assert linked is not None and linked.provider_message_id == "wamid.s"
    assert (await store.begin_send("msg_missing"))[0] is SendClaim.MISSING


async def test_a_failed_message_is_not_sent(store: Store) -> None:
    message = await new_message(store)
    failed = status_event(message, Status.FAILED, at(1), error=ERROR)
    await store.apply_status(failed)
    assert (await store.begin_send(message.id))[0] is SendClaim.MOVED_ON


async def test_concurrent_claims_of_one_send_let_exactly_one_go(
    store_factory: StoreFactory, store: Store
) -> None:
    message = await new_message(store)
    other = store_factory()
    await other.open()
    try:
        claims = await asyncio.gather(*(s.begin_send(message.id) for s in [store, other] * 5))
    finally:
        await other.close()
    assert sorted(c.value for c, _ in claims) == ["go"] + ["unknown"] * 9


async def test_calls_made_at_once_answer_each_as_one_at_a_time_would(store: Store) -> None:
    """Calls made at the same time may share a transaction (group commit): each caller
    still gets its own answer, and each call's writes are all there."""
    conversations = [
        await store.create_conversation("org_a", "whatsapp", f"+55{n}") for n in range(3)
    ]
    made = await asyncio.gather(
        *(store.create_message(conversations[n % 3], f"m{n}", f"k{n}") for n in range(12))
    )
    assert all(created for _, created in made)
    messages = [message for message, _ in made]
    assert [(m.text, m.conversation_id) for m in messages] == [
        (f"m{n}", conversations[n % 3].id) for n in range(12)
    ]
    handed = [OutboundMessage.from_json(i.payload) for i in await store.outbox_batch("r1", 100)]
    assert sorted((e.message_id, e.text, e.to) for e in handed) == sorted(
        (m.id, m.text, f"+55{n % 3}") for n, m in enumerate(messages)
    )
    claims = await asyncio.gather(*(store.begin_send(m.id) for m in messages))
    assert [claim for claim, _ in claims] == [SendClaim.GO] * 12
    assert [claimed.id for _, claimed in claims if claimed is not None] == [m.id for m in messages]
    assert (await store.begin_send(messages[0].id))[0] is SendClaim.UNKNOWN
    await store.park_status(ParkedStatus("whatsapp", "wamid.0", b"early"))
    links = await asyncio.gather(
        *(store.link_answer("whatsapp", f"wamid.{n}", m.id) for n, m in enumerate(messages))
    )
    assert links == [([ParkedStatus("whatsapp", "wamid.0", b"early")], None)] + [([], None)] * 11
    for n, message in enumerate(messages):
        assert (await current(store, message)).provider_message_id == f"wamid.{n}"
    await asyncio.gather(
        *(
            store.handoff(
                [status_entry(status_event(m, Status.SENT, at(1)))],
                done=[(TOPIC_MESSAGES, m.id)],
                parked=[("whatsapp", "wamid.0")] if n == 0 else [],
            )
            for n, m in enumerate(messages)
        )
    )
    assert [i.topic for i in await store.outbox_batch("r2", 100)] == [TOPIC_STATUS] * 12
    assert await store.link_answer("whatsapp", "wamid.0", messages[0].id) == ([], None)


async def test_the_watchdog_finds_what_stopped_moving(store: Store) -> None:
    waiting = await new_message(store)
    unknown = await new_message(store)
    await store.begin_send(unknown.id)
    sent = await new_message(store)
    await store.link_provider_id("whatsapp", "wamid.sent", sent.id)
    await store.apply_status(status_event(sent, Status.SENT, at(1)))
    moving = await new_message(store)
    await store.apply_status(status_event(moving, Status.READ, at(1)))
    later = datetime.now(UTC) + timedelta(seconds=5)
    stuck = await store.stuck(later, later, later, 100)
    assert [m.id for m in stuck.pending] == [waiting.id]
    assert [m.id for m in stuck.unknown] == [unknown.id]
    assert [m.id for m in stuck.sent] == [sent.id]
    earlier = datetime.now(UTC) - timedelta(minutes=5)
    assert await store.stuck(earlier, earlier, earlier, 100) == Stuck((), (), ())


async def test_a_lost_hand_off_is_made_again_only_while_pending(store: Store) -> None:
    message = await new_message(store)
    first = await store.outbox_batch("run-1", 10)
    await store.mark_relayed([i.id for i in first], "run-1")
    assert await store.redrive(message.id)
    again = await store.outbox_batch("run-1", 10)
    assert [OutboundMessage.from_json(i.payload).message_id for i in again] == [message.id]
    assert await store.outbox_size() == 1  # the fresh entry replaced the old one
    await store.begin_send(message.id)
    assert not await store.redrive(message.id)
    assert not await store.redrive("msg_missing")


async def test_a_message_history_is_its_changes_in_order(store: Store) -> None:
    message = await new_message(store)
    other = await new_message(store)
    await store.apply_status(status_event(message, Status.SENT, at(1)))
    await store.apply_status(status_event(other, Status.SENT, at(2)))
    await store.apply_status(status_event(message, Status.READ, at(3)))
    history = decoded(await store.message_history(message.id))
    assert [(f["status"], f["seq"]) for f in history] == [("SENT", 1), ("READ", 2)]
    assert await store.message_history("msg_missing") == ()


async def test_dead_letters_are_counted(store: Store) -> None:
    assert await store.dead_letter_count() == 0
    await store.record_dead_letter("msg.status", b"\xff not json", "not JSON")
    await store.record_dead_letter("messages", b"{}", "field 'event_id' missing")
    assert await store.dead_letter_count() == 2


async def test_dead_letters_are_listed_newest_first_and_found_by_id(store: Store) -> None:
    assert await store.dead_letters(10) == []
    await store.record_dead_letter("msg.status", b"\xff not json", "not JSON")
    await asyncio.sleep(0.002)  # Cassandra orders them by their timeuuid's time
    await store.record_dead_letter("messages", b"{}", "field 'event_id' missing")
    newest, oldest = await store.dead_letters(10)
    assert (newest.topic, newest.payload, newest.reason) == (
        "messages",
        b"{}",
        "field 'event_id' missing",
    )
    assert (oldest.topic, oldest.payload) == ("msg.status", b"\xff not json")
    assert oldest.at <= newest.at and newest.at.tzinfo is not None
    assert [d.id for d in await store.dead_letters(1)] == [newest.id]
    assert await store.dead_letter(oldest.id) == oldest
    for missing in ("", "x", "999999", "2026-01-01/not-a-uuid", "9" * 40, newest.id + "0"):
        assert await store.dead_letter(missing) is None, missing


async def test_ping_answers_while_open_only(store_factory: StoreFactory) -> None:
    store = store_factory()
    with pytest.raises(BackendUnavailable):
        await store.ping()
    await store.open()
    await store.ping()
    await store.close()
    with pytest.raises(BackendUnavailable):
        await store.ping()


async def test_an_unreachable_postgres_is_backend_unavailable() -> None:
    store = PostgresStore("postgresql://alice:s3cret@127.0.0.1:1/whatslike")
    with pytest.raises(BackendUnavailable) as caught:
        await store.open()
    assert "127.0.0.1:1/whatslike" in str(caught.value)
    assert "s3cret" not in str(caught.value)


async def test_an_unopenable_sqlite_file_is_backend_unavailable(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    store = SQLiteStore(blocker / "whatslike.db")
    with pytest.raises(BackendUnavailable, match="not-a-dir"):
        await store.open()


def test_open_store_picks_the_adapter_from_the_url() -> None:
    relative = open_store("sqlite:///data/whatslike.db")
    assert isinstance(relative, SQLiteStore)
    assert relative.path == Path("data/whatslike.db")
    absolute = open_store("sqlite:////var/lib/whatslike/w.db")
    assert isinstance(absolute, SQLiteStore)
    assert absolute.path == Path("/var/lib/whatslike/w.db")
    assert isinstance(open_store("postgresql://u@db:5432/w"), PostgresStore)
    assert isinstance(open_store("postgres://u@db/w"), PostgresStore)
    for bad in ("mysql://u:pw@db/w", "sqlite://", "sqlite:///", "", "whatslike.db"):
        with pytest.raises(ConfigError, match="WHATSLIKE_DATABASE_URL") as caught:
            open_store(bad)
        assert "pw" not in str(caught.value)


async def test_a_batch_answers_each_status_as_one_at_a_time_would(store: Store) -> None:
    conversation = await store.create_conversation("org_a", "whatsapp", "+1")
    first, _ = await store.create_message(conversation, "m1", "")
    second, _ = await store.create_message(conversation, "m2", "")
    sent = status_event(first, Status.SENT, at(1000))
    batch = [
        sent,
        status_event(second, Status.SENT, at(1000)),
        status_event(first, Status.DELIVERED, at(2000)),
        sent,  # redelivered within the same batch: its frames again, no new seq
        status_event(first, Status.SENT, at(1000)),  # the provider's resend: nothing
        status_event(second, Status.FAILED, at(500), error=ERROR),
    ]
    unknown = StatusEvent(
        event_id=new_id("evt"),
        message_id="msg_nobody",
        conversation_id=conversation.id,
        org_id="org_a",
        channel="whatsapp",
        status=Status.SENT,
        provider_message_id="wamid.nobody",
        occurred_at=at(1000),
    )
    await store.handoff([status_entry(event) for event in batch])
    results = await store.apply_statuses([*batch, unknown])
    assert [r.effect for r in results] == [
        Effect.CHANGED,
        Effect.CHANGED,
        Effect.CHANGED,
        Effect.NOOP,
        Effect.NOOP,
        Effect.CHANGED,
        Effect.NOOP,
    ]
    assert [seqs(r.frames) for r in results] == [[1], [2], [3], [1], [], [4], []]
    assert results[3].frames == results[0].frames
    assert results[-1].unknown_message
    assert not any(r.unknown_message for r in results[:-1])
    # Each answer is the message as it stood right after that event.
    assert [r.message.status if r.message else None for r in results[:-1]] == [
        Status.SENT,
        Status.SENT,
        Status.DELIVERED,
        Status.DELIVERED,
        Status.DELIVERED,
        Status.FAILED,
    ]
    assert (await current(store, first)) == results[4].message
    assert (await current(store, second)) == results[5].message
    changes = await store.changes_since(conversation.id, 0, 100)
    assert seqs(changes.frames) == [1, 2, 3, 4]
    # Every applied event's hand-off is complete, in the same transaction.
    left = await store.outbox_batch("run", 100)
    assert [item.topic for item in left] == [TOPIC_MESSAGES] * 2
    assert await store.apply_statuses([]) == []


async def test_a_batch_of_several_conversations_answers_in_its_own_order(store: Store) -> None:
    """Events of two conversations interleaved: each answer in the batch's place, each
    conversation numbered in the batch's order (Cassandra applies them side by side)."""
    first = await store.create_conversation("org_a", "whatsapp", "+1")
    second = await store.create_conversation("org_a", "whatsapp", "+2")
    a1, _ = await store.create_message(first, "a1", "")
    b1, _ = await store.create_message(second, "b1", "")
    b2, _ = await store.create_message(second, "b2", "")
    batch = [
        status_event(a1, Status.SENT, at(1000)),
        status_event(b1, Status.SENT, at(1000)),
        status_event(a1, Status.DELIVERED, at(2000)),
        status_event(b2, Status.SENT, at(1000)),
        status_event(b1, Status.READ, at(3000)),
        status_event(a1, Status.READ, at(3000)),
    ]
    results = await store.apply_statuses(batch)
    assert [r.message.id if r.message else None for r in results] == [
        event.message_id for event in batch
    ]
    assert [r.message.status if r.message else None for r in results] == [
        event.status for event in batch
    ]
    assert [seqs(r.frames) for r in results] == [[1], [1], [2], [2], [3], [3]]
    for conversation in (first, second):
        changes = await store.changes_since(conversation.id, 0, 100)
        assert seqs(changes.frames) == [1, 2, 3]


async def test_concurrent_batches_of_one_conversation_take_gap_free_seqs(store: Store) -> None:
    conversation = await store.create_conversation("org_a", "whatsapp", "+1")
    messages = [(await store.create_message(conversation, f"m{n}", ""))[0] for n in range(12)]
    events = [
        status_event(message, status, at(ms))
        for message in messages
        for status, ms in ((Status.SENT, 1000), (Status.DELIVERED, 2000), (Status.READ, 3000))
    ]
    # Batches that share messages and the conversation, committed concurrently (on
    # PostgreSQL from several connections: their row locks must not deadlock).
    batches = [events[i::4] for i in range(4)] + [list(reversed(events[::3]))]
    answers = await asyncio.gather(*(applied(store, batch) for batch in batches))
    taken = sorted(seq for results in answers for r in results for seq in seqs(r.frames))
    changes = await store.changes_since(conversation.id, 0, 1000)
    assert seqs(changes.frames) == list(range(1, changes.last_seq + 1))
    assert len(set(taken)) == changes.last_seq
    for message in messages:
        assert (await current(store, message)).status is Status.READ


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(observations=OBSERVATIONS, data=st.data())
async def test_statuses_in_batches_end_as_one_at_a_time(
    store: Store, observations: list[Observation], data: st.DataObject
) -> None:
    message = await new_message(store)
    events = [
        status_event(message, obs.status, obs.occurred_at, error=obs.error) for obs in observations
    ]
    events += data.draw(st.lists(st.sampled_from(events), max_size=4))  # redeliveries
    shuffled = data.draw(st.permutations(events))
    cuts = sorted(data.draw(st.sets(st.integers(1, max(1, len(shuffled) - 1)), max_size=3)))
    results: list[ApplyResult] = []
    for start, end in zip([0, *cuts], [*cuts, len(shuffled)], strict=True):
        results += await store.apply_statuses(shuffled[start:end])
    assert len(results) == len(shuffled)
    stored = await current(store, message)
    assert stored.state == expected_state(observations)
    changed = sum(result.effect is Effect.CHANGED for result in results)
    changes = await store.changes_since(message.conversation_id, 0, 1000)
    assert seqs(changes.frames) == list(range(1, changed + 1))
    assert stored.seq == (changed or None)


async def test_get_messages_reads_many_at_once(store: Store) -> None:
    first = await new_message(store)
    second = await new_message(store, "org_b")
    found = await store.get_messages([second.id, "msg_nobody", first.id, first.id])
    assert sorted(found, key=lambda m: m.id) == sorted(
        [await current(store, first), await current(store, second)], key=lambda m: m.id
    )
    assert await store.get_messages([]) == []
