"""The pure core of outbound webhooks: the event body, its Standard Webhooks signature,
the retry schedule and the checks of a target URL and its addresses.

Signatures follow the Standard Webhooks specification (standardwebhooks.com): headers
`webhook-id`, `webhook-timestamp` (Unix seconds) and `webhook-signature`, a space-separated
list of `v1,<base64 HMAC-SHA256(secret, "{id}.{timestamp}.{body}")>`, one per valid
secret (two for 24 h after a rotation). The secret is `whsec_` + base64 of 32 random
bytes. Hand-written (a dozen lines) rather than a runtime dependency on the
`standardwebhooks` package; the tests verify every signature with that package, as a
receiver would, so the two cannot disagree unnoticed.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import secrets
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from urllib.parse import urlsplit

from whatslike.clock import format_time

#: The event types (`type` of a body): a status change of a message (either direction),
#: and a customer's message arriving (its `message` frame, protocol.md §4).
MESSAGE_STATUS = "message.status"
MESSAGE_RECEIVED = "message.received"
SECRET_PREFIX = "whsec_"


def event_type(frame: str) -> str:
    """The event type of a change's frame (a `message` frame or a `status` one)."""
    return MESSAGE_RECEIVED if json.loads(frame)["type"] == "message" else MESSAGE_STATUS


def event_body(event_type: str, frame: str, at: datetime) -> bytes:
    """The exact bytes POSTed (and signed): `{"type", "timestamp", "data"}` with the
    status frame of protocol.md §4 as `data`, spliced in as stored; `timestamp` is when
    the event was queued (the frame carries when the status occurred)."""
    timestamp = format_time(at)
    return f'{{"type":"{event_type}","timestamp":"{timestamp}","data":{frame}}}'.encode()


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def _key(secret: str) -> bytes:
    return base64.b64decode(secret.removeprefix(SECRET_PREFIX))


def signature(secrets_: Sequence[str], webhook_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` header: one `v1,…` per secret, space-separated."""
    signed = f"{webhook_id}.{timestamp}.".encode() + body
    return " ".join(
        "v1," + base64.b64encode(hmac.new(_key(s), signed, hashlib.sha256).digest()).decode()
        for s in secrets_
    )


def headers(
    secrets_: Sequence[str], webhook_id: str, timestamp: int, body: bytes
) -> dict[str, str]:
    return {
        "content-type": "application/json",
        "webhook-id": webhook_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signature(secrets_, webhook_id, timestamp, body),
    }


def next_attempt(
    attempts: int,
    created_at: datetime,
    now: datetime,
    *,
    first_s: float,
    max_s: float,
    retry_for_s: float,
) -> datetime | None:
    """When to try again after `attempts` failed attempts (1 s, 2 s, 4 s, … capped at
    `max_s`), or None once the delivery is older than `retry_for_s`: it is parked."""
    if now - created_at >= timedelta(seconds=retry_for_s):
        return None
    wait_s = min(max_s, first_s * 2 ** min(attempts - 1, 30))
    return now + timedelta(seconds=wait_s)


class TargetRefused(ValueError):
    """A webhook URL or address that may not be called; the message says why."""


_LOOPBACK_NAMES = {"localhost", "localhost.localdomain"}


def check_url(url: str, *, allow_private: bool) -> str:
    """Syntax and scheme only (no DNS: names are resolved and checked at each delivery):
    https, a host, no credentials, no fragment; a literal address must be public unless
    `allow_private`, and plain http is allowed only to a loopback host then. Answers the
    URL as given."""
    if len(url) > 2048:
        raise TargetRefused("the URL is longer than 2048 characters")
    if not url.isascii() or any(c <= " " or c == "\x7f" for c in url):
        raise TargetRefused("the URL must be ASCII without spaces or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise TargetRefused(f"not a URL: {exc}") from exc
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise TargetRefused("the URL has no host")
    if parts.username is not None or parts.password is not None:
        raise TargetRefused("credentials in the URL are not allowed")
    if parts.fragment:
        raise TargetRefused("a fragment is not allowed")
    if port == 0:
        raise TargetRefused("port 0 is not allowed")
    literal = _literal_address(host)
    loopback = host.lower() in _LOOPBACK_NAMES or (literal is not None and literal.is_loopback)
    if parts.scheme == "http":
        if not (allow_private and loopback):
            raise TargetRefused("the URL must be https (http only to loopback, when allowed)")
    elif parts.scheme != "https":
        raise TargetRefused("the URL must be https")
    if loopback and not allow_private:
        raise TargetRefused("loopback targets are not allowed")
    if literal is not None:
        check_address(literal, allow_private=allow_private)
    return url


def _literal_address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def check_address(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address, *, allow_private: bool
) -> None:
    """Refuse what is not a public unicast address (private, loopback, link-local,
    multicast, reserved, unspecified; an IPv4-mapped IPv6 address as its IPv4), unless
    `allow_private` (then only multicast and unspecified are refused)."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if address.is_multicast or address.is_unspecified:
        raise TargetRefused(f"address {address} may not be called")
    if allow_private:
        return
    if not address.is_global or address.is_link_local or address.is_loopback:
        raise TargetRefused(f"address {address} is not public")


def checked_addresses(addresses: Iterable[str], *, allow_private: bool) -> list[str]:
    """The resolved addresses that may be called; raises when none may."""
    allowed, refused = [], []
    for text in addresses:
        try:
            check_address(ipaddress.ip_address(text), allow_private=allow_private)
        except TargetRefused as exc:
            refused.append(str(exc))
            continue
        allowed.append(text)
    if not allowed:
        raise TargetRefused("; ".join(refused) or "the name has no address")
    return allowed
