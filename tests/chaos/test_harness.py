"""The chaos harness's own parts: its fault plan replays from the seed, its database proxy
really cuts PostgreSQL, and its oracle fails on each kind of loss it is meant to catch."""

from __future__ import annotations

import asyncio
import itertools
import os
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import pytest

from bench.chaos import (
    MIN_FAULT_SPACING_S,
    ChaosConfig,
    DatabaseProxy,
    HttpLog,
    Observed,
    Replies,
    Sent,
    Watcher,
    WebhookTap,
    _inbound,
    fresh_database,
    oracle,
    plan_faults,
)


@pytest.mark.parametrize("seed", range(20))
def test_the_fault_plan_is_a_function_of_the_seed(seed: int) -> None:
    config = ChaosConfig(seed=seed, database="postgres", messages=150, pipeline_kills=5)
    window, rate, faults = plan_faults(config)
    assert plan_faults(config) == (window, rate, faults)
    assert plan_faults(ChaosConfig(seed=seed + 1, database="postgres", messages=150))[2] != faults
    kinds = [fault.kind for fault in faults]
    assert kinds.count("kill-pipeline") == 5
    assert (kinds.count("stop-pipeline"), kinds.count("kill-simulator")) == (1, 2)
    assert kinds.count("cut-database") == 1
    assert rate * window == pytest.approx(150)
    kills = [fault.at for fault in faults if fault.kind != "cut-database"]
    assert kills == sorted(kills)
    assert all(0 < at < window for at in kills)
    assert min(b - a for a, b in itertools.pairwise(kills)) > 1.0
    cut = next(fault.at for fault in faults if fault.kind == "cut-database")
    assert not [at for at in kills if cut - MIN_FAULT_SPACING_S <= at < cut + config.cut_s / 2]
    sqlite = plan_faults(ChaosConfig(seed=seed, database="sqlite"))[2]
    assert "cut-database" not in [fault.kind for fault in sqlite]


@pytest.mark.postgres
async def test_the_proxy_cuts_postgres_and_lets_it_back() -> None:
    admin_url = os.environ.get("WHATSLIKE_TEST_POSTGRES_URL", "")
    if not admin_url:
        pytest.fail("WHATSLIKE_TEST_POSTGRES_URL is not set: run scripts/services.sh")
    async with fresh_database(admin_url) as name:
        server = urlsplit(admin_url)
        proxy = DatabaseProxy(server.hostname or "127.0.0.1", server.port or 5432)
        await proxy.start()
        url = f"postgresql://postgres@127.0.0.1:{proxy.port}/{name}"
        try:
            connection = await asyncpg.connect(url, timeout=5)
            assert await connection.fetchval("SELECT 1") == 1
            cut = asyncio.create_task(proxy.cut(1.5))
            await asyncio.sleep(0.1)
            with pytest.raises((OSError, asyncpg.PostgresError, asyncpg.InterfaceError)):
                await connection.fetchval("SELECT 1")
            with pytest.raises((OSError, asyncpg.PostgresError, asyncpg.InterfaceError)):
                await asyncpg.connect(url, timeout=5)
            await cut
            again = await asyncpg.connect(url, timeout=5)
            assert await again.fetchval("SELECT 2") == 2
            await again.close()
            connection.terminate()
        finally:
            await proxy.close()


def _frame(conversation: str, message: str, status: str, seq: int) -> dict[str, Any]:
    return {
        "type": "status",
        "conversation_id": conversation,
        "message_id": message,
        "status": status,
        "seq": seq,
        "occurred_at": "2026-12-01T00:00:00.000Z",
        "error": None,
    }


def _world() -> tuple[list[Sent], Observed, Watcher, WebhookTap]:
    """One conversation, one message that went SENT → DELIVERED → READ, seen by all."""
    frames = [_frame("c1", "m1", s, n) for n, s in enumerate(["SENT", "DELIVERED", "READ"], 1)]
    message = {"id": "m1", "client_message_id": "k1", "status": "READ", "seq": 3, "error": None}
    sent = [Sent(0, "c1", "whatsapp", "k1", "chaos message k1", message_id="m1", attempts=1)]
    observed = Observed(
        messages={"m1": message},
        stored={"c1": [message]},
        changes={"c1": {"last_seq": 3, "frames": frames}},
        sends={"sends": 1, "keys": 1, "duplicates": {}},
        sends_problem="",
        pipeline_log="",
        simulator_log="",
    )
    watcher = Watcher("ws://unused", ["c1"])
    watcher.frames["c1"] = list(frames)
    tap = WebhookTap("http://unused")
    tap.whatsapp_acked = [("m1", "SENT"), ("m1", "DELIVERED"), ("m1", "READ")]
    return sent, observed, watcher, tap


def _failed(sent: list[Sent], observed: Observed, watcher: Watcher, tap: WebhookTap) -> list[str]:
    return [check.name for check in oracle(sent, observed, watcher, HttpLog(), tap) if not check.ok]


def test_the_oracle_passes_a_clean_run_and_fails_each_kind_of_loss() -> None:
    assert _failed(*_world()) == []

    sent, observed, watcher, tap = _world()
    observed.messages["m1"]["status"] = "DELIVERED"
    observed.changes["c1"]["frames"].pop()
    observed.changes["c1"]["last_seq"] = 2
    watcher.frames["c1"].pop()
    failed = _failed(sent, observed, watcher, tap)
    assert any("READ or FAILED" in name for name in failed)
    assert any("answered 200 is in the store" in name for name in failed)

    sent, observed, watcher, tap = _world()
    observed.sends = {"sends": 2, "keys": 1, "duplicates": {"m1": 2}}
    assert any("sent twice" in name for name in _failed(sent, observed, watcher, tap))

    sent, observed, watcher, tap = _world()
    observed.sends = None
    assert any("sent twice" in name for name in _failed(sent, observed, watcher, tap))

    sent, observed, watcher, tap = _world()
    observed.changes["c1"]["frames"].pop(1)
    failed = _failed(sent, observed, watcher, tap)
    assert any("gap-free" in name for name in failed)
    assert any("WebSocket" in name for name in failed)

    sent, observed, watcher, tap = _world()
    sent[0].message_id = None
    assert any("got 202" in name for name in _failed(sent, observed, watcher, tap))


def test_the_inbound_check_fails_a_reply_answered_200_and_lost_or_stored_twice() -> None:
    _, observed, _, tap = _world()
    replies = Replies("http://unused", "token", 1)
    replies.made = ["wamid.1", "wamid.2"]
    reply = {"id": "in1", "direction": "in", "provider_message_id": "wamid.1"}
    observed.messages["m1"]["direction"] = "out"
    observed.stored["c1"].append(reply)
    tap.customer_acked = ["wamid.1", "wamid.1"]  # a redelivery answered 200 twice
    assert _inbound(replies, observed, tap).ok

    tap.customer_acked.append("wamid.2")
    lost = _inbound(replies, observed, tap)
    assert not lost.ok and lost.examples == ["wamid.2: answered 200, not stored"]

    tap.customer_acked.pop()
    observed.stored["c1"].append({**reply, "id": "in2"})
    assert not _inbound(replies, observed, tap).ok
