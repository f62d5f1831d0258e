"""A token bucket for client frames: pure arithmetic on the times it is given.

`burst` frames may arrive at once; after that, `rate` per second. The hub answers a
frame over the limit with `rate_limited` and closes with 4008 after `strikes` of them in a
row (a client that keeps going regardless).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class FrameBudget:
    rate: float
    burst: int
    strikes: int
    tokens: float = field(init=False)
    updated: float | None = field(default=None, init=False)
    denied_in_a_row: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self.tokens = float(self.burst)

    def take(self, now: float) -> bool:
        """Spend one token at time `now` (seconds, monotonic); False when none is left."""
        if self.updated is not None:
            self.tokens = min(float(self.burst), self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1:
            self.tokens -= 1
            self.denied_in_a_row = 0
            return True
        self.denied_in_a_row += 1
        return False

    @property
    def exhausted(self) -> bool:
        """True once more than `strikes` frames in a row were refused."""
        return self.denied_in_a_row > self.strikes
