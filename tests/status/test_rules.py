"""The status rules: the transition table case by case, and order-independence as a
property (any permutation, any duplication of the same events: same final state)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from whatslike.status.rules import (
    OBSERVABLE,
    PROVIDER_CLOCK_SKEW,
    RANK,
    TRANSITIONS,
    Effect,
    MessageState,
    Observation,
    ProviderError,
    Status,
    apply,
    bounded,
)

T0 = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
ERR = ProviderError("131026", "Message undeliverable")


def at(seconds: int) -> datetime:
    return T0 + timedelta(seconds=seconds)


def run(*observations: Observation) -> tuple[MessageState, list[Effect]]:
    state = MessageState()
    effects = []
    for obs in observations:
        transition = apply(state, obs)
        state = transition.state
        effects.append(transition.effect)
    return state, effects


def test_the_table_covers_every_state_and_observation() -> None:
    assert set(TRANSITIONS) == {(s, o) for s in Status for o in OBSERVABLE}


def test_in_order_each_status_is_a_change() -> None:
    state, effects = run(
        Observation(Status.SENT, at(0)),
        Observation(Status.DELIVERED, at(1)),
        Observation(Status.READ, at(2)),
    )
    assert effects == [Effect.CHANGED] * 3
    assert state == MessageState(Status.READ, at(0), at(1), at(2))


def test_same_event_twice_is_a_noop() -> None:
    _, effects = run(Observation(Status.SENT, at(0)), Observation(Status.SENT, at(0)))
    assert effects == [Effect.CHANGED, Effect.NOOP]


def test_read_implies_delivered_and_sent() -> None:
    state, effects = run(Observation(Status.SENT, at(0)), Observation(Status.READ, at(5)))
    assert effects == [Effect.CHANGED, Effect.CHANGED]
    assert state == MessageState(Status.READ, at(0), at(5), at(5))


def test_late_delivered_after_read_only_fills_its_timestamp() -> None:
    state, effects = run(Observation(Status.READ, at(5)), Observation(Status.DELIVERED, at(3)))
    assert effects == [Effect.CHANGED, Effect.FILLED]
    assert state.status is Status.READ
    assert state.delivered_at == at(3)


def test_late_delivered_with_a_later_time_changes_nothing() -> None:
    _, effects = run(Observation(Status.READ, at(5)), Observation(Status.DELIVERED, at(6)))
    assert effects == [Effect.CHANGED, Effect.NOOP]


def test_failed_from_sent_applies_with_its_error() -> None:
    state, effects = run(Observation(Status.SENT, at(0)), Observation(Status.FAILED, at(1), ERR))
    assert effects == [Effect.CHANGED, Effect.CHANGED]
    assert state.status is Status.FAILED
    assert state.error == ERR
    assert state.failed_at == at(1)


def test_failed_after_delivered_is_an_anomaly_that_keeps_the_status() -> None:
    state, effects = run(
        Observation(Status.DELIVERED, at(1)), Observation(Status.FAILED, at(2), ERR)
    )
    assert effects == [Effect.CHANGED, Effect.ANOMALY]
    assert state.status is Status.DELIVERED
    assert state.error == ERR


def test_delivered_after_failed_moves_forward() -> None:
    state, effects = run(
        Observation(Status.FAILED, at(1), ERR), Observation(Status.DELIVERED, at(2))
    )
    assert effects == [Effect.CHANGED, Effect.CHANGED]
    assert state.status is Status.DELIVERED


def test_late_sent_never_revives_a_failed_message() -> None:
    state, effects = run(Observation(Status.FAILED, at(1), ERR), Observation(Status.SENT, at(0)))
    assert effects == [Effect.CHANGED, Effect.FILLED]
    assert state.status is Status.FAILED
    assert state.sent_at == at(0)


def test_pending_cannot_be_observed() -> None:
    with pytest.raises(ValueError, match="PENDING"):
        Observation(Status.PENDING, at(0))


# --- properties -------------------------------------------------------------------------

errors = st.sampled_from([ERR, ProviderError("131047", "Re-engagement message")])
observations = st.builds(
    Observation,
    status=st.sampled_from(OBSERVABLE),
    occurred_at=st.integers(0, 20).map(at),
    error=st.none() | errors,
)


@st.composite
def shuffled_with_duplicates(draw: st.DrawFn) -> tuple[list[Observation], list[Observation]]:
    events = draw(st.lists(observations, min_size=1, max_size=6))
    copies = draw(st.lists(st.sampled_from(events), max_size=6))
    return events, draw(st.permutations(events + copies))


def expected_status(events: list[Observation]) -> Status:
    seen = {e.status for e in events}
    for status in (Status.READ, Status.DELIVERED, Status.FAILED, Status.SENT):
        if status in seen:
            return status
    return Status.PENDING


@given(shuffled_with_duplicates())
def test_any_order_and_duplication_ends_in_the_same_state(
    case: tuple[list[Observation], list[Observation]],
) -> None:
    events, arrival = case
    reference, _ = run(*events)
    final, _ = run(*arrival)
    assert final == reference
    assert final.status is expected_status(events)


@given(shuffled_with_duplicates())
def test_status_never_goes_backwards(case: tuple[list[Observation], list[Observation]]) -> None:
    _, arrival = case
    state = MessageState()
    for obs in arrival:
        transition = apply(state, obs)
        before, after = state.status, transition.state.status
        if transition.effect is not Effect.CHANGED:
            assert after is before
        elif Status.FAILED not in (before, after):
            assert RANK[after] > RANK[before]
        elif before is Status.FAILED:
            assert after in (Status.DELIVERED, Status.READ)
        else:
            assert before in (Status.PENDING, Status.SENT)
        state = transition.state


@given(shuffled_with_duplicates())
def test_a_replay_changes_nothing_and_changes_are_few(
    case: tuple[list[Observation], list[Observation]],
) -> None:
    """Only status changes take a seq; a redelivered batch must take none, and no order
    can make a message change more often than PENDING→SENT→FAILED→DELIVERED→READ."""
    _, arrival = case
    state, effects = run(*arrival)
    assert effects.count(Effect.CHANGED) <= 4
    for obs in arrival:
        assert apply(state, obs).effect is Effect.NOOP


_times = st.datetimes(
    min_value=datetime(1970, 1, 2), max_value=datetime(9000, 1, 1), timezones=st.just(UTC)
)


@given(_times, _times, _times)
def test_a_provider_time_is_kept_within_the_messages_life(
    observed: datetime, created: datetime, received: datetime
) -> None:
    kept = bounded(observed, created, received)
    latest = max(created, received + PROVIDER_CLOCK_SKEW)
    assert created <= kept <= latest  # never before creation, never past receipt + skew
    if created <= observed <= received + PROVIDER_CLOCK_SKEW:
        assert kept == observed  # a plausible time is the provider's, untouched
    assert bounded(kept, created, received) == kept
    later = observed + timedelta(seconds=1)
    assert bounded(later, created, received) >= kept  # order of observations is kept
