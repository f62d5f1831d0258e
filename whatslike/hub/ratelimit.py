"""A token bucket for client frames: pure arithmetic on the times it is given.

`burst` frames may arrive at once; after that, `rate` per second. The hub answers a
frame over the limit with `rate_limited` and closes with 4008 once more than `strikes`
frames were refused within `window_s` seconds, whether in a row or interleaved with
allowed ones (a client that paces itself just over the rate cannot escape).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


@dataclass(slots=True)
class FrameBudget:
    rate: float
    burst: int
    strikes: int
    window_s: float = 10.0
    tokens: float = field(init=False)
    updated: float | None = field(default=None, init=False)
    #: Times of the latest refusals, at most strikes + 1 of them (bounded); made at the
    #: first refusal (most clients are never refused: an empty deque is ~600 bytes).
    refusals: deque[float] | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.tokens = float(self.burst)

    def take(self, now: float) -> bool:
        """Spend one token at time `now` (seconds, monotonic); False when none is left."""
        if self.updated is not None:
            self.tokens = min(float(self.burst), self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        if self.refusals is None:
            self.refusals = deque(maxlen=self.strikes + 1)
        self.refusals.append(now)
        return False

    @property
    def exhausted(self) -> bool:
        """True once more than `strikes` frames were refused within the window."""
        if self.refusals is None or len(self.refusals) <= self.strikes or self.updated is None:
            return False
        return self.refusals[0] > self.updated - self.window_s
