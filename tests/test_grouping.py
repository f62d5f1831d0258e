"""Group commit (`whatslike.grouping.Grouped`): callers that arrive together share one
call, each gets its own answer in order, a failure reaches every caller of that call."""

from __future__ import annotations

import asyncio

import pytest

from whatslike.grouping import Grouped


class Recorder:
    def __init__(self, fail_first: bool = False) -> None:
        self.calls: list[list[int]] = []
        self.fail_first = fail_first
        self.release = asyncio.Event()
        self.called = asyncio.Event()

    async def many(self, items: list[int]) -> list[str]:
        self.calls.append(items)
        self.called.set()
        await self.release.wait()
        if self.fail_first and len(self.calls) == 1:
            raise RuntimeError("store down")
        return [f"r{item}" for item in items]


async def test_callers_waiting_on_a_running_call_share_the_next_one() -> None:
    recorder = Recorder()
    grouped: Grouped[int, str] = Grouped(recorder.many, "test", limit=3)
    grouped.start()
    first = asyncio.create_task(grouped(0))
    await recorder.called.wait()
    rest = [asyncio.create_task(grouped(n)) for n in range(1, 6)]
    await asyncio.sleep(0)
    recorder.release.set()
    answers = await asyncio.gather(first, *rest)
    await grouped.stop()
    assert answers == [f"r{n}" for n in range(6)]
    # The first call ran alone; the five that queued behind it went in calls of at most 3.
    assert recorder.calls == [[0], [1, 2, 3], [4, 5]]


async def test_a_failed_call_fails_each_of_its_callers_and_the_next_call_runs() -> None:
    recorder = Recorder(fail_first=True)
    grouped: Grouped[int, str] = Grouped(recorder.many, "test", limit=10)
    grouped.start()
    callers = [asyncio.create_task(grouped(n)) for n in range(3)]
    await asyncio.sleep(0)
    recorder.release.set()
    outcomes = await asyncio.gather(*callers, return_exceptions=True)
    assert all(isinstance(outcome, RuntimeError) for outcome in outcomes)
    assert await grouped(7) == "r7"
    await grouped.stop()


async def test_stopping_cancels_the_callers_still_queued() -> None:
    recorder = Recorder()
    grouped: Grouped[int, str] = Grouped(recorder.many, "test", limit=10)
    grouped.start()
    running = asyncio.create_task(grouped(0))
    await recorder.called.wait()
    queued = asyncio.create_task(grouped(1))
    await asyncio.sleep(0)
    await grouped.stop()
    for task in (running, queued):
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_not_started_it_calls_one_at_a_time() -> None:
    recorder = Recorder()
    recorder.release.set()
    grouped: Grouped[int, str] = Grouped(recorder.many, "test", limit=10)
    assert list(await asyncio.gather(grouped(1), grouped(2))) == ["r1", "r2"]
    assert recorder.calls == [[1], [2]]


async def test_many_items_of_one_caller_share_calls_with_others_and_keep_their_order() -> None:
    recorder = Recorder()
    grouped: Grouped[int, str] = Grouped(recorder.many, "test", limit=4)
    grouped.start()
    first = asyncio.create_task(grouped(0))
    await recorder.called.wait()
    batch = asyncio.create_task(grouped.many([1, 2, 3]))
    other = asyncio.create_task(grouped.many([10, 11, 12]))
    await asyncio.sleep(0)
    recorder.release.set()
    answers = await asyncio.gather(batch, other)
    assert await first == "r0"
    await grouped.stop()
    assert list(answers) == [["r1", "r2", "r3"], ["r10", "r11", "r12"]]
    # Both lists queued behind the running call; the next calls take them in order.
    assert recorder.calls == [[0], [1, 2, 3, 10], [11, 12]]
