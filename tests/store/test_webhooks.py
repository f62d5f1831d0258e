"""The outbound webhooks' part of the stores (every one): a delivery per endpoint written
with each status change, due in seq order per conversation, leased per endpoint, parked
and replayed."""

from __future__ import annotations

import asyncio
import importlib
import json
from datetime import datetime, timedelta

import pytest

from tests.store.test_contract import applied, at, status_event
from tests.store.test_inbound import CONTACT, inbound
from whatslike.clock import utcnow
from whatslike.status.rules import Status
from whatslike.store.base import Store, WebhookEndpoint
from whatslike.webhooks.core import event_body, new_secret


def endpoint(org_id: str, name: str) -> WebhookEndpoint:
    return WebhookEndpoint(
        id=f"whe_{org_id}_{name}",
        org_id=org_id,
        url=f"https://{name}.example/hooks",
        secret=new_secret(),
        created_at=utcnow(),
    )


async def test_each_change_queues_one_delivery_per_endpoint_of_its_organization(
    store: Store,
) -> None:
    hooks = store
    first = await hooks.add_webhook_endpoint(endpoint("org-a", "one"), 5)
    second = await hooks.add_webhook_endpoint(endpoint("org-a", "two"), 5)
    other = await hooks.add_webhook_endpoint(endpoint("org-b", "one"), 5)
    assert first and second and other
    conversation = await store.create_conversation("org-a", "whatsapp", "+1")
    message, _ = await store.create_message(conversation, "hi", "")
    await applied(
        store,
        [
            status_event(message, Status.SENT, at(1)),
            status_event(message, Status.DELIVERED, at(2)),
            # Not a change (an older status): no delivery.
            status_event(message, Status.SENT, at(3)),
        ],
    )
    far = utcnow() + timedelta(days=1)
    for hook in (first, second):
        due = await hooks.due_webhook_deliveries(hook.id, far, 10)
        # Only the oldest of the conversation is due: seq order.
        assert [(d.conversation_id, d.seq) for d in due] == [(conversation.id, 1)]
        body = json.loads(due[0].body)
        assert body["type"] == "message.status"
        assert body["data"]["status"] == "SENT" and body["data"]["seq"] == 1
        await hooks.webhook_delivered(due[0].id)
        [then] = await hooks.due_webhook_deliveries(hook.id, far, 10)
        assert then.seq == 2 and then.webhook_id == f"{conversation.id}:2"
    assert await hooks.due_webhook_deliveries(other.id, far, 10) == []


async def test_an_organization_has_at_most_the_limit_of_endpoints(store: Store) -> None:
    hooks = store
    for n in range(2):
        assert await hooks.add_webhook_endpoint(endpoint("org-a", str(n)), 2) is not None
    assert await hooks.add_webhook_endpoint(endpoint("org-a", "x"), 2) is None
    assert await hooks.add_webhook_endpoint(endpoint("org-b", "x"), 2) is not None
    assert [e.id for e in await hooks.webhook_endpoints("org-a")] == [
        "whe_org-a_0",
        "whe_org-a_1",
    ]
    # Another organization's endpoint is invisible: not found, not deleted.
    assert await hooks.webhook_endpoint("org-b", "whe_org-a_0") is None
    assert not await hooks.delete_webhook_endpoint("org-b", "whe_org-a_0")
    assert await hooks.delete_webhook_endpoint("org-a", "whe_org-a_0")
    assert [e.id for e in await hooks.webhook_endpoints("org-a")] == ["whe_org-a_1"]


async def test_endpoints_added_at_once_never_pass_the_limit(store: Store) -> None:
    hooks = store
    added = await asyncio.gather(
        *(hooks.add_webhook_endpoint(endpoint("org-a", str(n)), 2) for n in range(5))
    )
    assert len([e for e in added if e is not None]) == 2
    assert len(await hooks.webhook_endpoints("org-a")) == 2


async def test_of_senders_claiming_at_once_one_leases_the_endpoint(store: Store) -> None:
    hooks = store
    hook = await hooks.add_webhook_endpoint(endpoint("org-a", "one"), 5)
    assert hook is not None
    conversation = await store.create_conversation("org-a", "whatsapp", "+1")
    message, _ = await store.create_message(conversation, "hi", "")
    await applied(store, [status_event(message, Status.SENT, at(1))])
    now = utcnow()
    claims = await asyncio.gather(
        *(hooks.claim_webhook_endpoints(f"s{n}", 10, 30, now) for n in range(4))
    )
    assert sorted(len(claimed) for claimed in claims) == [0, 0, 0, 1]


async def test_a_sender_leases_at_most_its_limit_and_another_takes_the_rest(
    store: Store,
) -> None:
    hooks = store
    for org in ("org-a", "org-b", "org-c"):
        assert await hooks.add_webhook_endpoint(endpoint(org, "one"), 5) is not None
        conversation = await store.create_conversation(org, "whatsapp", "+1")
        message, _ = await store.create_message(conversation, "hi", "")
        await applied(store, [status_event(message, Status.SENT, at(1))])
    now = utcnow()
    first = await hooks.claim_webhook_endpoints("s1", 2, 30, now)
    second = await hooks.claim_webhook_endpoints("s2", 2, 30, now)
    assert (len(first), len(second)) == (2, 1)
    assert {e.org_id for e in [*first, *second]} == {"org-a", "org-b", "org-c"}


async def test_a_lease_keeps_other_senders_off_an_endpoint(store: Store) -> None:
    hooks = store
    hook = await hooks.add_webhook_endpoint(endpoint("org-a", "one"), 5)
    assert hook is not None
    now = utcnow()
    # Nothing due: nothing to lease.
    assert await hooks.claim_webhook_endpoints("s1", 10, 30, now) == []
    conversation = await store.create_conversation("org-a", "whatsapp", "+1")
    message, _ = await store.create_message(conversation, "hi", "")
    await applied(store, [status_event(message, Status.SENT, at(1))])
    later = utcnow()
    assert [e.id for e in await hooks.claim_webhook_endpoints("s1", 10, 30, later)] == [hook.id]
    assert await hooks.claim_webhook_endpoints("s2", 10, 30, later) == []
    assert await hooks.renew_webhook_lease("s1", hook.id, 30)
    assert not await hooks.renew_webhook_lease("s2", hook.id, 30)
    # A lease that lapsed (its sender died) is taken over.
    lapsed = later + timedelta(seconds=60)
    assert [e.id for e in await hooks.claim_webhook_endpoints("s2", 10, 30, lapsed)] == [hook.id]
    await hooks.release_webhook_lease("s2", hook.id)
    assert [e.id for e in await hooks.claim_webhook_endpoints("s1", 10, 30, later)] == [hook.id]


async def test_failed_deliveries_wait_then_park_and_replay(store: Store) -> None:
    hooks = store
    hook = await hooks.add_webhook_endpoint(endpoint("org-a", "one"), 5)
    assert hook is not None
    assert await hooks.oldest_pending_webhook() is None
    conversation = await store.create_conversation("org-a", "whatsapp", "+1")
    message, _ = await store.create_message(conversation, "hi", "")
    await applied(
        store,
        [status_event(message, Status.SENT, at(1)), status_event(message, Status.READ, at(2))],
    )
    now = utcnow() + timedelta(seconds=1)
    [first] = await hooks.due_webhook_deliveries(hook.id, now, 10)
    assert await hooks.oldest_pending_webhook() == first.created_at  # the metric's age
    await hooks.webhook_failed(first.id, now + timedelta(seconds=5), "HTTP 503", now)
    # Waiting: neither it nor the one behind it is due, and no sender leases the endpoint
    # for nothing meanwhile.
    assert await hooks.due_webhook_deliveries(hook.id, now, 10) == []
    assert await hooks.claim_webhook_endpoints("s1", 10, 30, now) == []
    [again] = await hooks.due_webhook_deliveries(hook.id, now + timedelta(seconds=5), 10)
    assert again.id == first.id and again.attempts == 1 and again.last_error == "HTTP 503"
    await hooks.webhook_failed(first.id, None, "HTTP 500", now)  # given up: parked
    # The conversation's next delivery goes on.
    [behind] = await hooks.due_webhook_deliveries(hook.id, now, 10)
    assert behind.seq == 2
    assert await hooks.oldest_pending_webhook() == behind.created_at  # a parked one is not
    parked = await hooks.parked_webhook_deliveries("org-a", hook.id, 10)
    assert parked is not None and [(d.seq, d.last_error) for d in parked] == [(1, "HTTP 500")]
    assert await hooks.parked_webhook_deliveries("org-b", hook.id, 10) is None
    assert await hooks.replay_parked_webhooks("org-b", hook.id, now) is None
    assert await hooks.replay_parked_webhooks("org-a", hook.id, now) == 1
    assert await hooks.parked_webhook_deliveries("org-a", hook.id, 10) == []
    [head] = await hooks.due_webhook_deliveries(hook.id, now, 10)
    assert head.seq == 1 and head.attempts == 0


async def test_rotation_keeps_the_previous_secret_for_a_while(store: Store) -> None:
    hooks = store
    hook = await hooks.add_webhook_endpoint(endpoint("org-a", "one"), 5)
    assert hook is not None
    until = utcnow() + timedelta(hours=24)
    rotated = await hooks.rotate_webhook_secret("org-a", hook.id, "whsec_new", until)
    assert rotated is not None
    assert rotated.secret == "whsec_new" and rotated.previous_secret == hook.secret
    assert rotated.previous_until == until
    assert await hooks.rotate_webhook_secret("org-b", hook.id, "whsec_x", until) is None


async def test_a_customers_message_is_a_message_received_event(store: Store) -> None:
    hooks = store
    hook = await hooks.add_webhook_endpoint(endpoint("org_a", "one"), 5)
    assert hook is not None
    conversation = await store.create_conversation("org_a", "whatsapp", CONTACT)
    theirs = await store.receive_message(inbound("wamid.in"))
    await applied(
        store,
        [
            status_event(theirs, Status.DELIVERED, at(1)),  # its arrival
            status_event(theirs, Status.READ, at(2)),  # an agent read it
        ],
    )
    far = utcnow() + timedelta(days=1)
    kinds = []
    for _ in range(2):
        [due] = await hooks.due_webhook_deliveries(hook.id, far, 10)
        body = json.loads(due.body)
        assert due.event_type == body["type"]
        assert body["data"]["conversation_id"] == conversation.id
        kinds.append((body["type"], body["data"]["type"], body["data"]["seq"]))
        await hooks.webhook_delivered(due.id)
    assert kinds == [("message.received", "message", 1), ("message.status", "status", 2)]


async def test_no_body_is_made_for_an_organization_without_an_endpoint(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A status change of an organization with no endpoint makes no webhook body (the
    JSON of one per change was a cost of every status on the hot path), one of an
    organization with an endpoint still does."""
    hooks = store
    hook = await hooks.add_webhook_endpoint(endpoint("org-a", "one"), 5)
    assert hook is not None
    module = importlib.import_module(type(store).__module__)
    made: list[str] = []

    def counted(kind: str, frame: str, when: datetime) -> bytes:
        made.append(json.loads(frame)["conversation_id"])
        return event_body(kind, frame, when)

    monkeypatch.setattr(module, "event_body", counted)
    hooked = await store.create_conversation("org-a", "whatsapp", "+1")
    quiet = await store.create_conversation("org-b", "whatsapp", "+1")
    mine, _ = await store.create_message(hooked, "hi", "")
    theirs, _ = await store.create_message(quiet, "hi", "")
    await applied(
        store,
        [
            status_event(theirs, Status.SENT, at(1)),
            status_event(mine, Status.SENT, at(1)),
            status_event(theirs, Status.READ, at(2)),
        ],
    )
    assert made == [hooked.id]
    [due] = await hooks.due_webhook_deliveries(hook.id, utcnow() + timedelta(days=1), 10)
    assert due.conversation_id == hooked.id and json.loads(due.body)["data"]["seq"] == 1
