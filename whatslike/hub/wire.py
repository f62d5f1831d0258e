"""RFC 6455 on the wire, as the hub's server side needs it: the opening handshake's
accept key, the frames it writes (unmasked, never fragmented) and a reader of client
frames (masked; fragments assembled; control frames between them). Pure: bytes in,
messages or an error out, nothing about sockets or time."""

from __future__ import annotations

import base64
import hashlib
import struct
from typing import Final

CONTINUATION: Final = 0x0
TEXT: Final = 0x1
BINARY: Final = 0x2
CLOSE: Final = 0x8
PING: Final = 0x9
PONG: Final = 0xA

#: Close codes the reader answers with.
PROTOCOL_ERROR: Final = 1002
INVALID_DATA: Final = 1007
TOO_BIG: Final = 1009

#: Most frames one data message may come in. Browsers never fragment what they send and
#: libraries do only when asked; a cap makes every frame of a message cost something (an
#: empty continuation frame is 6 bytes of header), so a stream of them is closed (1009)
#: long before its parsing could hold up the event loop.
MAX_FRAGMENTS: Final = 64

_GUID: Final = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_CONTROL_MAX: Final = 125
_FIN: Final = 0x80
_MASKED: Final = 0x80
#: Close codes a peer may send (RFC 6455 §7.4): the defined ones, and 3000-4999.
_SENDABLE: Final = frozenset(
    (1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014)
)


class WireError(Exception):
    """The client broke the protocol: close the connection with `code`."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def accept_key(key: str) -> str:
    """Sec-WebSocket-Accept for a Sec-WebSocket-Key (RFC 6455 §4.2.2)."""
    return base64.b64encode(hashlib.sha1(key.encode("ascii") + _GUID).digest()).decode("ascii")


def valid_key(key: str) -> bool:
    """A Sec-WebSocket-Key is 16 bytes in base64."""
    try:
        return len(base64.b64decode(key.encode("ascii"), validate=True)) == 16
    except (ValueError, UnicodeEncodeError):
        return False


def frame(opcode: int, payload: bytes) -> bytes:
    """An unmasked, final server frame."""
    size = len(payload)
    if size < 126:
        return bytes((_FIN | opcode, size)) + payload
    if size < 1 << 16:
        return struct.pack("!BBH", _FIN | opcode, 126, size) + payload
    return struct.pack("!BBQ", _FIN | opcode, 127, size) + payload


def text_frame(payload: bytes) -> bytes:
    """An unmasked, final text frame holding `payload` (UTF-8)."""
    return frame(TEXT, payload)


def close_frame(code: int, reason: str) -> bytes:
    """A close frame; the reason is cut to fit a control frame (123 bytes)."""
    data = reason.encode("utf-8")[: _CONTROL_MAX - 2].decode("utf-8", "ignore").encode()
    return frame(CLOSE, struct.pack("!H", code) + data)


def parse_close(payload: bytes) -> tuple[int, str]:
    """The code and reason of a client's close frame (1005, "" when it has none)."""
    if not payload:
        return 1005, ""
    if len(payload) == 1:
        raise WireError(PROTOCOL_ERROR, "close frame of one byte")
    (code,) = struct.unpack("!H", payload[:2])
    if code not in _SENDABLE and not 3000 <= code < 5000:
        raise WireError(PROTOCOL_ERROR, f"close code {code} may not be sent")
    try:
        return code, payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        raise WireError(INVALID_DATA, "close reason is not UTF-8") from None


def unmask(mask: bytes, payload: bytes) -> bytes:
    """XOR `payload` with the 4-byte `mask` repeated (one big-integer XOR, in C)."""
    size = len(payload)
    if not size:
        return b""
    key = (mask * (size // 4 + 1))[:size]
    value = int.from_bytes(payload, "little") ^ int.from_bytes(key, "little")
    return value.to_bytes(size, "little")


class FrameReader:
    """Client frames in, messages out: `feed` any piece of the byte stream and get the
    complete messages it finished, as (opcode, payload) with opcode TEXT, BINARY, CLOSE,
    PING or PONG. A data message is bounded by `max_size` (its fragments together),
    refused from its header, before its payload is buffered, and by MAX_FRAGMENTS frames.
    The work is linear in the bytes fed: an incomplete frame waits in a growing buffer
    (never copied whole again), and a message's length so far is kept, not recounted.
    Holds no buffer between calls unless a frame is incomplete."""

    __slots__ = ("_buffer", "_fragments", "_opcode", "_size", "max_size")

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self._buffer = bytearray()
        self._fragments: list[bytes] | None = None
        #: Bytes of the fragments of the message being assembled.
        self._size = 0
        self._opcode = 0

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        buffer: bytes | bytearray
        if self._buffer:
            self._buffer += data
            buffer = self._buffer
        else:
            buffer = data
        messages: list[tuple[int, bytes]] = []
        offset, end = 0, len(buffer)
        while end - offset >= 2:
            first, second = buffer[offset], buffer[offset + 1]
            if first & 0x70:
                raise WireError(PROTOCOL_ERROR, "reserved bits are set")
            opcode = first & 0x0F
            if not second & _MASKED:
                raise WireError(PROTOCOL_ERROR, "client frames must be masked")
            size = second & 0x7F
            head = 2
            if size == 126:
                if end - offset < 4:
                    break
                (size,) = struct.unpack_from("!H", buffer, offset + 2)
                head = 4
            elif size == 127:
                if end - offset < 10:
                    break
                (size,) = struct.unpack_from("!Q", buffer, offset + 2)
                if size >> 63:
                    raise WireError(PROTOCOL_ERROR, "frame length has its high bit set")
                head = 10
            fin = bool(first & _FIN)
            self._check(opcode, fin, size)
            start = offset + head + 4
            if end - start < size:
                break
            mask = bytes(buffer[offset + head : start])
            payload = unmask(mask, bytes(buffer[start : start + size]))
            offset = start + size
            message = self._assemble(opcode, fin, payload)
            if message is not None:
                messages.append(message)
        if buffer is self._buffer:
            del self._buffer[:offset]
        elif offset < end:
            self._buffer = bytearray(memoryview(buffer)[offset:])
        return messages

    def _check(self, opcode: int, fin: bool, size: int) -> None:
        if opcode >= CLOSE:
            if opcode > PONG:
                raise WireError(PROTOCOL_ERROR, f"unknown opcode {opcode:#x}")
            if not fin:
                raise WireError(PROTOCOL_ERROR, "fragmented control frame")
            if size > _CONTROL_MAX:
                raise WireError(PROTOCOL_ERROR, "control frame over 125 bytes")
            return
        if opcode > BINARY:
            raise WireError(PROTOCOL_ERROR, f"unknown opcode {opcode:#x}")
        if opcode == CONTINUATION:
            if self._fragments is None:
                raise WireError(PROTOCOL_ERROR, "continuation without a message to continue")
            if len(self._fragments) >= MAX_FRAGMENTS:
                raise WireError(TOO_BIG, f"message in over {MAX_FRAGMENTS} fragments")
        elif self._fragments is not None:
            raise WireError(PROTOCOL_ERROR, "new message before the last one ended")
        total = self._size + size if opcode == CONTINUATION else size
        if total > self.max_size:
            raise WireError(TOO_BIG, f"frame is {total} bytes; the limit is {self.max_size}")

    def _assemble(self, opcode: int, fin: bool, payload: bytes) -> tuple[int, bytes] | None:
        if opcode >= CLOSE:
            return opcode, payload
        if opcode != CONTINUATION:
            if fin:
                return opcode, payload
            self._opcode, self._fragments, self._size = opcode, [payload], len(payload)
            return None
        assert self._fragments is not None  # checked in _check
        self._fragments.append(payload)
        self._size += len(payload)
        if not fin:
            return None
        whole, self._fragments, self._size = b"".join(self._fragments), None, 0
        return self._opcode, whole
