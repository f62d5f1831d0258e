"""Campaigns: one message to many contacts of one channel (issue 16), as pure rules.

A campaign is stored with all its recipients before it is acknowledged; a background part
of the api role (`whatslike.roles.campaigns`) then creates its messages in batches through
the normal send path (a conversation where there is none, a PENDING message, its outbox
entry), so the connector's pacing by the phone number's rate applies to them as to any.

Its live counts are kept per *bucket*: a message's status, with a FAILED one split by its
provider error code. Each status change moves one message from its old bucket to its new one
in the same store transaction, so the counts are exactly the sum of the messages' statuses
whenever nothing is in flight. Recipients whose message is not created yet are `waiting`.
One more row of the counts, `CHANGES`, counts the moves themselves: it grows by one in
every transaction that moves a count, so it is the counts' version (the live `campaign`
frames carry it, and a client keeps the highest). It is a row of the counts rather than a
column of the campaign so that status changes never lock the campaign's row, which the
step that creates its messages takes (`FOR UPDATE SKIP LOCKED` on PostgreSQL).

Agents are not starved: campaign messages enter the send queue only while less than
`CAMPAIGN_QUEUE_S` seconds' worth of the channel's rate is waiting there (`room`), so an
agent's message waits behind that much at most.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from whatslike.settings import Settings
from whatslike.status.rules import MessageState, Status

#: A campaign's recipients at most (one request).
MAX_CONTACTS = 10_000
#: The request body of a campaign at most (10,000 contacts of up to 128 characters fit).
CAMPAIGN_BODY_BYTES = 2 * 1024 * 1024
_FAILED = Status.FAILED.value
#: The row of a campaign's counts that counts the moves: the counts' version.
CHANGES = "changes"
#: A campaign's id starts so (`whatslike.clock.new_id`); its messages carry it as their
#: `client_message_id` (the store's `campaign_step` makes them so).
_ID_PREFIX = "cmp_"


def bucket_of(state: MessageState) -> str:
    """The count a message in this state is in: its status, or `FAILED:<code>`."""
    if state.status is Status.FAILED:
        return f"{_FAILED}:{state.error.code if state.error else ''}"
    return state.status.value


def campaign_of(client_message_id: str) -> str | None:
    """The campaign a message with this `client_message_id` may belong to: a hint (an
    agent may choose such a key too), only ever used to look a campaign up again."""
    return client_message_id if client_message_id.startswith(_ID_PREFIX) else None


def fingerprint(request: Mapping[str, Any]) -> str:
    """What identifies a campaign request beyond its key: the same key with another
    fingerprint is a different campaign (409)."""
    canonical = json.dumps(request, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def distinct(contacts: list[str]) -> tuple[str, ...]:
    """Each contact once, in the order first given (a contact gets one message)."""
    return tuple(dict.fromkeys(contacts))


def funnel(total: int, created: int, counts: Mapping[str, int]) -> dict[str, Any]:
    """The counts as the API shows them: `waiting` (no message yet), then one per status,
    FAILED also by error code. They add up to `total`."""
    failed = {
        bucket.partition(":")[2]: n
        for bucket, n in sorted(counts.items())
        if bucket.startswith(f"{_FAILED}:") and n
    }
    return {
        "waiting": total - created,
        "queued": counts.get(Status.PENDING.value, 0),
        "sent": counts.get(Status.SENT.value, 0),
        "delivered": counts.get(Status.DELIVERED.value, 0),
        "read": counts.get(Status.READ.value, 0),
        "failed": sum(failed.values()),
        "failed_by_code": failed,
    }


def sends_per_s(settings: Settings, channel: str) -> float:
    """The channel's send rate (what its connector paces to)."""
    return (
        settings.whatsapp_sends_per_s if channel == "whatsapp" else settings.instagram_sends_per_s
    )


def room(settings: Settings, channel: str, backlog: int) -> int:
    """How many more campaign messages may enter the channel's send queue now, with
    `backlog` of them waiting there: up to `CAMPAIGN_QUEUE_S` of the rate, at most a batch."""
    bound = int(sends_per_s(settings, channel) * settings.campaign_queue_s)
    return max(0, min(settings.campaign_batch, max(1, bound) - backlog))
