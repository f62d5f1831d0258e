"""The HTTP API of outbound webhooks (whatslike/webhooks): an organization's endpoints,
their secrets, and the deliveries parked after the retry period.

A secret is answered once, when it is made (create, rotate); it is never listed nor
logged.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from whatslike.api.contract import Operation, Reply, ResourceId
from whatslike.api.errors import ApiError
from whatslike.api.http import _body
from whatslike.auth import Identity
from whatslike.clock import format_time, new_id, utcnow
from whatslike.hub.frames import valid_id
from whatslike.roles import Deps, RoleDefaults
from whatslike.store.base import Store, WebhookDelivery, WebhookEndpoint
from whatslike.webhooks.core import TargetRefused, check_url, new_secret

#: How long the secret before a rotation still signs.
PREVIOUS_SECRET_S = 86_400
#: An endpoint's URL, as the schema admits it: a path and query of printable ASCII but
#: `"` and `#` (no escapes nor classes JSON Schema's and pydantic's regexes disagree on).
URL_PATTERN = r"^https?://[A-Za-z0-9.-]{1,253}(:[0-9]{1,5})?(/[!$-~]*)?$"
#: Parked deliveries answered at most by one list.
PARKED_LIMIT = 100


class NewEndpoint(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: Annotated[
        str,
        Field(
            max_length=2048,
            # The syntax (a host name or IPv4 address, a port, a path and query of
            # printable ASCII, no fragment); what passes it may still be refused (403).
            pattern=URL_PATTERN,
            description="Where events are POSTed: https to a public address (plain http "
            "and private addresses only where `WEBHOOK_ALLOW_PRIVATE` is set).",
        ),
    ]


class EndpointPath(BaseModel):
    endpoint_id: ResourceId


class EndpointOut(BaseModel):
    id: str
    url: str
    created_at: datetime
    previous_secret_valid_until: datetime | None = Field(
        description="After a rotation: until when the secret before it still signs too."
    )


class EndpointWithSecret(EndpointOut):
    secret: str = Field(
        description="`whsec_…`: shown once. Verifies `webhook-signature` (Standard Webhooks)."
    )


class EndpointList(BaseModel):
    endpoints: list[EndpointOut]


class ParkedDelivery(BaseModel):
    webhook_id: str = Field(description="The `webhook-id` it is sent with.")
    type: str
    attempts: int
    created_at: datetime
    parked_at: datetime
    last_error: str
    body: str = Field(description="The exact JSON body that is POSTed.")


class ParkedList(BaseModel):
    deliveries: list[ParkedDelivery]


class Replayed(BaseModel):
    replayed: int = Field(ge=0, description="Parked deliveries made due again.")


def endpoint_json(endpoint: WebhookEndpoint, *, secret: bool = False) -> dict[str, Any]:
    until = endpoint.previous_until
    answer = {
        "id": endpoint.id,
        "url": endpoint.url,
        "created_at": format_time(endpoint.created_at),
        "previous_secret_valid_until": (
            format_time(until) if until is not None and until > utcnow() else None
        ),
    }
    if secret:
        answer["secret"] = endpoint.secret
    return answer


def parked_json(delivery: WebhookDelivery) -> dict[str, Any]:
    assert delivery.parked_at is not None
    return {
        "webhook_id": delivery.webhook_id,
        "type": delivery.event_type,
        "attempts": delivery.attempts,
        "created_at": format_time(delivery.created_at),
        "parked_at": format_time(delivery.parked_at),
        "last_error": delivery.last_error,
        "body": delivery.body.decode(),
    }


class WebhookApi(RoleDefaults):
    """The api role's webhook operations; `identify` is the HTTP API's token and
    request-budget check (`HttpApi.identity`)."""

    name = "api-webhooks"

    def __init__(self, deps: Deps, identify: Callable[[Request], Identity]) -> None:
        self._store = deps.store
        self._settings = deps.settings
        self._identify = identify

    def operations(self) -> list[Operation]:
        # No links from the create to the others: past the organization's limit a create
        # answers 409 with no id, so a stateful run's chains would depend on its history.
        no_endpoint = {404: "No such webhook endpoint in the caller's organization."}
        return [
            Operation(
                "POST",
                "/api/webhooks",
                self.create,
                "createWebhookEndpoint",
                "Add an endpoint that receives the organization's events",
                "webhooks",
                201,
                Reply("The endpoint, with its secret (shown this once).", EndpointWithSecret),
                body=NewEndpoint,
                errors={
                    409: "The organization has its maximum of endpoints already.",
                    403: "The URL may not be called (plain http, a private or loopback "
                    "address, a port out of range); the message says why.",
                },
            ),
            Operation(
                "GET",
                "/api/webhooks",
                self.list,
                "listWebhookEndpoints",
                "The organization's webhook endpoints",
                "webhooks",
                200,
                Reply("The endpoints, oldest first (no secrets).", EndpointList),
            ),
            Operation(
                "DELETE",
                "/api/webhooks/{endpoint_id}",
                self.delete,
                "deleteWebhookEndpoint",
                "Remove an endpoint and the deliveries waiting for it",
                "webhooks",
                204,
                Reply("Removed."),
                path_params=EndpointPath,
                errors=no_endpoint,
            ),
            Operation(
                "POST",
                "/api/webhooks/{endpoint_id}/rotate",
                self.rotate,
                "rotateWebhookSecret",
                "Give an endpoint a new secret; the old one still signs for 24 h",
                "webhooks",
                200,
                Reply("The endpoint, with its new secret (shown this once).", EndpointWithSecret),
                path_params=EndpointPath,
                errors=no_endpoint,
            ),
            Operation(
                "GET",
                "/api/webhooks/{endpoint_id}/parked",
                self.parked,
                "listParkedWebhookDeliveries",
                "Deliveries given up after the retry period",
                "webhooks",
                200,
                Reply(f"At most {PARKED_LIMIT}, oldest first.", ParkedList),
                path_params=EndpointPath,
                errors=no_endpoint,
            ),
            Operation(
                "POST",
                "/api/webhooks/{endpoint_id}/replay",
                self.replay,
                "replayParkedWebhookDeliveries",
                "Deliver an endpoint's parked deliveries again",
                "webhooks",
                200,
                Reply("They are due again, with a fresh retry period.", Replayed),
                path_params=EndpointPath,
                errors=no_endpoint,
            ),
        ]

    def _begin(self, request: Request) -> tuple[Store, Identity]:
        identity = self._identify(request)
        endpoint_id = request.path_params.get("endpoint_id")
        if endpoint_id is not None and not valid_id(endpoint_id):
            raise ApiError(400, "bad_request", "an endpoint id is 1-128 of A-Z a-z 0-9 _ . : -")
        return self._store, identity

    async def create(self, request: Request) -> Response:
        store, identity = self._begin(request)
        body = await _body(request, NewEndpoint)
        try:
            url = check_url(body.url, allow_private=self._settings.webhook_allow_private)
        except TargetRefused as exc:
            raise ApiError(403, "refused_target", str(exc)) from exc
        endpoint = WebhookEndpoint(
            id=new_id("whe"),
            org_id=identity.org_id,
            url=url,
            secret=new_secret(),
            created_at=utcnow(),
        )
        limit = self._settings.webhook_endpoints_per_org
        if await store.add_webhook_endpoint(endpoint, limit) is None:
            raise ApiError(409, "too_many_endpoints", f"at most {limit} endpoints per organization")
        return JSONResponse(endpoint_json(endpoint, secret=True), status_code=201)

    async def list(self, request: Request) -> Response:
        store, identity = self._begin(request)
        endpoints = await store.webhook_endpoints(identity.org_id)
        return JSONResponse({"endpoints": [endpoint_json(e) for e in endpoints]})

    async def delete(self, request: Request) -> Response:
        store, identity = self._begin(request)
        if not await store.delete_webhook_endpoint(
            identity.org_id, request.path_params["endpoint_id"]
        ):
            raise ApiError(404, "not_found", "no such webhook endpoint")
        return Response(status_code=204)

    async def rotate(self, request: Request) -> Response:
        store, identity = self._begin(request)
        endpoint = await store.rotate_webhook_secret(
            identity.org_id,
            request.path_params["endpoint_id"],
            new_secret(),
            utcnow() + timedelta(seconds=PREVIOUS_SECRET_S),
        )
        if endpoint is None:
            raise ApiError(404, "not_found", "no such webhook endpoint")
        return JSONResponse(endpoint_json(endpoint, secret=True))

    async def parked(self, request: Request) -> Response:
        store, identity = self._begin(request)
        deliveries = await store.parked_webhook_deliveries(
            identity.org_id, request.path_params["endpoint_id"], PARKED_LIMIT
        )
        if deliveries is None:
            raise ApiError(404, "not_found", "no such webhook endpoint")
        return JSONResponse({"deliveries": [parked_json(d) for d in deliveries]})

    async def replay(self, request: Request) -> Response:
        store, identity = self._begin(request)
        replayed = await store.replay_parked_webhooks(
            identity.org_id, request.path_params["endpoint_id"], utcnow()
        )
        if replayed is None:
            raise ApiError(404, "not_found", "no such webhook endpoint")
        return JSONResponse({"replayed": replayed})
