"""Delivery of frames to clients: the fan-out's status frames to every subscribed
connection (framed once, the same bytes to every socket), and the hub's replies. A frame
is written straight to a socket that takes writes; behind one that does not it waits in
the connection's backlog, bounded (connection.py), for one drainer task, and a full
backlog, or a socket that takes nothing for the write timeout, closes only its own
connection (4009). Never waits: a slow client holds up nobody."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Iterator
from typing import TYPE_CHECKING, Final

from whatslike.hub import frames
from whatslike.hub.connection import (
    FULL,
    SLOW_CONSUMER,
    Connection,
    Outgoing,
    Reply,
    flush_out,
    size,
)
from whatslike.hub.transport import text_frame

if TYPE_CHECKING:
    from whatslike.hub.server import Hub

logger = logging.getLogger(__name__)

#: Most status frames in one `batch`, so one message stays well under clients' size limits
#: (websockets defaults to 1 MiB) even after a long replay.
MAX_BATCH: Final = 256

_STATUS_PREFIX: Final = "status:"

#: `"seq":<digits>` in a serialized status frame: found without parsing the frame (a JSON
#: string cannot hold an unescaped quote, so this is a key); used only when it occurs once.
_SEQ: Final = re.compile(rb'"seq":(\d+)[,}]')


def status_seq(frame: str | bytes) -> int | None:
    """The `seq` of a serialized status frame, or None when it has none."""
    raw = frame.encode() if isinstance(frame, str) else frame
    found = _SEQ.findall(raw)
    if len(found) == 1:
        return int(found[0])
    try:
        seq = json.loads(frame)["seq"]
    except (ValueError, TypeError, KeyError):
        return None
    if isinstance(seq, int) and not isinstance(seq, bool):
        return seq
    return None


def _batches(status_frames: list[str]) -> Iterator[str]:
    for start in range(0, len(status_frames), MAX_BATCH):
        chunk = status_frames[start : start + MAX_BATCH]
        yield chunk[0] if len(chunk) == 1 else frames.batch(chunk)


def coalesce(items: list[Outgoing]) -> list[str]:
    """The messages to send for queued items, in order: each run of status frames becomes
    one frame or one `batch`; replies stay on their own (a batch holds status frames)."""
    messages: list[str] = []
    run: list[str] = []
    for item in items:
        if isinstance(item, str):
            run.append(item)
            continue
        messages.extend(_batches(run))
        run = list(item.replay)
        messages.append(item.text)
    messages.extend(_batches(run))
    return messages


class Delivery:
    """Writes frames to the hub's connections (see the module's docstring)."""

    def __init__(self, hub: Hub) -> None:
        self._hub = hub
        self._write_timeout_s = hub.settings.write_timeout_s
        self._frames_sent = hub.metrics.ws_frames_sent
        #: Connections with frames in `out`, written at the end of this loop turn.
        self._dirty: list[Connection] = []

    def count(self, frames_written: int = 1) -> None:
        """Frames written to sockets elsewhere (the hub's first frame of each)."""
        self._frames_sent.inc(frames_written)

    def fan_out(self, channel: str, payload: bytes) -> None:
        """Send one status frame to every subscriber, without waiting: it is framed once
        and the same bytes are written to every socket that takes them (the same str
        object waits behind slow ones), and a full backlog closes only its own connection."""
        try:
            if not channel.startswith(_STATUS_PREFIX):
                return
            conversation_id = channel[len(_STATUS_PREFIX) :]
            listeners = self._hub.registry.subscribers(conversation_id)
            if not listeners:
                return
            seq = status_seq(payload)
            if seq is None:
                logger.warning("fan-out frame on %s has no seq; dropped", channel)
                return
            frame = payload.decode("utf-8")
            framed = text_frame(payload)
            connections = self._hub.connections
            written = 0
            for conn_id in listeners:
                conn = connections.get(conn_id)
                if conn is None:
                    continue
                subscription = conn.subscriptions.get(conversation_id)
                if (
                    subscription is not None
                    and subscription.held is None
                    and seq > subscription.high_seq + 1
                ):
                    # A hole: a publish was lost (Pub/Sub delivers at most once, e.g.
                    # around a Redis restart). Held; the store fills the hole first.
                    subscription.held = [(seq, frame)]
                    self._hub.spawn(self._hub.replays.recover(conn, conversation_id, hole=True))
                    continue
                outcome = conn.offer(conversation_id, seq, frame, framed)
                if outcome == FULL:
                    self._hub.evict(conn, SLOW_CONSUMER, "slow consumer")
                    continue
                written += outcome
                if outcome and conn.out is not None and len(conn.out) == 1:
                    if not self._dirty:
                        asyncio.get_running_loop().call_soon(self._flush)
                    self._dirty.append(conn)
                if conn.backlog is not None and conn.drainer is None:
                    self._drain_later(conn)
            self._frames_sent.inc(written)
        except Exception:
            # The fan-out adapter must keep delivering to everyone else.
            logger.exception("fan-out frame on %s could not be dispatched", channel)

    def _flush(self) -> None:
        """The end of a loop turn: write each connection's frames of this turn at once."""
        dirty, self._dirty = self._dirty, []
        for conn in dirty:
            flush_out(conn)

    def send(self, conn: Connection, item: Outgoing) -> None:
        """Write an item now, or queue it behind a slow socket (4009 when full)."""
        flush_out(conn)  # the frames before it go first
        if conn.backlog is None and not conn.paused:
            if not conn.fits(size(item)):
                self._hub.evict(conn, SLOW_CONSUMER, "slow consumer")
                return
            for message in coalesce([item]):
                conn.write(text_frame(message.encode()))
                self._frames_sent.inc()
        elif not conn.queue(item):
            self._hub.evict(conn, SLOW_CONSUMER, "slow consumer")
        elif conn.drainer is None:
            self._drain_later(conn)

    def _drain_later(self, conn: Connection) -> None:
        conn.drainer = asyncio.create_task(self._drain(conn))

    async def _drain(self, conn: Connection) -> None:
        """Send what waits behind a slow socket, in order, as it takes writes again; a
        socket that takes nothing for the write timeout is a slow consumer (4009)."""
        while conn.backlog:
            try:
                async with asyncio.timeout(self._write_timeout_s):
                    await conn.drained()
            except TimeoutError:
                conn.drainer = None
                self._hub.evict(conn, SLOW_CONSUMER, "slow consumer")
                return
            flush_out(conn)  # written before anything queued
            items = list(conn.backlog)
            conn.backlog.clear()
            conn.backlog_bytes = 0
            for message in coalesce(items):
                conn.write(text_frame(message.encode()))
                self._frames_sent.inc()
        conn.backlog = None
        conn.drainer = None

    def broadcast(self, connections: list[Connection], text: str) -> None:
        """One frame to many connections (a campaign's counts): framed once, written now
        to each socket that takes writes, queued behind the slow ones."""
        framed = text_frame(text.encode())
        for conn in connections:
            if not conn.open:
                continue
            flush_out(conn)  # the frames before it go first
            if conn.backlog is None and not conn.paused and conn.fits(len(framed)):
                conn.write(framed)
                self._frames_sent.inc()
            else:
                self.send(conn, Reply(text))

    def answer(self, conn: Connection, reply: Reply) -> None:
        """Send a reply to a connection still open."""
        if conn.open:
            self.send(conn, reply)
