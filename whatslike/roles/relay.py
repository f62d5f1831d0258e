"""The outbox relay: moves the store's hand-offs to the bus, at least once, oldest first.

Whatever the API answered 202 for and whatever a webhook answered 200 for is an outbox
entry in the store before the answer. The relay publishes each entry; then

- on a durable bus (Kafka: `publish` returns once the broker stored it) the relays of
  all processes claim entries with a lease (so each is published by one of them), and an
  entry is deleted once published: the bus keeps it from there on;
- on the in-process bus, which keeps nothing across a crash, the entry is only marked as
  relayed by this run, and stays until the work it stands for is stored downstream (the
  connector finished with the send, the status worker applied the status). A process
  that starts has a new run id, so it relays every entry left by the one before.

Consumers are idempotent (sends are claimed in the store, statuses are matched by event
id), so relaying an entry twice is harmless. The rule is the same for every bus: an
entry leaves the outbox only when something durable holds its work.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random

from whatslike.bus import BusFull, PublishIncomplete
from whatslike.bus.memory import backoff_delay
from whatslike.errors import WhatslikeError
from whatslike.roles import BackgroundRole, Deps
from whatslike.store.base import OutboxEntry

log = logging.getLogger(__name__)

#: Entries read and published per round trip to the store.
BATCH = 200
#: How long a relay's claim on entries holds (durable bus): another process's relay takes
#: them over after that, should this one have died between the claim and the publish.
CLAIM_LEASE_S = 30.0


class OutboxRelay(BackgroundRole):
    name = "relay"

    def __init__(self, deps: Deps) -> None:
        self._store = deps.store
        self._bus = deps.bus
        self._settings = deps.settings
        self._metrics = deps.metrics
        self._run = deps.relay_run
        self._wake = deps.handoffs
        self._rng = random.Random()

    async def relay_once(self) -> int:
        """Relay one batch; answer how many entries were handed to the bus."""
        if self._bus.durable:
            items = await self._store.claim_outbox(BATCH, CLAIM_LEASE_S)
        else:
            run = self._run.id
            items = await self._store.outbox_batch(run, BATCH)
        handed: list[int] = []
        try:
            await self._bus.publish_many([(item.topic, item.key, item.payload) for item in items])
            handed = [item.id for item in items]
        except PublishIncomplete as exc:
            handed = [item.id for item in items[: exc.taken]]
            raise exc.error from exc
        finally:
            if handed:
                self._metrics.outbox_relayed.inc(len(handed))
                if self._bus.durable:
                    await self._store.delete_outbox(handed)
                else:
                    await self._store.mark_relayed(handed, run)
            if self._bus.durable and len(handed) < len(items):
                await self._store.unclaim_outbox([item.id for item in items[len(handed) :]])
        return len(handed)

    async def run_forever(self) -> None:
        failures = 0
        while True:
            self._wake.clear()
            try:
                moved = await self.relay_once()
            except Exception as exc:
                if not isinstance(exc, WhatslikeError | BusFull):
                    log.exception("outbox relay failed")
                failures += 1
                delay = backoff_delay(
                    failures,
                    self._settings.consumer_backoff_base_s,
                    self._settings.consumer_backoff_cap_s,
                    self._rng,
                )
                log.warning("outbox relay paused %.1f s: %s", delay, exc)
                await asyncio.sleep(delay)
                continue
            failures = 0
            if moved < BATCH:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._settings.relay_poll_s):
                        await self._wake.wait()


#: Hand-offs (one webhook's or one send's) queued for `ClaimedPublisher` at most.
CLAIMED_QUEUE = 1024
#: Hand-offs published together at most (one `publish_many`, one delete).
CLAIMED_BATCH = 256


class ClaimedPublisher:
    """Publishes, in the background, hand-offs this process committed claimed
    (`Store.handoff(claim_s=CLAIM_LEASE_S)`) on a durable bus: right after their commit,
    without waiting for the relay's claim or turn, and without holding up the webhook's
    200 or the send's completion, which the commit alone allows. The hand-offs queued at
    once go out in order in one `publish_many`; those the bus took are then deleted in
    one statement, the others given back at once (the relay publishes them). A hand-off
    not published when this process stops or dies stays claimed until the claim lapses,
    then a relay (of any process) publishes it: nothing committed is lost.

    Bounded: while `CLAIMED_QUEUE` hand-offs wait, `submit` waits (backpressure onto the
    webhook or the send that hands off)."""

    def __init__(self, deps: Deps) -> None:
        self._store = deps.store
        self._bus = deps.bus
        self._metrics = deps.metrics
        self._wake = deps.handoffs
        self._queue: asyncio.Queue[tuple[list[OutboxEntry], list[int]]] = asyncio.Queue(
            CLAIMED_QUEUE
        )
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="claimed-publisher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        left: list[int] = []
        while not self._queue.empty():
            left += self._queue.get_nowait()[1]
        if left:  # the relays take them at once rather than after the lapse
            with contextlib.suppress(WhatslikeError):
                await self._store.unclaim_outbox(left)

    async def submit(self, entries: list[OutboxEntry], ids: list[int]) -> None:
        """Publish committed `entries`, claimed under `ids` (same order)."""
        if self._task is None:  # not started (a bare role in a test): at once
            await self._publish([(entries, ids)])
            return
        await self._queue.put((entries, ids))

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < CLAIMED_BATCH and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            await self._publish(batch)

    async def _publish(self, batch: list[tuple[list[OutboxEntry], list[int]]]) -> None:
        entries = [entry for handed, _ in batch for entry in handed]
        ids = [outbox_id for _, claimed in batch for outbox_id in claimed]
        taken = len(ids)
        try:
            await self._bus.publish_many([(e.topic, e.key, e.payload) for e in entries])
        except Exception as exc:
            taken = exc.taken if isinstance(exc, PublishIncomplete) else 0
            log.warning("hand-offs left to the outbox relay: %s", exc)
        if taken:
            self._metrics.outbox_relayed.inc(taken)
        try:
            # A delete or give-back that fails leaves the entries claimed: a relay
            # publishes them again once the claim lapses (consumers are idempotent).
            if taken:
                await self._store.delete_outbox(ids[:taken])
            if taken < len(ids):
                await self._store.unclaim_outbox(ids[taken:])
                self._wake.set()
        except Exception as exc:
            # Any error, not only ours: this task ending would leave every later hand-off
            # of the process to the lapse. One the store did not map (a bug) is logged with
            # its traceback, as the relay does.
            if not isinstance(exc, WhatslikeError):
                log.exception("hand-offs left in the outbox, claimed")
            else:
                log.warning("hand-offs left in the outbox, claimed: %s", exc)
