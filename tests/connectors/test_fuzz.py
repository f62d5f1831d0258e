"""Hypothesis against the webhook parsers: whatever a (signed) body holds, only a body
that is not a JSON object is refused (WebhookPayloadError, a 400); any other part that
is not Meta's shape is rejected alone; and every event made of what they hand on, in
every text field, is text the bus, the store and the logs can take."""

from __future__ import annotations

import dataclasses
import json
from datetime import datetime
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from whatslike.connectors import instagram
from whatslike.connectors.instagram import InstagramRead
from whatslike.connectors.meta import CustomerMessage, WebhookPayloadError, load_object
from whatslike.connectors.whatsapp import WhatsAppStatus, parse_webhook
from whatslike.events import StatusEvent
from whatslike.status.rules import Status

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


_errors = st.lists(st.fixed_dictionaries({"code": _json, "title": _json}), max_size=2)
_status = st.fixed_dictionaries(
    {
        "id": _maybe(_text),
        "status": _maybe(st.sampled_from(["sent", "delivered", "read", "failed", "deleted"])),
        "timestamp": _maybe(st.integers(-(10**20), 10**20).map(str)),
        "recipient_id": _maybe(_text),
        "biz_opaque_callback_data": _maybe(_text),
        "errors": _maybe(_errors),
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
                                                    "errors": _maybe(_errors),
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
        "read": _maybe(
            st.fixed_dictionaries({"mid": _json}) | st.fixed_dictionaries({"watermark": _json})
        ),
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
    """What the connector does with a signed body: only a body that is not a JSON object
    raises (WebhookPayloadError, a 400); anything else is parsed item by item."""
    try:
        payload = load_object(body)
    except WebhookPayloadError:
        return []
    parsed = parser(payload)
    for line in parsed.rejected:
        line.encode("utf-8")  # said in a log line
    for code, title in parsed.errors:
        code.encode("utf-8")
        title.encode("utf-8")
    return list(parsed.items)


def _customer_storable(message: CustomerMessage) -> None:
    """A customer's message goes into the store and a frame: all of it must be UTF-8."""
    for text in (message.account_id, message.contact, message.provider_message_id, message.text):
        text.encode("utf-8")
    _storable(_event(message.provider_message_id, Status.DELIVERED, message.sent_at, None))


def _storable(event: StatusEvent) -> None:
    """The event as the status worker would read it: it decodes, and every text in it is
    UTF-8 (no lone surrogate a store, a log or the fan-out would refuse)."""
    decoded = StatusEvent.from_json(event.to_json())
    assert decoded == event
    event.to_json().decode("ascii")
    json.dumps(dataclasses.asdict(decoded), default=str, ensure_ascii=False).encode("utf-8")


def _event(provider_message_id: str, status: Status, at: datetime, error: Any) -> StatusEvent:
    return StatusEvent(
        event_id="evt_1",
        message_id="msg_1",
        conversation_id="conv_1",
        org_id="org_1",
        channel="whatsapp",
        status=status,
        provider_message_id=provider_message_id,
        occurred_at=at,
        error=error,
    )


@settings(max_examples=400)
@given(_whatsapp)
def test_whatsapp_statuses_never_raise_anything_else(payload: dict[str, Any]) -> None:
    for status in _parse_whole(_body(payload), parse_webhook):
        if isinstance(status, CustomerMessage):
            _customer_storable(status)
            continue
        assert isinstance(status, WhatsAppStatus)
        status.callback_data.encode("utf-8")
        status.phone_number_id.encode("utf-8")
        _storable(
            _event(status.provider_message_id, status.status, status.occurred_at, status.error)
        )


@settings(max_examples=400)
@given(_instagram)
def test_instagram_reads_never_raise_anything_else(payload: dict[str, Any]) -> None:
    for read in _parse_whole(_body(payload), instagram.parse_webhook):
        if isinstance(read, CustomerMessage):
            _customer_storable(read)
            continue
        assert isinstance(read, InstagramRead)
        read.account_id.encode("utf-8")
        _storable(_event(read.provider_message_id or "-", Status.READ, read.occurred_at, None))


@given(st.binary(max_size=400))
def test_arbitrary_bytes_never_raise_anything_else(body: bytes) -> None:
    _parse_whole(body, parse_webhook)
    _parse_whole(body, instagram.parse_webhook)


def test_a_number_past_the_digit_limit_is_a_payload_error() -> None:
    body = b'{"object":"instagram","entry":[{"id":' + b"9" * 5000 + b"}]}"
    assert _parse_whole(body, instagram.parse_webhook) == []
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
    assert _parse_whole(_body(huge_timestamp), parse_webhook) == []


def test_a_lone_surrogate_is_replaced_and_the_rest_kept() -> None:
    body = (
        b'{"object":"instagram","entry":[{"id":"1","messaging":[{"timestamp":1,'
        b'"read":{"mid":"m\\ud800\\ud83d\\ude00x"}}]}]}'
    )
    [read] = instagram.parse_webhook(load_object(body)).items
    assert read.provider_message_id == "m\ufffd\U0001f600x"


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
    parsed = parse_webhook(load_object(_body(payload))).items
    assert [status.callback_data for status in parsed if isinstance(status, WhatsAppStatus)] == [
        "msg_1",
        "",
        "",
    ]
