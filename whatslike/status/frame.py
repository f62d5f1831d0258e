"""The `status` and `message` frames of protocol.md §4, serialized once where the change
is made.

The worker publishes these exact bytes on the fan-out and the hub forwards them without
re-encoding; `changes_since` returns the same text from the store.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from whatslike.clock import format_time
from whatslike.status.rules import ProviderError, Status

#: A message's direction: an agent's (sent by us) or the customer's (received).
OUT = "out"
IN = "in"


def status_frame(
    *,
    conversation_id: str,
    message_id: str,
    status: Status,
    seq: int,
    occurred_at: datetime,
    error: ProviderError | None,
) -> str:
    return json.dumps(
        {
            "type": "status",
            "conversation_id": conversation_id,
            "message_id": message_id,
            "status": status.value,
            "seq": seq,
            "occurred_at": format_time(occurred_at),
            "error": {"code": error.code, "title": error.title} if error else None,
        },
        separators=(",", ":"),
    )


def message_frame(
    *,
    conversation_id: str,
    message_id: str,
    text: str,
    status: Status,
    seq: int,
    occurred_at: datetime,
    media: dict[str, Any] | None = None,
) -> str:
    """A customer's message arrived: its first change, in the conversation's seq stream.
    `media` (present only for a message with a medium) is its medium, fetched already:
    `state` "stored" with its `media_id`, or "failed"."""
    frame: dict[str, Any] = {
        "type": "message",
        "conversation_id": conversation_id,
        "message_id": message_id,
        "direction": IN,
        "text": text,
        "status": status.value,
        "seq": seq,
        "occurred_at": format_time(occurred_at),
    }
    if media is not None:
        frame["media"] = media
    return json.dumps(frame, separators=(",", ":"))
