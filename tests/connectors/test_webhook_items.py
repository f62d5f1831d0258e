"""Meta's webhook shapes item by item (issue 17, "tests that pin the protocol"): one
Instagram `messaging[]` item as `parse_messaging` reads it, and the JSON helpers every
parser shares, with the exact error each bad shape gets."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from starlette.requests import Request
from starlette.responses import Response

from tests.connectors.test_instagram import seen, sent_message
from tests.connectors.test_whatsapp import Harness, open_harness
from whatslike.connectors.instagram import InstagramConnector, parse_messaging, parse_webhook
from whatslike.connectors.meta import (
    WebhookPayloadError,
    json_list,
    json_object,
    json_text,
    load_object,
    read_body,
    verification_response,
)
from whatslike.connectors.whatsapp import WhatsAppConnector

ACCOUNT = "17841400000000001"


@pytest.fixture
async def instagram(tmp_path: Path) -> AsyncIterator[Harness]:
    async with open_harness(tmp_path, InstagramConnector) as harness:
        yield harness


def seen_item(**changes: Any) -> dict[str, Any]:
    item: dict[str, Any] = {
        "sender": {"id": "7000000000000042"},
        "recipient": {"id": ACCOUNT},
        "timestamp": 1764072300120,
        "read": {"mid": "aWdfZAG1"},
    }
    item.update(changes)
    return item


def refused(raw: Any) -> str:
    with pytest.raises(WebhookPayloadError) as raised:
        parse_messaging(raw, ACCOUNT, "m")
    return str(raised.value)


def test_a_seen_item_is_read() -> None:
    item = seen_item()
    read = parse_messaging(item, ACCOUNT, "m")
    assert read is not None
    assert read.account_id == ACCOUNT
    assert read.provider_message_id == "aWdfZAG1"
    assert read.occurred_at == datetime(2025, 11, 25, 12, 5, 0, 120000, tzinfo=UTC)
    assert read.payload == json.dumps(item, separators=(",", ":")).encode()


def test_a_fractional_or_float_millisecond_time_is_taken() -> None:
    read = parse_messaging(seen_item(timestamp=1764072300120.0), ACCOUNT)
    assert read is not None and read.occurred_at.microsecond == 120000


def test_items_that_are_not_reads_are_none() -> None:
    assert parse_messaging({"message": {"mid": "x"}, "timestamp": 1}, ACCOUNT) is None
    assert parse_messaging({}, ACCOUNT) is None


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (["read"], "m must be a JSON object"),
        (seen_item(read="aWdfZAG1"), "m.read must be a JSON object"),
        (seen_item(read=None), "m.read must be a JSON object"),
        (seen_item(timestamp=None), "m.timestamp must be Unix milliseconds"),
        (seen_item(timestamp="1764072300120"), "m.timestamp must be Unix milliseconds"),
        (seen_item(timestamp=True), "m.timestamp must be Unix milliseconds"),
        (seen_item(timestamp=10**30), "m.timestamp must be Unix milliseconds"),
        (seen_item(timestamp=1e300), "m.timestamp must be Unix milliseconds"),
        (seen_item(read={}), "m.read.mid must be a non-empty string"),
        (seen_item(read={"mid": ""}), "m.read.mid must be a non-empty string"),
        (seen_item(read={"mid": False}), "m.read.mid must be a non-empty string"),
    ],
)
def test_a_bad_item_is_a_clear_error(raw: Any, message: str) -> None:
    assert refused(raw) == message


def test_an_item_without_timestamp_key_is_refused() -> None:
    item = seen_item()
    del item["timestamp"]
    assert refused(item) == "m.timestamp must be Unix milliseconds"


# -- the shared JSON helpers --------------------------------------------------------------


@pytest.mark.parametrize(("value", "text"), [("abc", "abc"), (12, "12"), (0, "0"), ("0", "0")])
def test_json_text_takes_text_and_integers(value: object, text: str) -> None:
    assert json_text(value, "f") == text


@pytest.mark.parametrize("value", ["", None, True, False, 1.5, [], {}, ["a"]])
def test_json_text_refuses_anything_else(value: object) -> None:
    with pytest.raises(WebhookPayloadError, match=r"^f must be a non-empty string$"):
        json_text(value, "f")


def test_json_list_reads_a_missing_list_as_empty_and_refuses_others() -> None:
    assert json_list(None, "l") == []
    assert json_list([1], "l") == [1]
    assert json_list([], "l") == []
    bad: tuple[object, ...] = ({}, "x", 0, False)
    for value in bad:
        with pytest.raises(WebhookPayloadError, match=r"^l must be a JSON array$"):
            json_list(value, "l")


def test_json_object_refuses_anything_but_an_object() -> None:
    assert json_object({"a": 1}, "o") == {"a": 1}
    not_objects: tuple[object, ...] = (None, [], "x", 1)
    for value in not_objects:
        with pytest.raises(WebhookPayloadError, match=r"^o must be a JSON object$"):
            json_object(value, "o")


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"[1]", "body must be a JSON object"),
        (b"null", "body must be a JSON object"),
        (b"{", "body is not JSON: "),
        (b"\xff", "body is not JSON: "),
        (b"[" * 100_000, "body is not JSON: "),
    ],
)
def test_load_object_refuses_what_is_not_a_json_object(body: bytes, message: str) -> None:
    with pytest.raises(WebhookPayloadError) as raised:
        load_object(body)
    assert str(raised.value).startswith(message)


def test_load_object_reads_an_object() -> None:
    assert load_object(b'{"object":"instagram"}') == {"object": "instagram"}


# -- Meta's send answers, and what an Instagram seen item turns into --------------------


@pytest.mark.parametrize("answer", [{"message_id": ""}, {"message_id": 7}, {"message_id": None}])
async def test_an_instagram_send_answer_without_a_text_id_is_unreadable(
    instagram: Harness, answer: dict[str, Any]
) -> None:
    with pytest.raises(TypeError):
        instagram.connector.provider_id_of(answer)
    assert instagram.connector.provider_id_of({"message_id": "mid.1"}) == "mid.1"


@pytest.mark.parametrize("answer", [{"messages": [{"id": ""}]}, {"messages": [{"id": 7}]}])
async def test_a_whatsapp_send_answer_without_a_text_id_is_unreadable(
    tmp_path: Path, answer: dict[str, Any]
) -> None:
    async with open_harness(tmp_path, WhatsAppConnector) as harness:
        with pytest.raises(TypeError):
            harness.connector.provider_id_of(answer)
        assert harness.connector.provider_id_of({"messages": [{"id": "wamid.1"}]}) == "wamid.1"


async def test_a_seen_marks_each_message_read_under_its_own_provider_id(
    instagram: Harness,
) -> None:
    first = await sent_message(instagram, "mid.1", "one")
    second = await sent_message(instagram, "mid.2", "two")
    await instagram.clear()
    assert (await instagram.post(seen("mid.2"))).status_code == 200
    events = {e.message_id: e.provider_message_id for e in await instagram.statuses()}
    assert events == {first.id: "mid.1", second.id: "mid.2"}


async def test_a_seen_for_another_account_is_counted_as_foreign(instagram: Harness) -> None:
    await sent_message(instagram, "mid.1", "one")
    assert (await instagram.post(seen("mid.1", account="999"))).status_code == 200
    labels = {"channel": "instagram", "outcome": "foreign_account"}
    registry = instagram.deps.metrics.registry
    assert registry.get_sample_value("whatslike_webhooks_total", labels) == 1


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"object": "instagram", "entry": {}}, "entry must be a JSON array"),
        ({"object": "instagram", "entry": [1]}, "entry[0] must be a JSON object"),
        ({"object": "instagram", "entry": [{"id": ""}]}, "entry[0].id must be a non-empty string"),
        (
            {"object": "instagram", "entry": [{"id": "1", "messaging": {}}]},
            "entry[0].messaging must be a JSON array",
        ),
    ],
)
def test_an_instagram_webhook_not_shaped_like_meta_s_names_where(
    payload: dict[str, Any], message: str
) -> None:
    parsed = parse_webhook(payload)
    assert (parsed.items, parsed.rejected) == ([], [message])


def handshake(query: bytes, verify_token: str = "verify-me") -> Response:
    return verification_response(
        Request({"type": "http", "query_string": query, "headers": []}), verify_token
    )


@pytest.mark.parametrize(
    "query",
    [
        b"hub.mode=subscribe&hub.challenge=1",
        b"hub.mode=subscribe&hub.verify_token=nope&hub.challenge=1",
        b"hub.verify_token=verify-me&hub.challenge=1",
        b"hub.mode=subscribe&hub.verify_token=verify-me",
    ],
)
def test_a_refused_handshake_says_why(query: bytes) -> None:
    response = handshake(query)
    assert response.status_code == 403
    assert json.loads(bytes(response.body)) == {
        "error": {"code": "forbidden", "message": "verification token mismatch"}
    }


def test_an_accepted_handshake_echoes_the_challenge() -> None:
    response = handshake(b"hub.mode=subscribe&hub.verify_token=verify-me&hub.challenge=42")
    assert (response.status_code, bytes(response.body)) == (200, b"42")


def streamed(*chunks: bytes) -> Request:
    """A request whose body arrives in `chunks`."""
    messages = [
        {"type": "http.request", "body": chunk, "more_body": index < len(chunks) - 1}
        for index, chunk in enumerate(chunks)
    ]

    async def receive() -> dict[str, Any]:
        return messages.pop(0)

    return Request({"type": "http", "method": "POST", "headers": []}, receive)


@pytest.mark.parametrize(
    ("chunks", "limit", "body"),
    [
        ((b"abc", b"de"), 5, b"abcde"),  # exactly the limit, over two chunks
        ((b"abc", b"def"), 5, None),  # one byte past it, only once both are counted
        ((b"abcdef",), 5, None),
        ((b"",), 0, b""),
        ((b"a",), 0, None),
    ],
)
async def test_read_body_stops_one_byte_past_the_limit(
    chunks: tuple[bytes, ...], limit: int, body: bytes | None
) -> None:
    assert await read_body(streamed(*chunks), limit) == body
