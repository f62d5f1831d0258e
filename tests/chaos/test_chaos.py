"""The chaos test of issue 6: nothing that was answered 202 (or 200 to a webhook) is ever
lost, sent twice or left stuck while the pipeline and the simulator are killed with
`kill -9` and the database is cut. About a minute per database; the harness and its
report live in bench/chaos.py (`python -m bench.chaos` runs longer versions).

Replay a failure with the seed the report prints: WHATSLIKE_CHAOS_SEED=<seed> pytest tests/chaos
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from bench.chaos import ChaosConfig, ChaosSetupError, Database, run_chaos

SEED = int(os.environ.get("WHATSLIKE_CHAOS_SEED") or random.randrange(10**6))


@pytest.mark.parametrize(
    "database", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
async def test_nothing_acknowledged_is_lost_under_kills_and_outages(
    database: Database, tmp_path: Path
) -> None:
    postgres_url = os.environ.get("WHATSLIKE_TEST_POSTGRES_URL", "")
    if database == "postgres" and not postgres_url:
        pytest.fail(
            "WHATSLIKE_TEST_POSTGRES_URL is not set: run scripts/services.sh (make test does)",
            pytrace=False,
        )
    config = ChaosConfig(
        seed=SEED,
        database=database,
        messages=150,
        replies=20,
        conversations=6,
        pipeline_kills=5,
        pipeline_stops=1,
        simulator_kills=2,
        database_cuts=1,
        cut_s=10,
        quiesce_s=60,
        settle_s=30,
        postgres_url=postgres_url,
        workdir=tmp_path,
    )
    try:
        result = await run_chaos(config, out=print)
    except ChaosSetupError as exc:
        pytest.fail(f"seed {SEED}: {exc}", pytrace=False)
    assert result.passed, (
        f"{result.report}\nreplay this test: WHATSLIKE_CHAOS_SEED={SEED} pytest tests/chaos"
    )
