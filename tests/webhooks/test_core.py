"""The pure core of outbound webhooks: signatures (checked with the `standardwebhooks`
library a receiver uses), the retry schedule, and what targets may be called."""

from __future__ import annotations

import ipaddress
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from whatslike.webhooks.core import (
    TargetRefused,
    check_address,
    check_url,
    checked_addresses,
    event_body,
    headers,
    new_secret,
    next_attempt,
)

T0 = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)


@given(body=st.binary(max_size=512), webhook_id=st.from_regex(r"\A[A-Za-z0-9_:.-]{1,64}\Z"))
def test_a_signature_verifies_with_each_valid_secret_and_no_other(
    body: bytes, webhook_id: str
) -> None:
    current, previous, other = new_secret(), new_secret(), new_secret()
    now = int(datetime.now(UTC).timestamp())
    signed = headers([current, previous], webhook_id, now, body)
    Webhook(current).verify(body, signed, json_parse=False)
    Webhook(previous).verify(body, signed, json_parse=False)
    with pytest.raises(WebhookVerificationError):
        Webhook(other).verify(body, signed, json_parse=False)
    with pytest.raises(WebhookVerificationError):
        Webhook(current).verify(body + b" ", signed, json_parse=False)


def test_the_body_carries_the_frame_as_stored() -> None:
    frame = '{"type":"status","seq":3}'
    assert event_body("message.status", frame, T0) == (
        b'{"type":"message.status","timestamp":"2026-12-05T12:00:00.000Z",'
        b'"data":{"type":"status","seq":3}}'
    )


@given(attempts=st.integers(1, 100), age_s=st.floats(0, 200_000))
def test_retries_back_off_within_bounds_then_park(attempts: int, age_s: float) -> None:
    created = T0 - timedelta(seconds=age_s)
    at = next_attempt(attempts, created, T0, first_s=1, max_s=600, retry_for_s=86_400)
    if age_s >= 86_400:
        assert at is None
        return
    assert at is not None
    assert timedelta(seconds=1) <= at - T0 <= timedelta(seconds=600)
    assert at - T0 == timedelta(seconds=min(600, 2 ** (attempts - 1)))


@pytest.mark.parametrize(
    "url",
    [
        "https://crm.example.com/hooks",
        "https://93.184.216.34:8443/x?y=1",
    ],
)
def test_public_https_targets_are_allowed(url: str) -> None:
    assert check_url(url, allow_private=False) == url


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://crm.example.com/hooks", "must be https"),
        ("ftp://crm.example.com/", "must be https"),
        ("https://localhost/x", "loopback"),
        ("https://127.0.0.1/x", "loopback"),
        ("https://10.1.2.3/x", "not public"),
        ("https://169.254.169.254/latest/meta-data", "not public"),
        ("https://[::1]/x", "loopback"),
        ("https://[::ffff:192.168.0.1]/x", "not public"),
        ("https://user:pw@crm.example.com/", "credentials"),
        ("https://crm.example.com:0/", "port 0"),
        ("https://crm.example.com:99999/", "not a URL"),
        ("https:///x", "no host"),
        ("https://crm.example.com/#x", "fragment"),
    ],
)
def test_other_targets_are_refused(url: str, why: str) -> None:
    with pytest.raises(TargetRefused, match=why):
        check_url(url, allow_private=False)


def test_allowing_private_targets_allows_http_to_loopback_only() -> None:
    assert check_url("http://127.0.0.1:9000/x", allow_private=True)
    assert check_url("https://10.1.2.3/x", allow_private=True)
    with pytest.raises(TargetRefused, match="must be https"):
        check_url("http://10.1.2.3/x", allow_private=True)


def test_resolved_addresses_are_filtered() -> None:
    assert checked_addresses(["10.0.0.1", "93.184.216.34"], allow_private=False) == [
        "93.184.216.34"
    ]
    with pytest.raises(TargetRefused, match="not public"):
        checked_addresses(["10.0.0.1", "fe80::1"], allow_private=False)
    with pytest.raises(TargetRefused, match="may not be called"):
        check_address(ipaddress.ip_address("224.0.0.1"), allow_private=True)
