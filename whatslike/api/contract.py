"""The HTTP API's contract (protocol.md §5): every operation declared once, beside its
handler, as an `Operation`. The Starlette routes, the hot routes (`whatslike.app`) and the
OpenAPI 3.1 document served at `/openapi.json` are all built from these declarations, so a
route cannot be served without being in the document, nor described with other models than
the ones that validate its requests.

The document itself is assembled here from pydantic models (request bodies, query, path and
header parameters, responses); what every operation of a kind shares (the bearer token's
401 and 429, a body's 400, 408 and 413, a stop's 503) is added by `document`, so a
declaration lists only what is its own.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field
from pydantic.json_schema import models_json_schema
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from whatslike.status.rules import Status

Endpoint = Callable[[Request], Awaitable[Response]]
Method = Literal["GET", "POST", "DELETE"]
#: Who may call an operation: an organization's JWT, the metrics token (when set), Meta
#: (its signature header, declared as a header parameter), or anyone.
Auth = Literal["bearer", "metrics", "none"]

#: Conversation and message ids (protocol.md §2).
ResourceId = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:-]{1,128}$")]
StatusName = Literal["PENDING", "SENT", "DELIVERED", "READ", "FAILED"]
assert set(StatusName.__args__) == {status.value for status in Status}  # type: ignore[attr-defined]


@dataclass(frozen=True)
class Reply:
    """A response of an operation: a JSON body of `model`, or a body of `media_type`."""

    description: str
    model: type[BaseModel] | None = None
    media_type: str = "application/json"
    #: Response headers: name → description.
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Link:
    """An OpenAPI link: the operation `operation_id` takes `parameters` (name → runtime
    expression such as `$response.body#/id`) from this operation's success response."""

    operation_id: str
    parameters: Mapping[str, str]


@dataclass(frozen=True)
class Operation:
    """One HTTP operation of the contract, bound to the handler that serves it."""

    method: Method
    path: str
    endpoint: Endpoint
    operation_id: str
    summary: str
    tag: str
    #: The success response: its status and what it carries.
    status: int
    reply: Reply
    auth: Auth = "bearer"
    #: The JSON request body (validated with this model by the handler).
    body: type[BaseModel] | None = None
    #: A binary request body instead (an upload): the media types it may be.
    upload: tuple[str, ...] = ()
    #: Parameters: one model each for the path, the query and the headers (field aliases
    #: are the parameter names).
    path_params: type[BaseModel] | None = None
    query: type[BaseModel] | None = None
    headers: type[BaseModel] | None = None
    #: Failures of this operation beyond the shared ones: status → when (an error body),
    #: or a `Reply` of its own.
    errors: Mapping[int, str | Reply] = field(default_factory=dict)
    links: Iterable[Link] = ()
    description: str = ""
    #: Served past Starlette's routing too (see `whatslike.app._HotRoutes`).
    hot: bool = False

    def path_regex(self) -> re.Pattern[str]:
        """What the path template matches, its `{name}` parts as named groups (one path
        segment each, like Starlette's default convertor)."""
        parts = re.split(r"\{(\w+)\}", self.path)
        return re.compile(
            "".join(
                f"(?P<{part}>[^/]+)" if i % 2 else re.escape(part) for i, part in enumerate(parts)
            )
        )


def routes(operations: Iterable[Operation]) -> list[Route]:
    """One route per path, dispatching on the method: a method the path does not serve
    answers 405 with an `Allow` that names every method it does (routes of one method
    each would name only the first route's)."""
    by_path: dict[str, dict[str, Endpoint]] = {}
    for op in operations:
        by_path.setdefault(op.path, {})[op.method] = op.endpoint
    return [
        Route(path, _dispatch(endpoints), methods=list(endpoints))
        for path, endpoints in by_path.items()
    ]


def _dispatch(endpoints: Mapping[str, Endpoint]) -> Endpoint:
    if len(endpoints) == 1:
        [endpoint] = endpoints.values()
        return endpoint

    async def dispatch(request: Request) -> Response:
        # HEAD is served as GET (Starlette adds it to a route that serves GET).
        return await endpoints["GET" if request.method == "HEAD" else request.method](request)

    return dispatch


# -- shared shapes --------------------------------------------------------------------


class ErrorDetail(BaseModel):
    code: str = Field(description="A stable machine-readable code, e.g. `bad_request`.")
    message: str = Field(description="What went wrong, for a person.")


class ErrorBody(BaseModel):
    """Every failure's body (protocol.md §5); never a stack trace."""

    error: ErrorDetail


class ProviderErrorOut(BaseModel):
    code: str = Field(description="The provider's error code, e.g. `131047`.")
    title: str


RETRY_AFTER = {"Retry-After": "Whole seconds after which the same request may be retried."}

#: The failures every operation of a kind may answer, added by `document`.
_BEARER_ERRORS: Mapping[int, str | Reply] = {
    401: "No `Authorization: Bearer` token, or one that is invalid or expired.",
    429: Reply(
        "The organization's request budget is spent (`ORG_REQUESTS_PER_S`, `ORG_REQUEST_BURST`).",
        ErrorBody,
        headers=RETRY_AFTER,
    ),
}
_BODY_ERRORS: Mapping[int, str | Reply] = {
    400: "The body is not JSON or does not match its schema.",
    408: "The body did not arrive whole within `BODY_TIMEOUT_S`.",
    413: "The body is larger than `MAX_BODY_BYTES`.",
}
_ALWAYS: Mapping[int, str | Reply] = {
    503: Reply(
        "A backend is out of reach, or the process is stopping; nothing was acknowledged "
        "and the same request is safe to retry.",
        ErrorBody,
        headers=RETRY_AFTER,
    ),
}

SECURITY_SCHEMES = {
    "bearerAuth": {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "JWT",
        "description": "A JWT of the organization (`whatslike token`); the organization "
        "always comes from the token, never from the request.",
    },
    "metricsToken": {
        "type": "http",
        "scheme": "bearer",
        "description": "`METRICS_TOKEN`, when it is set.",
    },
}


# -- the document ---------------------------------------------------------------------


def _models(operations: Iterable[Operation]) -> list[tuple[type[BaseModel], Any]]:
    """Every body model, with the mode its schema is written in (requests are validated,
    responses serialized)."""
    seen: dict[tuple[type[BaseModel], str], None] = {(ErrorBody, "serialization"): None}
    for op in operations:
        if op.body is not None:
            seen[(op.body, "validation")] = None
        replies = [op.reply, *(e for e in op.errors.values() if isinstance(e, Reply))]
        for reply in replies:
            if reply.model is not None:
                seen[(reply.model, "serialization")] = None
    return list(seen)


def _parameters(model: type[BaseModel] | None, where: str) -> list[dict[str, Any]]:
    if model is None:
        return []
    schema = model.model_json_schema(by_alias=True)
    required = set(schema.get("required", ()))
    parameters = []
    for name, given in schema.get("properties", {}).items():
        prop = dict(given)
        description = prop.pop("description", None)
        prop.pop("title", None)
        parameter: dict[str, Any] = {
            "name": name,
            "in": where,
            "required": where == "path" or name in required,
            "schema": prop,
        }
        if description:
            parameter["description"] = description
        parameters.append(parameter)
    return parameters


def _response(reply: Reply, refs: Mapping[type[BaseModel], dict[str, str]]) -> dict[str, Any]:
    answer: dict[str, Any] = {"description": reply.description}
    if reply.model is not None:
        answer["content"] = {reply.media_type: {"schema": refs[reply.model]}}
    elif reply.media_type != "application/json":
        answer["content"] = {reply.media_type: {"schema": {"type": "string"}}}
    if reply.headers:
        answer["headers"] = {
            name: {"description": text, "schema": {"type": "integer"}}
            for name, text in reply.headers.items()
        }
    return answer


def _error(entry: str | Reply) -> Reply:
    return entry if isinstance(entry, Reply) else Reply(entry, ErrorBody)


def _operation(op: Operation, refs: Mapping[type[BaseModel], dict[str, str]]) -> dict[str, Any]:
    placeholders = re.findall(r"\{(\w+)\}", op.path)
    declared = list(op.path_params.model_fields) if op.path_params else []
    if placeholders != declared:
        raise ValueError(f"{op.path}: path parameters {placeholders} declared as {declared}")
    errors: dict[int, str | Reply] = dict(_ALWAYS)
    if op.auth == "bearer":
        errors |= _BEARER_ERRORS
    elif op.auth == "metrics":
        errors[401] = "`METRICS_TOKEN` is set and the request does not carry it."
    if op.body is not None or op.upload:
        errors |= _BODY_ERRORS
    if op.path_params is not None or op.query is not None:
        errors.setdefault(400, "A parameter is outside its schema.")
    errors |= op.errors
    responses = {str(op.status): _response(op.reply, refs)}
    if op.links:
        responses[str(op.status)]["links"] = {
            link.operation_id[0].upper() + link.operation_id[1:]: {
                "operationId": link.operation_id,
                "parameters": dict(link.parameters),
            }
            for link in op.links
        }
    for status in sorted(errors):
        responses[str(status)] = _response(_error(errors[status]), refs)
    described: dict[str, Any] = {
        "operationId": op.operation_id,
        "summary": op.summary,
        "tags": [op.tag],
        "security": {
            "bearer": [{"bearerAuth": []}],
            "metrics": [{"metricsToken": []}, {}],
            "none": [],
        }[op.auth],
        "responses": responses,
    }
    if op.description:
        described["description"] = op.description
    parameters = [
        *_parameters(op.path_params, "path"),
        *_parameters(op.query, "query"),
        *_parameters(op.headers, "header"),
    ]
    if parameters:
        described["parameters"] = parameters
    if op.body is not None:
        described["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": refs[op.body]}},
        }
    elif op.upload:
        binary = {"schema": {"type": "string", "format": "binary"}}
        described["requestBody"] = {
            "required": True,
            "content": {media_type: binary for media_type in op.upload},
        }
    return described


def document(
    operations: Iterable[Operation], *, title: str, version: str, description: str
) -> dict[str, Any]:
    """The OpenAPI 3.1 document of `operations`."""
    operations = list(operations)
    models = _models(operations)
    keys, top = models_json_schema(models, ref_template="#/components/schemas/{model}")
    refs = {model: keys[(model, mode)] for model, mode in models}
    paths: dict[str, dict[str, Any]] = {}
    ids: set[str] = set()
    for op in operations:
        if op.operation_id in ids:
            raise ValueError(f"operationId {op.operation_id!r} is declared twice")
        ids.add(op.operation_id)
        methods = paths.setdefault(op.path, {})
        if op.method.lower() in methods:
            raise ValueError(f"{op.method} {op.path} is declared twice")
        methods[op.method.lower()] = _operation(op, refs)
    for op in operations:
        for link in op.links:
            if link.operation_id not in ids:
                raise ValueError(f"{op.operation_id} links to unknown {link.operation_id}")
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version, "description": description},
        "paths": paths,
        "components": {
            "schemas": top.get("$defs", {}),
            "securitySchemes": SECURITY_SCHEMES,
        },
    }


# -- models shared by several roles ---------------------------------------------------


class Health(BaseModel):
    status: Literal["ok"]
    roles: list[str] = Field(description="The roles this process runs.")


class Readiness(BaseModel):
    status: Literal["ready", "unavailable"]
    checks: dict[str, str] = Field(
        description="Each backend of the process (`store`, `bus`, `fanout`): `ok` or why not."
    )


class StatusFrame(BaseModel):
    """A status change, exactly as the WebSocket sends it (protocol.md §4)."""

    type: Literal["status"]
    conversation_id: str
    message_id: str
    status: StatusName
    seq: int = Field(ge=1, description="The conversation's sequence number of the change.")
    occurred_at: datetime
    error: ProviderErrorOut | None = Field(description="Set for FAILED.")


class InboundMediaOut(BaseModel):
    """A customer's medium: what Meta said of it and where its fetch is."""

    kind: Literal["image", "document", "audio", "video"]
    content_type: str = Field(description="Its MIME type (Meta's, or the download's).")
    filename: str = Field(description="A document's name, as the customer sent it.")
    state: Literal["fetching", "stored", "failed"] = Field(
        description="`fetching`: its bytes are being fetched from Meta; `stored`: in the "
        "media store, as `media_id`; `failed`: given up (`error` says why)."
    )
    media_id: str | None = Field(description="Once `stored`: `getMedia` gives its URL.")
    error: str | None = Field(description="Why it was given up, once `failed`.")


class MessageFrame(BaseModel):
    """A customer's message arrived, exactly as the WebSocket sends it (protocol.md §4):
    its first change, in the same seq stream as the status frames."""

    type: Literal["message"]
    conversation_id: str
    message_id: str
    direction: Literal["in"]
    text: str
    status: StatusName = Field(description="DELIVERED: it reached us (READ once read).")
    seq: int = Field(ge=1, description="The conversation's sequence number of the change.")
    occurred_at: datetime = Field(description="When the customer sent it (Meta's clock).")
    media: InboundMediaOut | None = Field(
        None,
        description="Present only when it carries a medium, fetched already (`stored` or "
        "`failed`); `text` is then its caption, maybe empty.",
    )


#: A change of a conversation, as the WebSocket sends it.
ChangeFrame = Annotated[StatusFrame | MessageFrame, Field(discriminator="type")]
