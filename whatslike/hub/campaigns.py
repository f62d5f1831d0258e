"""Live campaign counts over `/ws/status` (protocol.md §4): a connection subscribes to a
campaign of its organization and is answered with its counts at once (the snapshot); then
a `campaign` frame follows whenever they moved, at most 1/FRAME_INTERVAL_S a second, and
always one with the final counts once they stop moving.

The fan-out brings hints on `campaign:{id}` (no counts: whoever moved them published
one after the commit). The hub reads the counts from the store once for all its
subscribers of the campaign (coalesce.py decides when), frames them once and writes the
same bytes to each. Every frame carries the counts' version (`whatslike.campaigns.CHANGES`)
and a connection is sent only versions above the highest it was sent, so its counts
never go back. After a fan-out gap every followed campaign is read again."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from whatslike import campaigns
from whatslike.events import campaign_channel
from whatslike.hub import frames
from whatslike.hub.coalesce import Coalescer
from whatslike.hub.connection import Connection, Reply
from whatslike.hub.frames import SubscribeCampaign
from whatslike.hub.registry import SubscriptionRegistry
from whatslike.store.base import Campaign

if TYPE_CHECKING:
    from whatslike.hub.server import Hub

logger = logging.getLogger(__name__)

#: Shortest time between two reads of one campaign's counts in one hub, so at most
#: 1/FRAME_INTERVAL_S `campaign` frames a second per campaign reach a connection.
FRAME_INTERVAL_S: Final = 0.25
#: Campaigns one connection may follow at once.
MAX_CAMPAIGNS: Final = 16
#: A connection's version of a campaign while its subscribe's snapshot is read: no live
#: frame goes to it before the snapshot (which answers the subscribe).
_SNAPSHOT: Final = -1

CHANNEL_PREFIX: Final = campaign_channel("")


def campaign_frame(campaign: Campaign, ref: frames.Ref = None) -> str:
    counts = campaigns.funnel(campaign.total, campaign.created, campaign.counts)
    finished = counts["waiting"] == 0 and counts["queued"] == 0
    return frames.campaign(
        campaign.id,
        version=campaign.version,
        total=campaign.total,
        counts=counts,
        finished=finished,
        ref=ref,
    )


@dataclass(slots=True)
class _Feed:
    """One followed campaign in this hub."""

    #: The organization it is read for: the campaign's, once a subscribe read it.
    org_id: str
    coalescer: Coalescer
    #: The highest version read (and sent to every subscriber below it), and its frame.
    version: int = _SNAPSHOT
    frame: str = ""
    timer: asyncio.TimerHandle | None = None
    #: The last read failed (logged once until one succeeds).
    failing: bool = False


class CampaignFeeds:
    """The hub's campaign subscriptions and their reads (see the module's docstring)."""

    def __init__(self, hub: Hub) -> None:
        self._hub = hub
        self.registry = SubscriptionRegistry(MAX_CAMPAIGNS)
        self._feeds: dict[str, _Feed] = {}

    async def subscribe(self, conn: Connection, frame: SubscribeCampaign) -> None:
        """Answer a subscribe with the campaign's counts now (or `forbidden` when it is
        not one of the connection's organization, exactly as when there is none)."""
        campaign_id = frame.campaign_id
        if not self.registry.subscribe(conn.id, campaign_id):
            self._hub.refuse_request(
                conn,
                "too_many_subscriptions",
                f"a connection may follow at most {MAX_CAMPAIGNS} campaigns",
                frame.ref,
            )
            return
        feed = self._feeds.get(campaign_id)
        if feed is None:
            feed = self._feeds[campaign_id] = _Feed(
                conn.identity.org_id, Coalescer(FRAME_INTERVAL_S)
            )
        conn.campaigns[campaign_id] = _SNAPSHOT
        # Heard before the snapshot is read: a change committed during the read makes the
        # feed read again, and its frame follows the snapshot.
        await self._hub.fanout.add(campaign_channel(campaign_id))
        campaign = await self._hub.store.get_campaign(conn.identity.org_id, campaign_id)
        if conn.campaigns.get(campaign_id) != _SNAPSHOT:
            return  # unsubscribed or evicted meanwhile
        if campaign is None:
            self._drop(conn, campaign_id)
            self._hub.refuse_request(
                conn, "forbidden", f"campaign {campaign_id!r} is not available", frame.ref
            )
            return
        feed.org_id = campaign.org_id
        conn.campaigns[campaign_id] = campaign.version
        self._hub.delivery.answer(conn, Reply(campaign_frame(campaign, frame.ref)))
        if feed.version > campaign.version:  # read by the feed while the snapshot was
            conn.campaigns[campaign_id] = feed.version
            self._hub.delivery.answer(conn, Reply(feed.frame))

    def unsubscribe(self, conn: Connection, campaign_id: str) -> None:
        self._drop(conn, campaign_id)

    def leave(self, conn: Connection) -> None:
        """The connection is gone (closed or evicted): it follows nothing any more."""
        conn.campaigns.clear()
        self._release(self.registry.drop(conn.id))

    def changed(self, channel: str) -> None:
        """A hint from the fan-out: the campaign's counts may have moved."""
        campaign_id = channel[len(CHANNEL_PREFIX) :]
        feed = self._feeds.get(campaign_id)
        if feed is not None:
            self._schedule(campaign_id, feed, feed.coalescer.changed)

    def on_gap(self) -> None:
        """Hints may have been missed: every followed campaign is read again."""
        for campaign_id in list(self._feeds):
            self.changed(campaign_channel(campaign_id))

    def stop(self) -> None:
        for feed in self._feeds.values():
            if feed.timer is not None:
                feed.timer.cancel()
                feed.timer = None

    # -- the reads ----------------------------------------------------------------------

    def _schedule(
        self, campaign_id: str, feed: _Feed, ask: Callable[[float], float | None]
    ) -> None:
        """Ask the feed's coalescer (`changed` or `finished`) and start a read when due."""
        loop = asyncio.get_running_loop()
        delay = ask(loop.time())
        if delay is not None:
            feed.timer = loop.call_later(delay, self._start, campaign_id, feed)

    def _start(self, campaign_id: str, feed: _Feed) -> None:
        feed.timer = None
        if self._feeds.get(campaign_id) is not feed:
            return
        feed.coalescer.started(asyncio.get_running_loop().time())
        self._hub.spawn(self._read(campaign_id, feed))

    async def _read(self, campaign_id: str, feed: _Feed) -> None:
        try:
            campaign = await self._hub.store.get_campaign(feed.org_id, campaign_id)
        except Exception as exc:
            if not feed.failing:
                logger.warning("campaign %s: its counts could not be read (%s)", campaign_id, exc)
            feed.failing = True
            feed.coalescer.changed(asyncio.get_running_loop().time())  # so it is read again
            campaign = None
        else:
            feed.failing = False
        if self._feeds.get(campaign_id) is not feed:
            return  # nobody here follows it any more
        if campaign is not None and campaign.version > feed.version:
            feed.version, feed.frame = campaign.version, campaign_frame(campaign)
            self._send(campaign_id, feed)
        self._schedule(campaign_id, feed, feed.coalescer.finished)

    def _send(self, campaign_id: str, feed: _Feed) -> None:
        """The feed's frame to every subscriber not sent it (or a later one) yet."""
        behind = []
        for conn_id in self.registry.subscribers(campaign_id):
            conn = self._hub.connections.get(conn_id)
            if conn is None:
                continue
            version = conn.campaigns.get(campaign_id, _SNAPSHOT)
            if version != _SNAPSHOT and version < feed.version:
                conn.campaigns[campaign_id] = feed.version
                behind.append(conn)
        self._hub.delivery.broadcast(behind, feed.frame)

    # -- leaving --------------------------------------------------------------------------

    def _drop(self, conn: Connection, campaign_id: str) -> None:
        conn.campaigns.pop(campaign_id, None)
        if self.registry.unsubscribe(conn.id, campaign_id):
            self._release((campaign_id,))

    def _release(self, campaign_ids: Iterable[str]) -> None:
        """Forget the campaigns nobody here follows any more."""
        for campaign_id in campaign_ids:
            if self.registry.subscribers(campaign_id):
                continue
            self._hub.fanout.discard(campaign_channel(campaign_id))
            feed = self._feeds.pop(campaign_id, None)
            if feed is not None and feed.timer is not None:
                feed.timer.cancel()
