"""The outbound HTTP adapter against real sockets: what it answers, and which failures
mean "never sent" and which "may have been sent" (the connector sends exactly once on
the difference)."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager

import pytest

from whatslike import http_client
from whatslike.http_client import AiohttpClient, NotSent, OutcomeUnknown

Serve = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def server(serve: Serve) -> AsyncIterator[str]:
    listening = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = listening.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        listening.close()


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    return await reader.readexactly(length)


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_an_answer_of_any_status_comes_back_with_its_body() -> None:
    seen: list[bytes] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                seen.append(await read_request(reader))
            except asyncio.IncompleteReadError:
                return
            status = b"400 Bad Request" if seen[-1] == b"bad" else b"200 OK"
            writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()

    client = AiohttpClient(connections=4, keepalive_s=1.0)
    async with server(answer) as url:
        good = await client.post(url + "/x", b"good", {"Content-Type": "text/plain"}, 5)
        bad = await client.post(url + "/x", b"bad", {}, 5)
    await client.close()
    assert (good.status, good.ok, good.body) == (200, True, b"ok")
    assert (bad.status, bad.ok, bad.reason) == (400, False, "Bad Request")
    assert seen == [b"good", b"bad"]


async def test_a_refused_connection_is_never_sent() -> None:
    client = AiohttpClient(connections=4, keepalive_s=1.0)
    with pytest.raises(NotSent):
        await client.post(f"http://127.0.0.1:{closed_port()}/x", b"{}", {}, 5)
    await client.close()


async def test_no_free_connection_in_time_is_never_sent() -> None:
    release = asyncio.Event()

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await release.wait()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()

    client = AiohttpClient(connections=1, keepalive_s=1.0)
    async with server(hold) as url:
        first = asyncio.create_task(client.post(url, b"1", {}, 10))
        await asyncio.sleep(0)  # the first takes the only connection
        with pytest.raises(NotSent):
            await client.post(url, b"2", {}, 0.2)
        release.set()
        assert (await first).status == 200
    await client.close()


@pytest.mark.parametrize("how", ["closes", "hangs"])
async def test_a_request_written_and_not_answered_has_an_unknown_outcome(how: str) -> None:
    async def no_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        if how == "closes":
            writer.close()
        else:
            await asyncio.sleep(5)

    client = AiohttpClient(connections=4, keepalive_s=1.0)
    async with server(no_answer) as url:
        with pytest.raises(OutcomeUnknown):
            await client.post(url, b"{}", {}, 0.5)
    await client.close()


class ClosingServer:
    """A blocking HTTP/1.1 server on threads of its own, answering 200 to every request
    and keeping the connection; `close_idle` closes its connections as a server's idle
    timeout does. Being blocking, it can close them while the client's event loop is
    held in the call: the FIN is in the client's socket and the loop has not read it,
    as under load."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.bodies: list[bytes] = []
        self.accepted = 0
        self.connections: list[tuple[socket.socket, threading.Thread]] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:  # the listener closed
                return
            self.accepted += 1
            serving = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self.connections.append((conn, serving))
            serving.start()

    def _serve(self, conn: socket.socket) -> None:
        with conn.makefile("rb") as stream:
            while stream.readline():  # the request line; b"" once the connection is shut
                length = 0
                while (line := stream.readline()) not in (b"\r\n", b""):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                self.bodies.append(stream.read(length))
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    def close_idle(self) -> None:
        """Close every connection, returning once the client's side has acknowledged
        each FIN (it is in the client's socket)."""
        for conn, serving in self.connections:
            conn.shutdown(socket.SHUT_RDWR)
            deadline = time.monotonic() + 5
            while conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] != TCP_FIN_WAIT2:
                assert time.monotonic() < deadline, "the FIN was not acknowledged"
                time.sleep(0.001)
            serving.join()
            conn.close()
        self.connections.clear()


#: The TCP state (linux/tcp_states.h) of a socket whose FIN its peer acknowledged.
TCP_FIN_WAIT2 = 5


@contextmanager
def closing_server() -> Iterator[ClosingServer]:
    served = ClosingServer()
    try:
        yield served
    finally:
        served.listener.close()
        served.close_idle()


async def test_a_pooled_connection_its_server_closed_is_not_used() -> None:
    client = AiohttpClient(connections=4, keepalive_s=30.0)
    with closing_server() as served:
        assert (await client.post(served.url, b"first", {}, 5)).status == 200
        served.close_idle()  # the loop is held: the FIN waits unread in the socket
        assert (await client.post(served.url, b"second", {}, 5)).status == 200
    await client.close()
    assert served.bodies == [b"first", b"second"]
    assert served.accepted == 2


async def test_a_request_refused_by_a_connection_closed_under_it_is_never_sent(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The FIN comes after the connector's check (here: the check sees nothing) and the
    loop reads it before the request is written: aiohttp refuses to write it."""
    monkeypatch.setattr(http_client, "_peer_closed", lambda conn: False)
    client = AiohttpClient(connections=4, keepalive_s=30.0)
    with closing_server() as served:
        assert (await client.post(served.url, b"first", {}, 5)).status == 200
        served.close_idle()
        # The post takes the pooled connection in the loop's next turn, the one that
        # also reads the FIN (after it): its write, due in the turn after, is refused.
        post = asyncio.create_task(client.post(served.url, b"second", {}, 5))
        await asyncio.sleep(0)
        with pytest.raises(NotSent):
            await post
    await client.close()
    assert served.bodies == [b"first"]
