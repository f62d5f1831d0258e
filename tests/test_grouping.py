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


async def answered(call: asyncio.Task[str]) -> str:
    """The caller's answer; a Grouped whose task has died would leave it waiting for ever,
    so the wait is bounded (a failure, never a pass, when it runs out)."""
    async with asyncio.timeout(10):
        return await call


async def test_a_batch_whose_callers_were_all_cancelled_is_skipped_and_later_callers_served() -> (
    None
):
    recorder = Recorder()
    grouped: Grouped[int, str] = Grouped(recorder.many, "test", limit=10)
    grouped.start()
    running = asyncio.create_task(grouped(0))
    await recorder.called.wait()
    gone = [asyncio.create_task(grouped(n)) for n in (1, 2)]
    await asyncio.sleep(0)  # both are queued behind the running call
    for task in gone:
        task.cancel()
    await asyncio.gather(*gone, return_exceptions=True)
    recorder.release.set()
    assert await answered(running) == "r0"
    # The next batch held only cancelled callers: no call for it, and the task goes on.
    assert await answered(asyncio.create_task(grouped(3))) == "r3"
    await grouped.stop()
    assert recorder.calls == [[0], [3]]


async def test_cancelled_callers_are_left_out_of_the_call_the_others_share() -> None:
    recorder = Recorder()
    grouped: Grouped[int, str] = Grouped(recorder.many, "test", limit=10)
    grouped.start()
    running = asyncio.create_task(grouped(0))
    await recorder.called.wait()
    callers = [asyncio.create_task(grouped(n)) for n in (1, 2, 3)]
    await asyncio.sleep(0)
    callers[1].cancel()
    recorder.release.set()
    assert await answered(running) == "r0"
    assert [await answered(callers[0]), await answered(callers[2])] == ["r1", "r3"]
    await grouped.stop()
    assert recorder.calls == [[0], [1, 3]]


@pytest.mark.parametrize("fail", [False, True])
async def test_a_caller_cancelled_during_its_call_does_not_stop_the_task(fail: bool) -> None:
    recorder = Recorder(fail_first=fail)
    grouped: Grouped[int, str] = Grouped(recorder.many, "test", limit=10)
    grouped.start()
    leaving = asyncio.create_task(grouped(0))
    staying = asyncio.create_task(grouped(1))
    await recorder.called.wait()
    leaving.cancel()
    await asyncio.gather(leaving, return_exceptions=True)
    recorder.release.set()
    if fail:
        with pytest.raises(RuntimeError, match="store down"):
            await answered(staying)
    else:
        assert await answered(staying) == "r1"
    # The answer for the cancelled caller had nowhere to go; the task still serves.
    assert await answered(asyncio.create_task(grouped(2))) == "r2"
    await grouped.stop()
    assert recorder.calls == [[0, 1], [2]]


async def test_many_before_start_is_one_call_with_every_item() -> None:
    recorder = Recorder()
    recorder.release.set()
    grouped: Grouped[int, str] = Grouped(recorder.many, "test", limit=2)
    assert await grouped.many([1, 2, 3]) == ["r1", "r2", "r3"]
    assert await grouped.many([]) == []
    assert recorder.calls == [[1, 2, 3], []]


async def test_calls_after_stop_are_made_one_at_a_time_as_before_start() -> None:
    recorder = Recorder()
    recorder.release.set()
    grouped: Grouped[int, str] = Grouped(recorder.many, "test", limit=10)
    grouped.start()
    assert await answered(asyncio.create_task(grouped(0))) == "r0"
    await grouped.stop()
    assert list(await asyncio.gather(grouped(1), grouped(2))) == ["r1", "r2"]
    assert await grouped.many([3, 4]) == ["r3", "r4"]
    assert recorder.calls == [[0], [1], [2], [3, 4]]
    await grouped.stop()  # a second stop is harmless


async def test_stop_before_start_is_harmless() -> None:
    recorder = Recorder()
    recorder.release.set()
    grouped: Grouped[int, str] = Grouped(recorder.many, "test", limit=10)
    await grouped.stop()
    assert await grouped(5) == "r5"


async def test_a_full_queue_holds_the_next_caller_until_there_is_room() -> None:
    recorder = Recorder()
    grouped: Grouped[int, str] = Grouped(recorder.many, "test", limit=2)
    grouped.start()
    running = asyncio.create_task(grouped(0))
    await recorder.called.wait()
    queued = [asyncio.create_task(grouped(n)) for n in (1, 2, 3)]
    await asyncio.sleep(0)
    # Two fit in the queue; the third caller waits for room, not yet queued.
    assert [task.done() for task in queued] == [False, False, False]
    recorder.release.set()
    assert [await answered(task) for task in (running, *queued)] == ["r0", "r1", "r2", "r3"]
    await grouped.stop()
    assert recorder.calls == [[0], [1, 2], [3]]


@pytest.mark.parametrize("extra", [-1, 1])
async def test_a_call_answering_the_wrong_number_of_results_fails_its_callers_only(
    extra: int,
) -> None:
    calls: list[list[int]] = []

    async def miscounting(items: list[int]) -> list[str]:
        calls.append(items)
        answers = [f"r{item}" for item in items]
        if len(calls) > 1:
            return answers
        return answers[:-1] if extra < 0 else [*answers, "spare"]

    grouped: Grouped[int, str] = Grouped(miscounting, "test", limit=10)
    grouped.start()
    callers = [asyncio.create_task(grouped(n)) for n in (1, 2)]
    for caller in callers:
        with pytest.raises(ValueError, match="zip"):
            await answered(caller)
    # The task lives on: the next call is made and answered.
    assert await answered(asyncio.create_task(grouped(3))) == "r3"
    await grouped.stop()


async def test_the_task_carries_its_name_and_stop_waits_for_its_end() -> None:
    recorder = Recorder()
    recorder.release.set()
    grouped: Grouped[int, str] = Grouped(recorder.many, "store-writes", limit=10)
    grouped.start()
    [task] = [t for t in asyncio.all_tasks() if t.get_name() == "store-writes"]
    await grouped.stop()
    assert task.done()
