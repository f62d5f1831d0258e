"""The hub's WebSocket layer: uvicorn's sans-I/O `websockets` protocol, which also hands
itself to the application in the scope (extension `whatslike.transport`), so that the hub
can read client messages without ASGI's wrappers and write a status frame framed once
per event straight to every subscriber's socket. The upgrade itself (accept, subprotocol,
HTTP denials, close) still goes through ASGI, so everything else behaves as uvicorn does.
"""

from __future__ import annotations

import asyncio
import struct
from typing import Any, Final

from uvicorn._types import ASGIReceiveEvent, ASGISendEvent
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.http11 import Request

#: The scope extension under which the protocol is handed to the application.
EXTENSION: Final = "whatslike.transport"

#: What `receive` answers after `wake`: the reader looks at why it was woken.
WAKE: Final = {"type": "whatslike.wake"}

_TEXT_FIN: Final = 0x81


def text_frame(payload: bytes) -> bytes:
    """An unmasked, unfragmented server text frame holding `payload` (RFC 6455 §5.2)."""
    size = len(payload)
    if size < 126:
        return bytes((_TEXT_FIN, size)) + payload
    if size < 1 << 16:
        return struct.pack("!BBH", _TEXT_FIN, 126, size) + payload
    return struct.pack("!BBQ", _TEXT_FIN, 127, size) + payload


class _Inbox:
    """The part of asyncio.Queue uvicorn's protocol uses for the messages the application
    receives, without the Queue's three deques and Event (~2.5 KB per connection). Bounded
    by uvicorn's flow control: it stops reading the socket while a message waits here, so
    this holds a message, a disconnect and a wake at most."""

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: list[ASGIReceiveEvent] = []
        self._waiter: asyncio.Future[None] | None = None

    def put_nowait(self, item: ASGIReceiveEvent) -> None:
        self._items.append(item)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def empty(self) -> bool:
        return not self._items

    async def get(self) -> ASGIReceiveEvent:
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._items.pop(0)


class HubWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's protocol with direct, synchronous writes of ready frames, and lighter
    per connection (a small inbox; the handshake's request and response let go)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.queue = _Inbox()  # type: ignore[assignment]  # the same calls, less memory

    def handle_connect(self, event: Request) -> None:
        super().handle_connect(event)
        scope: dict[str, Any] | None = getattr(self, "scope", None)  # an upgrade only
        if scope is not None:
            scope["extensions"][EXTENSION] = self

    async def send(self, message: ASGISendEvent) -> None:
        await super().send(message)
        if message["type"] == "websocket.accept" and self.handshake_complete:
            del self.request, self.response  # the handshake's: not needed any more

    @property
    def open(self) -> bool:
        """Accepted, and neither closing nor gone: frames written now are delivered."""
        return self.handshake_complete and not (self.close_sent or self.disconnected)

    @property
    def paused(self) -> bool:
        """The socket's buffer is over its high-water mark: write nothing more now."""
        return not self.writable.is_set()

    def write(self, frame: bytes) -> None:
        """Write one ready frame (see `text_frame`); dropped once the socket is closing."""
        if self.open:
            self.transport.write(frame)

    async def drained(self) -> None:
        """Wait until the socket takes writes again (or is gone)."""
        await self.writable.wait()

    def wake(self) -> None:
        """Make a pending `receive` answer WAKE (the hub asked this connection to close)."""
        self.queue.put_nowait(WAKE)  # type: ignore[arg-type]  # an event of the hub's own
