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
    with pytest.raises(ValueError, match=r"^PENDING is never observed from a provider$"):
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


# --- every cell of the table: the effect and the whole resulting state ----------------------

OTHER = ProviderError("131047", "Re-engagement message")
P, S, D, R, F = Status.PENDING, Status.SENT, Status.DELIVERED, Status.READ, Status.FAILED


def state(
    status: Status,
    *,
    sent: int | None = None,
    delivered: int | None = None,
    read: int | None = None,
    failed: int | None = None,
    error: ProviderError | None = None,
) -> MessageState:
    def time(seconds: int | None) -> datetime | None:
        return None if seconds is None else at(seconds)

    return MessageState(status, time(sent), time(delivered), time(read), time(failed), error)


#: Where each cell starts: every timestamp the status implies, at 10 s.
START = {
    P: state(P),
    S: state(S, sent=10),
    D: state(D, sent=10, delivered=10),
    R: state(R, sent=10, delivered=10, read=10),
    F: state(F, sent=10, failed=10, error=ERR),
}

_C, _FI, _A, _N = Effect.CHANGED, Effect.FILLED, Effect.ANOMALY, Effect.NOOP

#: (current status, observed status, observed at) -> (effect, resulting state). The
#: observation at 5 s is earlier than every timestamp of the start state, at 20 s later.
#: A FAILED observation carries OTHER; the FAILED start state carries ERR.
CELLS: dict[tuple[Status, Status, int], tuple[Effect, MessageState]] = {
    (P, S, 5): (_C, state(S, sent=5)),
    (P, D, 5): (_C, state(D, sent=5, delivered=5)),
    (P, R, 5): (_C, state(R, sent=5, delivered=5, read=5)),
    (P, F, 5): (_C, state(F, failed=5, error=OTHER)),
    (S, S, 5): (_FI, state(S, sent=5)),
    (S, D, 5): (_C, state(D, sent=5, delivered=5)),
    (S, R, 5): (_C, state(R, sent=5, delivered=5, read=5)),
    (S, F, 5): (_C, state(F, sent=10, failed=5, error=OTHER)),
    (D, S, 5): (_FI, state(D, sent=5, delivered=10)),
    (D, D, 5): (_FI, state(D, sent=5, delivered=5)),
    (D, R, 5): (_C, state(R, sent=5, delivered=5, read=5)),
    (D, F, 5): (_A, state(D, sent=10, delivered=10, failed=5, error=OTHER)),
    (R, S, 5): (_FI, state(R, sent=5, delivered=10, read=10)),
    (R, D, 5): (_FI, state(R, sent=5, delivered=5, read=10)),
    (R, R, 5): (_FI, state(R, sent=5, delivered=5, read=5)),
    (R, F, 5): (_A, state(R, sent=10, delivered=10, read=10, failed=5, error=OTHER)),
    (F, S, 5): (_FI, state(F, sent=5, failed=10, error=ERR)),
    (F, D, 5): (_C, state(D, sent=5, delivered=5, failed=10, error=ERR)),
    (F, R, 5): (_C, state(R, sent=5, delivered=5, read=5, failed=10, error=ERR)),
    (F, F, 5): (_FI, state(F, sent=10, failed=5, error=OTHER)),
    (P, S, 20): (_C, state(S, sent=20)),
    (P, D, 20): (_C, state(D, sent=20, delivered=20)),
    (P, R, 20): (_C, state(R, sent=20, delivered=20, read=20)),
    (P, F, 20): (_C, state(F, failed=20, error=OTHER)),
    (S, S, 20): (_N, START[S]),
    (S, D, 20): (_C, state(D, sent=10, delivered=20)),
    (S, R, 20): (_C, state(R, sent=10, delivered=20, read=20)),
    (S, F, 20): (_C, state(F, sent=10, failed=20, error=OTHER)),
    (D, S, 20): (_N, START[D]),
    (D, D, 20): (_N, START[D]),
    (D, R, 20): (_C, state(R, sent=10, delivered=10, read=20)),
    (D, F, 20): (_A, state(D, sent=10, delivered=10, failed=20, error=OTHER)),
    (R, S, 20): (_N, START[R]),
    (R, D, 20): (_N, START[R]),
    (R, R, 20): (_N, START[R]),
    (R, F, 20): (_A, state(R, sent=10, delivered=10, read=10, failed=20, error=OTHER)),
    (F, S, 20): (_N, START[F]),
    (F, D, 20): (_C, state(D, sent=10, delivered=20, failed=10, error=ERR)),
    (F, R, 20): (_C, state(R, sent=10, delivered=20, read=20, failed=10, error=ERR)),
    (F, F, 20): (_N, START[F]),
}


def test_the_cell_table_covers_every_cell_at_both_times() -> None:
    assert {(current, seen) for current, seen, _ in CELLS} == set(TRANSITIONS)
    assert len(CELLS) == 2 * len(TRANSITIONS)


@pytest.mark.parametrize(("current", "seen", "seconds"), list(CELLS))
def test_each_cell_has_its_effect_and_its_state(
    current: Status, seen: Status, seconds: int
) -> None:
    obs = Observation(seen, at(seconds), OTHER if seen is F else None)
    transition = apply(START[current], obs)
    assert (transition.effect, transition.state) == CELLS[(current, seen, seconds)]


def test_an_anomaly_seen_again_is_a_noop_and_an_earlier_one_refills() -> None:
    delivered = START[D]
    first = apply(delivered, Observation(F, at(20), OTHER)).state
    assert apply(first, Observation(F, at(20), OTHER)).effect is Effect.NOOP
    assert apply(first, Observation(F, at(25), ERR)).effect is Effect.NOOP
    earlier = apply(first, Observation(F, at(15), ERR))
    assert earlier.effect is Effect.ANOMALY
    assert (earlier.state.failed_at, earlier.state.error) == (at(15), ERR)


# --- FAILED at the same time with different errors: the kept error ---------------------------


@pytest.mark.parametrize("start", [P, S, D, R])
def test_two_failures_at_the_same_time_keep_the_error_that_sorts_first(start: Status) -> None:
    low = ProviderError("131026", "Message undeliverable")
    high = ProviderError("131047", "Re-engagement message")
    same_code = ProviderError("131026", "Z later title")
    ends = set()
    for events in (
        (low, high, same_code),
        (high, same_code, low),
        (same_code, low, high),
        (high, low, same_code),
    ):
        current = START[start]
        for error in events:
            current = apply(current, Observation(F, at(30), error)).state
        ends.add(current)
        assert (current.failed_at, current.error) == (at(30), low)
    assert len(ends) == 1


def test_a_failure_without_an_error_and_one_with_an_empty_error_are_ordered_too() -> None:
    empty = ProviderError("", "")
    one = apply(apply(START[P], Observation(F, at(1))).state, Observation(F, at(1), empty))
    other = apply(apply(START[P], Observation(F, at(1), empty)).state, Observation(F, at(1)))
    assert one.state == other.state
    assert one.state.error == empty  # an error, even an empty one, beats none


# Errors drawn freely: codes and titles that tie, sort either way, are empty, or absent.
any_error = st.none() | st.builds(
    ProviderError, st.sampled_from(["", "1", "131026", "131047"]), st.sampled_from(["", "a", "b"])
)
failures_and_others = st.builds(
    Observation,
    status=st.sampled_from(OBSERVABLE),
    occurred_at=st.integers(0, 3).map(at),
    error=any_error,
)


@given(st.lists(failures_and_others, min_size=1, max_size=6), st.data())
def test_any_order_any_duplicates_same_state_including_the_error(
    events: list[Observation], data: st.DataObject
) -> None:
    copies = data.draw(st.lists(st.sampled_from(events), max_size=6))
    arrival = data.draw(st.permutations(events + copies))
    reference, _ = run(*events)
    final, _ = run(*arrival)
    assert final == reference
    failures = [e for e in events if e.status is Status.FAILED]
    if failures:
        first = min(
            failures,
            key=lambda e: (
                e.occurred_at,
                e.error is None,
                e.error and (e.error.code, e.error.title),
            ),
        )
        assert (final.failed_at, final.error) == (first.occurred_at, first.error)
