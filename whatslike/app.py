"""Assembly: the runtime builds the ports from the settings, composes the chosen roles,
and exposes one Starlette app. No globals, no import-time side effects."""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from importlib.metadata import version
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from whatslike.api.campaigns import Campaigns
from whatslike.api.contract import Endpoint, Health, Operation, Readiness, Reply, document
from whatslike.api.contract import routes as contract_routes
from whatslike.api.errors import (
    ApiError,
    error_response,
    on_api_error,
    on_http_exception,
    on_unexpected,
    unavailable_handler,
)
from whatslike.api.http import HttpApi
from whatslike.api.web import STATIC, WebAssets
from whatslike.api.webhooks import WebhookApi
from whatslike.bus.factory import open_bus
from whatslike.connectors.instagram import InstagramConnector
from whatslike.connectors.whatsapp import WhatsAppConnector
from whatslike.errors import BackendUnavailable, ConfigError, WhatslikeError
from whatslike.fanout.factory import open_fanout
from whatslike.http_client import AiohttpClient
from whatslike.hub.server import Hub
from whatslike.media.api import MediaApi
from whatslike.media.factory import open_media_store
from whatslike.metrics import Metrics
from whatslike.roles import Deps, Role
from whatslike.roles.relay import OutboxRelay
from whatslike.roles.router import Router
from whatslike.roles.status_worker import StatusWorker
from whatslike.roles.watchdog import Watchdog
from whatslike.settings import Settings, check_safety, resolve_jwt_secret, secure_data_dir
from whatslike.simulator.app import Simulator
from whatslike.store import open_store
from whatslike.webhooks.sender import WebhookSender

log = logging.getLogger(__name__)

PACKAGE_VERSION = version("whatslike")
API_DESCRIPTION = (
    "The HTTP API of Whatslike (docs/protocol.md §5, which makes this document normative): "
    "conversations, messages and their statuses, tenant-scoped by the bearer JWT. Statuses "
    "also arrive live over the WebSocket `/ws/status` (protocol.md §4), outside this "
    'document. Every failure answers `{"error": {"code", "message"}}`.'
)

#: Roles that talk only through the bus; with the in-process bus they must share a process.
PIPELINE_ROLES = ("api", "router", "connector", "status-worker")
#: Roles that add to the store's outbox: their process runs a relay.
HANDOFF_ROLES = ("api", "connector", "status-worker")


def check_wiring(settings: Settings) -> None:
    """Refuse role sets that cannot work with the configured backends."""
    if settings.bus_url == "memory://":
        present = [role for role in PIPELINE_ROLES if role in settings.roles]
        if present and len(present) != len(PIPELINE_ROLES):
            missing = ", ".join(r for r in PIPELINE_ROLES if r not in settings.roles)
            raise ConfigError(
                f"invalid setting roles (WHATSLIKE_ROLES): the in-process bus (bus_url "
                f"memory://) joins roles inside one process; add {missing} or use a shared bus"
            )


def build_roles(deps: Deps) -> list[Role]:
    chosen = deps.settings.roles
    roles: list[Role] = []
    if any(role in chosen for role in HANDOFF_ROLES):
        roles.append(OutboxRelay(deps))
    if "api" in chosen:
        media = open_media_store(deps.settings, deps.jwt_secret)
        api = HttpApi(deps, media)
        roles += [api, WebhookApi(deps, api.identity), Campaigns(deps, api.identity)]
        roles += [MediaApi(api, deps.settings, media), Hub(deps), WebAssets(deps)]
    if "router" in chosen:
        roles.append(Router(deps))
    if "connector" in chosen:
        roles += [WhatsAppConnector(deps), InstagramConnector(deps)]
    if "status-worker" in chosen:
        roles += [StatusWorker(deps), Watchdog(deps)]
    if "webhook-sender" in chosen:
        roles.append(WebhookSender(deps))
    if "simulator" in chosen:
        roles.append(Simulator(deps))
    return roles


class Runtime:
    """Everything one process runs: ports, roles and the ASGI app serving their routes."""

    def __init__(self, settings: Settings) -> None:
        check_wiring(settings)
        check_safety(settings)
        secure_data_dir(settings)
        self.settings = settings
        self.metrics = Metrics()
        self.deps = Deps(
            settings=settings,
            store=open_store(
                settings.effective_database_url,
                sqlite_synchronous=settings.sqlite_synchronous,
                pool_size=settings.database_pool_size,
            ),
            bus=open_bus(settings, self.metrics),
            fanout=open_fanout(settings),
            http=AiohttpClient(
                connections=settings.http_connections, keepalive_s=settings.http_keepalive_s
            ),
            metrics=self.metrics,
            jwt_secret=resolve_jwt_secret(settings),
        )
        self.roles = build_roles(self.deps)
        self._opened = False
        self._started = False
        #: Set when a stop began: new requests are answered 503 (see `_DrainGuard`).
        self.draining = False
        #: The operations of the HTTP API's contract this process serves, and their
        #: OpenAPI document (served at /openapi.json).
        self.operations = self._operations()
        self.openapi = document(
            self.operations,
            title="Whatslike HTTP API",
            version=PACKAGE_VERSION,
            description=API_DESCRIPTION,
        )
        self._openapi_body = json.dumps(self.openapi).encode()
        self.starlette = Starlette(
            routes=self._routes(),
            lifespan=self._lifespan,
            middleware=[Middleware(_DrainGuard, runtime=self)],
            exception_handlers={
                ApiError: on_api_error,
                HTTPException: on_http_exception,
                BackendUnavailable: unavailable_handler(settings.retry_after_s),
                Exception: on_unexpected,
            },
        )
        #: What the server serves: the hot operations (webhooks, a new message) straight to
        #: their handler, the rest through Starlette.
        self.hot_routes = _HotRoutes(self.starlette, self, [op for op in self.operations if op.hot])
        self.app: ASGIApp = self.hot_routes

    async def open(self) -> None:
        """Reach the store; raises WhatslikeError with a one-line reason."""
        if not self._opened:
            await self.deps.store.open()
            self._opened = True

    async def start(self) -> None:
        """Open the store, start the roles, the fan-out and the bus (idempotent). A start
        that fails undoes what it started — the store's thread included, which would
        otherwise keep the process alive — and raises; the bus and the backends raise
        WhatslikeError with a one-line reason."""
        if self._started:
            return
        undo: list[Callable[[], Awaitable[None]]] = [self.deps.http.close]
        try:
            await self.open()
            undo.append(self.deps.store.close)
            for role in self.roles:
                await role.start()
                undo.append(role.stop)
            await self.deps.fanout.start()
            undo.append(self.deps.fanout.stop)
            await self.deps.bus.start()  # it stops itself when it cannot start
        except BaseException:
            for step in reversed(undo):
                try:
                    await step()
                except Exception:
                    log.exception("undoing a failed start")
            self._opened = False
            raise
        self._started = True

    async def stop(self) -> None:
        """Stop what `start` started (idempotent)."""
        if not self._started:
            return
        self._started = False
        # Nothing more is handed to the bus; what the bus does not finish in time is
        # still in the outbox and is relayed again at the next start.
        for role in self.roles:
            if isinstance(role, OutboxRelay):
                await role.stop()
        await self.deps.bus.stop()
        await self.deps.fanout.stop()
        for role in reversed(self.roles):
            await role.stop()
        await self.deps.http.close()
        await self.deps.store.close()
        self._opened = False

    def demo_url(self) -> str | None:
        """The demo page, in the embedded mode only. No token in it: the page asks for a
        development token itself, and a printed token would end up in logs."""
        for role in self.roles:
            if isinstance(role, WebAssets) and self.settings.embedded:
                return f"{self.settings.base_url}/demo"
        return None

    @property
    def ws_protocol(self) -> Callable[..., Any] | None:
        """What uvicorn makes each WebSocket's protocol with: the hub's, when it runs."""
        for role in self.roles:
            if isinstance(role, Hub):
                return role.protocol
        return None

    async def close_connections(self) -> None:
        """Stop taking work (new requests answer 503) and close every WebSocket with 1001,
        before the server stops taking requests."""
        self.draining = True
        for role in self.roles:
            if isinstance(role, Hub):
                await role.stop()

    @asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[None]:
        await self.start()  # `serve` started it already: nothing left to do then
        try:
            yield
        finally:
            await self.stop()

    def _operations(self) -> list[Operation]:
        """Every operation of the contract this process serves: its own, then its roles'."""
        operations = [
            Operation(
                "GET",
                "/healthz",
                self._healthz,
                "health",
                "Whether the process serves",
                "operations",
                200,
                Reply("The process serves.", Health),
                auth="none",
            ),
            Operation(
                "GET",
                "/readyz",
                self._readyz,
                "readiness",
                "Whether every backend of the process's roles is reachable",
                "operations",
                200,
                Reply("Every backend is reachable.", Readiness),
                auth="none",
                errors={503: Reply("A backend is out of reach.", Readiness)},
            ),
            Operation(
                "GET",
                "/metrics",
                self._metrics,
                "metrics",
                "Prometheus metrics",
                "operations",
                200,
                Reply("The Prometheus text exposition format.", media_type="text/plain"),
                auth="metrics",
            ),
        ]
        for role in self.roles:
            operations += role.operations()
        return operations

    def _routes(self) -> list[BaseRoute]:
        routes: list[BaseRoute] = [*contract_routes(self.operations)]
        routes += [
            Route("/", self._index, methods=["GET"]),
            Route("/openapi.json", self._openapi, methods=["GET"]),
            Route("/docs", self._docs, methods=["GET"]),
            Mount("/docs/assets", StaticFiles(directory=STATIC / "api-docs"), name="docs"),
        ]
        for role in self.roles:
            routes += role.routes()
        return routes

    async def _openapi(self, request: Request) -> Response:
        return Response(self._openapi_body, media_type="application/json")

    async def _docs(self, request: Request) -> Response:
        """The contract for a person: Swagger UI, served from this process."""
        return FileResponse(
            STATIC / "api-docs" / "index.html",
            media_type="text/html",
            headers={"Cache-Control": "no-cache"},
        )

    async def _healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "roles": list(self.settings.roles)})

    async def _readyz(self, request: Request) -> Response:
        checks: dict[str, str] = {}
        for name, ping in (
            ("store", self.deps.store.ping),
            ("bus", self.deps.bus.ping),
            ("fanout", self.deps.fanout.ping),
        ):
            try:
                await ping()
                checks[name] = "ok"
            except WhatslikeError as exc:
                checks[name] = str(exc)
        ready = all(value == "ok" for value in checks.values())
        return JSONResponse(
            {"status": "ready" if ready else "unavailable", "checks": checks},
            status_code=200 if ready else 503,
        )

    async def _index(self, request: Request) -> Response:
        """The address `serve` prints: the demo in the embedded mode, else a short map."""
        if self.settings.embedded and "api" in self.settings.roles:
            return RedirectResponse("/demo", status_code=303)
        endpoints = ["/healthz", "/readyz", "/metrics", "/openapi.json", "/docs"]
        if "api" in self.settings.roles:
            endpoints += ["/api/conversations", "/ws/status", "/client/websocket-client.js"]
        return JSONResponse(
            {"service": "whatslike", "roles": list(self.settings.roles), "endpoints": endpoints}
        )

    async def _metrics(self, request: Request) -> Response:
        token = self.settings.metrics_token
        if token:
            given = request.headers.get("authorization", "").encode()
            if not hmac.compare_digest(given, f"Bearer {token}".encode()):
                raise ApiError(401, "unauthorized", "/metrics needs the metrics token")
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)


class _DrainGuard:
    """While the process stops, requests that were not under way yet are answered 503
    with a Retry-After, so clients retry elsewhere or later and nothing half-done is
    acknowledged; health probes still answer."""

    def __init__(self, app: ASGIApp, runtime: Runtime) -> None:
        self._app = app
        self._runtime = runtime

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            self._runtime.draining
            and scope["type"] == "http"
            and scope["path"] not in ("/healthz", "/readyz")
        ):
            response = error_response(503, "unavailable", "shutting down; retry later")
            response.headers["Retry-After"] = str(self._runtime.settings.retry_after_s)
            response.headers["Connection"] = "close"
            await response(scope, receive, send)
            return
        await self._app(scope, receive, send)


class _HotRoutes:
    """The busiest routes go straight to their endpoint, past Starlette's routing and
    middlewares, which cost more per request than the work itself: the operations declared
    `hot` (`POST /webhooks/<channel>`, Meta's status callbacks, to its connector, and
    `POST /api/conversations/{id}/messages`, an agent's or a campaign's message, to the
    API). Starlette serves them too (`_DrainGuard` and the tests of the routing see the
    same operations). What those layers would do is kept:
    while draining, the request takes the usual way (`_DrainGuard` answers 503); an API
    error, an outage (503 with Retry-After) and an unexpected error (logged, 500) are
    answered by the app's own handlers; a body over the limit propagates to BodyLimit,
    outside, as it would."""

    def __init__(self, app: ASGIApp, runtime: Runtime, hot: Sequence[Operation]) -> None:
        self._app = app
        self._runtime = runtime
        self._exact: dict[tuple[str, str], Endpoint] = {
            (op.method, op.path): op.endpoint for op in hot if "{" not in op.path
        }
        self._templates = [
            (op.method, op.path_regex(), op.endpoint) for op in hot if "{" in op.path
        ]
        self._served = [(op.method, op.path) for op in hot]
        self._on_unavailable = unavailable_handler(runtime.settings.retry_after_s)

    def served(self) -> list[tuple[str, str]]:
        """(method, path template) of every route taken past Starlette."""
        return list(self._served)

    def _endpoint(self, scope: Scope) -> Endpoint | None:
        if scope["type"] != "http":
            return None
        method: str = scope["method"]
        path: str = scope["path"]
        endpoint = self._exact.get((method, path))
        if endpoint is not None:
            return endpoint
        for wanted, template, endpoint in self._templates:
            if method == wanted and (match := template.fullmatch(path)):
                scope["path_params"] = match.groupdict()
                return endpoint
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        endpoint = self._endpoint(scope)
        if endpoint is None or self._runtime.draining:
            await self._app(scope, receive, send)
            return
        request = Request(scope, receive, send)
        try:
            response = await endpoint(request)
        except HTTPException:
            raise  # a body over the limit: BodyLimit, outside, answers 413
        except ApiError as exc:
            response = await on_api_error(request, exc)
        except BackendUnavailable as exc:
            response = await self._on_unavailable(request, exc)
        except Exception as exc:
            response = await on_unexpected(request, exc)
        await response(scope, receive, send)
