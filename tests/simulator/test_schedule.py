"""The simulator's retry schedule as a pure function, and its durable store on a real
SQLite file: what it keeps across a reopen, and how it counts sends."""

from __future__ import annotations

import asyncio
import itertools
import random
import sqlite3
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.simulator.test_simulator import AUTH, IG_SEND, WA_SEND, fixture, in_process
from whatslike.errors import BackendUnavailable
from whatslike.simulator.schedule import Backoff, Planned, WebhookSchedule

# -- the back-off schedule -------------------------------------------------------------

durations = st.floats(min_value=0.001, max_value=1000, allow_nan=False, allow_infinity=False)
scales = st.floats(min_value=0.001, max_value=100, allow_nan=False, allow_infinity=False)


@given(base=durations, cap=durations, scale=scales)
def test_delays_grow_to_the_cap_and_scale(base: float, cap: float, scale: float) -> None:
    backoff = Backoff(base_s=base, cap_s=cap, scale=scale)
    unscaled = Backoff(base_s=base, cap_s=cap)
    ceilings = [backoff.ceiling(n) for n in range(1, 2000)]
    assert ceilings[0] == pytest.approx(scale * min(base, cap))
    assert all(a <= b for a, b in itertools.pairwise(ceilings))
    assert all(c <= scale * cap for c in ceilings)
    assert ceilings[-1] == pytest.approx(scale * cap)  # doubling reaches the cap
    for n in (1, 2, 7, 30, 1999):
        assert backoff.ceiling(n) == pytest.approx(scale * unscaled.ceiling(n))


@given(
    base=durations,
    cap=durations,
    horizon_caps=st.floats(min_value=0, max_value=50),
    scale=scales,
    first_due=st.floats(min_value=0, max_value=2e9),
    seed=st.integers(),
)
def test_retries_keep_coming_until_the_horizon(
    *, base: float, cap: float, horizon_caps: float, scale: float, first_due: float, seed: int
) -> None:
    """Every attempt fails: retries come at most one (scaled) ceiling apart, at least half
    of it, never after the deadline, and stop only after an attempt at the deadline."""
    backoff = Backoff(base_s=base, cap_s=cap, horizon_s=horizon_caps * cap, scale=scale)
    rng = random.Random(seed)
    deadline = backoff.deadline(first_due)
    assert deadline == pytest.approx(first_due + scale * horizon_caps * cap)
    now, failures = first_due, 0
    while True:
        failures += 1
        due = backoff.next_due(first_due, now, failures, rng)
        if due is None:
            break
        ceiling = backoff.ceiling(failures)
        assert now < due <= deadline
        assert due <= now + ceiling
        assert due >= min(deadline, now + ceiling / 2)
        now = due
    assert now == deadline  # the last attempt was made at the deadline, not before


@given(seed=st.integers(), scale=st.sampled_from([1.0, 0.05]))
def test_the_default_schedule_outlasts_a_60_second_outage(seed: int, scale: float) -> None:
    """Webhooks fail for 60 (scaled) seconds from their first attempt: each is still being
    retried afterwards, and the first retry after the outage comes within one cap."""
    backoff = Backoff(scale=scale)
    rng = random.Random(seed)
    outage_end = 60 * scale
    now, failures = 0.0, 0
    while now < outage_end:
        failures += 1
        due = backoff.next_due(0.0, now, failures, rng)
        assert due is not None
        assert due - now <= 60 * scale
        now = due
    assert now - outage_end <= 60 * scale
    assert backoff.horizon_s == 7 * 24 * 3600


# -- the durable schedule --------------------------------------------------------------


def planned(count: int, due: float) -> list[Planned]:
    return [Planned(due + n, "whatsapp", f"body {n}".encode()) for n in range(count)]


async def test_pending_deliveries_survive_a_reopen(tmp_path: Path) -> None:
    path = tmp_path / "simulator.db"
    schedule = WebhookSchedule(path, capacity=10)
    assert await schedule.open() == 0
    start = time.time() - 10  # all due already: take() does not wait
    first = await schedule.accept("whatsapp:m1", planned(3, start))
    assert first is not None and [d.id for d in first] == sorted(d.id for d in first)
    await schedule.settle([first[0]])
    retried = first[1]
    retried.failures, retried.due = 2, start + 5
    await schedule.retry(retried)
    assert schedule.pending == 2
    await schedule.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert db.execute("SELECT count(*) FROM deliveries").fetchone() == (2,)

    again = WebhookSchedule(path, capacity=10)
    assert await again.open() == 2
    assert again.pending == 2
    resumed = [await again.take(), await again.take()]  # earliest first
    assert [(d.id, d.body, d.due, d.first_due, d.failures) for d in resumed] == [
        (first[2].id, b"body 2", start + 2, start + 2, 0),
        (retried.id, b"body 1", start + 5, start + 1, 2),
    ]
    await again.close()


async def test_a_full_schedule_stores_nothing(tmp_path: Path) -> None:
    schedule = WebhookSchedule(tmp_path / "simulator.db", capacity=4)
    await schedule.open()
    assert await schedule.accept("k1", planned(3, time.time())) is not None
    assert await schedule.accept("k2", planned(2, time.time())) is None
    assert schedule.pending == 3
    assert await schedule.sends() == {"sends": 1, "keys": 1, "duplicates": {}}
    await schedule.close()
    with pytest.raises(BackendUnavailable):
        await schedule.accept("k3", planned(1, time.time()))
    assert schedule.pending == 3  # a failed write gives its places back


async def test_an_unopenable_file_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "simulator.db").write_bytes(b"not a database, " * 100)
    with pytest.raises(BackendUnavailable, match="cannot open simulator database"):
        await WebhookSchedule(tmp_path / "simulator.db", capacity=1).open()


# -- send counting over the Graph API --------------------------------------------------


async def test_sends_are_counted_per_message_and_survive_a_restart(tmp_path: Path) -> None:
    whatsapp = fixture("whatsapp-send-request.json")
    other = {**whatsapp, "biz_opaque_callback_data": "msg_other"}
    instagram = fixture("instagram-send-request.json")
    async with in_process(tmp_path, sim_queue_size=8) as (_, client):
        assert (await client.get("/simulator/sends")).json() == {
            "sends": 0,
            "keys": 0,
            "duplicates": {},
        }
        answers = [
            (await client.post(WA_SEND, json=body, headers=AUTH)).status_code
            for body in (whatsapp, whatsapp, other)
        ]
        assert answers == [200, 200, 429]  # 3 webhooks each: the last 3 do not fit in 8
        for _ in range(2):
            assert (await client.post(IG_SEND, json=instagram, headers=AUTH)).status_code == 200
    callback = whatsapp["biz_opaque_callback_data"]
    recipient, text = instagram["recipient"]["id"], instagram["message"]["text"]
    expected = {
        "sends": 4,
        "keys": 2,
        "duplicates": {f"whatsapp:{callback}": 2, f"instagram:{recipient}:{text}": 2},
    }
    async with in_process(tmp_path) as (_, client):
        assert (await client.get("/simulator/sends")).json() == expected


async def test_a_send_that_cannot_be_stored_is_a_transient_error(tmp_path: Path) -> None:
    async with in_process(tmp_path) as (simulator, client):
        await simulator.schedule.close()
        response = await client.post(
            WA_SEND, json=fixture("whatsapp-send-request.json"), headers=AUTH
        )
        assert response.status_code == 503
        error = response.json()["error"]
        assert (error["code"], error["is_transient"]) == (2, True)
        counts = await client.get("/simulator/sends")
        assert counts.status_code == 503
        assert counts.json()["error"]["code"] == "unavailable"
        assert simulator.schedule.pending == 0


async def test_sends_accepted_at_once_are_all_stored_with_ids_never_given_before(
    tmp_path: Path,
) -> None:
    path = tmp_path / "simulator.db"
    schedule = WebhookSchedule(path, capacity=1000)
    await schedule.open()
    start = time.time() - 10
    accepted = await asyncio.gather(
        *(schedule.accept(f"whatsapp:m{n}", planned(3, start)) for n in range(50))
    )
    ids = [d.id for deliveries in accepted if deliveries for d in deliveries]
    assert ids == list(range(1, 151))  # in the order of the calls
    assert await schedule.sends() == {"sends": 50, "keys": 50, "duplicates": {}}
    # The newest are settled: their ids must not be given again after a reopen.
    last = accepted[-1]
    assert last is not None
    await schedule.settle(last)
    await schedule.close()

    again = WebhookSchedule(path, capacity=1000)
    assert await again.open() == 147
    more = await again.accept("whatsapp:m50", planned(1, start))
    assert more is not None and more[0].id == 151
    await again.close()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT count(*), max(id) FROM deliveries").fetchone() == (148, 151)
