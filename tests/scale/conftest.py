"""Fixtures of the multi-process tests: the Kafka broker, Redis, PostgreSQL and Cassandra of
scripts/services.sh (a missing one fails the test), a topic prefix and a fresh database
(or keyspace) of each test's own, and a redis-server of the test's own for the tests that
restart it."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from tests.bus.test_kafka import kafka_url, prefix
from tests.fanout.test_redis import own_redis, redis_url
from tests.store.conftest import (
    fresh_cassandra_keyspace,
    fresh_postgres_database,
    pytest_sessionfinish,
)

__all__ = ["kafka_url", "own_redis", "prefix", "pytest_sessionfinish", "redis_url"]


@pytest_asyncio.fixture
async def postgres_url() -> AsyncIterator[str]:
    async with fresh_postgres_database() as url:
        yield url


@pytest_asyncio.fixture(params=["postgres", "cassandra"])
async def database_url(request: pytest.FixtureRequest) -> AsyncIterator[str]:
    """A fresh PostgreSQL database, then an empty Cassandra keyspace."""
    fresh = fresh_postgres_database if request.param == "postgres" else fresh_cassandra_keyspace
    async with fresh() as url:
        yield url
