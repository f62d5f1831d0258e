"""Polite sending (whatslike/connectors/pacing.py): a token bucket never lets more than
its burst plus its rate through, waits are booked in arrival order, and a hold (after
Meta's 130429) delays everything after it."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given
from hypothesis import strategies as st

from whatslike.connectors.pacing import Pacer, TokenBucket


@given(
    st.floats(0.5, 1000),
    st.integers(1, 50),
    st.lists(st.floats(0, 10), min_size=1, max_size=200),
)
def test_never_more_than_the_burst_plus_the_rate(
    rate: float, burst: int, arrivals: list[float]
) -> None:
    bucket = TokenBucket(rate, burst)
    used = sorted(at + bucket.reserve(at) for at in sorted(arrivals))
    # Over any window [first, t], the sends it let out fit in burst + rate * (t - first).
    for n, at in enumerate(used):
        assert n + 1 <= burst + rate * (at - used[0]) + 1e-6


def test_a_quiet_bucket_lets_its_burst_out_at_once_then_paces() -> None:
    bucket = TokenBucket(rate=10, burst=3)
    assert [bucket.reserve(100.0) for _ in range(5)] == pytest.approx([0, 0, 0, 0.1, 0.2])


def test_take_books_nothing_when_no_token_is_free() -> None:
    bucket = TokenBucket(rate=1, burst=2)
    assert bucket.take(0.0) and bucket.take(0.0)
    assert not bucket.take(0.0) and not bucket.take(0.5)
    assert bucket.take(1.0)
    assert not bucket.full(1.0) and bucket.full(5.0)


def test_a_hold_delays_every_later_token() -> None:
    bucket = TokenBucket(rate=100, burst=10)
    bucket.hold(50.0, 2.0)
    assert bucket.reserve(50.0) == pytest.approx(2.0)
    assert bucket.reserve(50.0) == pytest.approx(2.01)  # it starts empty


@pytest.mark.parametrize(("rate", "burst"), [(0, 1), (1, 0)])
def test_a_bucket_needs_a_rate_and_a_burst(rate: float, burst: float) -> None:
    with pytest.raises(ValueError, match="rate"):
        TokenBucket(rate, burst)


async def test_the_pacer_waits_for_each_slot(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [0.0]
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    monkeypatch.setattr(asyncio, "sleep", sleep)
    pacer = Pacer(rate=4, burst=1, clock=lambda: now[0])
    for _ in range(3):
        await pacer.slot()
    pacer.hold(1.0)
    await pacer.slot()
    assert waits == pytest.approx([0.25, 0.5, 1.0])
