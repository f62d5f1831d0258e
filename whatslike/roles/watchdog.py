"""The stuck-message watchdog: notices messages that stopped moving.

Every `watchdog_interval_s` it asks the store for
- PENDING messages with no send under way for `stuck_pending_s`: their hand-off was lost
  or never made (it should not happen; the outbox keeps it) — each is handed off again;
- PENDING messages whose send outcome is unknown for `send_unknown_fail_s` (a crash or a
  timeout between the provider call and its answer, and no webhook settled it since):
  they become FAILED `send_outcome_unknown`, which the agent sees; a later provider
  status for them still moves them on (DELIVERED/READ after FAILED is allowed);
- SENT messages with no provider news for `stuck_sent_s`: counted and listed only (a
  phone can stay off for days; nothing to redo).
Each kind is a `whatslike_stuck_messages{kind}` gauge; `whatslike stuck` lists them.
It also counts the dead-lettered statuses that would still change their message
(`whatslike_dead_letters_unapplied`, among the newest SWEEP_LIMIT dead letters) and says
so in the log when that number changes; `whatslike dlq list` shows them and
`whatslike dlq replay <id>` applies one (see dead_letters.py).
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timedelta

from whatslike.clock import utcnow
from whatslike.errors import WhatslikeError
from whatslike.events import StatusEvent
from whatslike.roles import BackgroundRole, Deps, dead_letters
from whatslike.settings import Settings
from whatslike.status.rules import ProviderError, Status
from whatslike.store.base import Store, Stuck
from whatslike.store.common import status_entry

log = logging.getLogger(__name__)

#: At most this many of each kind per sweep (the gauge then reads "at least").
SWEEP_LIMIT = 1000

OUTCOME_UNKNOWN = ProviderError(
    "send_outcome_unknown", "No answer from the provider; the message may not have been sent"
)


async def find_stuck(
    store: Store, settings: Settings, now: datetime, older_than_s: float | None = None
) -> Stuck:
    """The stuck messages at `now`: by the settings' thresholds, or all older than
    `older_than_s` when given (operators asking "what has not moved for an hour?")."""

    def before(threshold_s: float) -> datetime:
        return now - timedelta(seconds=threshold_s if older_than_s is None else older_than_s)

    return await store.stuck(
        before(settings.stuck_pending_s),
        before(settings.send_unknown_fail_s),
        before(settings.stuck_sent_s),
        SWEEP_LIMIT,
    )


def unknown_outcome_failure(
    message_id: str, conversation_id: str, org_id: str, channel: str
) -> StatusEvent:
    """The FAILED a send of unknown outcome ends in; one event id per message, so two
    sweeps (or two watchdogs) hand off the same event and it applies once."""
    now = utcnow()
    return StatusEvent(
        event_id=f"evt_unknown_{message_id}",
        message_id=message_id,
        conversation_id=conversation_id,
        org_id=org_id,
        channel=channel,
        status=Status.FAILED,
        provider_message_id="",
        occurred_at=now,
        error=OUTCOME_UNKNOWN,
        received_at=now,
    )


class Watchdog(BackgroundRole):
    name = "watchdog"

    def __init__(self, deps: Deps) -> None:
        self._store = deps.store
        self._settings = deps.settings
        self._metrics = deps.metrics
        self._handoffs = deps.handoffs
        self._unapplied = 0  # as the last sweep counted them

    async def sweep(self) -> Stuck:
        """One look: count every kind, re-drive the lost hand-offs, fail the unknown."""
        stuck = await find_stuck(self._store, self._settings, utcnow())
        for kind, messages in (
            ("pending", stuck.pending),
            ("unknown", stuck.unknown),
            ("sent", stuck.sent),
        ):
            self._metrics.stuck_messages.labels(kind).set(len(messages))
        handed = False
        for message in stuck.pending:
            if await self._store.redrive(message.id):
                handed = True
                self._metrics.redriven.inc()
                log.warning("message %s was PENDING with no hand-off; handed off again", message.id)
        for message in stuck.unknown:
            failure = unknown_outcome_failure(
                message.id, message.conversation_id, message.org_id, message.channel
            )
            await self._store.handoff([status_entry(failure)])
            handed = True
            log.warning("message %s: send outcome unknown, marked FAILED", message.id)
        if handed:
            self._handoffs.set()
        await self._count_unapplied()
        return stuck

    async def _count_unapplied(self) -> None:
        reviews = await dead_letters.review(self._store, SWEEP_LIMIT)
        unapplied = [r for r in reviews if r.kind is dead_letters.Kind.UNAPPLIED]
        self._metrics.dead_letters_unapplied.set(len(unapplied))
        if len(unapplied) != self._unapplied:
            self._unapplied = len(unapplied)
            if unapplied:
                shown = ", ".join(sorted({r.status.message_id for r in unapplied if r.status}))
                log.warning(
                    "%d dead-lettered statuses are not applied (messages %s): see "
                    "`whatslike dlq list`, then `whatslike dlq replay <id>`",
                    len(unapplied),
                    shown[:500],
                )

    async def run_forever(self) -> None:
        while True:
            await asyncio.sleep(self._settings.watchdog_interval_s)
            try:
                await self.sweep()
            except WhatslikeError as exc:
                log.warning("watchdog sweep failed, trying again at the next one: %s", exc)
            except Exception:
                log.exception("watchdog sweep failed; trying again at the next one")
