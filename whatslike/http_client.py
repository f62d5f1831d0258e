"""Outbound HTTP: the connector's calls to the Graph API and the simulator's webhooks.

A narrow port (`HttpClient.post`: bytes in, status and bytes out) whose failures say what
the caller must know to send exactly once: `NotSent` (the request certainly never reached
the server: it failed before its first byte was written — no connection, none free in
time, or one that closed before the request was written) or `OutcomeUnknown` (it was
written, and no answer came).

`AiohttpClient` is the adapter: one aiohttp session per process, a pool of keep-alive
connections (aiohttp costs a fraction of the CPU per request that httpx does, which the
send path measured as its largest single cost). Idle connections are closed after
`keepalive_s`, below the servers' own idle timeout (ours closes one after 10 s: see
whatslike.serving), so a request is not written on a connection the server is closing at
that very moment — which would make its outcome unknown for no reason. A server may still
close one earlier: `_CheckedConnector` does not hand such a connection out again, and a
request that a connection closed under it refused to write is `NotSent`
(`_refused_unwritten`).
"""

from __future__ import annotations

import json
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Protocol

import aiohttp

if TYPE_CHECKING:
    from aiohttp.client_reqrep import ConnectionKey
    from aiohttp.connector import Connection
    from aiohttp.tracing import Trace


class NotSent(Exception):
    """The request certainly never reached the server: sending again is safe."""


class OutcomeUnknown(Exception):
    """The request may have reached the server (it was written, and no answer came)."""


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    body: bytes
    reason: str = ""

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    def json(self) -> Any:
        """The body as JSON; ValueError when it is not."""
        return json.loads(self.body)


class HttpClient(Protocol):
    async def post(
        self, url: str, body: bytes, headers: Mapping[str, str], timeout_s: float
    ) -> Answer:
        """POST `body`; the answer, whatever its status. Raises NotSent or
        OutcomeUnknown."""

    async def close(self) -> None: ...


class AiohttpClient:
    """`HttpClient` on one aiohttp session, made at the first request (it needs the
    running loop), with at most `connections` connections at once."""

    def __init__(self, *, connections: int, keepalive_s: float) -> None:
        self._connections = connections
        self._keepalive_s = keepalive_s
        self._session: aiohttp.ClientSession | None = None
        # Whether a request's head was written is what tells the two failures apart:
        # aiohttp's exceptions alone do not (a wait for a pooled connection and a wait
        # for the answer both end in TimeoutError). The trace fires as the head is
        # ready, just before it is written: a write refused after it is told apart by
        # `_refused_unwritten`.
        self._trace = aiohttp.TraceConfig()
        self._trace.on_request_headers_sent.append(_written)

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = _CheckedConnector(
                limit=self._connections, keepalive_timeout=self._keepalive_s
            )
            # No cookies, no automatic headers beyond the protocol's: a server-to-server
            # client.
            self._session = aiohttp.ClientSession(
                connector=connector,
                cookie_jar=aiohttp.DummyCookieJar(),
                skip_auto_headers=("User-Agent",),
                trace_configs=[self._trace],
            )
        return self._session

    async def post(
        self, url: str, body: bytes, headers: Mapping[str, str], timeout_s: float
    ) -> Answer:
        state = SimpleNamespace(written=False)
        try:
            async with self._open().post(
                url,
                data=body,
                headers=dict(headers),
                timeout=aiohttp.ClientTimeout(total=timeout_s),
                allow_redirects=False,
                trace_request_ctx=state,
            ) as response:
                payload = await response.read()
                return Answer(response.status, payload, response.reason or "")
        except (aiohttp.ClientError, TimeoutError) as exc:
            failure = OutcomeUnknown if state.written and not _refused_unwritten(exc) else NotSent
            raise failure(f"{type(exc).__name__}: {exc}") from exc

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


async def _written(
    session: aiohttp.ClientSession,
    context: SimpleNamespace,
    params: aiohttp.TraceRequestHeadersSentParams,
) -> None:
    context.trace_request_ctx.written = True


class _CheckedConnector(aiohttp.TCPConnector):
    """aiohttp's connector, except that it does not hand out a pooled connection whose
    server has closed it.

    aiohttp reuses an idle connection unless its protocol has seen it closed, that is
    unless the event loop has already read the server's FIN. Under load it often has not:
    the FIN waits in the socket, the request is handed to a dead connection, and it fails
    after aiohttp's headers-sent trace fired (the trace fires before anything is written),
    so its outcome looks unknown although the server never read a byte of it."""

    async def _get(self, key: ConnectionKey, traces: list[Trace]) -> Connection | None:
        while (conn := await super()._get(key, traces)) is not None:
            if not _peer_closed(conn):
                return conn
            conn.close()  # not reusable: dropped, as aiohttp drops one it saw closed
        return None  # none left in the pool: the caller makes a new connection


def _peer_closed(conn: Connection) -> bool:
    """Whether the idle `conn` is closed (or reset) by its server as far as its socket
    already tells, before the event loop has read it: one non-blocking peek."""
    transport = conn.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None:
        return True
    # asyncio's transport offers no recv of its own; a duplicate descriptor of the same
    # socket reads the same queue (a peek consumes nothing) and closing it leaves the
    # connection open.
    with sock.dup() as own:
        try:
            own.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return False  # nothing to read: open and idle
        except OSError:
            return True  # reset
    # b"" (the server's FIN), or bytes no request asked for (a close_notify ahead of a
    # TLS close, say): either way a request written now would meet a closing connection.
    return True


def _refused_unwritten(exc: BaseException) -> bool:
    """Whether `exc` is aiohttp refusing to write the request at all, the connection
    being already closing (its server closed it after it was handed out): nothing of the
    request left, so it is safe to send again.

    That holds because the request goes out in one write: aiohttp buffers the head and
    writes it with the body, `post` sends a body of bytes (one piece), and no caller asks
    for 100-continue (which would write the head first). Any other failure after the
    head was "sent" may have reached the server."""
    cause = exc.__cause__
    return (
        isinstance(exc, aiohttp.ClientOSError)
        and exc.strerror is not None
        and exc.strerror.startswith("Can not write request body")
        and isinstance(cause, aiohttp.ClientConnectionResetError)
        and cause.args == ("Cannot write to closing transport",)
    )
