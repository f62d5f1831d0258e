"""An agent reads a customer's message: what `POST …/messages/{message_id}/read` and the
WebSocket's `read` frame both do (protocol.md §4, §5)."""

from __future__ import annotations

from whatslike.clock import utcnow
from whatslike.status.frame import IN
from whatslike.status.rules import Status
from whatslike.store.base import Conversation, Store
from whatslike.store.common import read_event, status_entry


class ReadRefused(Exception):
    """The message cannot be marked read: `code` says why (`not_found`, `not_inbound`,
    `not_arrived`), `status` is the HTTP status that answers it."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


async def mark_read(store: Store, conversation: Conversation, message_id: str) -> bool:
    """Hand off the READ of a customer's message of `conversation` (the caller found it
    in its organization), unless it is READ already; True when something was handed off.
    Idempotent: the event id is the message's, so reads made at once apply as one.
    ReadRefused unless the message is a customer's of `conversation` that has arrived."""
    message = await store.get_message(message_id)
    if message is None or message.conversation_id != conversation.id:
        raise ReadRefused(404, "not_found", "no such message in this conversation")
    if message.direction != IN:
        raise ReadRefused(409, "not_inbound", "only a customer's message can be marked read")
    if message.inbound_media is not None and message.inbound_media.state == "fetching":
        # Its arrival is announced with its medium: a READ first would announce it
        # without (its `message` frame is its first change).
        raise ReadRefused(
            409, "not_arrived", "its medium is still being fetched: read it once it arrived"
        )
    if message.status is Status.READ:
        return False
    await store.handoff([status_entry(read_event(message, utcnow()))])
    return True
