"""The in-process fan-out: `publish` calls every listener synchronously.

There is no queue here: listeners (the hub) only hand the bytes to per-connection bounded
queues, which is where back-pressure and the slow-consumer policy live. Every channel
is always heard and the link never breaks, so `add`, `discard` and gaps are no-ops.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from whatslike.fanout import GapListener, Listener

log = logging.getLogger(__name__)


class MemoryFanout:
    def __init__(self) -> None:
        self._listeners: list[Listener] = []

    def listen(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def on_gap(self, listener: GapListener) -> None:
        return None

    async def add(self, channel: str) -> None:
        return None

    def discard(self, channel: str) -> None:
        return None

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def ping(self) -> None:
        return None

    async def publish_many(self, messages: Sequence[tuple[str, bytes]]) -> None:
        for channel, payload in messages:
            await self.publish(channel, payload)

    async def publish(self, channel: str, payload: bytes) -> None:
        for listener in self._listeners:
            try:
                listener(channel, payload)
            except Exception:
                # One broken listener must not keep the frame from the others.
                log.exception("fan-out listener failed on %s", channel)
