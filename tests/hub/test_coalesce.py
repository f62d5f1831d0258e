"""The coalescing of a campaign's reads (whatslike/hub/coalesce.py), driven by a
simulated clock: changes heard at any times, reads of any durations."""

from __future__ import annotations

import heapq
import itertools

from hypothesis import given
from hypothesis import strategies as st

from whatslike.hub.coalesce import Coalescer

INTERVAL = 0.25


def run(changes: list[float], durations: list[float]) -> tuple[list[float], list[float]]:
    """Feed a coalescer the changes (at those times) and perform the reads it asks for
    (each taking the next duration, cycling); answer the reads' start and end times."""
    coalescer = Coalescer(INTERVAL)
    # (time, order, kind): "change", "start" (a read it asked for), "end".
    events: list[tuple[float, int, str]] = [(t, n, "change") for n, t in enumerate(changes)]
    heapq.heapify(events)
    order = len(events)
    starts: list[float] = []
    ends: list[float] = []
    while events:
        now, _, kind = heapq.heappop(events)
        delay: float | None
        if kind == "change":
            delay = coalescer.changed(now)
        elif kind == "start":
            coalescer.started(now)
            starts.append(now)
            order += 1
            heapq.heappush(events, (now + durations[len(starts) % len(durations)], order, "end"))
            delay = None
        else:
            ends.append(now)
            delay = coalescer.finished(now)
        if delay is not None:
            assert delay >= 0
            order += 1
            heapq.heappush(events, (now + delay, order, "start"))
    return starts, ends


times = st.floats(0, 5, allow_nan=False)
reads = st.lists(st.floats(0, 1, allow_nan=False), min_size=1, max_size=5)


@given(st.lists(times, min_size=1, max_size=60), reads)
def test_reads_are_spaced_never_overlap_and_follow_the_last_change(
    changes: list[float], durations: list[float]
) -> None:
    starts, ends = run(changes, durations)
    # At most one read per interval (so at most 1/INTERVAL frames a second).
    assert all(b - a >= INTERVAL - 1e-9 for a, b in itertools.pairwise(starts))
    # One at a time: each read ends before the next starts.
    assert len(ends) == len(starts)
    assert all(end <= start for end, start in zip(ends, starts[1:], strict=False))
    # The last change is never swallowed: a read starts at or after it (and so sees it).
    assert starts and starts[-1] >= max(changes)


@given(st.lists(times, min_size=1, max_size=60), reads)
def test_every_change_is_read_by_a_read_that_starts_after_it(
    changes: list[float], durations: list[float]
) -> None:
    starts, _ = run(changes, durations)
    assert all(any(start >= change for start in starts) for change in changes)


def test_a_burst_costs_two_reads_and_a_quiet_campaign_none() -> None:
    # 1,000 changes within one interval: one read at once, one after the interval.
    starts, _ = run([n / 10_000 for n in range(1000)], [0.01])
    assert starts == [0.0, INTERVAL]
    assert run([], [0.01]) == ([], [])


def test_a_change_after_a_quiet_spell_is_read_at_once() -> None:
    starts, _ = run([0.0, 10.0], [0.01])
    assert starts == [0.0, 10.0]
