"""The client frame parser (every error with its exact message, never an exception) and
the server frame builders."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from whatslike.hub import frames
from whatslike.hub.frames import (
    Auth,
    FrameError,
    Ping,
    Read,
    Subscribe,
    SubscribeCampaign,
    Unsubscribe,
    UnsubscribeCampaign,
    parse_client_frame,
)

LIMIT = 4096


def parse(raw: str | bytes) -> object:
    return parse_client_frame(raw, LIMIT)


def test_subscribe_with_every_field() -> None:
    raw = '{"type":"subscribe","conversation_id":"c1","since":41,"ref":"r1"}'
    assert parse(raw) == Subscribe("c1", 41, "r1")


def test_subscribe_without_optional_fields() -> None:
    assert parse('{"type":"subscribe","conversation_id":"c1"}') == Subscribe("c1")
    assert parse('{"type":"subscribe","conversation_id":"c1","since":null}') == Subscribe("c1")


def test_since_zero_is_valid() -> None:
    assert parse('{"type":"subscribe","conversation_id":"c","since":0}') == Subscribe("c", 0)


def test_unsubscribe() -> None:
    raw = '{"type":"unsubscribe","conversation_id":"c1","ref":7}'
    assert parse(raw) == Unsubscribe("c1", 7)


def test_campaign_subscriptions() -> None:
    raw = '{"type":"subscribe_campaign","campaign_id":"cmp_1","ref":"r1"}'
    assert parse(raw) == SubscribeCampaign("cmp_1", "r1")
    raw = '{"type":"unsubscribe_campaign","campaign_id":"cmp_1"}'
    assert parse(raw) == UnsubscribeCampaign("cmp_1")
    assert parse('{"type":"subscribe_campaign","campaign_id":"a b","ref":2}') == FrameError(
        "field 'campaign_id' must be 1-128 of A-Z a-z 0-9 _ . : -", 2
    )
    assert parse('{"type":"subscribe_campaign"}') == FrameError("field 'campaign_id' is required")


@pytest.mark.parametrize("ts", [123, "abc", None, [1, {"a": 2}], 1.5, {"x": True}])
def test_ping_keeps_any_json_ts(ts: object) -> None:
    assert parse(json.dumps({"type": "ping", "ts": ts})) == Ping(ts)


def test_ping_without_ts() -> None:
    assert parse('{"type":"ping"}') == Ping(None)


def test_auth() -> None:
    assert parse('{"type":"auth","token":"a.b.c","ref":"r3"}') == Auth("a.b.c", "r3")


def test_read() -> None:
    raw = '{"type":"read","conversation_id":"c1","message_id":"msg_in_1","ref":"r4"}'
    assert parse(raw) == Read("c1", "msg_in_1", "r4")
    for missing in ('{"type":"read","conversation_id":"c1"}', '{"type":"read","message_id":"m"}'):
        result = parse(missing)
        assert isinstance(result, FrameError) and "is required" in result.message
    bad = parse('{"type":"read","conversation_id":"c1","message_id":"a/b","ref":1}')
    assert isinstance(bad, FrameError) and (bad.code, bad.ref) == ("bad_request", 1)
    assert json.loads(frames.read_ok("c1", "m1", "r4")) == {
        "type": "read_ok",
        "conversation_id": "c1",
        "message_id": "m1",
        "ref": "r4",
    }


def test_unknown_fields_are_ignored() -> None:
    assert parse('{"type":"ping","ts":1,"extra":{"x":1}}') == Ping(1)


def test_binary_utf8_is_read_as_text() -> None:
    assert parse('{"type":"auth","token":"ç"}'.encode()) == Auth("ç")


@pytest.mark.parametrize(
    "conversation_id",
    ["ç", "a b", "a/b", "x" * 129, "\u0000", "c1\n", "../c1", "%2e", "\ud800"],
)
def test_ids_outside_the_protocol_pattern_are_bad_requests(conversation_id: str) -> None:
    for kind in ("subscribe", "unsubscribe"):
        raw = json.dumps({"type": kind, "conversation_id": conversation_id, "ref": "r"})
        result = parse(raw)
        assert isinstance(result, FrameError), raw
        assert (result.code, result.ref) == ("bad_request", "r")


def test_ids_inside_the_pattern_are_taken() -> None:
    for conversation_id in ("c1", "conv_3f2a", "A-Z.0:9_", "x" * 128):
        assert parse(json.dumps({"type": "subscribe", "conversation_id": conversation_id})) == (
            Subscribe(conversation_id)
        )


@pytest.mark.parametrize(
    "raw",
    [
        '{"type":"auth","token":"a\\ud800b"}',
        '{"type":"auth","token":"\\udfff"}',
        '{"type":"ping","ref":"\\ud83d"}',
        '{"type":"subscribe","conversation_id":"c\\udc00"}',
    ],
)
def test_lone_surrogates_are_bad_requests(raw: str) -> None:
    result = parse(raw)
    assert isinstance(result, FrameError)
    assert result.code == "bad_request"


DEEP = f"frame nests arrays and objects deeper than {frames.MAX_DEPTH} levels"


@pytest.mark.parametrize(
    ("raw", "message", "ref"),
    [
        ('{"type":"x"}', "unknown frame type 'x'", None),
        ('{"type":"x","ref":"r9"}', "unknown frame type 'x'", "r9"),
        ('{"ref":1}', "field 'type' is required", 1),
        ('{"type":null}', "field 'type' is required", None),
        ('{"type":3}', "field 'type' must be a string", None),
        ('{"type":"subscribe","ref":"r"}', "field 'conversation_id' is required", "r"),
        (
            '{"type":"subscribe","conversation_id":null}',
            "field 'conversation_id' is required",
            None,
        ),
        (
            '{"type":"subscribe","conversation_id":""}',
            "field 'conversation_id' must be a non-empty string",
            None,
        ),
        (
            '{"type":"subscribe","conversation_id":5}',
            "field 'conversation_id' must be a non-empty string",
            None,
        ),
        (
            '{"type":"subscribe","conversation_id":"c","since":-1,"ref":"r"}',
            "field 'since' must be a non-negative integer",
            "r",
        ),
        (
            '{"type":"subscribe","conversation_id":"c","since":true}',
            "field 'since' must be a non-negative integer",
            None,
        ),
        (
            '{"type":"subscribe","conversation_id":"c","since":1.5}',
            "field 'since' must be a non-negative integer",
            None,
        ),
        (
            '{"type":"subscribe","conversation_id":"c","since":"4"}',
            "field 'since' must be a non-negative integer",
            None,
        ),
        ('{"type":"unsubscribe"}', "field 'conversation_id' is required", None),
        ('{"type":"auth"}', "field 'token' is required", None),
        ('{"type":"auth","token":7}', "field 'token' must be a non-empty string", None),
        ('{"type":"ping","ref":true}', "field 'ref' must be a string or an integer", None),
        ('{"type":"ping","ref":{"a":1}}', "field 'ref' must be a string or an integer", None),
        ("", "frame is not valid JSON", None),
        ("{", "frame is not valid JSON", None),
        ('{"type":"ping","ts":NaN}', "frame is not valid JSON", None),
        ('{"type":"ping","ts":-Infinity}', "frame is not valid JSON", None),
        ('{"type":"ping","ts":1e999}', "frame is not valid JSON", None),
        ("[" * 2000 + "]" * 2000, DEEP, None),
        ("[]", "frame must be a JSON object", None),
        ('"subscribe"', "frame must be a JSON object", None),
        ("null", "frame must be a JSON object", None),
        (b"\xff\xfe", "frame is not valid UTF-8", None),
    ],
)
def test_bad_frames(raw: str | bytes, message: str, ref: frames.Ref) -> None:
    assert parse(raw) == FrameError(message, ref)


def test_bad_frame_code_is_bad_request() -> None:
    error = parse("nope")
    assert isinstance(error, FrameError)
    assert error.code == "bad_request"
    assert not error.too_large


def test_oversized_text_counts_utf8_bytes() -> None:
    raw = json.dumps({"type": "ping", "ts": "é" * 2500}, ensure_ascii=False)
    size = len(raw.encode())
    assert parse(raw) == FrameError(f"frame is {size} bytes; the limit is {LIMIT}", too_large=True)


def test_oversized_binary_is_too_large_before_decoding() -> None:
    assert parse_client_frame(b"\xff" * 5000, LIMIT) == FrameError(
        "frame is 5000 bytes; the limit is 4096", too_large=True
    )


def test_frame_at_the_limit_is_accepted() -> None:
    head = '{"type":"ping","ts":"'
    raw = head + "a" * (LIMIT - len(head) - 2) + '"}'
    assert len(raw) == LIMIT
    assert isinstance(parse(raw), Ping)


@given(
    st.integers(0, 2000),
    st.lists(st.sampled_from(["[]", "{}"]), min_size=1),
    st.sampled_from(["ping", "subscribe", "nope"]),
)
def test_any_nesting_is_parsed_or_refused_and_pongs_serialize(
    depth: int, brackets: list[str], kind: str
) -> None:
    """A `ts` nested ~1,000 deep once parsed, and then broke the pong's serializer (1011
    and a traceback): nesting past MAX_DEPTH is a bad request, whatever the depth."""
    ts = "1"
    for level in range(depth):
        ts = "[" + ts + "]" if brackets[level % len(brackets)] == "[]" else '{"k":' + ts + "}"
    raw = f'{{"type":"{kind}","conversation_id":"c","ts":{ts}}}'
    result = parse_client_frame(raw, 100_000)
    if depth + 1 > frames.MAX_DEPTH:
        assert result == FrameError(DEEP)
    else:
        assert result != FrameError(DEEP)
        if kind == "ping":
            assert isinstance(result, Ping)
            assert json.loads(frames.pong(result.ts))["ts"] == result.ts


@given(st.text(max_size=300))
def test_arbitrary_text_never_raises(raw: str) -> None:
    result = parse_client_frame(raw, 256)
    assert isinstance(result, Subscribe | Unsubscribe | Ping | Auth | FrameError)


@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_raise(raw: bytes) -> None:
    result = parse_client_frame(raw, 256)
    assert isinstance(result, Subscribe | Unsubscribe | Ping | Auth | FrameError)


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=8,
)


@given(
    st.dictionaries(
        st.sampled_from(["type", "conversation_id", "since", "ref", "token", "ts", "x"]),
        _json | st.sampled_from(["subscribe", "unsubscribe", "ping", "auth"]),
    )
)
def test_arbitrary_objects_never_raise_and_pongs_stay_json(data: dict[str, object]) -> None:
    result = parse_client_frame(json.dumps(data), 10_000)
    if isinstance(result, Ping):
        json.loads(frames.pong(result.ts))  # always a valid JSON answer
    else:
        assert isinstance(result, Subscribe | Unsubscribe | Auth | FrameError)


_surrogates = st.text(
    st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF) | st.characters(), max_size=6
)


@given(
    st.sampled_from(["subscribe", "unsubscribe", "auth", "ping", "read", "nope"]),
    _surrogates,
    _surrogates | st.integers(),
)
def test_what_the_parser_accepts_is_clean_text(kind: str, value: str, ref: object) -> None:
    """Every string that comes out of the parser can be encoded, stored and logged: a lone
    surrogate or an id outside the pattern is a FrameError, never an exception later."""
    raw = json.dumps(
        {
            "type": kind,
            "conversation_id": value,
            "message_id": value,
            "token": value,
            "ts": value,
            "ref": ref,
        }
    )
    result = parse_client_frame(raw, 10_000)
    match result:
        case Subscribe(conversation_id=cid, ref=r) | Unsubscribe(conversation_id=cid, ref=r):
            assert frames.valid_id(cid)
            assert not isinstance(r, str) or not frames.has_lone_surrogate(r)
        case Read(conversation_id=cid, message_id=mid):
            assert frames.valid_id(cid) and frames.valid_id(mid)
        case Auth(token=token):
            token.encode("utf-8")
        case Ping(ts=ts):
            json.loads(frames.pong(ts))
        case FrameError(code=code):
            assert code == "bad_request"


def test_server_frames() -> None:
    assert json.loads(
        frames.connected(connection_id="k", user_id="u", org_id="o", heartbeat_s=25, token_exp=99)
    ) == {
        "type": "connected",
        "connection_id": "k",
        "user_id": "u",
        "org_id": "o",
        "heartbeat_s": 25,
        "token_exp": 99,
    }
    assert json.loads(frames.subscribed("c1", 45, True, "r1")) == {
        "type": "subscribed",
        "conversation_id": "c1",
        "seq": 45,
        "recovered": True,
        "ref": "r1",
    }
    assert json.loads(frames.unsubscribed("c1", 2)) == {
        "type": "unsubscribed",
        "conversation_id": "c1",
        "ref": 2,
    }
    assert json.loads(frames.pong({"a": [1]})) == {"type": "pong", "ts": {"a": [1]}}
    assert json.loads(frames.auth_ok(77, "r3")) == {"type": "auth_ok", "token_exp": 77, "ref": "r3"}
    assert json.loads(frames.error("forbidden", "no", "r")) == {
        "type": "error",
        "code": "forbidden",
        "message": "no",
        "ref": "r",
    }


def test_ref_is_left_out_when_the_client_gave_none() -> None:
    assert "ref" not in json.loads(frames.error("bad_request", "x"))
    assert "ref" not in json.loads(frames.unsubscribed("c"))


def test_batch_joins_frames_without_reencoding() -> None:
    # Key order and spacing that json.dumps would not produce prove the text is untouched.
    first = '{"seq": 1,  "type":"status"}'
    second = '{"type":"status","seq":2}'
    text = frames.batch([first, second])
    assert text == '{"type":"batch","frames":[' + first + "," + second + "]}"
    assert json.loads(text)["frames"] == [json.loads(first), json.loads(second)]
