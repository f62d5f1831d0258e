"""Concurrency by key (whatslike/bus/lanes.py): many keys at once, each key in order, a
bounded window, and commits that never pass an unfinished record."""

from __future__ import annotations

import asyncio
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from whatslike.bus.lanes import Lanes, Offsets


async def feed(lanes: Lanes[tuple[str, int]], items: list[tuple[str, int]]) -> None:
    for key, n in items:
        await lanes.reserve()
        lanes.add(key, (key, n))


@given(
    st.lists(st.tuples(st.sampled_from("abcdef"), st.integers(0, 3)), max_size=60),
    st.integers(1, 8),
    st.integers(0, 2**32 - 1),
)
def test_each_key_in_order_at_most_the_window_at_work_everything_handled(
    plan: list[tuple[str, int]], window: int, seed: int
) -> None:
    async def run() -> None:
        rng = random.Random(seed)
        items = [(key, n) for n, (key, _) in enumerate(plan)]
        handled: list[tuple[str, int]] = []
        at_work = most = 0

        async def handle(item: tuple[str, int]) -> None:
            nonlocal at_work, most
            at_work += 1
            most = max(most, at_work)
            for _ in range(rng.randint(0, 3)):
                await asyncio.sleep(0)
            handled.append(item)
            at_work -= 1

        lanes = Lanes(window, handle, "test")
        await feed(lanes, items)
        await lanes.drain()
        assert sorted(handled) == sorted(items)
        for key in "abcdef":
            assert [n for k, n in handled if k == key] == [n for k, n in items if k == key]
        assert most <= window
        assert lanes.busy == 0

    asyncio.run(run())


async def test_a_key_that_waits_does_not_hold_up_other_keys() -> None:
    release = asyncio.Event()
    handled: list[str] = []

    async def handle(item: tuple[str, int]) -> None:
        if item == ("slow", 0):
            await release.wait()
        handled.append(f"{item[0]}{item[1]}")
        if item == ("fast", 2):
            release.set()  # only reachable while slow0 still waits

    lanes = Lanes(8, handle, "test")
    await feed(lanes, [("slow", 0), ("slow", 1), ("fast", 0), ("fast", 1), ("fast", 2)])
    async with asyncio.timeout(5):
        await lanes.drain()
    assert handled == ["fast0", "fast1", "fast2", "slow0", "slow1"]


async def test_the_window_bounds_what_is_taken() -> None:
    release = asyncio.Event()

    async def handle(item: tuple[str, int]) -> None:
        await release.wait()

    lanes = Lanes(3, handle, "test")
    await feed(lanes, [("a", 0), ("b", 1), ("a", 2)])
    assert lanes.busy == 3
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            await lanes.reserve()
    release.set()
    await lanes.drain()
    await lanes.reserve()  # room again
    lanes.unreserve()


async def test_a_handler_that_raises_is_reported_and_its_lane_goes_on() -> None:
    handled: list[int] = []

    async def handle(item: tuple[str, int]) -> None:
        if item[1] == 0:
            raise RuntimeError("bug")
        handled.append(item[1])

    lanes = Lanes(4, handle, "test")
    await feed(lanes, [("a", 0), ("a", 1)])
    with pytest.raises(RuntimeError, match="bug"):
        await lanes.drain()
    assert handled == [1]


async def test_cancel_abandons_the_lanes_and_frees_the_window() -> None:
    async def handle(item: tuple[str, int]) -> None:
        await asyncio.Event().wait()

    lanes = Lanes(2, handle, "test")
    await feed(lanes, [("a", 0), ("b", 1)])
    await asyncio.sleep(0)
    await lanes.cancel()
    assert lanes.busy == 0
    async with asyncio.timeout(1):
        await feed(lanes, [("c", 2), ("d", 3)])
    await lanes.cancel()


@given(st.integers(0, 40), st.randoms(use_true_random=False))
def test_done_is_the_oldest_unfinished_offset_in_any_finishing_order(
    count: int, rng: random.Random
) -> None:
    offsets = Offsets()
    assert offsets.done is None
    start = 100
    for offset in range(start, start + count):
        offsets.take(offset)
    order = list(range(start, start + count))
    rng.shuffle(order)
    finished: set[int] = set()
    for offset in order:
        offsets.finish(offset)
        finished.add(offset)
        unfinished = [o for o in range(start, start + count) if o not in finished]
        assert offsets.done == (min(unfinished) if unfinished else start + count)


def test_offsets_are_taken_in_order() -> None:
    offsets = Offsets()
    offsets.take(5)
    with pytest.raises(ValueError, match="taken after"):
        offsets.take(4)
