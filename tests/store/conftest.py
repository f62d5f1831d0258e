"""Fixtures of the store contract suite: every adapter behind one `store` fixture.
PostgreSQL gets a fresh database per test on the local server, and fails when it is down."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import pytest
import pytest_asyncio

from whatslike.store.base import Store
from whatslike.store.postgres import PostgresStore
from whatslike.store.sqlite import SQLiteStore

#: Set by scripts/services.sh (through .services/postgres.env) or by hand.
POSTGRES_URL = os.environ.get("WHATSLIKE_TEST_POSTGRES_URL", "")

#: Builds another, unopened store on the same database as the test's `store`.
StoreFactory = Callable[[], Store]


async def _admin() -> asyncpg.Connection[asyncpg.Record]:
    if not POSTGRES_URL:
        pytest.fail(
            "WHATSLIKE_TEST_POSTGRES_URL is not set: run scripts/services.sh (make test does)",
            pytrace=False,
        )
    try:
        return await asyncpg.connect(POSTGRES_URL, timeout=10)
    except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
        failure = exc
    # Failed outside the except block, so the report is this one line, not a traceback.
    where = urlsplit(POSTGRES_URL)
    pytest.fail(
        f"PostgreSQL at {where.hostname}:{where.port or 5432} is unreachable ({failure}); "
        "run scripts/services.sh or set WHATSLIKE_TEST_POSTGRES_URL",
        pytrace=False,
    )


@asynccontextmanager
async def fresh_postgres_database() -> AsyncIterator[str]:
    """The URL of a fresh, empty database, dropped afterwards."""
    name = f"whatslike_t_{uuid.uuid4().hex}"
    admin = await _admin()
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        yield urlsplit(POSTGRES_URL)._replace(path=f"/{name}").geturl()
    finally:
        admin = await _admin()
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


@pytest_asyncio.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def store_factory(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[StoreFactory]:
    if request.param == "sqlite":
        path = tmp_path / "data" / "whatslike.db"
        yield lambda: SQLiteStore(path)
        return
    async with fresh_postgres_database() as url:
        yield lambda: PostgresStore(url)


@pytest_asyncio.fixture
async def store(store_factory: StoreFactory) -> AsyncIterator[Store]:
    opened = store_factory()
    await opened.open()
    try:
        yield opened
    finally:
        await opened.close()
