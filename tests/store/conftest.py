"""Fixtures of the store contract suite: every adapter behind one `store` fixture.
PostgreSQL gets a fresh database per test on the local server, Cassandra an empty keyspace
(made once, emptied after each test); each fails when its server is down."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import pytest
import pytest_asyncio
from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile, NoHostAvailable
from cassandra.policies import RoundRobinPolicy

from whatslike.store.base import Store
from whatslike.store.cassandra import CassandraAddress, CassandraStore
from whatslike.store.postgres import PostgresStore
from whatslike.store.sqlite import SQLiteStore

#: Set by scripts/services.sh (through .services/postgres.env) or by hand.
POSTGRES_URL = os.environ.get("WHATSLIKE_TEST_POSTGRES_URL", "")
#: Set by scripts/services/cassandra.sh (through .services/cassandra.env) or by hand.
CASSANDRA_URL = os.environ.get("WHATSLIKE_TEST_CASSANDRA_URL", "")

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


#: Keyspaces of this session's earlier tests, emptied, for the next ones: on one node,
#: creating a keyspace and its tables costs about 5 s, emptying its tables under 1 s.
_IDLE_KEYSPACES: list[str] = []
_MADE_KEYSPACES: list[str] = []


def _admin_cluster(address: CassandraAddress) -> Cluster:
    return Cluster(
        list(address.hosts),
        port=address.port,
        connect_timeout=10,
        execution_profiles={
            EXEC_PROFILE_DEFAULT: ExecutionProfile(load_balancing_policy=RoundRobinPolicy())
        },
        protocol_version=5,
    )


def _empty_keyspace(address: CassandraAddress) -> None:
    """Truncate every table but the schema version, so the keyspace is as a store's
    `open` leaves a new one."""
    cluster = _admin_cluster(address)
    try:
        session = cluster.connect()
        tables = session.execute(
            "SELECT table_name FROM system_schema.tables WHERE keyspace_name = %s",
            [address.keyspace],
        )
        futures = [
            session.execute_async(f"TRUNCATE {address.keyspace}.{row.table_name}", timeout=60)
            for row in tables
            if row.table_name != "schema_version"
        ]
        for future in futures:
            future.result()
    finally:
        cluster.shutdown()


def _drop_keyspaces(address: CassandraAddress, keyspaces: list[str]) -> None:
    cluster = _admin_cluster(address)
    try:
        session = cluster.connect()
        for keyspace in keyspaces:
            session.execute(f"DROP KEYSPACE IF EXISTS {keyspace}", timeout=60)
    finally:
        cluster.shutdown()


def pytest_sessionfinish() -> None:
    """Drop the keyspaces this session made."""
    if _MADE_KEYSPACES:
        _drop_keyspaces(CassandraAddress.parse(CASSANDRA_URL), _MADE_KEYSPACES)


@asynccontextmanager
async def fresh_cassandra_keyspace() -> AsyncIterator[str]:
    """The URL of an empty keyspace: a new one (the store creates it on open), or one an
    earlier test of this session used, its tables emptied afterwards."""
    if not CASSANDRA_URL:
        pytest.fail(
            "WHATSLIKE_TEST_CASSANDRA_URL is not set: run scripts/services.sh cassandra",
            pytrace=False,
        )
    if _IDLE_KEYSPACES:
        keyspace = _IDLE_KEYSPACES.pop()
    else:
        keyspace = f"whatslike_t_{uuid.uuid4().hex}"
        _MADE_KEYSPACES.append(keyspace)
    url = urlsplit(CASSANDRA_URL)._replace(path=f"/{keyspace}").geturl()
    address = CassandraAddress.parse(url)
    yield url
    try:
        await asyncio.to_thread(_empty_keyspace, address)
    except NoHostAvailable as exc:
        failure = exc
    else:
        _IDLE_KEYSPACES.append(keyspace)
        return
    pytest.fail(
        f"Cassandra at {address} is unreachable ({failure}); run"
        " scripts/services.sh cassandra or set WHATSLIKE_TEST_CASSANDRA_URL",
        pytrace=False,
    )


@pytest_asyncio.fixture(
    params=[
        "sqlite",
        pytest.param("postgres", marks=pytest.mark.postgres),
        pytest.param("cassandra", marks=pytest.mark.cassandra),
    ]
)
async def store_factory(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[StoreFactory]:
    if request.param == "sqlite":
        path = tmp_path / "data" / "whatslike.db"
        yield lambda: SQLiteStore(path)
        return
    if request.param == "cassandra":
        async with fresh_cassandra_keyspace() as url:
            # Small buckets, so the suite crosses partitions of the change log, the outbox
            # and the watchdog's index.
            # A missing message is waited for a second, not thirty.
            yield lambda: CassandraStore(
                url,
                bucket_size=4,
                index_bucket=timedelta(milliseconds=200),
                missing_wait=timedelta(seconds=1),
            )
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
