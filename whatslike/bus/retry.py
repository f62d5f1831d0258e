"""What a consumer does when its handler raises: the one place that tells an outage from
a poison event.

- An **outage** (the store, the bus or the fan-out unreachable, refusing for now, or
  timing out) says nothing about the event: the partition waits and tries the same event
  again, with capped back-off, for as long as the outage lasts. It never dead-letters.
- A **malformed** event can never be handled: it goes to the dead-letter topic at once.
- Any **other error** may be the event's fault (a poison event) or a passing one: it is
  tried `consumer_max_attempts` times, then dead-lettered.

Outage failures are recognized by the exception's type: ours (`BackendUnavailable`,
`BusFull`), the operating system's (`OSError`, which includes `ConnectionError` and
`TimeoutError`), and the drivers' own outage types, named here by module and class so
that this module imports none of the drivers. The provider (Meta) is not infrastructure
here: a send it does not take counts toward the budget (see `classify`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

from whatslike.bus import BusFull
from whatslike.errors import BackendUnavailable, MalformedEvent

#: Drivers' exception types that mean "the backend is away or slow", as
#: (module, class name); a subclass of one counts too.
OUTAGE_TYPES = frozenset(
    {
        # PostgreSQL (asyncpg): the link, the server refusing for now, our time limits.
        ("asyncpg.exceptions", "PostgresConnectionError"),
        ("asyncpg.exceptions", "CannotConnectNowError"),
        ("asyncpg.exceptions", "AdminShutdownError"),
        ("asyncpg.exceptions", "InsufficientResourcesError"),
        ("asyncpg.exceptions", "QueryCanceledError"),
        ("asyncpg.exceptions", "LockNotAvailableError"),
        ("asyncpg.exceptions", "IdleInTransactionSessionTimeoutError"),
        ("asyncpg.exceptions", "TransactionRollbackError"),
        # Redis (redis-py): ConnectionError covers BusyLoadingError.
        ("redis.exceptions", "ConnectionError"),
        ("redis.exceptions", "TimeoutError"),
        # Cassandra (cassandra-driver): no replica, too few replicas, timeouts.
        ("cassandra.cluster", "NoHostAvailable"),
        ("cassandra.connection", "ConnectionException"),
        ("cassandra", "OperationTimedOut"),
        ("cassandra", "Unavailable"),
        ("cassandra", "Timeout"),
        ("cassandra", "CoordinationFailure"),
        # Kafka (aiokafka), should one reach a handler past the bus's own wrapping.
        ("aiokafka.errors", "KafkaConnectionError"),
        ("aiokafka.errors", "KafkaTimeoutError"),
        ("aiokafka.errors", "RequestTimedOutError"),
        ("aiokafka.errors", "NodeNotReadyError"),
        ("aiokafka.errors", "NotLeaderForPartitionError"),
    }
)
#: While an outage lasts, a partition logs its retries at the 1st, 2nd, 4th, 8th … try,
#: and otherwise at most once per this many seconds.
OUTAGE_LOG_EVERY_S = 60.0


class Failure(Enum):
    OUTAGE = "outage"
    MALFORMED = "malformed"
    ERROR = "error"


def _is_outage(exc: BaseException) -> bool:
    if isinstance(exc, BackendUnavailable | BusFull | OSError):
        return True
    return any((cls.__module__, cls.__qualname__) in OUTAGE_TYPES for cls in type(exc).__mro__)


def classify(exc: BaseException) -> Failure:
    """What a handler's exception means for its event (see the module's docstring). By
    the exception's own type only, not by what caused it: the connector's
    `ProviderUnavailable` is often caused by an OSError (Meta unreachable), and a
    provider that stays away must still end the send FAILED `send_failed` after the
    budget, as it always has, instead of holding the partition."""
    if isinstance(exc, MalformedEvent):
        return Failure.MALFORMED
    return Failure.OUTAGE if _is_outage(exc) else Failure.ERROR


@dataclass(frozen=True)
class Step:
    """What to do after one failed try of an event."""

    failure: Failure
    #: The dead letter's reason; None: wait `backoff(try_number)` and try again.
    dead_letter: str | None
    #: The back-off exponent: consecutive outage tries, or counted failures.
    backoff_attempt: int
    #: Whether this retry gets a log line (all of them do, but an outage's only now and then).
    log: bool


@dataclass
class Tries:
    """One event's tries at its handler. Outage failures are never counted toward
    `max_attempts`; every other failure is (a malformed event needs just one)."""

    max_attempts: int
    #: Every try so far (the dead letter's `attempts`).
    total: int = 0
    #: Failures that count toward `max_attempts`.
    counted: int = 0
    #: The outage under way: its consecutive failed tries, and when it began.
    outage: int = 0
    outage_since: float = 0.0
    _logged_at: float = -math.inf

    def failed(self, exc: BaseException, now: float) -> Step:
        self.total += 1
        failure = classify(exc)
        if failure is Failure.OUTAGE:
            if not self.outage:
                self.outage_since = now
            self.outage += 1
            log = _power_of_two(self.outage) or now - self._logged_at >= OUTAGE_LOG_EVERY_S
            if log:
                self._logged_at = now
            return Step(failure, None, self.outage, log)
        self.outage = 0
        self.counted += 1
        name = f"{type(exc).__name__}: {exc}"
        if failure is Failure.MALFORMED:
            return Step(failure, f"malformed: {exc}", self.counted, False)
        if self.counted >= self.max_attempts:
            reason = f"failed {self.counted} times, last: {name}"
            return Step(failure, reason, self.counted, False)
        return Step(failure, None, self.counted, True)

    def recovered(self, now: float, group: str, topic: str) -> str | None:
        """After a try that succeeded: the line saying an outage ended, if one was under way."""
        if not self.outage:
            return None
        return (
            f"handler {group} on {topic}: the outage is over after {self.outage} tries "
            f"({now - self.outage_since:.1f} s)"
        )


def _power_of_two(n: int) -> bool:
    return n & (n - 1) == 0


def retry_line(step: Step, tries: Tries, group: str, topic: str, exc: BaseException) -> str:
    """The log line of a retry."""
    if step.failure is Failure.OUTAGE:
        return (
            f"handler {group} on {topic}: outage ({type(exc).__name__}: {exc}); the partition "
            f"waits and tries again (try {step.backoff_attempt} of this outage; outages "
            "never dead-letter)"
        )
    return (
        f"handler {group} on {topic} failed (attempt {tries.counted}/{tries.max_attempts}): "
        f"{type(exc).__name__}: {exc}"
    )
