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


def masked(mask: bytes, payload: bytes) -> bytes:
    """RFC 6455 §5.3 as written, byte by byte: octet i is XORed with octet i mod 4 of the
    key. The tests mask with this, never with the code under test (`wire.unmask`)."""
    return bytes(octet ^ mask[i % 4] for i, octet in enumerate(payload))


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
    return head + mask + masked(mask, raw[head_size:])


def hand_frame(first: int, payload: bytes, mask: bytes = b"\x05\x06\x07\x08") -> bytes:
    """A masked frame built by hand, for what websockets refuses to write (`first` is the
    FIN bit, reserved bits and opcode)."""
    size = len(payload)
    if size < 126:
        length = bytes((0x80 | size,))
    elif size < 1 << 16:
        length = bytes((0x80 | 126,)) + struct.pack("!H", size)
    else:
        length = bytes((0x80 | 127,)) + struct.pack("!Q", size)
    return bytes((first,)) + length + mask + masked(mask, payload)


def refusal(reader: FrameReader, stream: bytes) -> tuple[int, str]:
    with pytest.raises(WireError) as raised:
        reader.feed(stream)
    assert str(raised.value) == raised.value.reason
    return raised.value.code, raised.value.reason


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


# --- RFC 6455 §5.7's examples, byte for byte ---------------------------------------------

RFC_KEY = bytes((0x37, 0xFA, 0x21, 0x3D))


def test_rfc_6455_masked_hello_is_read() -> None:
    frame = bytes((0x81, 0x85, 0x37, 0xFA, 0x21, 0x3D, 0x7F, 0x9F, 0x4D, 0x51, 0x58))
    assert FrameReader(LIMIT).feed(frame) == [(wire.TEXT, b"Hello")]


def test_rfc_6455_masked_pong_hello_is_read() -> None:
    # The example's "masked Pong response" to the server's "Hello" ping.
    frame = bytes((0x8A, 0x85, 0x37, 0xFA, 0x21, 0x3D, 0x7F, 0x9F, 0x4D, 0x51, 0x58))
    assert FrameReader(LIMIT).feed(frame) == [(wire.PONG, b"Hello")]


def test_rfc_6455_fragmented_hello_masked_is_one_message() -> None:
    # The example's fragmented text ("Hel", "lo"), masked as a client must send it.
    first = bytes((0x01, 0x83)) + RFC_KEY + masked(RFC_KEY, b"Hel")
    last = bytes((0x80, 0x82)) + RFC_KEY + masked(RFC_KEY, b"lo")
    reader = FrameReader(LIMIT)
    assert reader.feed(first) == []
    assert reader.feed(last) == [(wire.TEXT, b"Hello")]


def test_rfc_6455_server_frames() -> None:
    assert wire.text_frame(b"Hello") == bytes((0x81, 0x05)) + b"Hello"
    assert wire.frame(wire.PING, b"Hello") == bytes((0x89, 0x05)) + b"Hello"
    assert wire.frame(wire.PONG, b"Hello") == bytes((0x8A, 0x05)) + b"Hello"
    assert wire.frame(wire.BINARY, b"x" * 256)[:4] == bytes((0x82, 0x7E, 0x01, 0x00))
    assert wire.frame(wire.BINARY, b"x" * 65536)[:10] == bytes((0x82, 0x7F, 0, 0, 0, 0, 0, 1, 0, 0))


@pytest.mark.parametrize(
    ("size", "head"),
    [
        (125, bytes((0x82, 125))),
        (126, bytes((0x82, 126, 0, 126))),
        (65535, bytes((0x82, 126, 0xFF, 0xFF))),
        (65536, bytes((0x82, 127, 0, 0, 0, 0, 0, 1, 0, 0))),
    ],
)
def test_server_length_fields_switch_at_126_and_65536(size: int, head: bytes) -> None:
    payload = bytes(i % 256 for i in range(size))
    assert wire.frame(wire.BINARY, payload) == head + payload


def test_unmask_repeats_the_key_in_order() -> None:
    assert wire.unmask(RFC_KEY, bytes((0x7F, 0x9F, 0x4D, 0x51, 0x58))) == b"Hello"
    # Zeros show the key itself: each octet in its place, repeated, cut at the length.
    assert wire.unmask(b"\x01\x02\x03\x04", bytes(7)) == bytes((1, 2, 3, 4, 1, 2, 3))
    assert wire.unmask(b"\x01\x02\x03\x04", bytes(4)) == bytes((1, 2, 3, 4))
    assert wire.unmask(b"\x01\x02\x03\x04", bytes(1)) == bytes((1,))
    assert wire.unmask(b"\x01\x02\x03\x04", b"") == b""


@given(st.binary(max_size=70), st.binary(min_size=4, max_size=4))
def test_unmask_is_rfc_6455_masking(payload: bytes, mask: bytes) -> None:
    assert wire.unmask(mask, payload) == masked(mask, payload)


# --- control frames through the reader -----------------------------------------------------


def test_close_and_pong_frames_come_out_of_the_reader() -> None:
    close = Close(1000, "bye").serialize()
    stream = (
        client_frame(Opcode.PONG, b"p1")
        + client_frame(Opcode.TEXT, b"hi")
        + client_frame(Opcode.PONG, b"")
        + client_frame(Opcode.CLOSE, close)
    )
    messages = FrameReader(LIMIT).feed(stream)
    assert messages == [
        (wire.PONG, b"p1"),
        (wire.TEXT, b"hi"),
        (wire.PONG, b""),
        (wire.CLOSE, close),
    ]
    assert wire.parse_close(messages[-1][1]) == (1000, "bye")


def test_an_empty_close_frame_comes_out_and_reads_as_1005() -> None:
    [(opcode, payload)] = FrameReader(LIMIT).feed(client_frame(Opcode.CLOSE, b""))
    assert opcode == wire.CLOSE
    assert wire.parse_close(payload) == (1005, "")


def test_control_frames_between_fragments_come_out_in_order() -> None:
    stream = (
        client_frame(Opcode.BINARY, b"ab", fin=False)
        + client_frame(Opcode.PONG, b"1")
        + client_frame(Opcode.CONT, b"cd", fin=False)
        + client_frame(Opcode.PING, b"2")
        + client_frame(Opcode.CONT, b"ef")
        + client_frame(Opcode.CLOSE, b"")
    )
    assert FrameReader(LIMIT).feed(stream) == [
        (wire.PONG, b"1"),
        (wire.PING, b"2"),
        (wire.BINARY, b"abcdef"),
        (wire.CLOSE, b""),
    ]


@pytest.mark.parametrize("opcode", [Opcode.PING, Opcode.PONG, Opcode.CLOSE])
def test_a_125_byte_control_frame_is_read_and_126_is_refused(opcode: Opcode) -> None:
    payload = struct.pack("!H", 1000) + b"r" * 123  # a valid close too
    assert FrameReader(LIMIT).feed(client_frame(opcode, payload)) == [(int(opcode), payload)]
    too_long = hand_frame(0x80 | opcode, payload + b"r")
    assert too_long[1] & 0x7F == 126  # 126 bytes take the 16-bit length field
    assert refusal(FrameReader(LIMIT), too_long) == (1002, "control frame over 125 bytes")


def test_a_control_frame_over_125_bytes_is_refused_from_its_header() -> None:
    head = hand_frame(0x89, b"x" * 126)[:4]  # no mask, no payload yet
    assert refusal(FrameReader(LIMIT), head) == (1002, "control frame over 125 bytes")


@pytest.mark.parametrize("opcode", [Opcode.PING, Opcode.PONG, Opcode.CLOSE])
def test_a_fragmented_control_frame_is_refused(opcode: Opcode) -> None:
    stream = hand_frame(int(opcode), b"")  # FIN clear
    assert refusal(FrameReader(LIMIT), stream) == (1002, "fragmented control frame")


# --- header bits and opcodes ---------------------------------------------------------------


@pytest.mark.parametrize("bit", [0x40, 0x20, 0x10])
def test_each_reserved_bit_is_refused(bit: int) -> None:
    stream = bytes((0x81 | bit, 0x80)) + b"\0\0\0\0"
    assert refusal(FrameReader(LIMIT), stream) == (1002, "reserved bits are set")


@pytest.mark.parametrize("opcode", [0x3, 0x4, 0x5, 0x6, 0x7, 0xB, 0xC, 0xD, 0xE, 0xF])
def test_every_reserved_opcode_is_refused(opcode: int) -> None:
    stream = bytes((0x80 | opcode, 0x80)) + b"\0\0\0\0"
    assert refusal(FrameReader(LIMIT), stream) == (1002, f"unknown opcode {opcode:#x}")


@pytest.mark.parametrize("opcode", [0x1, 0x2, 0x8, 0x9, 0xA])
def test_every_defined_opcode_is_read(opcode: int) -> None:
    stream = bytes((0x80 | opcode, 0x80)) + b"\0\0\0\0"
    assert FrameReader(LIMIT).feed(stream) == [(opcode, b"")]


def test_a_masked_bit_missing_is_refused_even_on_a_control_frame() -> None:
    assert refusal(FrameReader(LIMIT), bytes((0x89, 0x00))) == (
        1002,
        "client frames must be masked",
    )


# --- sizes: the limit, and length fields split across reads ---------------------------------


@pytest.mark.parametrize("limit", [0, 125, 126, 65_535, 65_536, 70_000])
def test_a_message_of_exactly_the_limit_is_read_and_one_byte_more_is_refused(limit: int) -> None:
    payload = b"z" * limit
    assert FrameReader(limit).feed(client_frame(Opcode.BINARY, payload)) == [(wire.BINARY, payload)]
    assert refusal(FrameReader(limit), client_frame(Opcode.BINARY, payload + b"z")) == (
        1009,
        f"frame is {limit + 1} bytes; the limit is {limit}",
    )


def test_fragments_reaching_the_limit_exactly_are_read() -> None:
    reader = FrameReader(10)
    stream = (
        client_frame(Opcode.TEXT, b"abc", fin=False)
        + client_frame(Opcode.CONT, b"defg", fin=False)
        + client_frame(Opcode.CONT, b"hij")
    )
    assert reader.feed(stream) == [(wire.TEXT, b"abcdefghij")]
    # The count starts again with the next message.
    assert reader.feed(client_frame(Opcode.TEXT, b"0123456789")) == [(wire.TEXT, b"0123456789")]


def test_a_third_fragment_over_the_limit_is_refused() -> None:
    reader = FrameReader(10)
    stream = (
        client_frame(Opcode.TEXT, b"abc", fin=False)
        + client_frame(Opcode.CONT, b"defg", fin=False)
        + client_frame(Opcode.CONT, b"hijk")
    )
    assert refusal(reader, stream) == (1009, "frame is 11 bytes; the limit is 10")


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65_535, 65_536])
def test_a_frame_fed_in_two_pieces_at_every_header_byte_is_read_once(size: int) -> None:
    payload = bytes(i % 249 for i in range(size))
    stream = client_frame(Opcode.BINARY, payload, mask=b"\x9a\x3c\xe1\x07")
    head = 2 + {126: 2, 127: 8}.get(stream[1] & 0x7F, 0) + 4
    for cut in range(1, head + 2):
        reader = FrameReader(LIMIT)
        assert reader.feed(stream[:cut]) == ([(wire.BINARY, payload)] if cut >= len(stream) else [])
        rest = reader.feed(stream[cut:])
        assert rest == ([] if cut >= len(stream) else [(wire.BINARY, payload)])


@pytest.mark.parametrize("size", [126, 300, 65_536])
def test_a_frame_fed_one_byte_at_a_time_is_read_once_at_its_last_byte(size: int) -> None:
    payload = bytes(i % 253 for i in range(size))
    stream = client_frame(Opcode.TEXT, payload) + client_frame(Opcode.PING, b"after")
    reader = FrameReader(LIMIT)
    first_end = len(stream) - len(client_frame(Opcode.PING, b"after"))
    got: list[tuple[int, list[tuple[int, bytes]]]] = []
    if size > 300:  # byte by byte through the headers; the payload in one piece
        pieces = [stream[i : i + 1] for i in range(14)]
        pieces += [stream[14 : first_end - 1], stream[first_end - 1 : first_end]]
        pieces += [stream[i : i + 1] for i in range(first_end, len(stream))]
    else:
        pieces = [stream[i : i + 1] for i in range(len(stream))]
    end = 0
    for piece in pieces:
        end += len(piece)
        messages = reader.feed(piece)
        if messages:
            got.append((end, messages))
    assert got == [(first_end, [(wire.TEXT, payload)]), (len(stream), [(wire.PING, b"after")])]


@pytest.mark.parametrize(("size", "field_end"), [(200, 4), (70_000, 10)])
def test_oversize_is_refused_as_soon_as_a_split_length_field_is_whole(
    size: int, field_end: int
) -> None:
    stream = client_frame(Opcode.BINARY, b"q" * size)
    reader = FrameReader(100)
    for index in range(field_end - 1):
        assert reader.feed(stream[index : index + 1]) == []
    assert refusal(reader, stream[field_end - 1 : field_end]) == (
        1009,
        f"frame is {size} bytes; the limit is 100",
    )


def test_a_length_with_its_high_bit_set_is_refused_when_its_field_is_whole() -> None:
    stream = bytes((0x82, 0xFF)) + struct.pack("!Q", (1 << 63) | 5)
    reader = FrameReader(LIMIT)
    for index in range(9):
        assert reader.feed(stream[index : index + 1]) == []
    assert refusal(reader, stream[9:]) == (1002, "frame length has its high bit set")


def test_the_largest_length_without_the_high_bit_is_only_too_big() -> None:
    stream = bytes((0x82, 0xFF)) + struct.pack("!Q", (1 << 63) - 1)
    assert refusal(FrameReader(LIMIT), stream) == (
        1009,
        f"frame is {(1 << 63) - 1} bytes; the limit is {LIMIT}",
    )


def test_a_frame_and_part_of_the_next_give_the_first_then_the_second() -> None:
    one, two = client_frame(Opcode.TEXT, b"one"), client_frame(Opcode.TEXT, b"two" * 50)
    reader = FrameReader(LIMIT)
    assert reader.feed(one + two[:3]) == [(wire.TEXT, b"one")]
    assert reader.feed(two[3:-1]) == []
    assert reader.feed(two[-1:] + one) == [(wire.TEXT, b"two" * 50), (wire.TEXT, b"one")]
    assert reader.feed(b"") == []


# --- close codes (RFC 6455 §7.4) -------------------------------------------------------------

#: The codes a peer may send: §7.4.1's, less 1004 (reserved), 1005 and 1006 (never on the
#: wire), plus the IANA registry's 1012-1014; 1015 (TLS) is never sent either; 3000-4999
#: are for libraries and applications.
ALLOWED = {1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014}


@pytest.mark.parametrize("code", sorted(ALLOWED | {3000, 3001, 3999, 4000, 4998, 4999}))
def test_every_allowed_close_code_is_read(code: int) -> None:
    assert wire.parse_close(struct.pack("!H", code) + b"why") == (code, "why")


@pytest.mark.parametrize(
    "code", [0, 1, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 5001, 65535]
)
def test_every_refused_close_code_is_a_protocol_error(code: int) -> None:
    with pytest.raises(WireError) as raised:
        wire.parse_close(struct.pack("!H", code))
    assert (raised.value.code, raised.value.reason) == (1002, f"close code {code} may not be sent")


def test_close_codes_allowed_are_exactly_the_rfc_ones() -> None:
    accepted = set()
    for code in range(1 << 16):
        try:
            wire.parse_close(struct.pack("!H", code))
        except WireError:
            continue
        accepted.add(code)
    assert accepted == ALLOWED | set(range(3000, 5000))


def test_a_close_reason_is_utf8_checked_after_the_code() -> None:
    assert wire.parse_close(struct.pack("!H", 4000) + "né".encode()) == (4000, "né")
    with pytest.raises(WireError) as raised:
        wire.parse_close(struct.pack("!H", 4000) + b"\xc3")
    assert (raised.value.code, raised.value.reason) == (1007, "close reason is not UTF-8")
    with pytest.raises(WireError) as one_byte:
        wire.parse_close(b"\x03")
    assert one_byte.value.reason == "close frame of one byte"


def test_close_frame_reasons_are_cut_to_123_bytes() -> None:
    frame = wire.close_frame(4000, "a" * 200)
    assert frame[:4] == bytes((0x88, 125, 0x0F, 0xA0))
    assert frame[4:] == b"a" * 123
    assert wire.close_frame(1000, "a" * 123)[1] == 125
    assert wire.close_frame(1000, "") == bytes((0x88, 2, 0x03, 0xE8))


def test_keys_of_16_bytes_only_are_valid() -> None:
    assert wire.valid_key("AAAAAAAAAAAAAAAAAAAAAA==")  # 16 bytes
    assert not wire.valid_key("AAAAAAAAAAAAAAAAAAAA")  # 15 bytes
    assert not wire.valid_key("AAAAAAAAAAAAAAAAAAAAAAA=")  # 17 bytes
    assert not wire.valid_key("AAAAAAAAAAAAAAAAAAAAAé==")  # not ASCII


@pytest.mark.parametrize("size", [126, 65_536])
def test_a_frame_then_an_extended_length_cut_short_gives_the_frame_and_waits(size: int) -> None:
    one = client_frame(Opcode.TEXT, b"one")
    big = client_frame(Opcode.BINARY, b"b" * size)
    head = 4 if size < 65_536 else 10
    for cut in range(1, head):
        reader = FrameReader(LIMIT)
        assert reader.feed(one + big[:cut]) == [(wire.TEXT, b"one")]
        assert reader.feed(big[cut:]) == [(wire.BINARY, b"b" * size)]
