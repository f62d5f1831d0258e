"""The hub's RFC 6455 codec, checked against the `websockets` library's own frames: what
the hub writes is what websockets writes; what a client writes (masked, in any pieces,
fragmented) is read back as the same messages; every protocol error has its close code."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st
from websockets.frames import Close, Frame, Opcode

from whatslike.hub import wire
from whatslike.hub.wire import FrameReader, WireError

LIMIT = 1 << 17


def client_frame(
    opcode: Opcode, payload: bytes, fin: bool = True, mask: bytes | None = b"\x01\x02\x03\x04"
) -> bytes:
    """A frame as a client writes it (websockets' serializer, with a known mask)."""
    raw = Frame(opcode, payload, fin=fin).serialize(mask=False)
    if mask is None:
        return raw
    first, second = raw[0], raw[1]
    head_size = {126: 4, 127: 10}.get(second & 0x7F, 2)
    head = bytes((first, second | 0x80)) + raw[2:head_size]
    return head + mask + wire.unmask(mask, raw[head_size:])


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65_535, 65_536, 70_000])
def test_text_frame_is_an_unmasked_final_text_frame(size: int) -> None:
    payload = bytes(ord("a") + i % 26 for i in range(size))
    assert wire.text_frame(payload) == Frame(Opcode.TEXT, payload).serialize(mask=False)


def test_close_frame_is_websockets_close_frame_and_fits_a_control_frame() -> None:
    expected = Frame(Opcode.CLOSE, Close(4009, "slow consumer").serialize())
    assert wire.close_frame(4009, "slow consumer") == expected.serialize(mask=False)
    long = wire.close_frame(1000, "é" * 100)
    assert long[1] <= 125
    assert long[4:].decode("utf-8") == "é" * 61


def test_accept_key_of_rfc_6455() -> None:
    # The example of RFC 6455 §1.3.
    assert wire.accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    assert wire.valid_key("dGhlIHNhbXBsZSBub25jZQ==")
    assert not wire.valid_key("dGhlIHNhbXBsZQ==")  # 11 bytes
    assert not wire.valid_key("not base64!")
    assert not wire.valid_key("")


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65_535, 65_536, 100_000])
def test_masked_lengths_are_read_back(size: int) -> None:
    payload = bytes(i % 251 for i in range(size))
    assert FrameReader(LIMIT).feed(client_frame(Opcode.BINARY, payload)) == [(wire.BINARY, payload)]


@given(st.binary(max_size=300), st.binary(min_size=4, max_size=4))
def test_any_mask_is_undone(payload: bytes, mask: bytes) -> None:
    frame = client_frame(Opcode.TEXT, payload, mask=mask)
    assert FrameReader(LIMIT).feed(frame) == [(wire.TEXT, payload)]


messages = st.lists(
    st.tuples(st.sampled_from([Opcode.TEXT, Opcode.BINARY]), st.binary(max_size=400)),
    min_size=1,
    max_size=6,
)


@given(messages, st.data())
def test_any_split_of_the_stream_gives_the_same_messages(
    sent: list[tuple[Opcode, bytes]], data: st.DataObject
) -> None:
    stream = b""
    expected: list[tuple[int, bytes]] = []
    for opcode, payload in sent:
        # Some messages in fragments, with a ping between them.
        pieces = data.draw(st.integers(1, 3))
        cut = [
            payload[i * len(payload) // pieces : (i + 1) * len(payload) // pieces]
            for i in range(pieces)
        ]
        for index, piece in enumerate(cut):
            kind = opcode if index == 0 else Opcode.CONT
            stream += client_frame(kind, piece, fin=index == pieces - 1)
            if index == 0 and pieces > 1:
                stream += client_frame(Opcode.PING, b"p")
                expected.append((wire.PING, b"p"))
        expected.append((int(opcode), payload))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    reader = FrameReader(LIMIT)
    got: list[tuple[int, bytes]] = []
    start = 0
    for cut_at in [*cuts, len(stream)]:
        got += reader.feed(stream[start:cut_at])
        start = cut_at
    assert got == expected


@pytest.mark.parametrize(
    ("stream", "code", "reason"),
    [
        (client_frame(Opcode.TEXT, b"hi", mask=None), 1002, "client frames must be masked"),
        (bytes((0x83, 0x80)) + b"\0\0\0\0", 1002, "unknown opcode 0x3"),
        (bytes((0x8B, 0x80)) + b"\0\0\0\0", 1002, "unknown opcode 0xb"),
        (bytes((0xC1, 0x80)) + b"\0\0\0\0", 1002, "reserved bits are set"),
        (bytes((0x09, 0x81)) + b"\0\0\0\0x", 1002, "fragmented control frame"),
        (bytes((0x89, 0xFE, 0, 126)) + b"\0" * 130, 1002, "control frame over 125 bytes"),
        (client_frame(Opcode.CONT, b"x"), 1002, "continuation without a message to continue"),
        (
            client_frame(Opcode.TEXT, b"a", fin=False) + client_frame(Opcode.TEXT, b"b"),
            1002,
            "new message before the last one ended",
        ),
        (
            bytes((0x81, 0xFF)) + struct.pack("!Q", 1 << 63),
            1002,
            "frame length has its high bit set",
        ),
    ],
)
def test_protocol_errors(stream: bytes, code: int, reason: str) -> None:
    with pytest.raises(WireError) as raised:
        FrameReader(LIMIT).feed(stream)
    assert (raised.value.code, raised.value.reason) == (code, reason)


def test_oversize_is_refused_from_the_header_before_the_payload() -> None:
    reader = FrameReader(100)
    head = client_frame(Opcode.TEXT, b"x" * 101)[:8]  # header and mask only
    with pytest.raises(WireError) as raised:
        reader.feed(head)
    assert (raised.value.code, raised.value.reason) == (
        1009,
        "frame is 101 bytes; the limit is 100",
    )


def test_fragments_count_together_against_the_limit() -> None:
    reader = FrameReader(100)
    assert reader.feed(client_frame(Opcode.TEXT, b"x" * 60, fin=False)) == []
    with pytest.raises(WireError) as raised:
        reader.feed(client_frame(Opcode.CONT, b"x" * 41))
    assert raised.value.code == 1009
    whole = FrameReader(100)
    whole.feed(client_frame(Opcode.TEXT, b"x" * 60, fin=False))
    assert whole.feed(client_frame(Opcode.CONT, b"y" * 40)) == [(wire.TEXT, b"x" * 60 + b"y" * 40)]


def test_a_stream_of_empty_continuation_frames_is_closed_at_the_fragment_cap() -> None:
    """180 KB of empty continuation frames (30,000 of them, each 6 bytes): once cost a
    sum over every fragment so far at each frame (quadratic; it held the loop for 9 s);
    now the message is refused with 1009 at fragment MAX_FRAGMENTS + 1."""
    reader = FrameReader(LIMIT)
    assert reader.feed(client_frame(Opcode.TEXT, b"{", fin=False)) == []
    empty = client_frame(Opcode.CONT, b"", fin=False)
    stream = empty * 30_000
    fed = 0
    with pytest.raises(WireError) as raised:
        while fed < len(stream):
            reader.feed(stream[fed : fed + len(empty)])
            fed += len(empty)
    assert raised.value.code == 1009
    assert raised.value.reason == f"message in over {wire.MAX_FRAGMENTS} fragments"
    assert fed // len(empty) == wire.MAX_FRAGMENTS - 1  # the first fragment, then these


@given(st.binary(max_size=200), st.data())
def test_a_message_in_up_to_max_fragments_pieces_is_read_back(
    payload: bytes, data: st.DataObject
) -> None:
    """Empty fragments included, and a ping after the first: the cap refuses nothing a
    client may send."""
    pieces = data.draw(st.integers(1, wire.MAX_FRAGMENTS))
    cuts = data.draw(
        st.lists(st.integers(0, len(payload)), min_size=pieces - 1, max_size=pieces - 1)
    )
    bounds = [0, *sorted(cuts), len(payload)]
    stream = b""
    for i in range(pieces):
        kind = Opcode.TEXT if i == 0 else Opcode.CONT
        stream += client_frame(kind, payload[bounds[i] : bounds[i + 1]], fin=i == pieces - 1)
        if i == 0 and pieces > 1:
            stream += client_frame(Opcode.PING, b"p")
    expected = [(wire.PING, b"p")] if pieces > 1 else []
    assert FrameReader(LIMIT).feed(stream) == [*expected, (wire.TEXT, payload)]


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b"", (1005, "")),
        (Close(1000, "bye").serialize(), (1000, "bye")),
        (Close(4001, "").serialize(), (4001, "")),
    ],
)
def test_close_payloads(payload: bytes, expected: tuple[int, str]) -> None:
    assert wire.parse_close(payload) == expected


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (b"\x03", 1002),
        (struct.pack("!H", 1005), 1002),
        (struct.pack("!H", 999), 1002),
        (struct.pack("!H", 1000) + b"\xff", 1007),
    ],
)
def test_bad_close_payloads(payload: bytes, code: int) -> None:
    with pytest.raises(WireError) as raised:
        wire.parse_close(payload)
    assert raised.value.code == code
