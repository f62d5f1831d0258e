"""The `status` frame of protocol.md §4, byte for byte: the hub forwards these bytes
without decoding them, so their exact text is the protocol."""

from __future__ import annotations

from datetime import UTC, datetime

from whatslike.status.frame import status_frame
from whatslike.status.rules import ProviderError, Status


def test_a_status_frame_is_compact_json_in_protocol_order() -> None:
    text = status_frame(
        conversation_id="c-1",
        message_id="m-1",
        status=Status.DELIVERED,
        seq=7,
        occurred_at=datetime(2026, 11, 25, 15, 42, 8, 123456, tzinfo=UTC),
        error=None,
    )
    assert text == (
        '{"type":"status","conversation_id":"c-1","message_id":"m-1","status":"DELIVERED",'
        '"seq":7,"occurred_at":"2026-11-25T15:42:08.123Z","error":null}'
    )


def test_a_failed_frame_carries_its_error() -> None:
    text = status_frame(
        conversation_id="c-2",
        message_id="m-2",
        status=Status.FAILED,
        seq=12,
        occurred_at=datetime(2026, 11, 25, 0, 0, tzinfo=UTC),
        error=ProviderError("131026", 'Message "undeliverable"'),
    )
    assert text == (
        '{"type":"status","conversation_id":"c-2","message_id":"m-2","status":"FAILED",'
        '"seq":12,"occurred_at":"2026-11-25T00:00:00.000Z",'
        '"error":{"code":"131026","title":"Message \\"undeliverable\\""}}'
    )
