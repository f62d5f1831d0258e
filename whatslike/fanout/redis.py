"""The Redis Pub/Sub fan-out (protocol.md §3). `publish` is one PUBLISH on a
channel (`status:{conversation_id}`, `campaign:{campaign_id}`); each hub's reader
SUBSCRIBEs to one channel per conversation or campaign it has a local subscriber for
(`add` / `discard`), not to a pattern such as `status:*`: with a pattern every hub reads,
and Redis writes to every hub, every status of every conversation (bench/redis_fanout.py
measures both).

`publish_many` writes a batch's PUBLISHes in one pipeline (one round trip).

The reader owns one connection at a time (a *link*) and never lets redis-py reconnect it
behind its back (redis-py's PubSub resubscribes silently, which would hide the outage):
a link that fails (an error, EOF, or no PONG within `liveness_s`) is dropped, and a new one
is opened with exponential back-off and jitter. It subscribes to every wanted channel and
sends a PING; when that PONG comes back every SUBSCRIBE before it is in effect, and the gap
listeners are told, so that their store reads from then on miss nothing.

Buffers, all bounded:
- a link's pending subscription changes: one entry per channel at most (a later `add`
  or `discard` of the same channel replaces the earlier one);
- PINGs in flight with the `add` calls waiting for them: one PING per sender wake-up; a
  link whose oldest PING is older than `liveness_s` is dropped, which releases the waiters;
- no message queue here: each message goes to the listeners as it is read (the hub queues
  it into per-connection bounded queues without waiting). Meanwhile Redis buffers for us up
  to its `client-output-buffer-limit pubsub` (32 MB, or 8 MB for 60 s, by default); past
  that Redis closes the link, which is a gap like any other.
- publishing uses a blocking pool of at most `max_connections`; a publish that waits longer
  than `timeout_s` for one, or for Redis, raises BackendUnavailable (the bus retries it).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Final, cast
from urllib.parse import urlsplit

from redis.asyncio import BlockingConnectionPool, ConnectionPool, Redis
from redis.asyncio.connection import AbstractConnection
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

from whatslike.errors import BackendUnavailable
from whatslike.fanout import GapListener, Listener

log = logging.getLogger(__name__)

#: Channels per SUBSCRIBE / UNSUBSCRIBE command when many change at once (a reconnect).
SUBSCRIBE_CHUNK: Final = 1000

_PONG: Final = b"PONG"  # the answer to PING outside subscribed mode
_SUBSCRIBED_PONG: Final = b"pong"  # ... and inside it: [b"pong", b""]
_MESSAGE: Final = b"message"


def redis_address(url: str) -> str:
    """host:port/db of a Redis URL, without the credentials it may hold."""
    parts = urlsplit(url)
    return f"{parts.hostname or 'localhost'}:{parts.port or 6379}{parts.path or '/0'}"


class _Link:
    """One reader connection: what was sent on it and who waits for which PONG."""

    def __init__(self, conn: AbstractConnection, wanted: set[str]) -> None:
        self.conn = conn
        #: Channels whose SUBSCRIBE was written on this connection (and no UNSUBSCRIBE).
        self.sent: set[str] = set()
        #: Channel → True (subscribe) or False (unsubscribe), not written yet.
        self.pending: dict[str, bool] = dict.fromkeys(wanted, True)
        #: Futures resolved by the PONG of the next PING written.
        self.waiters: list[asyncio.Future[None]] = []
        #: One entry per PING written, oldest first: when, and who waits for its PONG.
        self.pongs: deque[tuple[float, list[asyncio.Future[None]]]] = deque()
        self.wake = asyncio.Event()
        self.live = False

    def want(self, channel: str, heard: bool) -> None:
        if (channel in self.sent) == heard:
            self.pending.pop(channel, None)
        else:
            self.pending[channel] = heard
        self.wake.set()

    def barrier(self) -> asyncio.Future[None]:
        """A future resolved once everything written before the next PING is in effect."""
        waiter = asyncio.get_running_loop().create_future()
        self.waiters.append(waiter)
        self.wake.set()
        return waiter

    def flush(self, now: float, ping: bool) -> list[bytes]:
        """The commands for the pending changes, and a PING when someone waits for one."""
        on = [channel for channel, heard in self.pending.items() if heard]
        off = [channel for channel, heard in self.pending.items() if not heard]
        self.pending.clear()
        self.sent.update(on)
        self.sent.difference_update(off)
        packed: list[bytes] = []
        for command, names in (("UNSUBSCRIBE", off), ("SUBSCRIBE", on)):
            for start in range(0, len(names), SUBSCRIBE_CHUNK):
                chunk = names[start : start + SUBSCRIBE_CHUNK]
                packed += self.conn.pack_command(command, *chunk)
        if ping or self.waiters:
            packed += self.conn.pack_command("PING")
            self.pongs.append((now, self.waiters))
            self.waiters = []
        return packed

    def ponged(self) -> None:
        for waiter in self.pongs.popleft()[1]:
            if not waiter.done():
                waiter.set_result(None)

    def release(self) -> None:
        """The link is gone: nobody waits for it any more (a gap will be announced)."""
        waiting = [*self.waiters, *(waiter for _, group in self.pongs for waiter in group)]
        for waiter in waiting:
            if not waiter.done():
                waiter.set_result(None)


class RedisFanout:
    def __init__(
        self,
        url: str,
        *,
        timeout_s: float = 5.0,
        ping_interval_s: float = 5.0,
        liveness_s: float = 15.0,
        backoff_base_s: float = 0.1,
        backoff_cap_s: float = 5.0,
        max_connections: int = 16,
    ) -> None:
        self._where = redis_address(url)
        self._timeout_s = timeout_s
        self._ping_interval_s = ping_interval_s
        self._liveness_s = liveness_s
        self._backoff_base_s = backoff_base_s
        self._backoff_cap_s = backoff_cap_s
        # One immediate retry: a pooled connection left from before a Redis restart fails
        # once; a second failure is an outage, for the caller (the bus) to retry later.
        self._client = Redis(
            connection_pool=BlockingConnectionPool.from_url(
                url,
                max_connections=max_connections,
                timeout=timeout_s,
                socket_connect_timeout=timeout_s,
                socket_timeout=timeout_s,
                retry=Retry(NoBackoff(), 1),
            )
        )
        # The reader's connections, one per link: RESP2 (the reader parses its replies), no
        # retries and no read timeout (liveness is the PINGs'); the pool only builds them.
        self._new_connection: Callable[[], AbstractConnection] = ConnectionPool.from_url(
            url,
            protocol=2,
            socket_connect_timeout=timeout_s,
            socket_keepalive=True,
            retry=Retry(NoBackoff(), 0),
        ).make_connection
        self._listeners: list[Listener] = []
        self._gap_listeners: list[GapListener] = []
        self._wanted: set[str] = set()
        self._link: _Link | None = None
        self._live = asyncio.Event()
        self._failures = 0
        self._task: asyncio.Task[None] | None = None

    def listen(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def on_gap(self, listener: GapListener) -> None:
        self._gap_listeners.append(listener)

    async def add(self, channel: str) -> None:
        self._wanted.add(channel)
        link = self._link
        if link is None:
            return  # the next link subscribes to it, then announces a gap
        link.want(channel, True)
        await link.barrier()

    def discard(self, channel: str) -> None:
        self._wanted.discard(channel)
        if self._link is not None:
            self._link.want(channel, False)

    async def start(self) -> None:
        """Start the reader and wait (at most `timeout_s`) for its first link; when Redis
        is not there yet the reader keeps trying in the background and `ping` says so."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="redis-fanout-reader")
        try:
            async with asyncio.timeout(self._timeout_s):
                await self._live.wait()
        except TimeoutError:
            log.warning("fan-out: Redis at %s not reachable yet; retrying", self._where)

    async def stop(self) -> None:
        if self._task is not None:
            task, self._task = self._task, None
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await self._client.aclose()

    async def publish(self, channel: str, payload: bytes) -> None:
        try:
            await self._client.publish(channel, payload)
        except (RedisError, OSError) as exc:
            raise BackendUnavailable(f"Redis at {self._where} took no publish: {exc}") from exc

    async def publish_many(self, messages: Sequence[tuple[str, bytes]]) -> None:
        """One pipeline (no MULTI): every PUBLISH written at once, one round trip."""
        if not messages:
            return
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for channel, payload in messages:
                    pipe.publish(channel, payload)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            raise BackendUnavailable(f"Redis at {self._where} took no publish: {exc}") from exc

    async def ping(self) -> None:
        try:
            # redis-py types its commands for the sync and the asyncio client at once.
            await cast(Awaitable[bool], self._client.ping())
        except (RedisError, OSError) as exc:
            raise BackendUnavailable(f"Redis at {self._where} does not answer: {exc}") from exc
        if self._task is not None and not self._live.is_set():
            raise BackendUnavailable(f"fan-out link to Redis at {self._where} is reconnecting")

    # The reader.

    async def _run(self) -> None:
        while True:
            try:
                await self._session()
            except (RedisError, OSError, BackendUnavailable) as exc:
                reason = str(exc) or type(exc).__name__
            except Exception:
                # Never deaf: even a bug in a link's life ends in a new link.
                log.exception("fan-out: Redis link to %s failed", self._where)
                reason = "internal error"
            self._failures += 1
            ceiling = min(self._backoff_cap_s, self._backoff_base_s * 2 ** (self._failures - 1))
            delay = ceiling / 2 + random.uniform(0, ceiling / 2)
            log.warning(
                "fan-out: Redis link to %s lost (%s); reconnecting in %.2f s (attempt %d)",
                self._where,
                reason,
                delay,
                self._failures,
            )
            await asyncio.sleep(delay)

    async def _session(self) -> None:
        """One link's life: connect, subscribe to everything wanted, read until it fails.
        Always ends with an exception."""
        conn = self._new_connection()
        link: _Link | None = None
        tasks: list[asyncio.Task[None]] = []
        try:
            # Bounded: a server that accepts but never answers the handshake is an outage.
            async with asyncio.timeout(self._timeout_s):
                await conn.connect()  # type: ignore[no-untyped-call]  # redis-py leaves it bare
            # From here to the write, nothing yields: an `add` or `discard` either made it
            # into `_wanted` before the snapshot, or finds the link and queues a change.
            link = _Link(conn, self._wanted)
            self._link = link
            loop = asyncio.get_running_loop()
            async with asyncio.timeout(self._liveness_s):
                await conn.send_packed_command(link.flush(loop.time(), True), check_health=False)
            tasks = [
                asyncio.create_task(self._read(link)),
                asyncio.create_task(self._send(link)),
            ]
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            failure = next(iter(done)).exception()
            raise failure if failure is not None else BackendUnavailable("the link ended")
        finally:
            self._live.clear()
            self._link = None
            if link is not None:
                link.release()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await conn.disconnect(nowait=True)

    async def _read(self, link: _Link) -> None:
        conn = link.conn
        listeners = self._listeners
        while True:
            reply = await conn.read_response()
            if type(reply) is list and reply[0] == _MESSAGE:
                channel = reply[1].decode()
                for listener in listeners:
                    try:
                        listener(channel, reply[2])
                    except Exception:
                        # One broken listener must not keep the message from the others.
                        log.exception("fan-out listener failed on %s", channel)
            elif reply == _PONG or (type(reply) is list and reply[0] == _SUBSCRIBED_PONG):
                link.ponged()
                if not link.live:
                    self._went_live(link)
            # Anything else confirms a SUBSCRIBE or an UNSUBSCRIBE: the PONGs say enough.

    def _went_live(self, link: _Link) -> None:
        """The first PONG: every channel wanted when the link opened is heard again."""
        link.live = True
        self._live.set()
        self._failures = 0
        log.info("fan-out: Redis link to %s up (%d channels)", self._where, len(link.sent))
        if not self._wanted:
            return  # nobody follows anything here: nothing can have been missed
        for listener in self._gap_listeners:
            try:
                listener()
            except Exception:
                log.exception("fan-out gap listener failed")

    async def _send(self, link: _Link) -> None:
        """Writes the link's pending changes and PINGs; a PING every `ping_interval_s` when
        idle; fails the link when its oldest PONG is more than `liveness_s` late."""
        loop = asyncio.get_running_loop()
        while True:
            woke = True
            try:
                async with asyncio.timeout(self._ping_interval_s):
                    await link.wake.wait()
            except TimeoutError:
                woke = False
            link.wake.clear()
            now = loop.time()
            if link.pongs and now - link.pongs[0][0] > self._liveness_s:
                raise BackendUnavailable(f"no PONG for {self._liveness_s:g} s")
            commands = link.flush(now, ping=not woke and not link.pongs)
            if commands:
                async with asyncio.timeout(self._liveness_s):
                    await link.conn.send_packed_command(commands, check_health=False)
