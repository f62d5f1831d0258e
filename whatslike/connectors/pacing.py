"""Polite sending: the provider's rate limits, kept on our side.

Meta takes a fixed number of messages per second per business phone number (80 by
default, 1,000 after its upgrade) and answers more with error 130429; it also limits the
messages to one customer (the "pair rate", about one per 6 s after a burst) with 131056.
A fast pipeline must not earn those errors, and must never turn them into FAILED.

`TokenBucket` is the pure core (time is passed in): `rate` tokens per second, at most
`burst` saved up; `reserve` books the next token and says how long to wait for it, so
concurrent senders queue in arrival order without polling. `Pacer` is the connector's
shell around one bucket per sending account: it waits for a token before each send, and
`hold` stops the account for a while after the provider said "too fast".
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class TokenBucket:
    rate: float
    burst: float
    #: When the bucket was last full (it fills at `rate` from there); a token is free
    #: for the taking once `now` is past `free_at` by no more than `burst / rate`.
    free_at: float = float("-inf")

    def __post_init__(self) -> None:
        if self.rate <= 0 or self.burst < 1:
            raise ValueError("rate must be positive and burst at least 1")

    def reserve(self, now: float) -> float:
        """Take the next token: how long from `now` until it may be used (0: at once)."""
        # A bucket idle for long has at most `burst` tokens saved up.
        self.free_at = max(self.free_at, now - (self.burst - 1) / self.rate)
        wait = max(0.0, self.free_at - now)
        self.free_at += 1 / self.rate
        return wait

    def take(self, now: float) -> bool:
        """Take a token if one is free at `now`; book nothing otherwise."""
        if self.reserve(now) == 0:
            return True
        self.free_at -= 1 / self.rate  # give the booking back
        return False

    def full(self, now: float) -> bool:
        """Whether `burst` tokens are saved up (the bucket has been idle long enough)."""
        return self.free_at <= now - (self.burst - 1) / self.rate

    def hold(self, now: float, seconds: float) -> None:
        """No token before `now + seconds` (the provider asked us to slow down), and the
        bucket starts empty then."""
        self.free_at = max(self.free_at, now + seconds)


class Pacer:
    """Waits before each send of one account so that at most `rate` per second (after a
    burst of `burst`) leave; a hold (after 130429) delays every later send of the account."""

    def __init__(
        self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._bucket = TokenBucket(rate, burst)
        self._clock = clock

    async def slot(self) -> None:
        wait = self._bucket.reserve(self._clock())
        if wait > 0:
            await asyncio.sleep(wait)

    def hold(self, seconds: float) -> None:
        self._bucket.hold(self._clock(), seconds)
