"""Group commit: callers that arrive while a store transaction runs share the next one.

Each caller hands one item and waits for its own answer; one task takes everything
queued (at most `limit`) and makes one call with it. At low load a call carries one item
and nothing waits for a timer; under load a call carries many, so the per-transaction
costs (a thread hop, a commit, a round trip) are paid once for all of them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

A = TypeVar("A")
R = TypeVar("R")


class Failed:
    """What one item of a group raised when the others went on (its own changes undone):
    the answer its caller gets instead of a result, to raise as its own error."""

    __slots__ = ("error",)

    def __init__(self, error: Exception) -> None:
        self.error = error


class Grouped(Generic[A, R]):
    """`many` answers one result per item, in order; if it raises, every caller of that
    call gets the exception. The queue holds at most `limit` items: a caller finding it
    full waits for room (backpressure onto whoever calls: a bus consumer, a request)."""

    def __init__(
        self, many: Callable[[list[A]], Awaitable[list[R]]], name: str, limit: int
    ) -> None:
        self._many = many
        self._name = name
        self._limit = limit
        self._queue: asyncio.Queue[tuple[A, asyncio.Future[R]]] = asyncio.Queue(maxsize=limit)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=self._name)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        while not self._queue.empty():
            _, waiting = self._queue.get_nowait()
            waiting.cancel()

    async def __call__(self, item: A) -> R:
        if self._task is None:  # not started (a bare role in a test): one at a time
            return (await self._many([item]))[0]
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        await self._queue.put((item, future))
        return await future

    async def many(self, items: Sequence[A]) -> list[R]:
        """Each item's result, in order, as if each were handed by `__call__`: queued
        together, they share calls with other callers' items (or span consecutive calls)."""
        if self._task is None:  # not started: one call
            return await self._many(list(items))
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[R]] = []
        for item in items:
            futures.append(loop.create_future())
            await self._queue.put((item, futures[-1]))
        return list(await asyncio.gather(*futures))

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            # Let the callers that are ready now add theirs before the call is made.
            await asyncio.sleep(0)
            while len(batch) < self._limit and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            live = [(item, future) for item, future in batch if not future.done()]
            if not live:
                continue
            try:
                results = await self._many([item for item, _ in live])
                # A result too many or too few fails the call's callers (ValueError), as
                # any failure of `many` does, rather than ending this task.
                answers = list(zip(live, results, strict=True))
            except asyncio.CancelledError:
                for _, future in live:  # stopped mid-call: its callers must not wait on
                    future.cancel()
                raise
            except Exception as exc:
                for _, future in live:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future), result in answers:
                if not future.done():
                    future.set_result(result)
