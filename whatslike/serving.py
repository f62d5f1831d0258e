"""The HTTP server's own defences, around uvicorn: request heads bounded in size (431) and
time (408), request bodies bounded before they are read (413) and in time (408), and log
lines that never carry a token or a secret (query values, JWTs and the configured secrets
are redacted).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import urllib.parse
from collections.abc import Callable, Iterable
from typing import Any, cast

import uvicorn
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from whatslike.campaigns import CAMPAIGN_BODY_BYTES
from whatslike.media.limits import SUPPORTED
from whatslike.settings import Settings

#: Request bodies Meta may send (it documents webhooks of up to 3 MB); a campaign's
#: (`CAMPAIGN_BODY_BYTES`, 2 MiB); elsewhere the `max_body_bytes` setting applies.
WEBHOOK_BODY_BYTES = 4 * 1024 * 1024
#: The largest medium Meta takes (a document).
MEDIA_BODY_BYTES = max(limit for _, limit in SUPPORTED.values())

_HEAD_END = b"\r\n\r\n"
_REASONS = {408: "Request Timeout", 431: "Request Header Fields Too Large"}

# -- logs ----------------------------------------------------------------------------

_JWT = re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*")
#: Query parameters whose values never reach a log: anything named like a credential.
_SECRET_QUERY = re.compile(
    r"(?i)([?&][^=&\s\"']*(?:token|secret|ticket|key|signature|challenge)[^=&\s\"']*=)"
    r"[^&\s\"']*"
)
REDACTED = "[redacted]"
#: Percent-decoding rounds before redacting: a value encoded twice (`%2561`) still shows.
_DECODE_ROUNDS = 4


class RedactSecrets(logging.Filter):
    """Rewrites every log record so that no JWT, credential-like query value or
    configured secret survives, whatever logger or formatter produced it. Arguments are
    redacted one by one, so formatters that read `record.args` (uvicorn's access log)
    keep working."""

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        # Longest first, so a secret that contains another is replaced whole.
        self._secrets = sorted({s for s in secrets if len(s) >= 6}, key=len, reverse=True)

    def redact(self, text: str) -> str:
        # Decoded first: `%61ccess_token=…`, a JWT with `%2E` for its dots or an encoded
        # secret would pass the patterns below. The line then shows the decoded text.
        for _ in range(_DECODE_ROUNDS):
            if "%" not in text:
                break
            decoded = urllib.parse.unquote(text)
            if decoded == text:
                break
            text = decoded
        for secret in self._secrets:
            text = text.replace(secret, REDACTED)
        text = _JWT.sub(REDACTED, text)
        return _SECRET_QUERY.sub(rf"\1{REDACTED}", text)

    def _clean(self, value: Any) -> Any:
        return self.redact(value) if isinstance(value, str) else value

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = self._clean(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(self._clean(arg) for arg in record.args)
        elif isinstance(record.args, dict):
            record.args = {key: self._clean(arg) for key, arg in record.args.items()}
        if record.exc_info and not record.exc_text:
            # Format the traceback now, so its text can be redacted like the message.
            record.exc_text = self.redact(logging.Formatter().formatException(record.exc_info))
        elif record.exc_text:
            record.exc_text = self.redact(record.exc_text)
        return True


class QuietDenials(logging.Filter):
    """uvicorn's WebSocket protocol logs an ERROR after every upgrade the app refused with
    an HTTP answer (it counts the refusal as a handshake never completed): one per bad
    token would let anyone flood the log. The hub logs refusals itself, at INFO, at most
    once per interval, so this line is dropped; so is the INFO line uvicorn writes for
    every accepted WebSocket (10,000 reconnecting clients would write 10,000 lines; the
    hub counts connections in its metrics)."""

    NOISE = frozenset(
        ("ASGI callable returned without completing handshake.", '%s - "WebSocket %s" [accepted]')
    )

    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg not in self.NOISE


class DeferredFlush(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler that flushes at most every `delay_s` instead of after each line:
    the access log writes a line per request, and a flush per line (a write system call)
    was ~12 % of an API process's CPU under load. A line waits at most `delay_s` in the
    stream's buffer (or until the buffer fills); the handler flushes when it is closed
    (logging's shutdown, at exit). Outside an event loop it flushes at once."""

    def __init__(self, stream: Any, delay_s: float) -> None:
        super().__init__(stream)
        self._delay_s = delay_s
        self._pending: asyncio.TimerHandle | None = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.stream.write(self.format(record) + self.terminator)
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)
            return
        if self._pending is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        self._pending = loop.call_later(self._delay_s, self._flush_now)

    def _flush_now(self) -> None:
        self._pending = None
        self.flush()

    def close(self) -> None:
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None
        self.flush()
        super().close()


#: How long an access-log line may wait in its stream's buffer.
ACCESS_FLUSH_S = 0.2


def defer_access_flush(delay_s: float = ACCESS_FLUSH_S) -> None:
    """Put uvicorn's access log (one line per request) on a `DeferredFlush` of the same
    stream, with the same formatter, level and filters; its other logs stay as they are
    (a warning or an error is written at once)."""
    access = logging.getLogger("uvicorn.access")
    for n, handler in enumerate(access.handlers):
        if type(handler) is not logging.StreamHandler:
            continue
        deferred = DeferredFlush(handler.stream, delay_s)
        deferred.setFormatter(handler.formatter)
        deferred.setLevel(handler.level)
        for kept in handler.filters:
            deferred.addFilter(kept)
        access.handlers[n] = deferred


def secrets_of(settings: Settings, jwt_secret: str) -> list[str]:
    return [
        jwt_secret,
        *settings.meta_app_secrets,
        settings.meta_verify_token,
        settings.meta_access_token,
        settings.sim_control_token,
        settings.metrics_token,
    ]


def redact_logs(secrets: Iterable[str]) -> RedactSecrets:
    """Put the filter on every handler of the root and uvicorn loggers (handlers see the
    records their loggers' children propagate, which logger filters would miss)."""
    redactor = RedactSecrets(secrets)
    uvicorn_errors = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, QuietDenials) for f in uvicorn_errors.filters):
        uvicorn_errors.addFilter(QuietDenials())
    for name in ("", "uvicorn", "uvicorn.error", "uvicorn.access"):
        for handler in logging.getLogger(name).handlers:
            if not any(isinstance(f, RedactSecrets) for f in handler.filters):
                handler.addFilter(redactor)
    return redactor


# -- request heads -------------------------------------------------------------------


def guarded_protocol(
    max_header_bytes: int, header_timeout_s: float, body_timeout_s: float
) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol, refusing request heads (request line and headers,
    an upgrade's included) larger than `max_header_bytes` with 431 and closing with 408
    a connection whose head is not complete within `header_timeout_s` (slowloris), or
    whose body is not received whole within `body_timeout_s` of its head (a body
    trickled, or never sent). Between requests of a keep-alive connection the next head
    is awaited as any head is, so an idle connection is closed too."""

    class GuardedHttpProtocol(HttpToolsProtocol):
        _head_bytes = 0
        _tail = b""
        _in_head = True
        _head_timer: asyncio.TimerHandle | None = None
        _body_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._expect_head()

        def connection_lost(self, exc: Exception | None) -> None:
            self._stop_timer()
            self._stop_body_timer()
            super().connection_lost(exc)

        def on_headers_complete(self) -> None:
            super().on_headers_complete()
            # Only a request that announces a body waits for one (an upgrade has none).
            if any(
                name in (b"content-length", b"transfer-encoding") and value not in (b"0", b"")
                for name, value in self.headers
            ):
                self._body_timer = self.loop.call_later(body_timeout_s, self._body_timeout)

        def on_message_complete(self) -> None:
            self._stop_body_timer()
            super().on_message_complete()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._expect_head()  # keep-alive: the next request has a head of its own

        def data_received(self, data: bytes) -> None:
            if self._in_head:
                seen = self._tail + data
                end = seen.find(_HEAD_END)
                if end < 0:
                    self._head_bytes += len(data)
                    self._tail = seen[-3:]
                else:
                    self._head_bytes += end + len(_HEAD_END) - len(self._tail)
                if self._head_bytes > max_header_bytes:
                    self._answer(431, f"request head is over {max_header_bytes} bytes")
                    return
                if end >= 0:
                    self._in_head = False
                    self._stop_timer()
            super().data_received(data)

        def _expect_head(self) -> None:
            self._in_head, self._head_bytes, self._tail = True, 0, b""
            self._stop_timer()
            self._head_timer = self.loop.call_later(header_timeout_s, self._head_timeout)

        def _stop_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _stop_body_timer(self) -> None:
            if self._body_timer is not None:
                self._body_timer.cancel()
                self._body_timer = None

        def _body_timeout(self) -> None:
            self._body_timer = None
            if self.transport.is_closing():
                return
            cycle = self.cycle
            if cycle is not None and not cycle.response_complete:
                # The app stops waiting for the body (it reads a disconnect) and nothing
                # it sends is written after this answer.
                cycle.disconnected = True
                cycle.message_event.set()
                if cycle.response_started:  # too late for an answer: just close
                    self.transport.close()
                    return
            self._answer(408, f"request body not received within {body_timeout_s} s")

        def _head_timeout(self) -> None:
            self._head_timer = None
            if self._in_head and not self.transport.is_closing():
                self._answer(408, f"request head not received within {header_timeout_s} s")

        def _answer(self, status: int, message: str) -> None:
            self._stop_timer()
            self._stop_body_timer()
            code = "header_too_large" if status == 431 else "timeout"
            body = json.dumps({"error": {"code": code, "message": message}}).encode()
            head = (
                f"HTTP/1.1 {status} {_REASONS[status]}\r\n"
                "content-type: application/json\r\n"
                f"content-length: {len(body)}\r\n"
                "connection: close\r\n\r\n"
            ).encode()
            self.transport.write(head + body)
            self.transport.close()

    return GuardedHttpProtocol


# -- request bodies ------------------------------------------------------------------


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body is over {limit} bytes")


class BodyNotReceived(HTTPException):
    """The body stopped coming: the client left, or its time ran out (the protocol has
    answered 408). Nothing more can be sent; raised where the app reads the body, so a
    handler cannot mistake it for an error of its own (no traceback, no answer)."""

    def __init__(self) -> None:
        super().__init__(408, "request body not received whole")


class BodyLimit:
    """ASGI middleware: a request whose Content-Length is over the limit is answered 413
    at once, unread; a body that turns out larger while it is read (chunked) stops the
    reading with BodyTooLarge (413) at the first chunk past the limit; a body cut short
    (the client left, or BODY_TIMEOUT_S passed) stops it with BodyNotReceived."""

    def __init__(self, app: ASGIApp, limit_for: Callable[[str], int]) -> None:
        self._app = app
        self._limit_for = limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        limit = self._limit_for(scope["path"])
        for name, value in scope["headers"]:
            if name == b"content-length" and (not value.isdigit() or int(value) > limit):
                await _send_413(send, limit)
                return
        received = 0
        complete = False

        async def limited() -> Message:
            nonlocal received, complete
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
                complete = not message.get("more_body", False)
            elif message["type"] == "http.disconnect" and not complete:
                raise BodyNotReceived
            return message

        started = False

        async def watch(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self._app(scope, limited, watch)
        except BodyTooLarge:
            if not started:
                await _send_413(send, limit)
        except BodyNotReceived:
            pass  # nobody to answer: the client is gone or has its 408


async def _send_413(send: Send, limit: int) -> None:
    body = json.dumps(
        {"error": {"code": "too_large", "message": f"request body is over {limit} bytes"}}
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def body_limit(settings: Settings) -> Callable[[str], int]:
    def limit_for(path: str) -> int:
        if path == "/api/campaigns":
            return max(CAMPAIGN_BODY_BYTES, settings.max_body_bytes)
        if path.startswith("/webhooks/"):
            return WEBHOOK_BODY_BYTES
        # An upload: each type's own limit is checked while it streams (whatslike/media).
        return MEDIA_BODY_BYTES if path == "/api/media" else settings.max_body_bytes

    return limit_for


# -- the server ----------------------------------------------------------------------

#: How long uvicorn keeps an idle keep-alive connection (its default is 5 s): well past
#: our outbound client's `http_keepalive_s` (4 s), which must give a connection up before
#: its server closes it, even with its event loop late by seconds under load; else a
#: request meets a connection being closed and its outcome is unknown for no reason. The
#: head timeout (`header_timeout_s`, 10 s) closes an idle connection first, with a 408.
SERVER_KEEPALIVE_S = 15


def server_config(
    app: ASGIApp, settings: Settings, log_level: str, ws: Callable[..., Any] | None
) -> uvicorn.Config:
    """uvicorn's configuration with every limit of the settings in place; `ws` makes the
    protocol of each WebSocket (`Hub.protocol`), None for uvicorn's own."""
    return uvicorn.Config(
        BodyLimit(app, body_limit(settings)),
        log_level=log_level,
        # Below INFO nothing of the access log is written: without this uvicorn still
        # builds each line's arguments (client address, path) per request.
        access_log=log_level in ("debug", "info"),
        lifespan="on",
        http=guarded_protocol(
            settings.max_header_bytes, settings.header_timeout_s, settings.body_timeout_s
        ),
        # The hub speaks WebSocket itself (see whatslike.hub.transport), and compresses
        # nothing: its frames are a few hundred bytes.
        ws=cast(Any, ws) if ws is not None else "websockets-sansio",
        ws_per_message_deflate=False,
        ws_max_size=settings.max_frame_bytes,
        timeout_keep_alive=SERVER_KEEPALIVE_S,
    )
