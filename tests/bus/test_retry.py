"""The one classification of a handler's failure (outage, malformed, other), with the real
exception types of every driver, and the retry policy built on it (hypothesis)."""

from __future__ import annotations

import sqlite3

import aiokafka.errors
import asyncpg.exceptions
import cassandra
import cassandra.cluster
import cassandra.connection
import pytest
import redis.exceptions
from hypothesis import given
from hypothesis import strategies as st

from whatslike.bus import BusFull
from whatslike.bus.retry import OUTAGE_LOG_EVERY_S, Failure, Tries, classify
from whatslike.connectors.base import ProviderUnavailable
from whatslike.errors import BackendUnavailable, ConfigError, MalformedEvent

OUTAGES: list[BaseException] = [
    BackendUnavailable("store down"),
    BusFull("full"),
    TimeoutError(),
    ConnectionRefusedError(),
    ConnectionResetError(),
    OSError(113, "No route to host"),
    asyncpg.exceptions.ConnectionDoesNotExistError("closed"),
    asyncpg.exceptions.CannotConnectNowError("starting up"),
    asyncpg.exceptions.AdminShutdownError("shutting down"),
    asyncpg.exceptions.TooManyConnectionsError("too many"),
    asyncpg.exceptions.QueryCanceledError("statement timeout"),
    asyncpg.exceptions.LockNotAvailableError("lock timeout"),
    asyncpg.exceptions.IdleInTransactionSessionTimeoutError("idle"),
    asyncpg.exceptions.DeadlockDetectedError("deadlock"),
    asyncpg.exceptions.SerializationError("serialization"),
    redis.exceptions.ConnectionError("refused"),
    redis.exceptions.BusyLoadingError("loading"),
    redis.exceptions.TimeoutError("slow"),
    cassandra.cluster.NoHostAvailable("none", {}),
    cassandra.OperationTimedOut("timed out"),
    cassandra.Unavailable("too few replicas"),
    cassandra.ReadTimeout("read timeout"),
    cassandra.WriteTimeout("write timeout", write_type=0),
    cassandra.connection.ConnectionShutdown("shut down"),
    aiokafka.errors.KafkaConnectionError("refused"),
    aiokafka.errors.KafkaTimeoutError(),
]
ERRORS: list[BaseException] = [
    ValueError("no such state"),
    KeyError("x"),
    RuntimeError("bug"),
    ConfigError("bad setting"),
    asyncpg.exceptions.UniqueViolationError("duplicate"),
    asyncpg.exceptions.DataError("bad value"),
    asyncpg.exceptions._base.InterfaceError("another operation is in progress"),
    redis.exceptions.ResponseError("WRONGTYPE"),
    cassandra.InvalidRequest("bad query"),
    sqlite3.IntegrityError("constraint"),
]


@pytest.mark.parametrize("exc", OUTAGES, ids=lambda e: type(e).__name__)
def test_outages_are_recognized(exc: BaseException) -> None:
    assert classify(exc) is Failure.OUTAGE


@pytest.mark.parametrize("exc", ERRORS, ids=lambda e: type(e).__name__)
def test_other_errors_count_toward_the_budget(exc: BaseException) -> None:
    assert classify(exc) is Failure.ERROR


def test_malformed_and_the_provider_are_not_outages() -> None:
    assert classify(MalformedEvent("x")) is Failure.MALFORMED
    # Meta unreachable: the connector's error, caused by an OSError, counts toward the
    # budget (a send that never gets through ends FAILED send_failed, as documented).
    try:
        try:
            raise ConnectionRefusedError(111, "Connection refused")
        except OSError as cause:
            raise ProviderUnavailable("send of msg_1 failed") from cause
    except ProviderUnavailable as exc:
        assert classify(exc) is Failure.ERROR


failures = st.lists(st.sampled_from(["outage", "error", "malformed"]), min_size=1, max_size=60).map(
    lambda kinds: [
        {"outage": BackendUnavailable("x"), "error": ValueError("x"), "malformed": None}[k]
        or MalformedEvent("x")
        for k in kinds
    ]
)


@given(failures, st.integers(1, 12), st.floats(0.01, 100))
def test_only_the_event_s_own_failures_lead_to_a_dead_letter(
    excs: list[BaseException], max_attempts: int, gap_s: float
) -> None:
    tries = Tries(max_attempts)
    counted = 0
    for n, exc in enumerate(excs):
        step = tries.failed(exc, n * gap_s)
        kind = classify(exc)
        counted += kind is not Failure.OUTAGE
        assert tries.total == n + 1
        if kind is Failure.OUTAGE:
            assert step.dead_letter is None  # never, however long
        elif kind is Failure.MALFORMED:
            assert step.dead_letter is not None and step.dead_letter.startswith("malformed")
        else:
            assert (step.dead_letter is not None) == (counted >= max_attempts)
        if step.dead_letter is not None:
            return


@given(st.integers(1, 2000), st.floats(0.01, 30))
def test_an_outage_s_retries_are_logged_sparingly(count: int, gap_s: float) -> None:
    """At tries 1, 2, 4, 8 … and at least once a minute; the back-off exponent grows."""
    tries = Tries(3)
    logged: list[int] = []
    for n in range(1, count + 1):
        step = tries.failed(BackendUnavailable("x"), n * gap_s)
        assert step.backoff_attempt == n
        if step.log:
            logged.append(n)
    powers = [n for n in range(1, count + 1) if n & (n - 1) == 0]
    assert set(powers) <= set(logged)
    longest_silence = max(b - a for a, b in zip([0, *logged], [*logged, count], strict=True))
    assert longest_silence * gap_s <= OUTAGE_LOG_EVERY_S + gap_s
    # Sparing: no more than one line per minute beyond the powers of two.
    assert len(logged) <= len(powers) + count * gap_s / OUTAGE_LOG_EVERY_S + 1
    recovered = tries.recovered(count * gap_s + 1, "g", "t")
    assert recovered is not None and f"after {count} tries" in recovered
