"""The WebSocket hub of protocol.md §4: authenticates `/ws/status` upgrades, answers client
frames and forwards fan-out status frames to each subscribed connection, in seq order."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections import deque
from collections.abc import Coroutine, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Final

import uvicorn
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, WebSocketRoute
from starlette.websockets import WebSocket
from uvicorn.middleware.proxy_headers import _TrustedHosts
from uvicorn.server import ServerState

from whatslike.auth import Identity, InvalidToken, TokenService, bearer_token
from whatslike.clock import new_id
from whatslike.errors import BackendUnavailable
from whatslike.grouping import Grouped
from whatslike.hub import frames
from whatslike.hub.caps import ConnectionCaps
from whatslike.hub.frames import Auth, ClientFrame, FrameError, Ping, Subscribe, Unsubscribe
from whatslike.hub.ratelimit import FrameBudget
from whatslike.hub.registry import SubscriptionRegistry
from whatslike.hub.transport import CLOSE_TIMEOUT_S, Request, WebSocketProtocol, text_frame
from whatslike.roles import Deps
from whatslike.settings import Settings
from whatslike.store.base import Changes, Store, SubscriptionRead

logger = logging.getLogger(__name__)
_ACCESS = logging.getLogger("uvicorn.error")

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

#: A client that sent nothing (not even a ping) for this many heartbeats is gone. It is
#: closed with 1000 "idle": 1001 would tell a live client that the server is going away,
#: and a silent client is not broken enough for a policy code; one that is still there
#: reconnects as after any close.
IDLE_HEARTBEATS: Final = 3


#: Most status frames in one `batch`, so one message stays well under clients' size limits
#: (websockets defaults to 1 MiB) even after a long replay.
MAX_BATCH: Final = 256

#: Most subscribes read from the store in one call.
READ_BATCH: Final = 256

#: Store reads in flight at once while re-reading subscriptions after a fan-out gap.
RECOVERY_READS: Final = 8

_STATUS_PREFIX: Final = "status:"

#: Longest pause between two sweeps for expired tokens and idle clients (one hub-wide
#: timer, not one per connection); a quarter of the heartbeat when that is shorter.
SWEEP_S: Final = 1.0

#: Verified tokens kept (until they expire) so that a reconnecting client is not verified
#: again; emptied when full.
TOKEN_CACHE: Final = 50_000

#: Client messages a connection may leave waiting behind a subscribe's store read before
#: its socket is no longer read (until the read is answered).
INBOX: Final = 16

#: The identity of a connection not admitted yet.
_NOBODY: Final = Identity("", "", 0)

#: `"seq":<digits>` in a serialized status frame: found without parsing the frame (a JSON
#: string cannot hold an unescaped quote, so this is a key); used only when it occurs once.
_SEQ: Final = re.compile(rb'"seq":(\d+)[,}]')

_CAP_MESSAGES: Final = {
    "total": "the server holds as many connections as it may; retry later",
    "user": "this user holds as many connections as one user may",
    "ip": "this address holds as many connections as one address may",
}

#: The subprotocol a client offers to carry its token outside the URL, next to
#: SUBPROTOCOL (which the server selects: it never echoes the token back):
#: `Sec-WebSocket-Protocol: whatslike.v1, access_token.<JWT>`.
SUBPROTOCOL: Final = "whatslike.v1"
TOKEN_SUBPROTOCOL_PREFIX: Final = "access_token."

#: Refused upgrades are logged at INFO at most once per this many seconds; the ones in
#: between are counted into the next line (an attacker cannot flood the log).
REFUSAL_LOG_INTERVAL_S: Final = 10.0


@dataclass(slots=True)
class _RefusalLog:
    last: float = float("-inf")
    suppressed: int = 0

    def note(self, status: int, code: str) -> None:
        now = time.monotonic()
        if now - self.last < REFUSAL_LOG_INTERVAL_S:
            self.suppressed += 1
            return
        logger.info(
            "refused a WebSocket upgrade: %d %s (%d more refused since the last such line)",
            status,
            code,
            self.suppressed,
        )
        self.last, self.suppressed = now, 0


@dataclass(frozen=True, slots=True)
class _Admission:
    identity: Identity
    user: tuple[str, str]
    ip: str
    subprotocol: str | None


@dataclass(frozen=True, slots=True)
class Reply:
    """A frame answering the client, and the status frames that must follow it (a
    replay). Queued as one item so a replay never counts against the live-frame bound."""

    text: str
    replay: tuple[str, ...] = ()


#: What `_Connection.offer` answers when a frame can be neither sent nor queued.
FULL: Final = -1

#: What waits behind a slow socket: live status frames (the fan-out's very str objects)
#: and replies; the drainer sends them in order once the socket takes writes again.
Outgoing = str | Reply


@dataclass(slots=True)
class _Subscription:
    #: Highest seq queued to the client; anything not above it is a duplicate or stale.
    high_seq: int
    #: Live frames held back while the replay is read from the store; None once live.
    held: list[tuple[int, str]] | None = None
    #: A fan-out gap ended while the store was being read: read it again afterwards.
    gap: bool = False


def _size(item: Outgoing) -> int:
    """The bytes an item stands for (its JSON is ASCII: a character is a byte)."""
    if isinstance(item, str):
        return len(item)
    return len(item.text) + sum(map(len, item.replay))


class _Connection(WebSocketProtocol):
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

    def __init__(self, hub: Hub, connections: set[Any]) -> None:
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
        self.subscriptions: dict[str, _Subscription] = {}
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
        size = _size(item)
        if len(self.backlog) >= self.limit or not self.fits(size):
            return False
        self.backlog.append(item)
        self.backlog_bytes += size
        return True


def _flush_out(conn: _Connection) -> None:
    out, conn.out = conn.out, None
    if out:
        conn.write(out[0] if len(out) == 1 else b"".join(out))


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


def _settle(subscription: _Subscription, replayed: Iterable[str]) -> list[str]:
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


class Hub:
    """The `/ws/status` endpoint. Each connection is one `_Connection` (uvicorn makes it
    through `protocol` at the upgrade): admitted at once, its client frames handled in
    `data_received`, with no task of its own; a task exists only while a subscribe reads
    the store, or while a slow socket has frames waiting (the drainer). Frames out are
    written straight to the socket (`on_fanout` never waits); one hub-wide timer closes
    expired and idle connections."""

    name = "hub"

    def __init__(self, deps: Deps) -> None:
        self._settings: Settings = deps.settings
        self.settings = deps.settings
        self._store: Store = deps.store
        self._metrics = deps.metrics
        self._tokens = TokenService.from_settings(deps.settings, deps.jwt_secret)
        self._registry = SubscriptionRegistry(deps.settings.max_subscriptions)
        self._connections: dict[str, _Connection] = {}
        self._caps = ConnectionCaps(
            deps.settings.max_connections,
            deps.settings.max_connections_per_user,
            deps.settings.max_connections_per_ip,
        )
        self._refusals = _RefusalLog()
        self._stopping = False
        self._fanout = deps.fanout
        self._recoveries: set[asyncio.Task[None]] = set()
        self._sweeper: asyncio.Task[None] | None = None
        #: Connections accepted and not yet closed; `stop` waits for none to be left.
        self._closing = 0
        self._all_closed: asyncio.Event | None = None
        self._verified: dict[str, Identity] = {}
        self._frames_sent = deps.metrics.ws_frames_sent
        #: Connections with frames in `out`, written at the end of this loop turn.
        self._dirty: list[_Connection] = []
        #: Subscribes waiting for their store read, and the task reading them.
        #: Subscribes' store reads: those that wait meanwhile share the next store call.
        self._reads: Grouped[SubscriptionRead, Changes | None] = Grouped(
            self._read_many, "hub-subscribe-reads", READ_BATCH
        )
        self.max_frame_bytes = deps.settings.max_frame_bytes
        #: The addresses whose X-Forwarded-For is believed, as uvicorn's proxy headers
        #: middleware would (set from uvicorn's config at the first upgrade).
        self._proxies: _TrustedHosts | None = None
        self._proxy_config: object = None
        deps.metrics.ws_subscriptions.set_function(lambda: self._registry.subscription_count)
        deps.fanout.listen(self.on_fanout)
        deps.fanout.on_gap(self.on_gap)

    def routes(self) -> list[BaseRoute]:
        # Reached only when the server does not use `protocol` for WebSockets.
        return [WebSocketRoute("/ws/status", self._misconfigured)]

    def protocol(self, config: uvicorn.Config, server_state: ServerState, **_: Any) -> Any:
        """uvicorn's `ws` protocol class (it calls this at each upgrade, with keywords):
        the hub's own WebSocket protocol for one connection."""
        if config is not self._proxy_config:
            self._proxy_config = config
            self._proxies = (
                _TrustedHosts(config.forwarded_allow_ips) if config.proxy_headers else None
            )
        return _Connection(self, server_state.connections)

    async def start(self) -> None:
        self._stopping = False
        if self._sweeper is None:
            self._sweeper = asyncio.create_task(self._sweep(), name="hub-sweep")
            self._reads.start()

    async def stop(self) -> None:
        """Close every connection with 1001 and wait (bounded) until they are gone."""
        self._stopping = True
        if self._sweeper is not None:
            sweeper, self._sweeper = self._sweeper, None
            sweeper.cancel()
            await asyncio.gather(sweeper, return_exceptions=True)
        for recovery in self._recoveries:
            recovery.cancel()
        await self._reads.stop()
        for conn in list(self._connections.values()):
            conn.request_close(GOING_AWAY, "server shutting down")
        if not self._closing:
            return
        self._all_closed = asyncio.Event()
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT_S + 1):
                await self._all_closed.wait()
        except TimeoutError:
            logger.warning("hub stopped with %d connections still closing", self._closing)
        finally:
            self._all_closed = None

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    # The hot path.

    def on_fanout(self, channel: str, payload: bytes) -> None:
        """Send one status frame to every subscriber, without waiting: it is framed once
        and the same bytes are written to every socket that takes them (the same str
        object waits behind slow ones), and a full backlog closes only its own connection."""
        try:
            if not channel.startswith(_STATUS_PREFIX):
                return
            conversation_id = channel[len(_STATUS_PREFIX) :]
            listeners = self._registry.subscribers(conversation_id)
            if not listeners:
                return
            seq = status_seq(payload)
            if seq is None:
                logger.warning("fan-out frame on %s has no seq; dropped", channel)
                return
            frame = payload.decode("utf-8")
            framed = text_frame(payload)
            connections = self._connections
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
                    self._spawn(self._recover(conn, conversation_id, hole=True))
                    continue
                outcome = conn.offer(conversation_id, seq, frame, framed)
                if outcome == FULL:
                    self._evict(conn, SLOW_CONSUMER, "slow consumer")
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

    def _evict(self, conn: _Connection, code: int, reason: str) -> None:
        self._release(self._registry.drop(conn.id))
        conn.subscriptions.clear()
        conn.request_close(code, reason)

    def _release(self, conversation_ids: Iterable[str]) -> None:
        """Tell the fan-out which of these conversations nobody here follows any more."""
        for conversation_id in conversation_ids:
            if not self._registry.subscribers(conversation_id):
                self._fanout.discard(conversation_id)

    # The connection's life.

    async def _misconfigured(self, websocket: WebSocket) -> None:
        # A wiring error, not a client's: the server must use serving.server_config.
        logger.error("the hub needs uvicorn with ws=Hub.protocol")
        await self._refuse_asgi(websocket, 500, "internal", "the server is misconfigured")

    def upgrade(self, conn: _Connection, request: Request) -> None:
        """Admit or refuse an upgrade, at once; an admitted one is open when this returns."""
        if request.path != "/ws/status":
            conn.refuse(404, {"error": {"code": "not_found", "message": "no WebSocket here"}})
            return
        admission = self._admit(request)
        if isinstance(admission, tuple):
            status, code, message = admission
            self._refusals.note(status, code)
            # The access line uvicorn writes for a refused upgrade (a token in the URL
            # is redacted by the servers' log filter).
            _ACCESS.info('%s - "WebSocket %s" %d', request.peer, request.target, status)
            conn.refuse(status, {"error": {"code": code, "message": message}})
            return
        conn.id = new_id("conn")
        identity = conn.identity = admission.identity
        conn.user, conn.ip = admission.user, admission.ip
        connected = frames.connected(
            connection_id=conn.id,
            user_id=identity.user_id,
            org_id=identity.org_id,
            heartbeat_s=self._settings.heartbeat_s,
            token_exp=identity.exp,
        )
        # The 101 and the first frame in one write (one send() for both).
        conn.accept(
            request.headers["sec-websocket-key"],
            admission.subprotocol,
            text_frame(connected.encode()),
        )
        self._frames_sent.inc()
        self._connections[conn.id] = conn
        self._closing += 1
        self._metrics.ws_connections.inc()

    def closing(self, conn: _Connection, code: int, by_server: bool) -> None:
        """The connection takes no more frames: it leaves the hub (its socket may still
        be finishing the closing handshake)."""
        if by_server:
            self._metrics.ws_closes.labels(code=str(code)).inc()
        if self._connections.pop(conn.id, None) is None:
            return
        if conn.drainer is not None:
            conn.drainer.cancel()
            conn.drainer = None
        self._release(self._registry.drop(conn.id))
        conn.subscriptions.clear()
        conn.backlog = conn.out = conn.inbox = None
        conn.backlog_bytes = 0
        self._metrics.ws_connections.dec()

    def lost(self, conn: _Connection) -> None:
        """The socket is gone: its place under the caps is free."""
        self._caps.release(conn.user, conn.ip)
        self._closing -= 1
        if self._closing == 0 and self._all_closed is not None:
            self._all_closed.set()

    def _admit(self, request: Request) -> _Admission | tuple[int, str, str]:
        """The identity of an acceptable upgrade, its connection counted against the caps;
        otherwise the HTTP status, error code and message to refuse it with."""
        if self._stopping:
            return 503, "unavailable", "the server is shutting down"
        headers = request.headers
        origin = headers.get("origin")
        allowed = self._settings.effective_allowed_origins
        # Only browsers send Origin, and only browsers can be tricked into connecting.
        if allowed and origin is not None and origin not in allowed:
            return 403, "forbidden_origin", "this origin is not allowed"
        offered = request.subprotocols
        token = (
            next(
                (
                    name[len(TOKEN_SUBPROTOCOL_PREFIX) :]
                    for name in offered
                    if name.startswith(TOKEN_SUBPROTOCOL_PREFIX)
                ),
                None,
            )
            or bearer_token(headers.get("authorization"))
            or next(iter(request.query.get("access_token", ())), None)
        )
        if not token:
            return 401, "unauthorized", "a token is required"
        try:
            identity = self._verify(token)
        except InvalidToken as exc:
            return 401, "unauthorized", exc.reason
        admission = _Admission(
            identity,
            (identity.org_id, identity.user_id),
            self._client_ip(request),
            SUBPROTOCOL if SUBPROTOCOL in offered else None,
        )
        refused_by = self._caps.claim(admission.user, admission.ip)
        if refused_by is not None:
            status = 503 if refused_by == "total" else 429
            return status, "too_many_connections", _CAP_MESSAGES[refused_by]
        return admission

    def _client_ip(self, request: Request) -> str:
        """The client's address as uvicorn's proxy headers middleware gives it: from
        X-Forwarded-For only when the peer is a trusted proxy."""
        proxies = self._proxies
        forwarded = request.headers.get("x-forwarded-for")
        if proxies is not None and forwarded is not None and request.peer in proxies:
            host, _ = proxies.get_trusted_client_address(forwarded)
            if host:
                return host
        return request.peer

    def _verify(self, token: str) -> Identity:
        """The token's identity, verified once and then kept until it expires (a client
        reconnecting with the same token costs no signature check)."""
        identity = self._verified.get(token)
        if identity is not None and identity.exp > time.time():
            return identity
        identity = self._tokens.verify(token)
        if len(self._verified) >= TOKEN_CACHE:
            self._verified.clear()
        self._verified[token] = identity
        return identity

    async def _refuse_asgi(
        self, websocket: WebSocket, status: int, code: str, message: str
    ) -> None:
        """Refuse an upgrade that came through ASGI with an HTTP answer."""
        self._refusals.note(status, code)
        if "websocket.http.response" in websocket.scope.get("extensions", {}):
            response = JSONResponse({"error": {"code": code, "message": message}}, status)
            await websocket.send_denial_response(response)
        else:
            # Servers without the denial-response extension can only answer 403.
            await websocket.close(POLICY)

    async def _sweep(self) -> None:
        """Close connections whose token expired (4001) or that went silent (idle); a
        refreshed token or a new frame simply moves their deadlines."""
        heartbeat_s = self._settings.heartbeat_s
        idle_s = IDLE_HEARTBEATS * heartbeat_s
        interval = min(SWEEP_S, heartbeat_s / 4)
        while True:
            await asyncio.sleep(interval)
            now, idle_since = time.time(), time.monotonic() - idle_s
            for conn in list(self._connections.values()):
                if conn.identity.exp <= now:
                    conn.request_close(TOKEN_EXPIRED, "token expired")
                elif conn.last_heard <= idle_since:
                    conn.request_close(NORMAL, "idle")

    def _flush(self) -> None:
        """The end of a loop turn: write each connection's frames of this turn at once."""
        dirty, self._dirty = self._dirty, []
        for conn in dirty:
            _flush_out(conn)

    def _send(self, conn: _Connection, item: Outgoing) -> None:
        """Write an item now, or queue it behind a slow socket (4009 when full)."""
        _flush_out(conn)  # the frames before it go first
        if conn.backlog is None and not conn.paused:
            if not conn.fits(_size(item)):
                self._evict(conn, SLOW_CONSUMER, "slow consumer")
                return
            for message in coalesce([item]):
                conn.write(text_frame(message.encode()))
                self._frames_sent.inc()
        elif not conn.queue(item):
            self._evict(conn, SLOW_CONSUMER, "slow consumer")
        elif conn.drainer is None:
            self._drain_later(conn)

    def _drain_later(self, conn: _Connection) -> None:
        conn.drainer = asyncio.create_task(self._drain(conn))

    async def _drain(self, conn: _Connection) -> None:
        """Send what waits behind a slow socket, in order, as it takes writes again; a
        socket that takes nothing for the write timeout is a slow consumer (4009)."""
        while conn.backlog:
            try:
                async with asyncio.timeout(self._settings.write_timeout_s):
                    await conn.drained()
            except TimeoutError:
                conn.drainer = None
                self._evict(conn, SLOW_CONSUMER, "slow consumer")
                return
            _flush_out(conn)  # written before anything queued
            items = list(conn.backlog)
            conn.backlog.clear()
            conn.backlog_bytes = 0
            for message in coalesce(items):
                conn.write(text_frame(message.encode()))
                self._frames_sent.inc()
        conn.backlog = None
        conn.drainer = None

    def receive(self, conn: _Connection, raw: str | bytes) -> None:
        """Handle one client message (the connection is not waiting for a subscribe)."""
        if not conn.open:
            return
        conn.last_heard = time.monotonic()
        frame = frames.parse_client_frame(raw, self.max_frame_bytes)
        try:
            if not conn.budget.take(conn.last_heard):
                self._limit(conn, frame)
            elif isinstance(frame, FrameError):
                self._reject(conn, frame)
            else:
                self._handle(conn, frame)
        except Exception:
            logger.exception("connection %s failed", conn.id)
            conn.request_close(INTERNAL_ERROR, "internal error")

    def _limit(self, conn: _Connection, frame: ClientFrame | FrameError) -> None:
        if conn.budget.exhausted:
            conn.request_close(RATE_LIMITED, "rate limit exceeded repeatedly")
            return
        ref = frame.ref if not isinstance(frame, Ping) else None
        self._refuse_request(conn, "rate_limited", "too many frames; slow down", ref)

    def _reject(self, conn: _Connection, error: FrameError) -> None:
        if error.too_large:
            conn.request_close(TOO_BIG, error.message)
            return
        conn.bad_frames += 1
        self._metrics.ws_bad_frames.labels(code=error.code).inc()
        if conn.bad_frames > self._settings.bad_frame_tolerance:
            conn.request_close(POLICY, "too many malformed frames")
            return
        self._answer(conn, Reply(frames.error(error.code, error.message, error.ref)))

    def _refuse_request(self, conn: _Connection, code: str, message: str, ref: frames.Ref) -> None:
        self._metrics.ws_bad_frames.labels(code=code).inc()
        self._answer(conn, Reply(frames.error(code, message, ref)))

    def _answer(self, conn: _Connection, reply: Reply) -> None:
        if conn.open:
            self._send(conn, reply)

    def _handle(self, conn: _Connection, frame: ClientFrame) -> None:
        match frame:
            case Subscribe():
                # The messages behind it wait until its store read is answered.
                conn.inbox = deque()
                self._spawn(self._subscribing(conn, frame))
            case Unsubscribe():
                if self._registry.unsubscribe(conn.id, frame.conversation_id):
                    self._release((frame.conversation_id,))
                conn.subscriptions.pop(frame.conversation_id, None)
                self._answer(conn, Reply(frames.unsubscribed(frame.conversation_id, frame.ref)))
            case Ping():
                self._answer(conn, Reply(frames.pong(frame.ts)))
            case Auth():
                self._refresh(conn, frame)

    async def _subscribing(self, conn: _Connection, frame: Subscribe) -> None:
        """Answer a subscribe, then the messages that came meanwhile, in order."""
        try:
            await self._subscribe(conn, frame)
        except BackendUnavailable as exc:
            # The store is out: the client reconnects (with back-off) and resubscribes
            # with `since`, missing nothing; no traceback for this.
            logger.warning("connection %s: %s", conn.id, exc)
            conn.request_close(TRY_AGAIN_LATER, "store unavailable")
        except Exception:
            logger.exception("connection %s failed", conn.id)
            conn.request_close(INTERNAL_ERROR, "internal error")
        inbox, conn.inbox = conn.inbox, None
        if inbox is None:  # closed meanwhile
            return
        paused = len(inbox) >= INBOX
        while inbox and conn.inbox is None:
            self.receive(conn, inbox.popleft())
        if conn.inbox is not None:  # another subscribe: the rest waits behind it
            inbox.extend(conn.inbox)
            conn.inbox = inbox
            if len(inbox) >= INBOX:
                return
        if paused and conn.transport is not None and conn.close_code is None:
            conn.transport.resume_reading()

    async def _subscribe(self, conn: _Connection, frame: Subscribe) -> None:
        conversation_id = frame.conversation_id
        if not self._registry.subscribe(conn.id, conversation_id):
            self._refuse_request(
                conn,
                "too_many_subscriptions",
                f"a connection may follow at most {self._settings.max_subscriptions} conversations",
                frame.ref,
            )
            return
        # Registered before the store is read, so nothing published meanwhile is missed:
        # such frames are held and merged with the replay by seq.
        subscription = _Subscription(frame.since or 0, held=[])
        replaced = conn.subscriptions.get(conversation_id)
        conn.subscriptions[conversation_id] = subscription
        # Heard from here on (or a gap is announced later), so the read below is enough.
        await self._fanout.add(conversation_id)
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
                if self._registry.unsubscribe(conn.id, conversation_id):
                    self._release((conversation_id,))
            else:
                conn.subscriptions[conversation_id] = replaced
            self._refuse_request(
                conn, "forbidden", f"conversation {conversation_id!r} is not available", frame.ref
            )
            return
        if frame.since is None or not changes.complete:
            # Without `since`: live frames go on from the seq read. Incomplete: the client
            # must reload over HTTP, and live frames go on from the store's seq, which may
            # be below `since` (a client that outlived a store reset).
            subscription.high_seq = changes.last_seq
        following = _settle(subscription, changes.frames)
        self._answer(
            conn,
            Reply(
                frames.subscribed(conversation_id, changes.last_seq, changes.complete, frame.ref),
                tuple(following),
            ),
        )
        if subscription.gap:
            self._spawn(self._recover(conn, conversation_id))

    async def _read_many(self, reads: list[SubscriptionRead]) -> list[Changes | None]:
        return await self._store.subscription_changes(reads, self._settings.replay_limit)

    # Fan-out gaps: the link to the fan-out broke, so statuses may have been missed.

    def on_gap(self) -> None:
        """Re-read every live subscription from the store and send what it missed."""
        pending = [(conn, cid) for conn in self._connections.values() for cid in conn.subscriptions]
        self._spawn(self._recover_all(pending))

    def _spawn(self, work: Coroutine[None, None, None]) -> None:
        task = asyncio.create_task(work)
        self._recoveries.add(task)
        task.add_done_callback(self._recoveries.discard)

    async def _recover_all(self, pending: list[tuple[_Connection, str]]) -> None:
        async def reader() -> None:
            while pending:
                conn, conversation_id = pending.pop()
                await self._recover(conn, conversation_id)

        await asyncio.gather(*(reader() for _ in range(RECOVERY_READS)))

    async def _recover(self, conn: _Connection, conversation_id: str, hole: bool = False) -> None:
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
                self._evict(conn, INTERNAL_ERROR, "internal error")
                return
            if conn.subscriptions.get(conversation_id) is not subscription:
                return  # unsubscribed or evicted meanwhile
            if not changes.complete:
                subscription.high_seq = changes.last_seq
                reload = frames.subscribed(conversation_id, changes.last_seq, False)
                self._answer(conn, Reply(reload, tuple(_settle(subscription, ()))))
            else:
                missed = _settle(subscription, changes.frames)
                if missed:  # a Reply, so a long catch-up does not count against the bound
                    self._answer(conn, Reply(missed[0], tuple(missed[1:])))
            if not subscription.gap:
                return

    def _refresh(self, conn: _Connection, frame: Auth) -> None:
        try:
            identity = self._tokens.verify(frame.token)
        except InvalidToken as exc:
            self._refuse_request(conn, frames.BAD_REQUEST, exc.reason, frame.ref)
            return
        if (identity.user_id, identity.org_id) != (conn.identity.user_id, conn.identity.org_id):
            self._refuse_request(
                conn,
                frames.BAD_REQUEST,
                "the token is for a different user or organization",
                frame.ref,
            )
            return
        conn.identity = identity
        self._answer(conn, Reply(frames.auth_ok(identity.exp, frame.ref)))
