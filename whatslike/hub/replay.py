"""Replays: what a client missed, read from the store and merged, by seq, with the live
frames that come meanwhile. A `subscribe` (with `since`: the frames after it; without:
only the seq to go on from) registers the subscription before the store is read, so
nothing published during the read is lost: such frames are held and merged. After a
fan-out gap, or a hole in a subscription's seqs, every subscription concerned is read
again the same way; what cannot be given whole is answered `recovered: false`."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Final

from whatslike.events import status_channel
from whatslike.grouping import Grouped
from whatslike.hub import frames
from whatslike.hub.connection import INTERNAL_ERROR, Connection, Reply, Subscription
from whatslike.hub.delivery import status_seq
from whatslike.hub.frames import Subscribe
from whatslike.store.base import Changes, SubscriptionRead

if TYPE_CHECKING:
    from whatslike.hub.server import Hub

logger = logging.getLogger(__name__)

#: Most subscribes read from the store in one call.
READ_BATCH: Final = 256

#: Store reads in flight at once while re-reading subscriptions after a fan-out gap.
RECOVERY_READS: Final = 8


def settle(subscription: Subscription, replayed: Iterable[str]) -> list[str]:
    """End a store read: the replayed and the held live frames to send, in seq order,
    each once; the subscription is live again."""
    pairs = [(status_seq(text), text) for text in replayed]
    held, subscription.held = subscription.held or [], None
    following: list[str] = []
    for seq, text in [*pairs, *sorted(held, key=lambda pair: pair[0])]:
        if seq is not None and seq > subscription.high_seq:
            following.append(text)
            subscription.high_seq = seq
    return following


class Replays:
    """Answers subscribes and recovers subscriptions (see the module's docstring)."""

    def __init__(self, hub: Hub) -> None:
        self._hub = hub
        self._settings = hub.settings
        self._store = hub.store
        #: Subscribes' store reads: those that wait meanwhile share the next store call.
        self._reads: Grouped[SubscriptionRead, Changes | None] = Grouped(
            self._read_many, "hub-subscribe-reads", READ_BATCH
        )

    def start(self) -> None:
        self._reads.start()

    async def stop(self) -> None:
        await self._reads.stop()

    async def subscribe(self, conn: Connection, frame: Subscribe) -> None:
        """Answer a subscribe: `subscribed`, then the replay (both one Reply)."""
        conversation_id = frame.conversation_id
        if not self._hub.registry.subscribe(conn.id, conversation_id):
            self._hub.refuse_request(
                conn,
                "too_many_subscriptions",
                f"a connection may follow at most {self._settings.max_subscriptions} conversations",
                frame.ref,
            )
            return
        # Registered before the store is read, so nothing published meanwhile is missed:
        # such frames are held and merged with the replay by seq.
        subscription = Subscription(frame.since or 0, held=[])
        replaced = conn.subscriptions.get(conversation_id)
        conn.subscriptions[conversation_id] = subscription
        # Heard from here on (or a gap is announced later), so the read below is enough.
        await self._hub.fanout.add(status_channel(conversation_id))
        # One read: the conversation is the organization's, and what the client missed
        # (without `since`, it loaded the conversation itself: only what comes after the
        # seq read now is news; what comes meanwhile is held).
        changes = await self._reads(
            SubscriptionRead(conn.identity.org_id, conversation_id, frame.since)
        )
        if conn.subscriptions.get(conversation_id) is not subscription:
            return  # evicted, or unsubscribed by a later frame: the answer is moot
        if changes is None:
            if replaced is None:
                del conn.subscriptions[conversation_id]
                if self._hub.registry.unsubscribe(conn.id, conversation_id):
                    self._hub.release((conversation_id,))
            else:
                conn.subscriptions[conversation_id] = replaced
            self._hub.refuse_request(
                conn, "forbidden", f"conversation {conversation_id!r} is not available", frame.ref
            )
            return
        if frame.since is None or not changes.complete:
            # Without `since`: live frames go on from the seq read. Incomplete: the client
            # must reload over HTTP, and live frames go on from the store's seq, which may
            # be below `since` (a client that outlived a store reset).
            subscription.high_seq = changes.last_seq
        following = settle(subscription, changes.frames)
        self._hub.delivery.answer(
            conn,
            Reply(
                frames.subscribed(conversation_id, changes.last_seq, changes.complete, frame.ref),
                tuple(following),
            ),
        )
        if subscription.gap:
            self._hub.spawn(self.recover(conn, conversation_id))

    async def _read_many(self, reads: list[SubscriptionRead]) -> list[Changes | None]:
        return await self._store.subscription_changes(reads, self._settings.replay_limit)

    # Fan-out gaps: the link to the fan-out broke, so statuses may have been missed.

    def on_gap(self) -> None:
        """Re-read every live subscription from the store and send what it missed."""
        connections = self._hub.connections.values()
        pending = [(conn, cid) for conn in connections for cid in conn.subscriptions]
        self._hub.spawn(self._recover_all(pending))

    async def _recover_all(self, pending: list[tuple[Connection, str]]) -> None:
        async def reader() -> None:
            while pending:
                conn, conversation_id = pending.pop()
                await self.recover(conn, conversation_id)

        await asyncio.gather(*(reader() for _ in range(RECOVERY_READS)))

    async def recover(self, conn: Connection, conversation_id: str, hole: bool = False) -> None:
        """Send one subscription what the store has after its last frame, merged with the
        live frames that come meanwhile; when that cannot be complete, tell the client to
        reload (`subscribed` with `recovered: false`, as for a `since` beyond the store).
        `hole`: called for a live frame past a missing seq, already held."""
        subscription = conn.subscriptions.get(conversation_id)
        if subscription is None:
            return
        if subscription.held is not None and not hole:
            subscription.gap = True  # the read in flight may predate the gap: it calls back
            return
        while True:
            subscription.gap = False
            if subscription.held is None:
                subscription.held = []
            try:
                changes = await self._store.changes_since(
                    conversation_id, subscription.high_seq, self._settings.replay_limit
                )
            except Exception:
                logger.exception("connection %s: store read after a fan-out gap failed", conn.id)
                # The client reconnects and recovers with `since`.
                self._hub.evict(conn, INTERNAL_ERROR, "internal error")
                return
            if conn.subscriptions.get(conversation_id) is not subscription:
                return  # unsubscribed or evicted meanwhile
            if not changes.complete:
                subscription.high_seq = changes.last_seq
                reload = frames.subscribed(conversation_id, changes.last_seq, False)
                self._hub.delivery.answer(conn, Reply(reload, tuple(settle(subscription, ()))))
            else:
                missed = settle(subscription, changes.frames)
                if missed:  # a Reply, so a long catch-up does not count against the bound
                    self._hub.delivery.answer(conn, Reply(missed[0], tuple(missed[1:])))
            if not subscription.gap:
                return
