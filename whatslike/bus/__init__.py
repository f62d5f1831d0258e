"""The bus port: keyed events on topics, consumed by groups with at-least-once delivery.

A handler that returns has processed the event (the bus commits it). A handler that
raises gets the event again with exponential back-off. An outage (the store, the bus or
the fan-out away or timing out) is retried for as long as it lasts and never
dead-letters; any other error, after `consumer_max_attempts` failures, or at once for
`MalformedEvent` (retrying cannot help), sends the event to `<topic>.dlq` with the
reason (whatslike/bus/retry.py decides which is which). Events with the same key are
handled in publish order.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol, runtime_checkable

Handler = Callable[[bytes], Awaitable[None]]
#: Handles several events of one partition, in order, at once (one store transaction);
#: returning means all are handled. Raising hands each of them to the per-event handler
#: again (retries, dead letters), so the batch handler must be idempotent, as every
#: handler is under at-least-once delivery.
BatchHandler = Callable[[list[bytes]], Awaitable[None]]


class BusFull(Exception):
    """The bus could not take the event within the publish timeout. Retriable."""


#: (topic, key, value) of one event to publish.
Event = tuple[str, str, bytes]


class PublishIncomplete(Exception):
    """`publish_many` took only the first `taken` events; `error` is why the next one was
    not taken (BusFull, BackendUnavailable, ...)."""

    def __init__(self, taken: int, error: Exception) -> None:
        super().__init__(f"{taken} events taken, then: {error}")
        self.taken = taken
        self.error = error


async def publish_in_turn(
    publish: Callable[[str, str, bytes], Awaitable[None]], events: Sequence[Event]
) -> None:
    """`publish_many` for a bus without batches of its own: one event after the other."""
    for taken, event in enumerate(events):
        try:
            await publish(*event)
        except Exception as exc:
            raise PublishIncomplete(taken, exc) from exc


class Bus(Protocol):
    #: True when a returned `publish` means the bus itself stored the event (Kafka with
    #: acks=all): the outbox relay may then forget it. False for the in-process bus,
    #: which keeps nothing across a crash: there an outbox entry stays until the work it
    #: stands for is done and stored downstream.
    durable: bool

    def subscribe(self, topic: str, group: str, handler: Handler) -> None:
        """Register a consumer group's handler; call before `start`."""

    async def start(self) -> None: ...

    async def stop(self) -> None:
        """Stop consuming; events being handled finish first."""

    async def publish(self, topic: str, key: str, value: bytes) -> None:
        """Hand an event to the bus; waits while the bus is full, then raises BusFull."""

    async def publish_many(self, events: Sequence[Event]) -> None:
        """Hand several events to the bus at once (one round trip to a broker for all),
        each key's in the given order; raises PublishIncomplete when only a first part of
        them was taken."""

    async def ping(self) -> None: ...


@runtime_checkable
class Background(Protocol):
    """A bus that can fetch a group's events less eagerly (Kafka)."""

    def subscribe_background(self, topic: str, group: str, handler: Handler) -> None:
        """Like `subscribe`, for a group on no latency path (dead letters): its events
        may wait longer before they are fetched, so that an idle group costs little."""


@runtime_checkable
class Batching(Protocol):
    """A bus that fetches many events at once (Kafka) and can hand them over together."""

    def subscribe_batch(
        self, topic: str, group: str, handler: Handler, batch: BatchHandler
    ) -> None: ...
