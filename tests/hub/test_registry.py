"""The subscription registry: both directions agree after any sequence of operations,
and the per-connection limit holds."""

from __future__ import annotations

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from whatslike.hub.registry import SubscriptionRegistry

CONNECTIONS = st.sampled_from(["k1", "k2", "k3", "k4"])
CONVERSATIONS = st.sampled_from(["c1", "c2", "c3", "c4", "c5"])
LIMIT = 3


def test_subscribe_and_lookup_both_ways() -> None:
    registry = SubscriptionRegistry(max_subscriptions=10)
    assert registry.subscribe("k1", "c1")
    assert registry.subscribe("k2", "c1")
    assert registry.subscribe("k1", "c2")
    assert registry.subscribers("c1") == {"k1", "k2"}
    assert registry.subscribers("c2") == {"k1"}
    assert registry.subscriptions("k1") == {"c1", "c2"}
    assert (registry.connection_count, registry.conversation_count) == (2, 2)
    assert registry.subscription_count == 3


def test_subscribe_twice_is_one_subscription() -> None:
    registry = SubscriptionRegistry(max_subscriptions=1)
    assert registry.subscribe("k1", "c1")
    assert registry.subscribe("k1", "c1")
    assert registry.subscription_count == 1


def test_limit_refuses_a_new_conversation_and_changes_nothing() -> None:
    registry = SubscriptionRegistry(max_subscriptions=2)
    assert registry.subscribe("k1", "c1")
    assert registry.subscribe("k1", "c2")
    assert not registry.subscribe("k1", "c3")
    assert registry.subscriptions("k1") == {"c1", "c2"}
    assert registry.subscribers("c3") == frozenset()
    assert registry.subscribe("k2", "c3")  # the limit is per connection


def test_unsubscribe() -> None:
    registry = SubscriptionRegistry(max_subscriptions=2)
    registry.subscribe("k1", "c1")
    assert registry.unsubscribe("k1", "c1")
    assert not registry.unsubscribe("k1", "c1")
    assert not registry.unsubscribe("k9", "c1")
    assert registry.subscribers("c1") == frozenset()
    assert (registry.connection_count, registry.conversation_count) == (0, 0)


def test_drop_forgets_the_connection_everywhere() -> None:
    registry = SubscriptionRegistry(max_subscriptions=5)
    registry.subscribe("k1", "c1")
    registry.subscribe("k1", "c2")
    registry.subscribe("k2", "c2")
    assert registry.drop("k1") == {"c1", "c2"}
    assert registry.drop("k1") == frozenset()
    assert registry.subscribers("c1") == frozenset()
    assert registry.subscribers("c2") == {"k2"}


def test_subscribers_snapshot_survives_changes() -> None:
    # The fan-out iterates a snapshot while it drops slow connections.
    registry = SubscriptionRegistry(max_subscriptions=5)
    registry.subscribe("k1", "c1")
    registry.subscribe("k2", "c1")
    snapshot = registry.subscribers("c1")
    for conn_id in snapshot:
        registry.drop(conn_id)
    assert snapshot == {"k1", "k2"}
    assert registry.subscribers("c1") == frozenset()


class RegistryMachine(RuleBasedStateMachine):
    """Compares the registry with a plain model: a set of (connection, conversation)."""

    def __init__(self) -> None:
        super().__init__()
        self.registry = SubscriptionRegistry(max_subscriptions=LIMIT)
        self.model: set[tuple[str, str]] = set()

    def _held(self, conn_id: str) -> set[str]:
        return {conv for conn, conv in self.model if conn == conn_id}

    @rule(conn_id=CONNECTIONS, conversation_id=CONVERSATIONS)
    def subscribe(self, conn_id: str, conversation_id: str) -> None:
        held = self._held(conn_id)
        expected = conversation_id in held or len(held) < LIMIT
        assert self.registry.subscribe(conn_id, conversation_id) == expected
        if expected:
            self.model.add((conn_id, conversation_id))

    @rule(conn_id=CONNECTIONS, conversation_id=CONVERSATIONS)
    def unsubscribe(self, conn_id: str, conversation_id: str) -> None:
        expected = (conn_id, conversation_id) in self.model
        assert self.registry.unsubscribe(conn_id, conversation_id) == expected
        self.model.discard((conn_id, conversation_id))

    @rule(conn_id=CONNECTIONS)
    def drop(self, conn_id: str) -> None:
        assert self.registry.drop(conn_id) == self._held(conn_id)
        self.model = {pair for pair in self.model if pair[0] != conn_id}

    @invariant()
    def both_directions_agree(self) -> None:
        for conversation_id in ["c1", "c2", "c3", "c4", "c5"]:
            expected = {
                conn_id
                for conn_id in ["k1", "k2", "k3", "k4"]
                if conversation_id in self.registry.subscriptions(conn_id)
            }
            assert self.registry.subscribers(conversation_id) == expected
            assert expected == {conn for conn, conv in self.model if conv == conversation_id}

    @invariant()
    def counts_match_the_model(self) -> None:
        assert self.registry.subscription_count == len(self.model)
        assert self.registry.connection_count == len({conn for conn, _ in self.model})
        assert self.registry.conversation_count == len({conv for _, conv in self.model})
        assert all(len(self._held(conn)) <= LIMIT for conn, _ in self.model)


TestRegistryMachine = RegistryMachine.TestCase
