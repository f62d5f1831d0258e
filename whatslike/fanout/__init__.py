"""The fan-out port: bytes published on `status:{conversation_id}`, heard by every hub."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

#: Called with (channel, payload) for every message on a `status:*` channel.
Listener = Callable[[str, bytes], None]


class Fanout(Protocol):
    def listen(self, listener: Listener) -> None:
        """Register a listener for every `status:*` channel; call before `start`."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def publish(self, channel: str, payload: bytes) -> None: ...

    async def ping(self) -> None: ...
