"""The exact text of what the hub says (protocol.md §4): the server's frames byte for
byte (compact JSON, the protocol's key order), and the message of each bad request the
parser answers that the broader tests of test_frames.py check only by kind."""

from __future__ import annotations

import pytest

from whatslike.hub import frames
from whatslike.hub.frames import FrameError, parse_client_frame


def test_server_frames_are_compact_json_in_protocol_order() -> None:
    assert frames.pong({"a": [1, 2]}) == '{"type":"pong","ts":{"a":[1,2]}}'
    assert frames.unsubscribed("c1", 2) == '{"type":"unsubscribed","conversation_id":"c1","ref":2}'
    assert frames.subscribed("c1", 45, False) == (
        '{"type":"subscribed","conversation_id":"c1","seq":45,"recovered":false}'
    )
    assert frames.auth_ok(77, "r3") == '{"type":"auth_ok","token_exp":77,"ref":"r3"}'
    assert frames.campaign(
        "cmp_1",
        version=7,
        total=3,
        counts={"waiting": 0, "read": 2, "failed": 1, "failed_by_code": {"131026": 1}},
        finished=True,
        ref="r",
    ) == (
        '{"type":"campaign","campaign_id":"cmp_1","version":7,"total":3,"counts":{"waiting":0,'
        '"read":2,"failed":1,"failed_by_code":{"131026":1}},"finished":true,"ref":"r"}'
    )
    assert frames.campaign_unsubscribed("cmp_1", 4) == (
        '{"type":"campaign_unsubscribed","campaign_id":"cmp_1","ref":4}'
    )
    assert frames.error("forbidden", "no") == '{"type":"error","code":"forbidden","message":"no"}'
    assert frames.connected(
        connection_id="k", user_id="u", org_id="o", heartbeat_s=25, token_exp=99
    ) == (
        '{"type":"connected","connection_id":"k","user_id":"u","org_id":"o",'
        '"heartbeat_s":25,"token_exp":99}'
    )


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (
            '{"type":"auth","token":"a\\ud800b","ref":1}',
            FrameError("field 'token' is not valid Unicode (a lone surrogate)", 1),
        ),
        (
            '{"type":"ping","ref":"\\ud83d"}',
            FrameError("field 'ref' is not valid Unicode (a lone surrogate)"),
        ),
        (
            '{"type":"subscribe","conversation_id":"c d","ref":"r"}',
            FrameError("field 'conversation_id' must be 1-128 of A-Z a-z 0-9 _ . : -", "r"),
        ),
        (
            '{"type":"unsubscribe","conversation_id":"' + "c" * 129 + '"}',
            FrameError("field 'conversation_id' must be 1-128 of A-Z a-z 0-9 _ . : -"),
        ),
    ],
)
def test_the_message_of_each_bad_field(raw: str, expected: FrameError) -> None:
    assert parse_client_frame(raw, 4096) == expected


def test_a_128_character_id_is_taken() -> None:
    result = parse_client_frame(
        '{"type":"unsubscribe","conversation_id":"' + "c" * 128 + '"}', 4096
    )
    assert result == frames.Unsubscribe("c" * 128)
