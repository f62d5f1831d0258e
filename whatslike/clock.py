"""Time and id helpers shared by every part: RFC 3339 UTC with milliseconds, opaque ids."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime


def utcnow() -> datetime:
    """Now, in UTC, truncated to milliseconds (the wire resolution)."""
    now = datetime.now(UTC)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


def format_time(at: datetime) -> str:
    """RFC 3339 UTC with milliseconds, e.g. ``2026-11-25T15:42:08.123Z``."""
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{at.microsecond // 1000:03d}Z"


def parse_time(text: str) -> datetime:
    """Parse an RFC 3339 time; naive times are taken as UTC. Raises ValueError."""
    parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)


def from_unix(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


def new_id(prefix: str) -> str:
    """An opaque, unique id such as ``msg_3f2a…``."""
    return f"{prefix}_{uuid.uuid4().hex}"
