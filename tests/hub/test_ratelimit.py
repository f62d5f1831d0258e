"""The frame budget: a burst, then the rate; too many refusals in a window end the
connection, in a row or interleaved."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from whatslike.hub.ratelimit import FrameBudget


def test_a_burst_then_the_rate() -> None:
    budget = FrameBudget(rate=10, burst=3, strikes=2)
    assert [budget.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert budget.take(0.05) is False  # half a token back
    assert budget.take(0.1) is True  # one full token
    assert budget.take(10.0) and budget.take(10.0) and budget.take(10.0)
    assert budget.take(10.0) is False  # refills only up to the burst


def test_refusals_in_a_row_exhaust_it() -> None:
    budget = FrameBudget(rate=1, burst=1, strikes=2)
    assert budget.take(0.0)
    assert not budget.take(0.1) and not budget.take(0.2)
    assert not budget.exhausted
    assert not budget.take(0.3)
    assert budget.exhausted


def test_interleaving_allowed_frames_does_not_escape_the_window() -> None:
    """The evasion of issue 8: refused and allowed frames alternate, so no two refusals
    are in a row; at 180 frames/s against 20/s it must still end within the window."""
    budget = FrameBudget(rate=20, burst=40, strikes=10, window_s=10)
    now, refused = 0.0, 0
    while not budget.exhausted:
        now += 1 / 180
        refused += not budget.take(now)
        assert now < 10, "never exhausted"
    assert refused == 11


def test_refusals_spread_over_more_than_the_window_are_forgiven() -> None:
    budget = FrameBudget(rate=0.01, burst=1, strikes=2, window_s=10)
    assert budget.take(0.0)
    for at in (1.0, 7.0, 13.0, 19.0, 25.0):  # never three refusals within 10 s
        assert not budget.take(at)
        assert not budget.exhausted
    assert not budget.take(26.0)  # the third within 10 s
    assert budget.exhausted


@given(
    st.floats(0.5, 100),
    st.integers(1, 50),
    st.lists(st.floats(0, 1, allow_nan=False), min_size=1, max_size=200),
)
def test_never_more_than_burst_plus_rate_times_elapsed(
    rate: float, burst: int, gaps: list[float]
) -> None:
    budget = FrameBudget(rate=rate, burst=burst, strikes=3)
    now, allowed = 0.0, 0
    for gap in gaps:
        now += gap
        allowed += budget.take(now)
    assert allowed <= burst + rate * now + 1e-9
