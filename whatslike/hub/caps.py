"""How many WebSockets one user, one address and the whole hub may hold: pure counting,
claimed at the upgrade and released when the connection ends."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass(slots=True)
class ConnectionCaps:
    total: int
    per_user: int
    per_ip: int
    count: int = field(default=0, init=False)
    #: Only keys with at least one connection are kept, so both stay bounded by `total`.
    users: Counter[tuple[str, str]] = field(default_factory=Counter, init=False)
    ips: Counter[str] = field(default_factory=Counter, init=False)

    def claim(self, user: tuple[str, str], ip: str) -> str | None:
        """Count one more connection, or answer which cap refuses it: "total", "user" or
        "ip" (nothing is counted then)."""
        if self.count >= self.total:
            return "total"
        if self.users[user] >= self.per_user:
            return "user"
        if self.ips[ip] >= self.per_ip:
            return "ip"
        self.count += 1
        self.users[user] += 1
        self.ips[ip] += 1
        return None

    def release(self, user: tuple[str, str], ip: str) -> None:
        self.count -= 1
        self.users[user] -= 1
        if self.users[user] <= 0:
            del self.users[user]
        self.ips[ip] -= 1
        if self.ips[ip] <= 0:
            del self.ips[ip]
