"""The hub's own WebSocket protocol: an asyncio protocol that uvicorn's HTTP protocol hands
the socket to at an upgrade (uvicorn's `ws` protocol slot, so `/ws/status` stays on the
HTTP port). It reads the request head uvicorn replays to it, lets the subclass admit or
refuse the upgrade synchronously (an HTTP answer, no socket opened), writes the 101
itself, then reads client frames in `data_received` and hands each message on, with no
task, no ASGI scope and nothing of the handshake kept per connection.

The subclass implements `upgrade` (answer with `accept` or `refuse`), `message`,
`control` (a ping or pong came: may it be answered?), `closing` (the connection stops
taking frames) and `lost` (the socket is gone).

A PING is answered with a PONG at once while the socket takes writes; behind a socket
that does not, only the latest ping waits for its answer (RFC 6455 §5.5.3 allows
answering only the most recent), so pings never pile up bytes a client will not read.
"""

from __future__ import annotations

import asyncio
import json
from typing import Final, NamedTuple, cast
from urllib.parse import parse_qs, unquote, urlsplit

from whatslike.hub import wire
from whatslike.hub.wire import WireError, text_frame

__all__ = ["Request", "WebSocketProtocol", "text_frame"]

#: How long a close frame may wait for the client's answer (or behind a socket that does
#: not drain) before the connection is cut.
CLOSE_TIMEOUT_S: Final = 5.0

#: Bytes read after the server's close frame while waiting for the client's: past them
#: the connection is cut (a client still flooding has had its answer; a well-behaved one
#: sends its close frame long before).
CLOSING_READ_BYTES: Final = 64 * 1024

_REASONS: Final = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    426: "Upgrade Required",
    429: "Too Many Requests",
    500: "Internal Server Error",
    503: "Service Unavailable",
}

_OPEN, _CLOSING, _CLOSED = 1, 2, 3


class Request(NamedTuple):
    """What an upgrade asked for; dropped once answered."""

    #: The request target as sent (path and query).
    target: str
    path: str
    query: dict[str, list[str]]
    #: Lower-case names; repeated headers joined with ", ".
    headers: dict[str, str]
    #: The peer's address as the socket gives it ("" when it has none).
    peer: str

    @property
    def subprotocols(self) -> list[str]:
        offered = self.headers.get("sec-websocket-protocol", "")
        return [name.strip() for name in offered.split(",") if name.strip()]


def parse_head(head: bytes, peer: str) -> Request | str:
    """The request of a head (request line and headers), or why it is no WebSocket
    upgrade (RFC 6455 §4.2.1)."""
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or parts[0] != "GET":
        return "a WebSocket upgrade is a GET"
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep:
            return "malformed header line"
        key, value = name.strip().lower(), value.strip()
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    if "websocket" not in headers.get("upgrade", "").lower():
        return "Upgrade: websocket is missing"
    if "upgrade" not in [t.strip().lower() for t in headers.get("connection", "").split(",")]:
        return "Connection: Upgrade is missing"
    if not wire.valid_key(headers.get("sec-websocket-key", "")):
        return "Sec-WebSocket-Key is missing or malformed"
    target = urlsplit(parts[1])
    return Request(parts[1], unquote(target.path), parse_qs(target.query), headers, peer)


def http_answer(status: int, body: dict[str, object], extra: str = "") -> bytes:
    """An HTTP answer with a JSON body, closing the connection."""
    content = json.dumps(body).encode()
    head = (
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
        "content-type: application/json\r\n"
        f"content-length: {len(content)}\r\n"
        f"{extra}connection: close\r\n\r\n"
    )
    return head.encode("latin-1") + content


class WebSocketProtocol(asyncio.Protocol):
    """One WebSocket, server side. Writes go straight to the transport; `paused` says
    that the transport's buffer is over its high-water mark (write nothing more now)."""

    __slots__ = (
        "_closing_read",
        "_drained",
        "_heard",
        "_pong",
        "_reader",
        "_state",
        "_timer",
        "paused",
        "transport",
    )

    def __init__(self, max_size: int) -> None:
        self.transport: asyncio.Transport | None = None
        self.paused = False
        self._state = 0  # handshake
        self._reader = wire.FrameReader(max_size)
        self._drained: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        #: The client's close frame came: the TCP connection may be closed.
        self._heard = False
        #: The payload of the latest ping not answered yet (the socket was not taking
        #: writes); answered when it takes them again.
        self._pong: bytes | None = None
        #: Bytes read since the server's close frame (see CLOSING_READ_BYTES).
        self._closing_read = 0

    # -- what the subclass implements

    def upgrade(self, request: Request) -> None:
        """Answer the upgrade: `accept` or `refuse`."""
        raise NotImplementedError

    def message(self, data: str | bytes) -> None:
        """A complete text (str) or binary (bytes) message from the client."""
        raise NotImplementedError

    def control(self) -> bool:
        """A ping or pong came (while open): False drops it (a ping is not answered)."""
        raise NotImplementedError

    def closing(self, code: int, reason: str, by_server: bool) -> None:
        """The connection takes no more frames (the server or the client began to close,
        or the socket is gone): called once, after an `accept`."""
        raise NotImplementedError

    def lost(self) -> None:
        """The socket is gone (after `closing`, when the upgrade was accepted)."""
        raise NotImplementedError

    # -- the handshake

    def accept(self, key: str, subprotocol: str | None, first: bytes) -> None:
        """Open the WebSocket: the 101, and `first` (a ready frame) in the same write."""
        extra = f"Sec-WebSocket-Protocol: {subprotocol}\r\n" if subprotocol else ""
        assert self.transport is not None
        head = (
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Accept: {wire.accept_key(key)}\r\n"
            f"{extra}\r\n"
        )
        self.transport.write(head.encode("latin-1") + first)
        self._state = _OPEN

    def refuse(self, status: int, body: dict[str, object], extra: str = "") -> None:
        """Answer the upgrade over HTTP and close: no socket is opened."""
        self._state = _CLOSED
        assert self.transport is not None
        self.transport.write(http_answer(status, body, extra))
        self.transport.close()

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but behave as one.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self._state == 0:
            self._handshake(data)
            return
        if self._state != _OPEN and not (self._state == _CLOSING and not self._heard):
            return
        if self._state == _CLOSING:
            self._closing_read += len(data)
            if self._closing_read > CLOSING_READ_BYTES:
                self._abort()
                return
        try:
            messages = self._reader.feed(data)
        except WireError as exc:
            self.close(exc.code, exc.reason)
            return
        for opcode, payload in messages:
            if opcode == wire.TEXT:
                try:
                    text = payload.decode("utf-8")
                except UnicodeDecodeError:
                    self.close(wire.INVALID_DATA, "text frame is not UTF-8")
                    return
                if self._state == _OPEN:
                    self.message(text)
            elif opcode == wire.BINARY:
                if self._state == _OPEN:
                    self.message(payload)
            elif opcode in (wire.PING, wire.PONG):
                if self._state == _OPEN and self.control() and opcode == wire.PING:
                    self._answer_ping(payload)
            elif opcode == wire.CLOSE:
                self._closed_by_client(payload)
                return
            if self._state == _CLOSED:
                return

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        pong, self._pong = self._pong, None
        if pong is not None:
            self.write(wire.frame(wire.PONG, pong))
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        state, self._state = self._state, _CLOSED
        self._pong = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.paused = False
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)
        if state == _OPEN:
            self.closing(1006, "", False)
        if state in (_OPEN, _CLOSING):
            self.lost()
        self.transport = None

    # -- frames

    @property
    def open(self) -> bool:
        """Accepted, and neither closing nor gone: frames written now are delivered."""
        return self._state == _OPEN

    @property
    def unsent(self) -> int:
        """Bytes written and not yet taken by the socket (the transport's buffer), and
        the pong waiting for it."""
        if self.transport is None:
            return 0
        pong = 0 if self._pong is None else len(self._pong) + 2
        return self.transport.get_write_buffer_size() + pong

    def _answer_ping(self, payload: bytes) -> None:
        if self.paused:
            self._pong = payload  # replaces an older one: only the latest is answered
        else:
            self.write(wire.frame(wire.PONG, payload))

    def write(self, data: bytes) -> None:
        """Write ready frames (see `text_frame`); dropped once the connection is closing."""
        if self._state == _OPEN and self.transport is not None:
            self.transport.write(data)

    async def drained(self) -> None:
        """Wait until the socket takes writes again (or is gone)."""
        if self.paused:
            self._drained = asyncio.get_running_loop().create_future()
            try:
                await self._drained
            finally:
                self._drained = None

    def close(self, code: int, reason: str) -> None:
        """Begin the closing handshake: send a close frame, wait (bounded) for the
        client's, then close the socket. Nothing is sent after it."""
        self._close(code, reason, by_server=True)

    def _close(self, code: int, reason: str, *, by_server: bool) -> None:
        if self._state != _OPEN or self.transport is None:
            return
        self._state = _CLOSING
        self.closing(code, reason, by_server)
        self.transport.write(wire.close_frame(code, reason))
        if self._heard:
            self.transport.close()
        else:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(CLOSE_TIMEOUT_S, self._abort)

    def _closed_by_client(self, payload: bytes) -> None:
        try:
            code, _ = wire.parse_close(payload)
        except WireError as exc:
            self.close(exc.code, exc.reason)
            return
        self._heard = True
        if self._state == _OPEN:  # the client began: echo its code, then hang up
            self._close(1000 if code == 1005 else code, "", by_server=False)
        elif self.transport is not None:
            self.transport.close()

    def _abort(self) -> None:
        self._timer = None
        if self.transport is not None:
            self.transport.abort()

    def _handshake(self, data: bytes) -> None:
        end = data.find(b"\r\n\r\n")
        assert self.transport is not None
        if end < 0:  # uvicorn replays the whole head at once
            self.refuse(400, {"error": {"code": "bad_request", "message": "incomplete head"}})
            return
        peername = self.transport.get_extra_info("peername")
        peer = str(peername[0]) if isinstance(peername, tuple) and peername else ""
        request = parse_head(data[:end], peer)
        if isinstance(request, str):
            self.refuse(400, {"error": {"code": "bad_request", "message": request}})
            return
        if request.headers.get("sec-websocket-version") != "13":
            self.refuse(
                426,
                {"error": {"code": "bad_request", "message": "WebSocket version 13 only"}},
                "Sec-WebSocket-Version: 13\r\n",
            )
            return
        self.upgrade(request)
