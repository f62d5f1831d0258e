"""The per-organization HTTP budget: one token bucket per organization, the buckets of at
most `max_orgs` organizations kept (least recently seen dropped first, which only ever
gives a dropped organization a fresh burst)."""

from __future__ import annotations

import time
from collections import OrderedDict

from whatslike.hub.ratelimit import FrameBudget

MAX_ORGS = 10_000


class OrgRateLimit:
    def __init__(self, rate: float, burst: int, max_orgs: int = MAX_ORGS) -> None:
        self._rate = rate
        self._burst = burst
        self._max_orgs = max_orgs
        self._budgets: OrderedDict[str, FrameBudget] = OrderedDict()

    def allow(self, org_id: str, now: float | None = None) -> bool:
        """Spend one request of the organization's budget; False when it has none left."""
        budget = self._budgets.get(org_id)
        if budget is None:
            budget = FrameBudget(self._rate, self._burst, strikes=1)
            self._budgets[org_id] = budget
            if len(self._budgets) > self._max_orgs:
                self._budgets.popitem(last=False)
        else:
            self._budgets.move_to_end(org_id)
        return budget.take(time.monotonic() if now is None else now)

    def retry_after_s(self) -> int:
        """Whole seconds until one request is surely allowed again."""
        return max(1, int(1 / self._rate + 0.999))
