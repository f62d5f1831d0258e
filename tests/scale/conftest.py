"""Fixtures of the multi-process tests: the Kafka broker, Redis and PostgreSQL of
scripts/services.sh (a missing one fails the test), a topic prefix and a fresh database of
each test's own, and a redis-server of the test's own for the tests that restart it."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest_asyncio

from tests.bus.test_kafka import kafka_url, prefix
from tests.fanout.test_redis import own_redis, redis_url
from tests.store.conftest import fresh_postgres_database

__all__ = ["kafka_url", "own_redis", "prefix", "redis_url"]


@pytest_asyncio.fixture
async def postgres_url() -> AsyncIterator[str]:
    async with fresh_postgres_database() as url:
        yield url
