"""The simulator's webhook schedule, kept on disk as Meta keeps its own.

Every planned webhook delivery and every accepted send is written to one SQLite file
(WAL) in one transaction before the send is answered; a delivery is deleted once the
connector answered it with a 2xx. Sends answered at the same time share one transaction
(a group commit, whatslike/grouping.py), and so do the deletes: under load one sync
serves many sends instead of each waiting its turn for its own. A restarted simulator
loads what is pending and goes on retrying. An in-memory heap indexes what is due next;
it is bounded by the number of pending deliveries, and a send whose webhooks do not fit
is refused before it is accepted, so nothing accepted is ever dropped. Due times are
wall-clock (Unix) seconds, so they keep their meaning across a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import random
import sqlite3
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiosqlite

from whatslike.errors import BackendUnavailable
from whatslike.grouping import Grouped

log = logging.getLogger(__name__)

#: Meta retries an unanswered webhook with decreasing frequency for up to 7 days.
RETRY_BASE_S = 0.5
RETRY_CAP_S = 60.0
RETRY_HORIZON_S = 7 * 24 * 3600.0
#: Sends (or settled webhooks) written in one transaction at most.
GROUP_LIMIT = 256

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS deliveries (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        channel TEXT NOT NULL,
        body BLOB NOT NULL,
        first_due REAL NOT NULL,
        due REAL NOT NULL,
        failures INTEGER NOT NULL DEFAULT 0
    )""",
    """CREATE TABLE IF NOT EXISTS sends (
        key TEXT PRIMARY KEY,
        count INTEGER NOT NULL
    )""",
)


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential back-off with jitter: from `base_s` doubling up to `cap_s`, for at most
    `horizon_s` after the first attempt; every duration is multiplied by `scale`."""

    base_s: float = RETRY_BASE_S
    cap_s: float = RETRY_CAP_S
    horizon_s: float = RETRY_HORIZON_S
    scale: float = 1.0

    def ceiling(self, failures: int) -> float:
        """The delay before jitter after the `failures`-th failed attempt (1, 2, ...)."""
        # 2.0 ** 1024 overflows; by then any base has long reached the cap.
        doubled = self.base_s * 2.0 ** min(max(failures - 1, 0), 1023)
        return self.scale * min(self.cap_s, doubled)

    def deadline(self, first_due: float) -> float:
        """The last moment an attempt is made for a delivery first due at `first_due`."""
        return first_due + self.scale * self.horizon_s

    def next_due(
        self, first_due: float, now: float, failures: int, rng: random.Random
    ) -> float | None:
        """When to try again after the `failures`-th attempt failed at `now`: a uniform
        draw from the upper half of the ceiling, never past the deadline; None (give up)
        once an attempt at or after the deadline failed."""
        deadline = self.deadline(first_due)
        if now >= deadline:
            return None
        ceiling = self.ceiling(failures)
        return min(deadline, now + rng.uniform(ceiling / 2, ceiling))


@dataclass(order=True)
class Delivery:
    """One webhook POST, due at `due` (Unix seconds); the row id keeps plan order on ties."""

    due: float
    id: int
    channel: str = field(compare=False)
    body: bytes = field(compare=False, repr=False)
    first_due: float = field(compare=False)
    failures: int = field(default=0, compare=False)


@dataclass(frozen=True, slots=True)
class Planned:
    """A webhook a send produces, before it is stored."""

    due: float
    channel: str
    body: bytes


class WebhookSchedule:
    """Pending webhook deliveries and the count of accepted sends, in `path`."""

    def __init__(self, path: Path, capacity: int) -> None:
        self.path = path
        self.capacity = capacity
        self._db: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()  # one connection: one transaction at a time
        self._heap: list[Delivery] = []
        self._pending = 0  # stored and not yet settled: queued, in flight or waiting
        self._wakeup = asyncio.Event()
        #: The next delivery's row id: ids are given here, so a group's rows go in with one
        #: `executemany` (no RETURNING per row), in the order of the calls.
        self._next_id = 1
        self._accepts = Grouped(self._accept_many, "sim-accepts", GROUP_LIMIT)
        self._settles = Grouped(self._settle_many, "sim-settles", GROUP_LIMIT)

    @property
    def pending(self) -> int:
        return self._pending

    async def open(self) -> int:
        """Open (or create) the file and queue every pending delivery; how many."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = await aiosqlite.connect(self.path, isolation_level=None)
        except (OSError, sqlite3.Error) as exc:
            raise BackendUnavailable(f"cannot open simulator database {self.path}: {exc}") from exc
        self._db = db
        try:
            await db.execute("PRAGMA journal_mode = WAL")
            async with self._transaction() as tx:
                for statement in _SCHEMA:
                    await tx.execute(statement)
                rows = await tx.execute_fetchall(
                    "SELECT id, channel, body, first_due, due, failures FROM deliveries"
                )
                # AUTOINCREMENT's counter: never an id given before, settled or not.
                [(last,)] = await tx.execute_fetchall(
                    "SELECT coalesce(max(seq), 0) FROM sqlite_sequence WHERE name = 'deliveries'"
                )
        except (sqlite3.Error, BackendUnavailable) as exc:
            self._db = None
            await db.close()
            raise BackendUnavailable(f"cannot open simulator database {self.path}: {exc}") from exc
        self._heap = [
            Delivery(due, id_, channel, bytes(body), first_due, failures)
            for id_, channel, body, first_due, due, failures in rows
        ]
        heapq.heapify(self._heap)
        self._pending = len(self._heap)
        self._next_id = int(last) + 1
        self._accepts.start()
        self._settles.start()
        self._wakeup.set()
        return self._pending

    async def close(self) -> None:
        await self._accepts.stop()
        await self._settles.stop()
        if self._db is not None:
            async with self._lock:
                db, self._db = self._db, None
                await db.close()

    async def accept(
        self, send_key: str | None, planned: Sequence[Planned]
    ) -> list[Delivery] | None:
        """Store one send (counted under `send_key`; None: a customer's message, no send)
        and its deliveries in one transaction (shared with the sends accepted at the same
        time); None when they do not fit (nothing stored). The deliveries are not queued:
        `put` them. Raises BackendUnavailable when the file cannot be written (nothing of
        the group stored). A caller cancelled while its group commits may find its send
        stored all the same: it then goes out after a restart, as a send Meta took before
        the client hung up would."""
        if self._pending + len(planned) > self.capacity:
            return None
        self._pending += len(planned)
        deliveries = [
            Delivery(plan.due, self._next_id + n, plan.channel, plan.body, plan.due)
            for n, plan in enumerate(planned)
        ]
        self._next_id += len(planned)
        try:
            await self._accepts((send_key, deliveries))
        except BaseException:
            self._pending -= len(planned)
            raise
        return deliveries

    async def _accept_many(self, sends: list[tuple[str | None, list[Delivery]]]) -> list[None]:
        async with self._transaction() as db:
            await db.executemany(
                "INSERT INTO sends (key, count) VALUES (?, 1)"
                " ON CONFLICT (key) DO UPDATE SET count = count + 1",
                [(key,) for key, _ in sends if key is not None],
            )
            await db.executemany(
                "INSERT INTO deliveries (id, channel, body, first_due, due) VALUES (?, ?, ?, ?, ?)",
                [(d.id, d.channel, d.body, d.due, d.due) for _, group in sends for d in group],
            )
        return [None] * len(sends)

    def put(self, delivery: Delivery) -> None:
        """Queue a stored delivery for its due time."""
        heapq.heappush(self._heap, delivery)
        self._wakeup.set()

    async def take(self) -> Delivery:
        """The earliest delivery, once it is due."""
        while True:
            wait: float | None = None
            if self._heap:
                wait = self._heap[0].due - time.time()
                if wait <= 0:
                    return heapq.heappop(self._heap)
            # No await between the check above and clear(): a put() cannot be missed.
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._wakeup.wait()

    def take_due(self, first: Delivery, limit: int) -> list[Delivery]:
        """`first` and the deliveries of its channel due now behind it in the heap, up to
        `limit` in all: what Meta would put in one webhook."""
        taken = [first]
        now = time.time()
        while (
            len(taken) < limit
            and self._heap
            and self._heap[0].due <= now
            and self._heap[0].channel == first.channel
        ):
            taken.append(heapq.heappop(self._heap))
        return taken

    async def settle(self, deliveries: Sequence[Delivery]) -> None:
        """The deliveries are done (answered 2xx, or given up): delete them, free their
        places."""
        try:
            await self._settles.many([d.id for d in deliveries])
        except BackendUnavailable as exc:
            # At least once: the rows stay and are posted again after a restart.
            log.error("simulator could not delete delivered webhooks: %s", exc)
        finally:
            # After the write: no pending delivery means none left on disk either.
            self._pending -= len(deliveries)

    async def _settle_many(self, ids: list[int]) -> list[None]:
        async with self._transaction() as db:
            await db.executemany("DELETE FROM deliveries WHERE id = ?", [(i,) for i in ids])
        return [None] * len(ids)

    async def retry(self, delivery: Delivery) -> None:
        """Store the delivery's new due time and failure count, and queue it again."""
        try:
            async with self._transaction() as db:
                await db.execute(
                    "UPDATE deliveries SET due = ?, failures = ? WHERE id = ?",
                    (delivery.due, delivery.failures, delivery.id),
                )
        except BackendUnavailable as exc:
            # The stored row keeps its earlier due time: a restart retries it sooner.
            log.error("simulator could not store a webhook's next attempt: %s", exc)
        self.put(delivery)

    async def sends(self) -> dict[str, Any]:
        """How many sends were accepted, under how many keys, and the keys sent twice or
        more (with their counts)."""
        async with self._transaction() as db:
            [(keys, total)] = await db.execute_fetchall(
                "SELECT count(*), coalesce(sum(count), 0) FROM sends"
            )
            repeated = await db.execute_fetchall(
                "SELECT key, count FROM sends WHERE count > 1 ORDER BY key"
            )
        duplicates = {key: count for key, count in repeated}
        return {"sends": total, "keys": keys, "duplicates": duplicates}

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        async with self._lock:
            if self._db is None:
                raise BackendUnavailable(f"simulator database {self.path} is not open")
            db = self._db
            try:
                await db.execute("BEGIN IMMEDIATE")
                yield db
                await db.execute("COMMIT")
            except BaseException as exc:
                # Also when cancelled: a BEGIN still queued in aiosqlite's thread runs
                # first, and no later transaction finds this one open.
                await _rollback(db)
                if isinstance(exc, sqlite3.Error):
                    raise BackendUnavailable(f"simulator database {self.path}: {exc}") from exc
                raise


async def _rollback(db: aiosqlite.Connection) -> None:
    with contextlib.suppress(sqlite3.Error):  # none open: SQLite undid it, or it committed
        await db.execute("ROLLBACK")
