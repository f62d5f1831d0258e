"""The fan-out port: bytes published on a channel (`status:{conversation_id}`,
`campaign:{campaign_id}`), heard by every hub that has a local subscriber for it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

#: Called with (channel, payload) for every message on a channel heard.
Listener = Callable[[str, bytes], None]

#: Called when messages may have been missed (the link to the backend broke and is back):
#: every listener must re-read what it follows from the store.
GapListener = Callable[[], None]


class Fanout(Protocol):
    def listen(self, listener: Listener) -> None:
        """Register a listener for the channels heard; call before `start`."""

    def on_gap(self, listener: GapListener) -> None:
        """Register a listener told of a possible gap; call before `start`. It is called
        once the link is back and every added conversation is heard again, so a store
        read made after the call misses nothing."""

    async def add(self, channel: str) -> None:
        """Hear this channel (idempotent). Returns once its messages are heard, or once
        the link is known to be down, in which case a gap is announced later."""

    def discard(self, channel: str) -> None:
        """Stop hearing this channel (its last local subscriber left)."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def publish(self, channel: str, payload: bytes) -> None:
        """Publish; raises BackendUnavailable when the backend cannot take it."""

    async def publish_many(self, messages: Sequence[tuple[str, bytes]]) -> None:
        """Publish (channel, payload) pairs in order, in as few round trips as the backend
        allows; raises BackendUnavailable when it cannot take them (some may be out)."""

    async def ping(self) -> None:
        """Raises BackendUnavailable when the backend does not answer."""
