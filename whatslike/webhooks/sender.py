"""The webhook-sender role: delivers the deliveries the store queued with each status
change (whatslike/webhooks/core.py for their body and signature).

Each round, a sender leases the endpoints that have a delivery due (a lease per endpoint
in the store, so two senders — of one process or of several — never deliver one endpoint
at once; a sender that dies lets its leases lapse after `webhook_lease_s`). Each leased
endpoint is delivered by a task of its own, so a slow or failing endpoint delays only
its organization: it reads at most `webhook_batch` deliveries — the oldest of each of its
conversations, so seq order per conversation holds — and POSTs them in waves of at most
`webhook_in_flight`, each POST bounded by `webhook_timeout_s` (resolving the name
included), renewing its lease before the next wave could outlast half of it (the lease
outlasts a POST: a setting check). A delivery is deleted after a 2xx only; any other
answer, a timeout or a refused address counts as a failed attempt, retried after 1 s,
2 s, 4 s, … at most `webhook_retry_max_s`, and parked once it is older than
`webhook_retry_for_s`, where the API and `whatslike webhooks` list and replay it. The
conversation's later deliveries wait behind it until it is delivered or parked.

Targets are checked at every attempt: the URL again (a literal address, the scheme),
then every address the name resolves to (`_CheckedResolver`): aiohttp connects only to
the addresses that passed, so a name that resolves to a private address after it was
configured is not called. Redirects are never followed (a 3xx is a failed attempt).

Metrics: each attempt's outcome (`whatslike_webhook_deliveries_total`), and at most every
`OLDEST_EVERY_S` the age of the oldest pending delivery, read from the store (a slow or
down endpoint shows there long before anything is parked).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from datetime import datetime

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

from whatslike.clock import new_id, utcnow
from whatslike.errors import WhatslikeError
from whatslike.roles import BackgroundRole, Deps
from whatslike.store.base import Store, WebhookDelivery, WebhookEndpoint
from whatslike.webhooks.core import TargetRefused, check_url, checked_addresses, headers
from whatslike.webhooks.core import next_attempt as retry_at

log = logging.getLogger(__name__)

#: At most this many connections to all endpoints at once (per sender process): the
#: default `webhook_endpoints_at_once` times `webhook_in_flight`.
CONNECTIONS = 256
#: How often the age of the oldest pending delivery is read (a scan of the pending ones);
#: Prometheus scrapes every 15 s by default.
OLDEST_EVERY_S = 5.0


class _CheckedResolver(AbstractResolver):
    """The system resolver, answering only the addresses a webhook may be sent to."""

    def __init__(self, *, allow_private: bool) -> None:
        self._resolver = DefaultResolver()
        self._allow_private = allow_private

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        found = await self._resolver.resolve(host, port, family)
        try:
            allowed = set(
                checked_addresses((r["host"] for r in found), allow_private=self._allow_private)
            )
        except TargetRefused as exc:
            raise OSError(f"refused: {exc}") from exc
        return [r for r in found if r["host"] in allowed]

    async def close(self) -> None:
        await self._resolver.close()


def secrets_of(endpoint: WebhookEndpoint, now: datetime) -> list[str]:
    """The secrets that sign now: the current one, and the one before a rotation for as
    long as it still does."""
    previous = endpoint.previous_secret
    until = endpoint.previous_until
    if previous is not None and until is not None and now < until:
        return [endpoint.secret, previous]
    return [endpoint.secret]


class WebhookSender(BackgroundRole):
    name = "webhook-sender"

    def __init__(self, deps: Deps) -> None:
        self._settings = deps.settings
        self._store = deps.store
        self._owner = new_id("sender")
        self._running: dict[str, asyncio.Task[None]] = {}
        self._session: aiohttp.ClientSession | None = None
        self._outcomes = {
            outcome: deps.metrics.webhook_deliveries.labels(outcome)
            for outcome in ("delivered", "retried", "parked")
        }
        self._oldest = deps.metrics.webhook_oldest_pending
        self._oldest_read = -OLDEST_EVERY_S

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None:
            # No limit per host: endpoints of several organizations on one host must not
            # share one; each endpoint's own requests are bounded (`webhook_in_flight`).
            connector = aiohttp.TCPConnector(
                limit=CONNECTIONS,
                resolver=_CheckedResolver(allow_private=self._settings.webhook_allow_private),
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                cookie_jar=aiohttp.DummyCookieJar(),
                skip_auto_headers=("User-Agent",),
            )
        return self._session

    async def run_forever(self) -> None:
        while True:
            try:
                await self.round(self._store)
                await self._measure(self._store)
            except WhatslikeError as exc:
                log.warning("webhook-sender: %s", exc)
            await asyncio.sleep(self._settings.webhook_poll_s)

    async def _measure(self, store: Store) -> None:
        if time.monotonic() - self._oldest_read < OLDEST_EVERY_S:
            return
        self._oldest_read = time.monotonic()
        oldest = await store.oldest_pending_webhook()
        age = (utcnow() - oldest).total_seconds() if oldest is not None else 0.0
        self._oldest.set(max(0.0, age))

    async def round(self, store: Store) -> None:
        """Lease the endpoints with a delivery due and start a task for each new one."""
        settings = self._settings
        free = settings.webhook_endpoints_at_once - len(self._running)
        if free <= 0:
            return
        claimed = await store.claim_webhook_endpoints(
            self._owner, settings.webhook_endpoints_at_once, settings.webhook_lease_s, utcnow()
        )
        for endpoint in claimed:
            if endpoint.id in self._running:
                continue  # its lease was renewed; its task goes on
            if free <= 0:
                await store.release_webhook_lease(self._owner, endpoint.id)
                continue
            free -= 1
            self._running[endpoint.id] = asyncio.create_task(
                self._deliver_endpoint(store, endpoint), name=f"webhooks-{endpoint.id}"
            )

    async def _deliver_endpoint(self, store: Store, claimed: WebhookEndpoint) -> None:
        settings = self._settings
        renewed = time.monotonic()  # the claim, just made, leased it
        try:
            while True:
                # Read again each time: a rotation or a delete takes effect at once.
                endpoint = await store.webhook_endpoint(claimed.org_id, claimed.id)
                if endpoint is None:
                    return
                due = await store.due_webhook_deliveries(
                    endpoint.id, utcnow(), settings.webhook_batch
                )
                if not due:
                    return
                # In waves of `webhook_in_flight` POSTs; a wave lasts at most
                # `webhook_timeout_s`, so the lease is renewed before the next one could
                # outlast half of it (not after every wave: a write saved per wave).
                step = settings.webhook_in_flight
                for start in range(0, len(due), step):
                    wave = due[start : start + step]
                    await asyncio.gather(*(self._attempt(store, endpoint, d) for d in wave))
                    held_s = time.monotonic() - renewed + settings.webhook_timeout_s
                    if held_s > settings.webhook_lease_s / 2:
                        if not await store.renew_webhook_lease(
                            self._owner, endpoint.id, settings.webhook_lease_s
                        ):
                            return
                        renewed = time.monotonic()
        except WhatslikeError as exc:
            log.warning("webhook-sender: endpoint %s: %s", claimed.id, exc)
        finally:
            self._running.pop(claimed.id, None)
            with contextlib.suppress(WhatslikeError):  # else the lease lapses by itself
                await store.release_webhook_lease(self._owner, claimed.id)

    async def _attempt(
        self,
        store: Store,
        endpoint: WebhookEndpoint,
        delivery: WebhookDelivery,
    ) -> None:
        error = await self._post(endpoint, delivery)
        now = utcnow()
        if not error:
            await store.webhook_delivered(delivery.id)
            self._outcomes["delivered"].inc()
            return
        settings = self._settings
        next_at = retry_at(
            delivery.attempts + 1,
            delivery.created_at,
            now,
            first_s=settings.webhook_retry_first_s,
            max_s=settings.webhook_retry_max_s,
            retry_for_s=settings.webhook_retry_for_s,
        )
        if next_at is None:
            log.warning(
                "webhook-sender: endpoint %s: delivery %s parked after %d attempts: %s",
                endpoint.id,
                delivery.webhook_id,
                delivery.attempts + 1,
                error,
            )
        await store.webhook_failed(delivery.id, next_at, error, now)
        self._outcomes["retried" if next_at is not None else "parked"].inc()

    async def _post(self, endpoint: WebhookEndpoint, delivery: WebhookDelivery) -> str:
        """POST one delivery; "" for a 2xx, else what went wrong (no secret, no URL)."""
        now = utcnow()
        try:
            check_url(endpoint.url, allow_private=self._settings.webhook_allow_private)
            async with self._open().post(
                endpoint.url,
                data=delivery.body,
                headers=headers(
                    secrets_of(endpoint, now),
                    delivery.webhook_id,
                    int(now.timestamp()),
                    delivery.body,
                ),
                timeout=aiohttp.ClientTimeout(total=self._settings.webhook_timeout_s),
                allow_redirects=False,
            ) as response:
                # The body is not read: only the status matters, whatever its size.
                status = response.status
        except TargetRefused as exc:
            return f"refused: {exc}"
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return f"{type(exc).__name__}: {exc}"[:300]
        return "" if 200 <= status < 300 else f"HTTP {status}"

    async def stop(self) -> None:
        await super().stop()
        running = list(self._running.values())
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None
