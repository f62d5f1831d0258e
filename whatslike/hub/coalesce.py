"""When a hub reads a followed campaign's counts again: at most once per `interval`, and
always once more after the last change heard. Pure: times in, delays out.

Theory: a read started after a change was heard sees it (the hint is published after the
change committed). So the rule is only this: a change heard while no read is due makes
one due, `interval` after the last read started (at once if that is past); a change
heard while a read runs makes another due after it. Reads never overlap, start at least
`interval` apart (so a campaign's frames come at most 1/interval a second, however fast
its statuses move), and the last change is always followed by a read that sees it (the
final counts are always sent)."""

from __future__ import annotations

import math


class Coalescer:
    """One campaign's reads in one hub: call `changed` for each change heard, `started`
    when the read it asked for begins and `finished` when it ends; a returned delay asks
    for a read that many seconds from now (None: one is already due or running)."""

    __slots__ = ("_dirty", "_due", "_last_start", "_reading", "interval")

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._last_start = -math.inf
        self._reading = False
        #: A change was heard since the running read started (or none runs yet).
        self._dirty = False
        #: A read is asked for and has not started.
        self._due = False

    def changed(self, now: float) -> float | None:
        self._dirty = True
        if self._reading or self._due:
            return None
        return self._ask(now)

    def started(self, now: float) -> None:
        self._due = False
        self._reading = True
        self._dirty = False
        self._last_start = now

    def finished(self, now: float) -> float | None:
        """The read ended (its counts sent, or it failed: then call `changed` first, so
        that it is tried again)."""
        self._reading = False
        if not self._dirty:
            return None
        return self._ask(now)

    def _ask(self, now: float) -> float:
        self._due = True
        return max(0.0, self._last_start + self.interval - now)
