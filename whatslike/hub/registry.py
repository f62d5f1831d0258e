"""Who listens to which conversation: connections ↔ conversations, both ways, with the
per-connection subscription limit. Pure: no asyncio, sockets or clocks."""

from __future__ import annotations

_NOBODY: frozenset[str] = frozenset()


class SubscriptionRegistry:
    """Invariant: ``conn in subscribers(c)`` exactly when ``c in subscriptions(conn)``.

    Subscribers are kept as frozensets and replaced on change (copy-on-write): the
    fan-out reads them once per status frame, far more often than clients subscribe,
    and may iterate a set while a slow connection is dropped from it."""

    def __init__(self, max_subscriptions: int) -> None:
        self._max = max_subscriptions
        self._subscribers: dict[str, frozenset[str]] = {}
        self._subscriptions: dict[str, set[str]] = {}
        self._count = 0

    def subscribe(self, conn_id: str, conversation_id: str) -> bool:
        """Add a subscription (idempotent). False, and nothing changes, when the
        connection already holds `max_subscriptions` other conversations."""
        held = self._subscriptions.get(conn_id, set())
        if conversation_id in held:
            return True
        if len(held) >= self._max:
            return False
        held.add(conversation_id)
        self._count += 1
        self._subscriptions[conn_id] = held
        self._subscribers[conversation_id] = self._subscribers.get(conversation_id, _NOBODY) | {
            conn_id
        }
        return True

    def unsubscribe(self, conn_id: str, conversation_id: str) -> bool:
        """Remove a subscription; False when there was none."""
        held = self._subscriptions.get(conn_id)
        if held is None or conversation_id not in held:
            return False
        held.remove(conversation_id)
        if not held:
            del self._subscriptions[conn_id]
        self._forget(conn_id, conversation_id)
        return True

    def drop(self, conn_id: str) -> frozenset[str]:
        """Forget a connection; answers the conversations it was subscribed to."""
        held = self._subscriptions.pop(conn_id, set())
        for conversation_id in held:
            self._forget(conn_id, conversation_id)
        return frozenset(held)

    def subscribers(self, conversation_id: str) -> frozenset[str]:
        return self._subscribers.get(conversation_id, _NOBODY)

    def subscriptions(self, conn_id: str) -> frozenset[str]:
        return frozenset(self._subscriptions.get(conn_id, ()))

    @property
    def connection_count(self) -> int:
        """Connections holding at least one subscription."""
        return len(self._subscriptions)

    @property
    def conversation_count(self) -> int:
        """Conversations with at least one subscriber."""
        return len(self._subscribers)

    @property
    def subscription_count(self) -> int:
        """Subscriptions of all connections together."""
        return self._count

    def _forget(self, conn_id: str, conversation_id: str) -> None:
        self._count -= 1
        remaining = self._subscribers[conversation_id] - {conn_id}
        if remaining:
            self._subscribers[conversation_id] = remaining
        else:
            del self._subscribers[conversation_id]
