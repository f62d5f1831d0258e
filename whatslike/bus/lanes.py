"""Concurrency by key inside one partition: many conversations at once, each in order.

A partition is a unit of assignment, not of concurrency: its consumer hands each event to
the *lane* of its key (the conversation). A lane handles its events one after the other,
in the order they were handed in; lanes run concurrently. At most `window` events are
taken and unfinished at once (in a lane's queue or at work); a consumer reserves a place before it
takes the next event from the partition's own bounded buffer, which holds the rest.

`Offsets` says how far a partition is done when its records finish out of order: up to
(not including) the oldest record still unfinished, so a commit never skips one.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

T = TypeVar("T")


class Lanes(Generic[T]):
    """Runs `handle(item)` for items of different keys concurrently, of one key in order.

    `handle` must not raise (the buses catch, retry and dead-letter inside it); should it
    raise anyway, the exception is kept and raised by the next `reserve` or `drain`, and the
    lane goes on with its next item."""

    def __init__(self, window: int, handle: Callable[[T], Awaitable[None]], name: str) -> None:
        if window < 1:
            raise ValueError("window must be at least 1")
        self._handle = handle
        self._name = name
        self._room = asyncio.Semaphore(window)
        self._lanes: dict[Hashable, deque[T]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._failure: BaseException | None = None

    @property
    def busy(self) -> int:
        """Items taken and not finished."""
        return sum(len(queue) for queue in self._lanes.values())

    async def reserve(self) -> None:
        """Wait for a place in the window, before taking the item to `add` from a bounded
        buffer (so nothing is held beyond the buffer and the window)."""
        self._raise_failure()
        await self._room.acquire()

    def unreserve(self) -> None:
        """Give back a place reserved for an item that did not come."""
        self._room.release()

    def add(self, key: Hashable, item: T) -> None:
        """Hand `item` to `key`'s lane, into the place `reserve` gave."""
        queue = self._lanes.get(key)
        if queue is not None:
            queue.append(item)  # its lane's task is at work and will take it
            return
        self._lanes[key] = deque([item])
        self._idle.clear()
        task = asyncio.create_task(self._run(key), name=f"{self._name}-lane")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain(self) -> None:
        """Wait until every item handed in is finished."""
        await self._idle.wait()
        self._raise_failure()

    async def cancel(self) -> None:
        """Abandon every lane: their items are dropped unfinished (whoever handed them in
        redelivers them: the outbox, or the uncommitted offsets)."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for _ in range(self.busy):
            self._room.release()
        self._lanes.clear()
        self._idle.set()

    async def _run(self, key: Hashable) -> None:
        queue = self._lanes[key]
        while queue:
            try:
                await self._handle(queue[0])
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._failure = exc
            queue.popleft()
            self._room.release()
        del self._lanes[key]
        if not self._lanes:
            self._idle.set()

    def _raise_failure(self) -> None:
        failure, self._failure = self._failure, None
        if failure is not None:
            raise failure


class Offsets:
    """Records taken in offset order and finished in any order: `done` is the offset of
    the oldest one unfinished (all before it are finished), or one past the last taken."""

    def __init__(self) -> None:
        self._taken: deque[int] = deque()
        self._finished: set[int] = set()
        self._next: int | None = None

    @property
    def done(self) -> int | None:
        if self._taken:
            return self._taken[0]
        return self._next

    def take(self, offset: int) -> None:
        if self._next is not None and offset < self._next:
            raise ValueError(f"offset {offset} taken after {self._next - 1}")
        self._taken.append(offset)
        self._next = offset + 1

    def finish(self, offset: int) -> None:
        self._finished.add(offset)
        while self._taken and self._taken[0] in self._finished:
            self._finished.discard(self._taken.popleft())
