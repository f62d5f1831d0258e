"""The status rules of protocol.md §1: one transition table and one pure `apply`.

Theory: a message's state is a function of the *set* of status observations it has seen,
never of their arrival order. The status is the highest rank observed, except that FAILED
stands only while nothing proves the message reached the device (DELIVERED or READ). Each
per-status timestamp is the earliest time at which that status (or one that implies it:
READ implies DELIVERED implies SENT) was observed. Because min and max are commutative,
associative and idempotent, any permutation and any duplication of the same observations
ends in the same state; duplicates change nothing and so take no sequence number.

Only a change of `status` is a notified change (it takes the next conversation `seq`).
A late lower-rank event only fills an empty (or later) timestamp, silently.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from enum import Enum, StrEnum


class Status(StrEnum):
    PENDING = "PENDING"
    SENT = "SENT"
    DELIVERED = "DELIVERED"
    READ = "READ"
    FAILED = "FAILED"


#: Rank of the forward-moving statuses. FAILED has none: it is a side branch.
RANK: dict[Status, int] = {
    Status.PENDING: 0,
    Status.SENT: 1,
    Status.DELIVERED: 2,
    Status.READ: 3,
}

#: Statuses a provider can report (PENDING is ours alone).
OBSERVABLE: tuple[Status, ...] = (Status.SENT, Status.DELIVERED, Status.READ, Status.FAILED)


class Action(Enum):
    """What an observation does to a message in a given status."""

    ADVANCE = "advance"  # the status changes: a notified change with the next seq
    FILL = "fill"  # the status stays; only earlier timestamps (or the error) are kept
    ANOMALY = "anomaly"  # FAILED after delivery: record the error, keep the status


_A, _F, _X = Action.ADVANCE, Action.FILL, Action.ANOMALY

#: The whole transition table: (current status, observed status) -> action.
TRANSITIONS: dict[tuple[Status, Status], Action] = {
    (Status.PENDING, Status.SENT): _A,
    (Status.PENDING, Status.DELIVERED): _A,
    (Status.PENDING, Status.READ): _A,
    (Status.PENDING, Status.FAILED): _A,
    (Status.SENT, Status.SENT): _F,
    (Status.SENT, Status.DELIVERED): _A,
    (Status.SENT, Status.READ): _A,
    (Status.SENT, Status.FAILED): _A,
    (Status.DELIVERED, Status.SENT): _F,
    (Status.DELIVERED, Status.DELIVERED): _F,
    (Status.DELIVERED, Status.READ): _A,
    (Status.DELIVERED, Status.FAILED): _X,
    (Status.READ, Status.SENT): _F,
    (Status.READ, Status.DELIVERED): _F,
    (Status.READ, Status.READ): _F,
    (Status.READ, Status.FAILED): _X,
    # The device proves the message arrived: DELIVERED/READ move a FAILED message on.
    # A late SENT never revives it.
    (Status.FAILED, Status.SENT): _F,
    (Status.FAILED, Status.DELIVERED): _A,
    (Status.FAILED, Status.READ): _A,
    (Status.FAILED, Status.FAILED): _F,
}


class Effect(Enum):
    """What applying one observation did."""

    CHANGED = "changed"  # status moved: assign the next seq and notify
    FILLED = "filled"  # timestamps/error updated silently: persist, no seq
    ANOMALY = "anomaly"  # FAILED after delivery recorded: persist, count, no seq
    NOOP = "noop"  # nothing new (a duplicate or an older copy)


@dataclass(frozen=True, slots=True)
class ProviderError:
    code: str
    title: str


@dataclass(frozen=True, slots=True)
class Observation:
    """One status reported by a provider for one message."""

    status: Status
    occurred_at: datetime
    error: ProviderError | None = None

    def __post_init__(self) -> None:
        if self.status is Status.PENDING:
            raise ValueError("PENDING is never observed from a provider")


@dataclass(frozen=True, slots=True)
class MessageState:
    status: Status = Status.PENDING
    sent_at: datetime | None = None
    delivered_at: datetime | None = None
    read_at: datetime | None = None
    failed_at: datetime | None = None
    error: ProviderError | None = None


@dataclass(frozen=True, slots=True)
class Transition:
    state: MessageState
    effect: Effect


_TIMESTAMP_OF: dict[Status, str] = {
    Status.SENT: "sent_at",
    Status.DELIVERED: "delivered_at",
    Status.READ: "read_at",
}


def _earliest(current: datetime | None, seen: datetime) -> datetime:
    return seen if current is None or seen < current else current


def _error_key(at: datetime, error: ProviderError | None) -> tuple[datetime, bool, str, str]:
    """Which FAILED observation a message keeps: the earliest; at the same time, one with an
    error before one without, then the error first by (code, title). A total order, so
    the kept error never depends on arrival order (an error ("", "") ties with none no more)."""
    return (at, False, error.code, error.title) if error else (at, True, "", "")


def _with_observation(state: MessageState, obs: Observation) -> MessageState:
    """Fold the observation's timestamps (and error) into the state, keeping earliest."""
    if obs.status is Status.FAILED:
        if state.failed_at is not None and _error_key(state.failed_at, state.error) <= _error_key(
            obs.occurred_at, obs.error
        ):
            return state
        return replace(state, failed_at=obs.occurred_at, error=obs.error)
    updates: dict[str, datetime] = {}
    for implied in (Status.SENT, Status.DELIVERED, Status.READ):
        if RANK[implied] > RANK[obs.status]:
            break
        name = _TIMESTAMP_OF[implied]
        current: datetime | None = getattr(state, name)
        earliest = _earliest(current, obs.occurred_at)
        if earliest != current:
            updates[name] = earliest
    return replace(state, **updates) if updates else state  # type: ignore[arg-type]


def apply(state: MessageState, obs: Observation) -> Transition:
    """Apply one observation to a message state. Pure; never raises for a legal status."""
    action = TRANSITIONS[(state.status, obs.status)]
    folded = _with_observation(state, obs)
    if action is Action.ADVANCE:
        return Transition(replace(folded, status=obs.status), Effect.CHANGED)
    if folded == state:
        return Transition(state, Effect.NOOP)
    return Transition(folded, Effect.ANOMALY if action is Action.ANOMALY else Effect.FILLED)


#: How far ahead of our clock a provider's timestamp may be (its clock, and WhatsApp's
#: whole seconds): NTP keeps both within milliseconds, so a minute is generous; past it,
#: a time is taken for wrong (a signed status dated the year 3000).
PROVIDER_CLOCK_SKEW = timedelta(seconds=60)


def bounded(observed: datetime, created_at: datetime, received_at: datetime) -> datetime:
    """The provider's time of an observation, kept when plausible: never before the
    message existed, never after we received the news plus PROVIDER_CLOCK_SKEW (and
    `created_at` wins should the two bounds cross, e.g. across two machines' clocks)."""
    return max(created_at, min(observed, received_at + PROVIDER_CLOCK_SKEW))
