"""One client of the hub and its socket (see transport.py for the wire): what it may still
send (its frame budget), what waits to be sent to it (bounded in items and in bytes) and
what it follows (its subscriptions). The hub decides; a connection only keeps its state
and tells the hub what its socket did, through `Owner`."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Final, Protocol

from whatslike.auth import Identity
from whatslike.hub.ratelimit import FrameBudget
from whatslike.hub.transport import Request, WebSocketProtocol
from whatslike.settings import Settings

logger = logging.getLogger(__name__)

# Close codes (protocol.md §4).
NORMAL: Final = 1000
GOING_AWAY: Final = 1001
POLICY: Final = 1008
TOO_BIG: Final = 1009
INTERNAL_ERROR: Final = 1011
TRY_AGAIN_LATER: Final = 1013
TOKEN_EXPIRED: Final = 4001
RATE_LIMITED: Final = 4008
SLOW_CONSUMER: Final = 4009

#: Client messages a connection may leave waiting behind a subscribe's store read before
#: its socket is no longer read (until the read is answered).
INBOX: Final = 16

#: The identity of a connection not admitted yet.
_NOBODY: Final = Identity("", "", 0)


@dataclass(frozen=True, slots=True)
class Reply:
    """A frame answering the client, and the status frames that must follow it (a
    replay). Queued as one item so a replay never counts against the live-frame bound."""

    text: str
    replay: tuple[str, ...] = ()


#: What `Connection.offer` answers when a frame can be neither sent nor queued.
FULL: Final = -1

#: What waits behind a slow socket: live status frames (the fan-out's very str objects)
#: and replies; the drainer sends them in order once the socket takes writes again.
Outgoing = str | Reply


@dataclass(slots=True)
class Subscription:
    #: Highest seq queued to the client; anything not above it is a duplicate or stale.
    high_seq: int
    #: Live frames held back while the replay is read from the store; None once live.
    held: list[tuple[int, str]] | None = None
    #: A fan-out gap ended while the store was being read: read it again afterwards.
    gap: bool = False


class Owner(Protocol):
    """What a connection tells the hub (see the WebSocketProtocol methods of the same
    names) and what it reads of it."""

    settings: Settings
    max_frame_bytes: int

    def upgrade(self, conn: Connection, request: Request) -> None: ...

    def receive(self, conn: Connection, raw: str | bytes) -> None: ...

    def closing(self, conn: Connection, code: int, by_server: bool) -> None: ...

    def lost(self, conn: Connection) -> None: ...


def size(item: Outgoing) -> int:
    """The bytes an item stands for (its JSON is ASCII: a character is a byte)."""
    if isinstance(item, str):
        return len(item)
    return len(item.text) + sum(map(len, item.replay))


class Connection(WebSocketProtocol):
    """One client, and its socket. Frames are written straight to the socket while it
    takes them; behind a slow socket they wait in `backlog` (at most `limit` items and,
    with what the socket's buffer holds, `byte_limit` bytes; past that, and past the
    write timeout, the connection is closed 4009) for the one drainer task. Client
    messages are handled as they arrive, synchronously; only a subscribe waits (for its
    store read), and the messages behind it wait in `inbox`."""

    __slots__ = (
        "backlog",
        "backlog_bytes",
        "bad_frames",
        "budget",
        "byte_limit",
        "campaigns",
        "close_code",
        "close_reason",
        "connections",
        "drainer",
        "hub",
        "id",
        "identity",
        "inbox",
        "ip",
        "last_heard",
        "limit",
        "out",
        "subscriptions",
        "user",
    )

    def __init__(self, hub: Owner, connections: set[Any]) -> None:
        super().__init__(hub.max_frame_bytes)
        self.hub = hub
        self.id = ""
        self.identity = _NOBODY
        settings = hub.settings
        self.budget = FrameBudget(
            settings.client_frames_per_s,
            settings.client_frame_burst,
            settings.rate_limit_strikes,
            settings.rate_limit_window_s,
        )
        self.limit = settings.connection_queue_size
        self.byte_limit = settings.connection_queue_bytes
        self.user = ("", "")
        self.ip = ""
        self.subscriptions: dict[str, Subscription] = {}
        #: Campaigns it follows: the highest version of their counts sent to it.
        self.campaigns: dict[str, int] = {}
        self.backlog: deque[Outgoing] | None = None
        #: What the items in `backlog` hold (see `_size`).
        self.backlog_bytes = 0
        #: Frames written in this turn of the event loop, sent in one write at its end
        #: (so a burst of events read from Redis at once costs one send() per socket).
        #: Holds what one turn brings at most: the frames of the messages one read held.
        self.out: list[bytes] | None = None
        self.drainer: asyncio.Task[None] | None = None
        #: Client messages that came while a subscribe waits for the store, handled
        #: after it in order. Past INBOX messages the socket is not read until it empties
        #: (so it holds at most INBOX plus what one read of the socket brings).
        self.inbox: deque[str | bytes] | None = None
        self.bad_frames = 0
        self.last_heard = time.monotonic()
        self.close_code: int | None = None
        self.close_reason = ""
        #: uvicorn's set of live connections (its shutdown asks each to close).
        self.connections = connections

    # The socket's life (see WebSocketProtocol).

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.connections.add(self)

    def upgrade(self, request: Request) -> None:
        try:
            self.hub.upgrade(self, request)
        except Exception:
            logger.exception("a WebSocket upgrade failed")
            if self.open:
                self.request_close(INTERNAL_ERROR, "internal error")
            elif self.transport is not None and not self.transport.is_closing():
                self.refuse(500, {"error": {"code": "internal", "message": "internal error"}})

    def message(self, data: str | bytes) -> None:
        if self.inbox is not None:
            self.inbox.append(data)
            if len(self.inbox) == INBOX and self.transport is not None:
                self.transport.pause_reading()
            return
        self.hub.receive(self, data)

    def control(self) -> bool:
        """Pings and pongs are frames too: each takes from the budget like a message;
        over it, it is dropped (a ping is not answered) and counts as a refusal."""
        if self.budget.take(time.monotonic()):
            return True
        if self.budget.exhausted:
            self.request_close(RATE_LIMITED, "rate limit exceeded repeatedly")
        return False

    def closing(self, code: int, reason: str, by_server: bool) -> None:
        self.hub.closing(self, code, by_server)

    def lost(self) -> None:
        self.hub.lost(self)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.connections.discard(self)

    def shutdown(self) -> None:
        """uvicorn stops: close with 1001."""
        if self.open:
            self.request_close(GOING_AWAY, "server shutting down")
        elif self.transport is not None and self.close_code is None:
            self.transport.close()

    # The hub's side.

    def request_close(self, code: int, reason: str) -> None:
        """Close the connection; the first reason given wins."""
        if self.close_code is None:
            self.close_code = code
            self.close_reason = reason
            self.close(code, reason)

    def offer(self, conversation_id: str, seq: int, frame: str, framed: bytes) -> int:
        """Send a live status frame (`framed`: `frame` as a WebSocket frame) unless it is
        a duplicate: the frames written now (1, or 0 when held or queued), or FULL when it
        cannot be queued either."""
        subscription = self.subscriptions.get(conversation_id)
        if subscription is None:  # unsubscribed while this frame was on its way
            return 0
        if subscription.held is not None:
            if len(subscription.held) >= self.limit:
                return FULL
            subscription.held.append((seq, frame))
            return 0
        if seq <= subscription.high_seq:
            return 0
        subscription.high_seq = seq
        if self.backlog is None and not self.paused:
            if self.out is None:
                self.out = [framed]
                return 1
            self.out.append(framed)
            return 1
        if not self.queue(frame):
            return FULL
        return 0

    def fits(self, size: int) -> bool:
        """Whether `size` bytes more stay within the byte bound, counting what waits in
        the backlog and in the socket's buffer (a client that never reads pins no more)."""
        return self.backlog_bytes + self.unsent + size <= self.byte_limit

    def queue(self, item: Outgoing) -> bool:
        """Put an item behind the ones waiting for the socket; False when full."""
        if self.backlog is None:
            self.backlog = deque()
        item_bytes = size(item)
        if len(self.backlog) >= self.limit or not self.fits(item_bytes):
            return False
        self.backlog.append(item)
        self.backlog_bytes += item_bytes
        return True


def flush_out(conn: Connection) -> None:
    """Write the frames of this loop turn (`out`) in one write."""
    out, conn.out = conn.out, None
    if out:
        conn.write(out[0] if len(out) == 1 else b"".join(out))
