"""What WhatsApp and Instagram webhooks share: Meta's `X-Hub-Signature-256` scheme and the
subscription handshake, plus the JSON error answer every webhook route gives.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Generic, TypeVar

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from whatslike.errors import WhatslikeError
from whatslike.store.base import InboundMedia

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Hub-Signature-256"
_PREFIX = "sha256="

#: JSON may carry a lone surrogate ("\\ud800"), which UTF-8 (every store, log and bus
#: encoding) cannot: one such character made an event no consumer could store.
_SURROGATE = re.compile("[\ud800-\udfff]")
REPLACEMENT = "\ufffd"

T = TypeVar("T")


class WebhookPayloadError(WhatslikeError):
    """A signed webhook body (or one item of it) is not shaped like Meta's. A body that is
    not a JSON object is answered 400; a bad item is skipped (logged and counted)."""


@dataclass
class Parsed(Generic[T]):
    """What one signed webhook body holds: the items to apply, and the rest, each said."""

    items: list[T] = field(default_factory=list)
    #: One line per item (or part of the body) that could not be read: where, and why.
    rejected: list[str] = field(default_factory=list)
    #: Errors Meta reported outside any item (WhatsApp's `value.errors`), as (code, title).
    errors: list[tuple[str, str]] = field(default_factory=list)
    #: What is ignored on purpose (protocol.md §5), one kind per item: e.g. "reaction".
    ignored: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class CustomerMessage:
    """A customer's message in a webhook: `account_id` is ours (the phone number id, the
    Instagram account id) it was sent to, `contact` who sent it, `sent_at` Meta's time."""

    account_id: str
    contact: str
    provider_message_id: str
    text: str
    sent_at: datetime
    #: The medium it carries, as Meta described it (`text` is then its caption).
    media: InboundMedia | None = None


def webhook_entries(
    payload: dict[str, Any], expected_object: str, channel: str, parsed: Parsed[Any]
) -> list[Any]:
    """The entries of a webhook body about `expected_object`: none for another object
    (logged), none when `entry` is not a list (said in `parsed.rejected`)."""
    if payload.get("object") != expected_object:
        log.warning("%s webhook for object %r ignored", channel, payload.get("object"))
        return []
    try:
        return json_list(payload.get("entry"), "entry")
    except WebhookPayloadError as exc:
        parsed.rejected.append(str(exc))
        return []


def sign(app_secret: str, body: bytes) -> str:
    """The `X-Hub-Signature-256` value Meta sends for this exact body."""
    digest = hmac.new(app_secret.encode(), body, hashlib.sha256).hexdigest()
    return _PREFIX + digest


def signature_valid(app_secrets: str | Sequence[str], body: bytes, header: str | None) -> bool:
    """True when `header` is the HMAC-SHA256 of the raw bytes as received, under any of
    the app secrets (several while a secret is rotated). Re-serialized JSON would differ
    in spacing or escaping, so callers must pass the bytes untouched."""
    if not header or not header.startswith(_PREFIX):
        return False
    candidates = (app_secrets,) if isinstance(app_secrets, str) else tuple(app_secrets)
    # Hex digests compare case-insensitively; compare_digest keeps the time constant, and
    # every secret is tried so the time does not tell which one matched.
    given = header[len(_PREFIX) :].strip().lower().encode()
    matches = [
        hmac.compare_digest(given, sign(secret, body)[len(_PREFIX) :].encode())
        for secret in candidates
        if secret
    ]
    return any(matches)


def error_response(status_code: int, code: str, message: str) -> JSONResponse:
    """The project's error shape (protocol.md §5); never a stack trace."""
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status_code)


def verification_response(request: Request, verify_token: str) -> Response:
    """Meta's subscription handshake: echo `hub.challenge` when the token is ours."""
    params = request.query_params
    token = params.get("hub.verify_token", "")
    challenge = params.get("hub.challenge", "")
    token_ok = hmac.compare_digest(token.encode(), verify_token.encode())
    if params.get("hub.mode") != "subscribe" or not token_ok or not challenge:
        return error_response(403, "forbidden", "verification token mismatch")
    return PlainTextResponse(challenge)


def load_object(body: bytes) -> dict[str, Any]:
    """The webhook body as a JSON object, or WebhookPayloadError."""
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError) as exc:
        # ValueError covers bad JSON, bad UTF-8 and integers past the digit limit.
        raise WebhookPayloadError(f"body is not JSON: {exc}") from exc
    return json_object(payload, "body")


def json_object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise WebhookPayloadError(f"{where} must be a JSON object")
    return value


def json_list(value: Any, where: str) -> list[Any]:
    """A list field; Meta leaves out empty lists, so a missing one reads as empty."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise WebhookPayloadError(f"{where} must be a JSON array")
    return value


def json_text(value: Any, where: str) -> str:
    # Meta sends ids as strings, but a number is accepted rather than dropping a status.
    if isinstance(value, bool) or not isinstance(value, str | int) or value == "":
        raise WebhookPayloadError(f"{where} must be a non-empty string")
    return clean_text(str(value))


def clean_text(text: str) -> str:
    """`text` with every lone surrogate replaced by U+FFFD, the rest kept: always UTF-8."""
    return _SURROGATE.sub(REPLACEMENT, text)


async def read_body(request: Request, limit: int) -> bytes | None:
    """The raw body as received, or None once it passes `limit` bytes (read no further)."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)
