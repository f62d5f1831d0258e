"""What a role is: routes to serve (the operations of the HTTP API's contract, see
`whatslike.api.contract`, and others), and background work to start and stop.

Roles are composed by `whatslike.app.build_app` from the settings; each is built with the
ports it needs (store, bus, fan-out, HTTP client, metrics) and subscribes its bus
handlers in its constructor, before the bus starts.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from starlette.routing import BaseRoute

from whatslike.bus import Bus
from whatslike.clock import new_id
from whatslike.fanout import Fanout
from whatslike.http_client import HttpClient
from whatslike.metrics import Metrics
from whatslike.settings import Settings
from whatslike.store.base import Store

if TYPE_CHECKING:
    from whatslike.api.contract import Operation


class RelayRun:
    """The outbox relay's run in this process (see whatslike/roles/relay.py).

    On a bus that keeps nothing (in-process), a role may hand its own outbox entries to
    the bus itself right after their commit, adding them as relayed by this run (one
    commit, and no second pass of the relay over them). If that publish fails, `renew`
    starts a new run: the relay then hands on again every entry not relayed under the
    new id, those included (a duplicate is harmless: consumers are idempotent). A
    process that dies leaves them to the next process's run, like any relayed entry."""

    def __init__(self) -> None:
        self.id = new_id("run")

    def renew(self) -> None:
        self.id = new_id("run")


@dataclass(frozen=True)
class Deps:
    """The ports and shared objects a role is built with."""

    settings: Settings
    store: Store
    bus: Bus
    fanout: Fanout
    http: HttpClient
    metrics: Metrics
    jwt_secret: str
    #: Set by whoever adds to the store's outbox in this process; the relay waits on it.
    handoffs: asyncio.Event = field(default_factory=asyncio.Event)
    relay_run: RelayRun = field(default_factory=RelayRun)


class Role(Protocol):
    name: str

    def operations(self) -> list[Operation]:
        """The role's operations of the HTTP API's contract (served and documented)."""

    def routes(self) -> list[BaseRoute]:
        """The role's routes outside the contract (pages, static files, the WebSocket,
        the simulator's Graph API); its operations are served beside them."""

    async def start(self) -> None:
        """Start background work; called after the store opened, before the bus starts."""

    async def stop(self) -> None:
        """Stop background work; called after the bus stopped."""


class RoleDefaults:
    """What a role without routes or background work of its own answers."""

    def operations(self) -> list[Operation]:
        return []

    def routes(self) -> list[BaseRoute]:
        return []

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None


class BackgroundRole(RoleDefaults):
    """A role whose work is one task that runs from start to stop (`run_forever`)."""

    _task: asyncio.Task[None] | None = None

    async def run_forever(self) -> None:
        raise NotImplementedError

    async def start(self) -> None:
        self._task = asyncio.create_task(self.run_forever(), name=type(self).__name__)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            # Not `suppress(CancelledError)` around `await self._task`: that would also
            # swallow a cancellation of the caller itself (a bounded stop timing out).
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
