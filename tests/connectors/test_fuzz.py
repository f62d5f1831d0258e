"""Hypothesis against the webhook parsers: whatever a (signed) body holds, the only
exception that leaves them is WebhookPayloadError (answered 400), and what they hand on
is text the store can take."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from whatslike.connectors.instagram import parse_reads
from whatslike.connectors.meta import WebhookPayloadError, load_object
from whatslike.connectors.whatsapp import parse_statuses

#: Text with lone surrogates too: JSON can carry them ("\\ud800"), UTF-8 cannot.
_text = st.text(st.characters(exclude_categories=()), max_size=12)
_leaf = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | _text
    | st.sampled_from(["sent", "delivered", "read", "failed", "", "1700000000", "9" * 5000])
)
_json = st.recursive(
    _leaf,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)


def _maybe(value: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return value | _json


_status = st.fixed_dictionaries(
    {
        "id": _maybe(_text),
        "status": _maybe(st.sampled_from(["sent", "delivered", "read", "failed", "deleted"])),
        "timestamp": _maybe(st.integers(-(10**20), 10**20).map(str)),
        "recipient_id": _maybe(_text),
        "biz_opaque_callback_data": _maybe(_text),
        "errors": _maybe(st.lists(st.fixed_dictionaries({"code": _json, "title": _json}))),
    }
)
_whatsapp = st.fixed_dictionaries(
    {
        "object": _maybe(st.just("whatsapp_business_account")),
        "entry": _maybe(
            st.lists(
                st.fixed_dictionaries(
                    {
                        "id": _json,
                        "changes": _maybe(
                            st.lists(
                                st.fixed_dictionaries(
                                    {
                                        "field": _maybe(st.just("messages")),
                                        "value": _maybe(
                                            st.fixed_dictionaries(
                                                {
                                                    "metadata": _maybe(
                                                        st.fixed_dictionaries(
                                                            {"phone_number_id": _json}
                                                        )
                                                    ),
                                                    "statuses": _maybe(
                                                        st.lists(_maybe(_status), max_size=3)
                                                    ),
                                                }
                                            )
                                        ),
                                    }
                                ),
                                max_size=2,
                            )
                        ),
                    }
                ),
                max_size=2,
            )
        ),
    }
)
_read = st.fixed_dictionaries(
    {
        "sender": _json,
        "recipient": _json,
        "timestamp": _maybe(st.integers() | st.floats()),
        "read": _maybe(st.fixed_dictionaries({"mid": _json})),
    }
)
_instagram = st.fixed_dictionaries(
    {
        "object": _maybe(st.just("instagram")),
        "entry": _maybe(
            st.lists(
                st.fixed_dictionaries(
                    {"id": _json, "time": _json, "messaging": _maybe(st.lists(_maybe(_read)))}
                ),
                max_size=2,
            )
        ),
    }
)


def _body(payload: Any) -> bytes:
    # As Meta would send it, surrogates escaped; Infinity/NaN are not JSON but a forger
    # can write them, so they are kept.
    return json.dumps(payload).encode()


def _parse_whole(body: bytes, parser: Any) -> list[Any]:
    """What the connector does with a signed body; only WebhookPayloadError may leave."""
    try:
        return list(parser(load_object(body)))
    except WebhookPayloadError:
        return []


@settings(max_examples=400)
@given(_whatsapp)
def test_whatsapp_statuses_never_raise_anything_else(payload: dict[str, Any]) -> None:
    for status in _parse_whole(_body(payload), parse_statuses):
        status.provider_message_id.encode("utf-8")  # storable text, no lone surrogate
        status.callback_data.encode("utf-8")
        status.phone_number_id.encode("utf-8")


@settings(max_examples=400)
@given(_instagram)
def test_instagram_reads_never_raise_anything_else(payload: dict[str, Any]) -> None:
    for read in _parse_whole(_body(payload), parse_reads):
        read.provider_message_id.encode("utf-8")
        read.account_id.encode("utf-8")


@given(st.binary(max_size=400))
def test_arbitrary_bytes_never_raise_anything_else(body: bytes) -> None:
    _parse_whole(body, parse_statuses)
    _parse_whole(body, parse_reads)


def test_a_number_past_the_digit_limit_is_a_payload_error() -> None:
    body = b'{"object":"instagram","entry":[{"id":' + b"9" * 5000 + b"}]}"
    assert _parse_whole(body, parse_reads) == []
    huge_timestamp = {
        "object": "whatsapp_business_account",
        "entry": [
            {
                "changes": [
                    {
                        "field": "messages",
                        "value": {
                            "metadata": {"phone_number_id": "1"},
                            "statuses": [{"id": "w", "status": "sent", "timestamp": "9" * 5000}],
                        },
                    }
                ]
            }
        ],
    }
    assert _parse_whole(_body(huge_timestamp), parse_statuses) == []


def test_a_lone_surrogate_in_an_id_is_a_payload_error() -> None:
    body = (
        b'{"object":"instagram","entry":[{"id":"1","messaging":[{"timestamp":1,'
        b'"read":{"mid":"m\\ud800"}}]}]}'
    )
    try:
        parse_reads(load_object(body))
    except WebhookPayloadError as error:
        assert "mid" in str(error)
    else:
        raise AssertionError("a lone surrogate got through")


def test_callback_data_that_is_not_clean_text_is_dropped() -> None:
    payload = {
        "object": "whatsapp_business_account",
        "entry": [
            {
                "changes": [
                    {
                        "field": "messages",
                        "value": {
                            "metadata": {"phone_number_id": "1"},
                            "statuses": [
                                {
                                    "id": "wamid.1",
                                    "status": "sent",
                                    "timestamp": "1700000000",
                                    "biz_opaque_callback_data": hint,
                                }
                                for hint in ("msg_1", "m\ud800", "a\nb")
                            ],
                        },
                    }
                ]
            }
        ],
    }
    parsed = parse_statuses(load_object(_body(payload)))
    assert [status.callback_data for status in parsed] == ["msg_1", "", ""]
