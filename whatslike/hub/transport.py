"""The hub's WebSocket layer: uvicorn's sans-I/O `websockets` protocol, which also hands
itself to the application in the scope (extension `whatslike.transport`), so that the hub
can read client messages without ASGI's wrappers and write a status frame framed once
per event straight to every subscriber's socket. The upgrade itself (accept, subprotocol,
HTTP denials, close) still goes through ASGI, so everything else behaves as uvicorn does.
"""

from __future__ import annotations

import struct
from typing import Any, Final

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


class HubWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's protocol with direct, synchronous writes of ready frames."""

    def handle_connect(self, event: Request) -> None:
        super().handle_connect(event)
        scope: dict[str, Any] | None = getattr(self, "scope", None)  # an upgrade only
        if scope is not None:
            scope["extensions"][EXTENSION] = self

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
