"""The WebSocket frames of protocol.md §4: a sans-I/O parser of client frames that never
raises, and builders of the server's frames as JSON text."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

#: What a client may put in `ref` to match answers to its requests.
Ref = str | int | None

BAD_REQUEST: Final = "bad_request"

#: Deepest nesting of arrays and objects a client frame may hold (a `ping`'s `ts` is any
#: JSON value, echoed in the pong): deeper ones are bad requests, before anything
#: recursive (the parser, the pong's serializer) meets them.
MAX_DEPTH: Final = 32

#: What an id (a conversation's, a message's) may look like (protocol.md §2): ASCII
#: letters, digits and `_ . : -`, 1 to 128 of them. Anything else cannot name one.
ID_PATTERN: Final = re.compile(r"[A-Za-z0-9_.:-]{1,128}")


def valid_id(value: str) -> bool:
    return ID_PATTERN.fullmatch(value) is not None


def has_lone_surrogate(value: str) -> bool:
    """True for text JSON can carry (`"\\ud800"`) but UTF-8 cannot."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


@dataclass(frozen=True, slots=True)
class Subscribe:
    conversation_id: str
    since: int | None = None
    ref: Ref = None


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    conversation_id: str
    ref: Ref = None


@dataclass(frozen=True, slots=True)
class Ping:
    ts: object = None  # any JSON value; the pong carries it back


@dataclass(frozen=True, slots=True)
class Auth:
    token: str
    ref: Ref = None


@dataclass(frozen=True, slots=True)
class SubscribeCampaign:
    campaign_id: str
    ref: Ref = None


@dataclass(frozen=True, slots=True)
class UnsubscribeCampaign:
    campaign_id: str
    ref: Ref = None


@dataclass(frozen=True, slots=True)
class Read:
    """The agent read a customer's message (what `POST …/messages/{id}/read` does)."""

    conversation_id: str
    message_id: str
    ref: Ref = None


ClientFrame = Subscribe | Unsubscribe | Ping | Auth | SubscribeCampaign | UnsubscribeCampaign | Read


@dataclass(frozen=True, slots=True)
class FrameError:
    """A frame the client got wrong. `too_large` frames close the connection (1009);
    the others are answered with an `error` frame carrying `code`, `message` and `ref`."""

    message: str
    ref: Ref = None
    code: str = BAD_REQUEST
    too_large: bool = False


class _Invalid(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def _reject_constant(name: str) -> object:
    # NaN and Infinity are not JSON: a pong echoing them would not be JSON either.
    raise ValueError(f"{name} is not JSON")


def _finite_float(literal: str) -> float:
    value = float(literal)
    if not math.isfinite(value):  # 1e999 parses as infinity; see _reject_constant
        raise ValueError(f"{literal} is out of range")
    return value


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _text(data: dict[str, Any], name: str) -> str:
    value = data.get(name)
    if value is None:
        raise _Invalid(f"field {name!r} is required")
    if not isinstance(value, str) or not value:
        raise _Invalid(f"field {name!r} must be a non-empty string")
    if has_lone_surrogate(value):
        raise _Invalid(f"field {name!r} is not valid Unicode (a lone surrogate)")
    return value


def _id(data: dict[str, Any], name: str) -> str:
    value = _text(data, name)
    if not valid_id(value):
        raise _Invalid(f"field {name!r} must be 1-128 of A-Z a-z 0-9 _ . : -")
    return value


def _since(data: dict[str, Any]) -> int | None:
    value = data.get("since")
    if value is None:
        return None
    if not _is_int(value) or value < 0:
        raise _Invalid("field 'since' must be a non-negative integer")
    return int(value)


def _ref(data: dict[str, Any]) -> Ref:
    value = data.get("ref")
    if isinstance(value, str) and has_lone_surrogate(value):
        raise _Invalid("field 'ref' is not valid Unicode (a lone surrogate)")
    if value is None or isinstance(value, str):
        return value
    if _is_int(value):
        return int(value)
    raise _Invalid("field 'ref' must be a string or an integer")


def _depth(value: object) -> int:
    """How deeply arrays and objects nest in a parsed JSON value (0 for a scalar);
    iterative, so any depth is measured without recursion."""
    deepest = 0
    pending: list[tuple[object, int]] = [(value, 0)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, dict):
            item = list(item.values())
        if isinstance(item, list):
            depth += 1
            deepest = max(deepest, depth)
            pending.extend((child, depth) for child in item)
    return deepest


def _decode(raw: str | bytes, max_bytes: int) -> str | FrameError:
    size = len(raw) if isinstance(raw, bytes) else len(raw.encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        return FrameError(f"frame is {size} bytes; the limit is {max_bytes}", too_large=True)
    if isinstance(raw, str):
        return raw
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return FrameError("frame is not valid UTF-8")


def _frame(data: dict[str, Any], ref: Ref) -> ClientFrame:
    kind = data.get("type")
    if kind is None:
        raise _Invalid("field 'type' is required")
    if not isinstance(kind, str):
        raise _Invalid("field 'type' must be a string")
    if kind == "subscribe":
        return Subscribe(_id(data, "conversation_id"), _since(data), ref)
    if kind == "unsubscribe":
        return Unsubscribe(_id(data, "conversation_id"), ref)
    if kind == "ping":
        return Ping(data.get("ts"))
    if kind == "auth":
        return Auth(_text(data, "token"), ref)
    if kind == "subscribe_campaign":
        return SubscribeCampaign(_id(data, "campaign_id"), ref)
    if kind == "unsubscribe_campaign":
        return UnsubscribeCampaign(_id(data, "campaign_id"), ref)
    if kind == "read":
        return Read(_id(data, "conversation_id"), _id(data, "message_id"), ref)
    raise _Invalid(f"unknown frame type {kind!r}")


def parse_client_frame(raw: str | bytes, max_bytes: int) -> ClientFrame | FrameError:
    """Parse one client message (binary messages are read as UTF-8 text). Never raises:
    anything the client got wrong comes back as a FrameError with a precise message."""
    text = _decode(raw, max_bytes)
    if isinstance(text, FrameError):
        return text
    too_deep = FrameError(f"frame nests arrays and objects deeper than {MAX_DEPTH} levels")
    try:
        data = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except ValueError:
        # Bad JSON, NaN/Infinity and integers too long to convert.
        return FrameError("frame is not valid JSON")
    except RecursionError:  # nested deeper than the parser allows
        return too_deep
    # Fewer brackets than MAX_DEPTH cannot nest deeper (the usual case, counted in C).
    if text.count("[") + text.count("{") > MAX_DEPTH and _depth(data) > MAX_DEPTH:
        return too_deep
    if not isinstance(data, dict):
        return FrameError("frame must be a JSON object")
    try:
        ref = _ref(data)
    except _Invalid as exc:
        return FrameError(exc.message)
    try:
        return _frame(data, ref)
    except _Invalid as exc:
        return FrameError(exc.message, ref)


def _dump(frame: dict[str, object], ref: Ref = None) -> str:
    if ref is not None:
        frame["ref"] = ref
    return json.dumps(frame, separators=(",", ":"))


def connected(
    *, connection_id: str, user_id: str, org_id: str, heartbeat_s: int, token_exp: int
) -> str:
    return _dump(
        {
            "type": "connected",
            "connection_id": connection_id,
            "user_id": user_id,
            "org_id": org_id,
            "heartbeat_s": heartbeat_s,
            "token_exp": token_exp,
        }
    )


def subscribed(conversation_id: str, seq: int, recovered: bool, ref: Ref = None) -> str:
    return _dump(
        {
            "type": "subscribed",
            "conversation_id": conversation_id,
            "seq": seq,
            "recovered": recovered,
        },
        ref,
    )


def unsubscribed(conversation_id: str, ref: Ref = None) -> str:
    return _dump({"type": "unsubscribed", "conversation_id": conversation_id}, ref)


def campaign(
    campaign_id: str,
    *,
    version: int,
    total: int,
    counts: Mapping[str, object],
    finished: bool,
    ref: Ref = None,
) -> str:
    """A campaign's counts (`whatslike.campaigns.funnel`) at `version`: a client keeps the
    frame of the highest version it saw and drops older ones."""
    return _dump(
        {
            "type": "campaign",
            "campaign_id": campaign_id,
            "version": version,
            "total": total,
            "counts": dict(counts),
            "finished": finished,
        },
        ref,
    )


def campaign_unsubscribed(campaign_id: str, ref: Ref = None) -> str:
    return _dump({"type": "campaign_unsubscribed", "campaign_id": campaign_id}, ref)


def pong(ts: object) -> str:
    return _dump({"type": "pong", "ts": ts})


def auth_ok(token_exp: int, ref: Ref = None) -> str:
    return _dump({"type": "auth_ok", "token_exp": token_exp}, ref)


def read_ok(conversation_id: str, message_id: str, ref: Ref = None) -> str:
    return _dump(
        {"type": "read_ok", "conversation_id": conversation_id, "message_id": message_id}, ref
    )


def error(code: str, message: str, ref: Ref = None) -> str:
    return _dump({"type": "error", "code": code, "message": message}, ref)


def batch(status_frames: Sequence[str]) -> str:
    """Wrap already-serialized status frames; they are joined, never decoded again."""
    return '{"type":"batch","frames":[' + ",".join(status_frames) + "]}"
