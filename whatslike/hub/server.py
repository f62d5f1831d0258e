"""The WebSocket hub of protocol.md §4: authenticates `/ws/status` upgrades, answers client
frames and forwards fan-out status frames to each subscribed connection, in seq order.

This module ties the parts together and handles what clients send; each part reads on
its own: connection.py (one client and what waits for it), admission.py (who may
connect), delivery.py (frames out, behind slow sockets), replay.py (what a subscribe or
a fan-out gap needs from the store), campaigns.py (campaigns' live counts), transport.py
and wire.py (the WebSocket itself)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Coroutine, Iterable
from typing import Any, Final

import uvicorn
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, WebSocketRoute
from starlette.websockets import WebSocket
from uvicorn.server import ServerState

from whatslike.api.contract import Operation
from whatslike.auth import InvalidToken, TokenService
from whatslike.clock import new_id
from whatslike.errors import BackendUnavailable
from whatslike.events import status_channel
from whatslike.hub import frames
from whatslike.hub.admission import Gate
from whatslike.hub.campaigns import CHANNEL_PREFIX, CampaignFeeds
from whatslike.hub.connection import (
    GOING_AWAY,
    INBOX,
    INTERNAL_ERROR,
    NORMAL,
    POLICY,
    RATE_LIMITED,
    TOKEN_EXPIRED,
    TOO_BIG,
    TRY_AGAIN_LATER,
    Connection,
    Reply,
)
from whatslike.hub.delivery import Delivery
from whatslike.hub.frames import (
    Auth,
    ClientFrame,
    FrameError,
    Ping,
    Read,
    Subscribe,
    SubscribeCampaign,
    Unsubscribe,
    UnsubscribeCampaign,
)
from whatslike.hub.registry import SubscriptionRegistry
from whatslike.hub.replay import Replays
from whatslike.hub.transport import CLOSE_TIMEOUT_S, Request, text_frame
from whatslike.reads import ReadRefused, mark_read
from whatslike.roles import Deps
from whatslike.settings import Settings
from whatslike.store.base import Store

logger = logging.getLogger(__name__)
_ACCESS = logging.getLogger("uvicorn.error")

#: A client that sent nothing (not even a ping) for this many heartbeats is gone. It is
#: closed with 1000 "idle": 1001 would tell a live client that the server is going away,
#: and a silent client is not broken enough for a policy code; one that is still there
#: reconnects as after any close.
IDLE_HEARTBEATS: Final = 3
#: Longest pause between two sweeps for expired tokens and idle clients (one hub-wide
#: timer, not one per connection); a quarter of the heartbeat when that is shorter.
SWEEP_S: Final = 1.0


class Hub:
    """The `/ws/status` endpoint. Each connection is one `Connection` (uvicorn makes it
    through `protocol` at the upgrade): admitted at once, its client frames handled in
    `data_received`, with no task of its own; a task exists only while a subscribe reads
    the store, or while a slow socket has frames waiting (the drainer). Frames out are
    written straight to the socket (`on_fanout` never waits); one hub-wide timer closes
    expired and idle connections."""

    name = "hub"

    def __init__(self, deps: Deps) -> None:
        self.settings: Settings = deps.settings
        self.store: Store = deps.store
        self._handoffs = deps.handoffs
        self.metrics = deps.metrics
        self.fanout = deps.fanout
        self.registry = SubscriptionRegistry(deps.settings.max_subscriptions)
        #: Open connections by id.
        self.connections: dict[str, Connection] = {}
        self.max_frame_bytes = deps.settings.max_frame_bytes
        self._gate = Gate(deps.settings, TokenService.from_settings(deps.settings, deps.jwt_secret))
        self.delivery = Delivery(self)
        self.replays = Replays(self)
        self.campaigns = CampaignFeeds(self)
        self._tasks: set[asyncio.Task[None]] = set()
        self._sweeper: asyncio.Task[None] | None = None
        #: Connections accepted and not yet closed; `stop` waits for none to be left.
        self._closing = 0
        self._all_closed: asyncio.Event | None = None
        deps.metrics.ws_subscriptions.set_function(lambda: self.registry.subscription_count)
        deps.fanout.listen(self.on_fanout)
        deps.fanout.on_gap(self.on_gap)

    def operations(self) -> list[Operation]:
        return []  # outside the HTTP API's contract: its routes are below

    def routes(self) -> list[BaseRoute]:
        # Reached only when the server does not use `protocol` for WebSockets.
        return [WebSocketRoute("/ws/status", self._misconfigured)]

    def protocol(self, config: uvicorn.Config, server_state: ServerState, **_: Any) -> Any:
        """uvicorn's `ws` protocol class (it calls this at each upgrade, with keywords):
        the hub's own WebSocket protocol for one connection."""
        self._gate.configure(config)
        return Connection(self, server_state.connections)

    async def start(self) -> None:
        self._gate.stopping = False
        if self._sweeper is None:
            self._sweeper = asyncio.create_task(self._sweep(), name="hub-sweep")
            self.replays.start()

    async def stop(self) -> None:
        """Close every connection with 1001 and wait (bounded) until they are gone."""
        self._gate.stopping = True
        if self._sweeper is not None:
            sweeper, self._sweeper = self._sweeper, None
            sweeper.cancel()
            await asyncio.gather(sweeper, return_exceptions=True)
        for task in self._tasks:
            task.cancel()
        await self.replays.stop()
        self.campaigns.stop()
        for conn in list(self.connections.values()):
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
        return len(self.connections)

    def on_fanout(self, channel: str, payload: bytes) -> None:
        """A status frame from the fan-out: to every subscriber (delivery.py); a hint
        that a campaign's counts moved: to its feed (campaigns.py)."""
        if channel.startswith(CHANNEL_PREFIX):
            self.campaigns.changed(channel)
        else:
            self.delivery.fan_out(channel, payload)

    def on_gap(self) -> None:
        """The link to the fan-out broke and is back: every live subscription is read
        again from the store (replay.py), every followed campaign too (campaigns.py)."""
        self.replays.on_gap()
        self.campaigns.on_gap()

    def spawn(self, work: Coroutine[None, None, None]) -> None:
        """Run `work` as a task of the hub's (cancelled at `stop`)."""
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def evict(self, conn: Connection, code: int, reason: str) -> None:
        """Close a connection at once, its subscriptions dropped."""
        self.release(self.registry.drop(conn.id))
        conn.subscriptions.clear()
        self.campaigns.leave(conn)
        conn.request_close(code, reason)

    def release(self, conversation_ids: Iterable[str]) -> None:
        """Tell the fan-out which of these conversations nobody here follows any more."""
        for conversation_id in conversation_ids:
            if not self.registry.subscribers(conversation_id):
                self.fanout.discard(status_channel(conversation_id))

    # The connection's life.

    async def _misconfigured(self, websocket: WebSocket) -> None:
        # A wiring error, not a client's: the server must use serving.server_config.
        logger.error("the hub needs uvicorn with ws=Hub.protocol")
        await self._refuse_asgi(websocket, 500, "internal", "the server is misconfigured")

    def upgrade(self, conn: Connection, request: Request) -> None:
        """Admit or refuse an upgrade, at once; an admitted one is open when this returns."""
        if request.path != "/ws/status":
            conn.refuse(404, {"error": {"code": "not_found", "message": "no WebSocket here"}})
            return
        admission = self._gate.admit(request)
        if isinstance(admission, tuple):
            status, code, message = admission
            self._gate.refusals.note(status, code)
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
            heartbeat_s=self.settings.heartbeat_s,
            token_exp=identity.exp,
        )
        # The 101 and the first frame in one write (one send() for both).
        conn.accept(
            request.headers["sec-websocket-key"],
            admission.subprotocol,
            text_frame(connected.encode()),
        )
        self.delivery.count()
        self.connections[conn.id] = conn
        self._closing += 1
        self.metrics.ws_connections.inc()

    def closing(self, conn: Connection, code: int, by_server: bool) -> None:
        """The connection takes no more frames: it leaves the hub (its socket may still
        be finishing the closing handshake)."""
        if by_server:
            self.metrics.ws_closes.labels(code=str(code)).inc()
        if self.connections.pop(conn.id, None) is None:
            return
        if conn.drainer is not None:
            conn.drainer.cancel()
            conn.drainer = None
        self.release(self.registry.drop(conn.id))
        conn.subscriptions.clear()
        self.campaigns.leave(conn)
        conn.backlog = conn.out = conn.inbox = None
        conn.backlog_bytes = 0
        self.metrics.ws_connections.dec()

    def lost(self, conn: Connection) -> None:
        """The socket is gone: its place under the caps is free."""
        self._gate.release(conn.user, conn.ip)
        self._closing -= 1
        if self._closing == 0 and self._all_closed is not None:
            self._all_closed.set()

    async def _refuse_asgi(
        self, websocket: WebSocket, status: int, code: str, message: str
    ) -> None:
        """Refuse an upgrade that came through ASGI with an HTTP answer."""
        self._gate.refusals.note(status, code)
        if "websocket.http.response" in websocket.scope.get("extensions", {}):
            response = JSONResponse({"error": {"code": code, "message": message}}, status)
            await websocket.send_denial_response(response)
        else:
            # Servers without the denial-response extension can only answer 403.
            await websocket.close(POLICY)

    async def _sweep(self) -> None:
        """Close connections whose token expired (4001) or that went silent (idle); a
        refreshed token or a new frame simply moves their deadlines."""
        heartbeat_s = self.settings.heartbeat_s
        idle_s = IDLE_HEARTBEATS * heartbeat_s
        interval = min(SWEEP_S, heartbeat_s / 4)
        while True:
            await asyncio.sleep(interval)
            now, idle_since = time.time(), time.monotonic() - idle_s
            for conn in list(self.connections.values()):
                if conn.identity.exp <= now:
                    conn.request_close(TOKEN_EXPIRED, "token expired")
                elif conn.last_heard <= idle_since:
                    conn.request_close(NORMAL, "idle")

    # What clients send.

    def receive(self, conn: Connection, raw: str | bytes) -> None:
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

    def _limit(self, conn: Connection, frame: ClientFrame | FrameError) -> None:
        if conn.budget.exhausted:
            conn.request_close(RATE_LIMITED, "rate limit exceeded repeatedly")
            return
        ref = frame.ref if not isinstance(frame, Ping) else None
        self.refuse_request(conn, "rate_limited", "too many frames; slow down", ref)

    def _reject(self, conn: Connection, error: FrameError) -> None:
        if error.too_large:
            conn.request_close(TOO_BIG, error.message)
            return
        conn.bad_frames += 1
        self.metrics.ws_bad_frames.labels(code=error.code).inc()
        if conn.bad_frames > self.settings.bad_frame_tolerance:
            conn.request_close(POLICY, "too many malformed frames")
            return
        self.delivery.answer(conn, Reply(frames.error(error.code, error.message, error.ref)))

    def refuse_request(self, conn: Connection, code: str, message: str, ref: frames.Ref) -> None:
        self.metrics.ws_bad_frames.labels(code=code).inc()
        self.delivery.answer(conn, Reply(frames.error(code, message, ref)))

    def _handle(self, conn: Connection, frame: ClientFrame) -> None:
        match frame:
            case Subscribe() | SubscribeCampaign() | Read():
                # The messages behind it wait until its store work is answered.
                conn.inbox = deque()
                self.spawn(self._in_turn(conn, frame))
            case Unsubscribe():
                if self.registry.unsubscribe(conn.id, frame.conversation_id):
                    self.release((frame.conversation_id,))
                conn.subscriptions.pop(frame.conversation_id, None)
                self.delivery.answer(
                    conn, Reply(frames.unsubscribed(frame.conversation_id, frame.ref))
                )
            case UnsubscribeCampaign():
                self.campaigns.unsubscribe(conn, frame.campaign_id)
                self.delivery.answer(
                    conn, Reply(frames.campaign_unsubscribed(frame.campaign_id, frame.ref))
                )
            case Ping():
                self.delivery.answer(conn, Reply(frames.pong(frame.ts)))
            case Auth():
                self._refresh(conn, frame)

    async def _in_turn(self, conn: Connection, frame: Subscribe | SubscribeCampaign | Read) -> None:
        """Answer a subscribe or a read, then the messages that came meanwhile, in order."""
        try:
            if isinstance(frame, Subscribe):
                await self.replays.subscribe(conn, frame)
            elif isinstance(frame, SubscribeCampaign):
                await self.campaigns.subscribe(conn, frame)
            else:
                await self._read(conn, frame)
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

    async def _read(self, conn: Connection, frame: Read) -> None:
        """Mark a customer's message read, as the HTTP API does: another organization's
        conversation, or none, answers `forbidden` (like a subscribe)."""
        conversation = await self.store.get_conversation(
            conn.identity.org_id, frame.conversation_id
        )
        if conversation is None:
            self.refuse_request(conn, "forbidden", "no such conversation", frame.ref)
            return
        try:
            if await mark_read(self.store, conversation, frame.message_id):
                self._handoffs.set()
        except ReadRefused as exc:
            self.refuse_request(conn, exc.code, exc.message, frame.ref)
            return
        answer = frames.read_ok(frame.conversation_id, frame.message_id, frame.ref)
        self.delivery.answer(conn, Reply(answer))

    def _refresh(self, conn: Connection, frame: Auth) -> None:
        try:
            identity = self._gate.tokens.verify(frame.token)
        except InvalidToken as exc:
            self.refuse_request(conn, frames.BAD_REQUEST, exc.reason, frame.ref)
            return
        if (identity.user_id, identity.org_id) != (conn.identity.user_id, conn.identity.org_id):
            self.refuse_request(
                conn,
                frames.BAD_REQUEST,
                "the token is for a different user or organization",
                frame.ref,
            )
            return
        conn.identity = identity
        self.delivery.answer(conn, Reply(frames.auth_ok(identity.exp, frame.ref)))
