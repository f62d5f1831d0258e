"""The store port: what every store adapter (SQLite, PostgreSQL, …) must do.

All tenant-facing reads take the `org_id` and answer None for another organization's
rows, so a caller can never tell "not yours" from "does not exist". Worker-facing calls
(`apply_status`, the provider-id index) are keyed by our own ids and are not scoped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

from whatslike.events import StatusEvent
from whatslike.status.rules import Effect, MessageState, ProviderError, Status


@dataclass(frozen=True, slots=True)
class Conversation:
    id: str
    org_id: str
    channel: str
    contact: str
    last_seq: int
    created_at: datetime


@dataclass(frozen=True, slots=True)
class Message:
    id: str
    conversation_id: str
    org_id: str
    channel: str
    text: str
    client_message_id: str
    created_at: datetime
    state: MessageState
    seq: int | None  # the seq of the message's latest notified change, if any
    provider_message_id: str | None = None

    @property
    def status(self) -> Status:
        return self.state.status


@dataclass(frozen=True, slots=True)
class ApplyResult:
    """What `apply_status` did. `frames` are the status frames to fan out (JSON text):
    the new change, or — when this very event was applied before (a redelivery after
    a crash between commit and publish) — that earlier change again, so a notification
    is never lost. Clients drop the duplicate by `seq`."""

    effect: Effect
    frames: tuple[str, ...] = ()
    message: Message | None = None
    unknown_message: bool = False


@dataclass(frozen=True, slots=True)
class Changes:
    """Frames after a seq. `complete` is False when they cannot all be given (history
    trimmed, or more than the replay limit): the client must reload over HTTP."""

    frames: tuple[str, ...]
    last_seq: int
    complete: bool


@dataclass(frozen=True, slots=True)
class ParkedStatus:
    """A status that arrived before its provider id was linked to one of our messages."""

    channel: str
    provider_message_id: str
    payload: bytes = field(repr=False)


class Store(Protocol):
    async def open(self) -> None:
        """Connect and create or migrate the schema. Idempotent."""

    async def close(self) -> None: ...

    async def ping(self) -> None:
        """Raise BackendUnavailable if the store cannot answer."""

    async def create_conversation(
        self, org_id: str, channel: str, contact: str
    ) -> Conversation: ...

    async def get_conversation(self, org_id: str, conversation_id: str) -> Conversation | None: ...

    async def create_message(
        self, conversation: Conversation, text: str, client_message_id: str
    ) -> tuple[Message, bool]:
        """Insert a PENDING message. The same non-empty client_message_id in the same
        conversation returns the first message and False."""

    async def get_message(self, message_id: str) -> Message | None: ...

    async def list_messages(self, org_id: str, conversation_id: str) -> list[Message] | None:
        """Oldest first; None when the conversation is not this organization's."""

    async def unread_up_to(self, message_id: str) -> list[Message]:
        """The messages of the same conversation created no later than this one that the
        provider accepted (a provider id) and are not READ, oldest first: what Instagram's
        read watermark marks READ. Filtered here, not by the caller, so a long
        conversation does not load its whole history on every read receipt."""

    async def link_provider_id(
        self, channel: str, provider_message_id: str, message_id: str
    ) -> list[ParkedStatus]:
        """Index a provider id (idempotent; the first link wins) and return the statuses
        parked for it, oldest first. They stay parked until `forget_parked`, so a crash
        before they were handed on loses nothing: the next link returns them again."""

    async def forget_parked(self, channel: str, provider_message_id: str) -> None:
        """Drop the parked statuses of a provider id once they were handed on."""

    async def expire_parked(self, before: datetime) -> int:
        """Drop statuses parked before this time (provider ids that never became ours:
        messages sent by another tool on the same number); answer how many."""

    async def find_by_provider_id(
        self, channel: str, provider_message_id: str
    ) -> Message | None: ...

    async def park_status(self, parked: ParkedStatus) -> Message | None:
        """Keep a status whose provider id is not yet known. Atomic with
        `link_provider_id`: if the id was linked meanwhile, nothing is parked and the
        message is returned instead."""

    async def apply_status(self, event: StatusEvent) -> ApplyResult:
        """Apply the status rules and, for a status change, assign the conversation's
        next seq, in one transaction."""

    async def changes_since(self, conversation_id: str, since: int, limit: int) -> Changes: ...

    async def record_dead_letter(self, topic: str, payload: bytes, reason: str) -> None: ...

    async def dead_letter_count(self) -> int: ...


__all__ = [
    "ApplyResult",
    "Changes",
    "Conversation",
    "Message",
    "ParkedStatus",
    "ProviderError",
    "Store",
]
