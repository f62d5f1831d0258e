"""The HTTP API of protocol.md §5: conversations, messages and changes, tenant-scoped.

The organization always comes from the token, never from the request; another
organization's conversation answers 404 exactly like one that does not exist.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timedelta
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.config import JsonDict
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from whatslike.api.contract import (
    ChangeFrame,
    InboundMediaOut,
    Link,
    Operation,
    ProviderErrorOut,
    Reply,
    ResourceId,
    StatusName,
)
from whatslike.api.errors import ApiError
from whatslike.api.ratelimit import OrgRateLimit
from whatslike.auth import Identity, InvalidToken, TokenService, bearer_token
from whatslike.clock import format_time, utcnow
from whatslike.events import CHANNELS
from whatslike.hub.frames import valid_id
from whatslike.media.limits import MediaRefused, instagram_attachment
from whatslike.media.store import MEDIA_ID, MediaStore
from whatslike.reads import ReadRefused, mark_read
from whatslike.roles import Deps, RoleDefaults
from whatslike.store.base import Conversation, Message
from whatslike.store.common import inbound_message_id, media_json
from whatslike.templates import Template, canonical

log = logging.getLogger(__name__)


Channel = Literal["whatsapp", "instagram"]

#: How long after a customer's message a free-form message may be sent (Meta's rule).
CUSTOMER_WINDOW = timedelta(hours=24)
#: Instagram: how long after it a human agent may still answer, with the HUMAN_AGENT tag.
HUMAN_AGENT_WINDOW = timedelta(days=7)
#: An agent's Instagram answer accepted this long after the customer's last message is
#: tagged HUMAN_AGENT: an hour before the 24 h close, for the time it may wait to be sent.
HUMAN_AGENT_FROM = CUSTOMER_WINDOW - timedelta(hours=1)
HUMAN_AGENT = "HUMAN_AGENT"

# -- requests (validated with these models) ---------------------------------------------


Contact = Annotated[
    str,
    Field(
        min_length=1,
        max_length=128,
        # No white space nor control character. Spelled out rather than `\S` alone:
        # JSON Schema's regexes (ECMAScript) and pydantic's (Rust) disagree on what
        # `\s` is (U+0085 is white space only to Rust, U+FEFF only to ECMAScript).
        pattern=r"^[^\s\x00-\x1f\x7f-\x9f\ufeff]+$",
        description="The contact's WhatsApp phone number or Instagram-scoped id.",
    ),
]


class NewConversation(BaseModel):
    model_config = ConfigDict(extra="forbid")
    channel: Channel
    contact: Contact


#: Meta: a medium's caption is at most 1,024 characters.
CAPTION_LIMIT = 1024


def _not_null(schema: JsonDict) -> None:
    """An optional field's schema without its `null`: left out is the only way to not
    give it."""
    options = schema.pop("anyOf")
    del schema["default"]
    assert isinstance(options, list)
    [given] = [o for o in options if isinstance(o, dict) and o.get("type") != "null"]
    assert isinstance(given, dict)
    schema.update(given)


class NewMessage(BaseModel):
    """A text (`text`, not empty), a medium uploaded with `POST /api/media` (`media_id`,
    with `text` as its caption, maybe empty), or a WhatsApp template (`type` `template`
    and `template`, nothing else). `type` may be left out of a text or a medium."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "anyOf": [
                {
                    "required": ["media_id"],
                    "properties": {
                        "type": {"const": "media"},
                        "text": {"maxLength": CAPTION_LIMIT},
                    },
                    "not": {"required": ["template"]},
                },
                {
                    "required": ["text"],
                    "properties": {"type": {"const": "text"}, "text": {"minLength": 1}},
                    "not": {"anyOf": [{"required": ["media_id"]}, {"required": ["template"]}]},
                },
                {
                    "required": ["type", "template"],
                    "properties": {"type": {"const": "template"}},
                    "not": {"anyOf": [{"required": ["media_id"]}, {"required": ["text"]}]},
                },
            ]
        },
    )
    # None stands for "not given": the schema does not offer null (see `_one_kind`).
    type: Literal["text", "media", "template"] | None = Field(
        None,
        description="What the message is; a text or a medium may leave it out.",
        json_schema_extra=_not_null,
    )
    text: Annotated[str, Field(max_length=4096)] = ""
    client_message_id: Annotated[
        str,
        Field(
            max_length=128,
            description="The caller's key: the same one twice answers the first message.",
        ),
    ] = ""
    media_id: Annotated[
        str, Field(pattern=MEDIA_ID.pattern, description="A medium of `POST /api/media`.")
    ] = ""
    template: Template | None = Field(
        None,
        description="A WhatsApp template, in Meta's shape: sent any time.",
        json_schema_extra=_not_null,
    )

    @model_validator(mode="after")
    def _one_kind(self) -> NewMessage:
        for name in ("type", "template"):
            if name in self.model_fields_set and getattr(self, name) is None:
                raise ValueError(f"{name} may be left out, not null")
        if self.type == "template" or self.template is not None:
            if self.type != "template" or self.template is None:
                raise ValueError('a template message has "type": "template" and a "template"')
            if self.media_id or "text" in self.model_fields_set:
                raise ValueError("a template message has no text nor media_id")
        elif self.media_id:
            if self.type not in (None, "media"):
                raise ValueError('a message with a media_id is of "type": "media"')
            if len(self.text) > CAPTION_LIMIT:
                raise ValueError(f"a caption is at most {CAPTION_LIMIT} characters")
        elif self.type == "media":
            raise ValueError('a message of "type": "media" needs a media_id')
        elif not self.text:
            raise ValueError("a message needs a text, a media_id or a template")
        return self


class ConversationPath(BaseModel):
    id: ResourceId


class ConversationMessagePath(BaseModel):
    id: ResourceId
    message_id: ResourceId


class MessagePath(BaseModel):
    message_id: ResourceId


class ChangesQuery(BaseModel):
    since: Annotated[
        int,
        Field(
            ge=0,
            le=10**18 - 1,
            description="The last seq the caller has; the frames after it are answered.",
        ),
    ] = 0


class FindMessageQuery(BaseModel):
    provider_message_id: Annotated[
        str,
        Field(
            min_length=1,
            max_length=512,
            pattern=r"^[^\x00-\x1f\x7f]+$",
            description="A WhatsApp wamid or an Instagram mid.",
        ),
    ]
    channel: Channel | None = None


# -- responses (what the handlers below write) ------------------------------------------


class ConversationOut(BaseModel):
    id: str
    org_id: str
    channel: Channel
    contact: str
    last_seq: int = Field(ge=0, description="The seq of the conversation's latest change.")
    created_at: datetime


class MessageOut(BaseModel):
    id: str
    conversation_id: str
    direction: Literal["out", "in"] = Field(
        description="`out`: an agent's, sent by us; `in`: the customer's. A customer's "
        "message is DELIVERED once it reached us, READ once an agent read it."
    )
    text: str
    client_message_id: str
    provider_message_id: str | None
    status: StatusName
    seq: int | None = Field(
        description="The conversation seq of the message's latest applied change."
    )
    created_at: datetime
    sent_at: datetime | None
    delivered_at: datetime | None
    read_at: datetime | None
    failed_at: datetime | None
    error: ProviderErrorOut | None
    media_id: str | None = Field(
        description="The medium it carries (`getMedia` gives its URL); `text` is its caption."
    )
    template: Template | None = Field(
        description="The WhatsApp template it is (`text` is then empty)."
    )
    tag: Literal["HUMAN_AGENT"] | None = Field(
        description="The Instagram message tag it is sent with: `HUMAN_AGENT` for an "
        "agent's answer more than 23 h after the customer's last message."
    )
    media: InboundMediaOut | None = Field(
        description="A customer's medium (null for an agent's message, and for a "
        "customer's without one): its fetch's `state`, `media_id` once stored."
    )


class MessageWithHistory(MessageOut):
    history: list[ChangeFrame] = Field(description="The message's changes, in order.")


class MessageList(BaseModel):
    messages: list[MessageOut]


class Accepted(BaseModel):
    message_id: str
    status: StatusName = Field(
        description="PENDING for a new message; a retry answers the first message's status."
    )


class Read(BaseModel):
    message_id: str
    status: Literal["READ"]


class Changes(BaseModel):
    conversation_id: str
    last_seq: int = Field(ge=0)
    complete: bool = Field(
        description="False when more frames follow than one answer holds: ask again with "
        "`since` = the last frame's seq."
    )
    frames: list[ChangeFrame]


def conversation_json(conversation: Conversation) -> dict[str, Any]:
    return {
        "id": conversation.id,
        "org_id": conversation.org_id,
        "channel": conversation.channel,
        "contact": conversation.contact,
        "last_seq": conversation.last_seq,
        "created_at": format_time(conversation.created_at),
    }


def message_json(message: Message) -> dict[str, Any]:
    state = message.state

    def when(value: Any) -> str | None:
        return format_time(value) if value is not None else None

    return {
        "id": message.id,
        "conversation_id": message.conversation_id,
        "direction": message.direction,
        "text": message.text,
        "client_message_id": message.client_message_id,
        "provider_message_id": message.provider_message_id,
        "status": state.status.value,
        "seq": message.seq,
        "created_at": format_time(message.created_at),
        "sent_at": when(state.sent_at),
        "delivered_at": when(state.delivered_at),
        "read_at": when(state.read_at),
        "failed_at": when(state.failed_at),
        "error": {"code": state.error.code, "title": state.error.title} if state.error else None,
        "media_id": message.media_id,
        "template": json.loads(message.template) if message.template else None,
        "tag": message.tag,
        "media": media_json(message),
    }


ModelT = TypeVar("ModelT", bound=BaseModel)


def _refusal(exc: ValidationError, kind: str) -> ApiError:
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first["loc"])
    message = f"{kind} {where!r}: {first['msg']}" if where else first["msg"]
    return ApiError(400, "bad_request", message)


async def _body(request: Request, model: type[ModelT]) -> ModelT:
    raw = await request.body()
    try:
        return model.model_validate_json(raw or b"{}")
    except ValidationError as exc:
        raise _refusal(exc, "field") from exc


def _query(request: Request, model: type[ModelT]) -> ModelT:
    try:
        return model.model_validate(dict(request.query_params))
    except ValidationError as exc:
        raise _refusal(exc, "query") from exc


class HttpApi(RoleDefaults):
    """Routes of the api role's HTTP side (the hub lives in `whatslike.hub.server`)."""

    name = "api"

    def __init__(self, deps: Deps, media: MediaStore) -> None:
        self._store = deps.store
        self._media = media
        self._handoffs = deps.handoffs
        self._settings = deps.settings
        self._tokens = TokenService.from_settings(deps.settings, deps.jwt_secret)
        self._org_limit = OrgRateLimit(
            deps.settings.org_requests_per_s, deps.settings.org_request_burst
        )

    def operations(self) -> list[Operation]:
        no_conversation = {404: "No such conversation in the caller's organization."}
        no_message = {404: "No such message in the caller's organization."}
        to_conversation = {"id": "$response.body#/id"}
        return [
            Operation(
                "POST",
                "/api/conversations",
                self.create_conversation,
                "createConversation",
                "Open a conversation with a contact on a channel",
                "conversations",
                201,
                Reply("The new conversation.", ConversationOut),
                body=NewConversation,
                links=[
                    Link("getConversation", to_conversation),
                    Link("sendMessage", to_conversation),
                    Link("listMessages", to_conversation),
                    Link("listChanges", to_conversation),
                ],
            ),
            Operation(
                "GET",
                "/api/conversations/{id}",
                self.get_conversation,
                "getConversation",
                "A conversation",
                "conversations",
                200,
                Reply("The conversation.", ConversationOut),
                path_params=ConversationPath,
                errors=no_conversation,
            ),
            Operation(
                "POST",
                "/api/conversations/{id}/messages",
                self.send_message,
                "sendMessage",
                "Send a text message, a medium or a template",
                "messages",
                202,
                Reply(
                    "The message and the work of sending it are stored; its statuses "
                    "follow over the WebSocket and `listChanges`.",
                    Accepted,
                ),
                body=NewMessage,
                path_params=ConversationPath,
                errors={
                    404: "No such conversation, or no such medium, in the caller's organization.",
                    422: "`outside_window`: the customer service window is closed for a "
                    "free-form message (24 h after the customer's last message; on "
                    "Instagram 7 days, with the HUMAN_AGENT tag after 23 h; enforced per "
                    "`CUSTOMER_WINDOW`; a template is never refused for it); "
                    "`media_unsupported`: a medium Instagram does not take (its type or "
                    "size; a caption with it); `template_unsupported`: a template on "
                    "Instagram.",
                },
                links=[Link("getMessage", {"message_id": "$response.body#/message_id"})],
                hot=True,
            ),
            Operation(
                "GET",
                "/api/conversations/{id}/messages",
                self.list_messages,
                "listMessages",
                "A conversation's messages, both directions, with their statuses",
                "messages",
                200,
                Reply("The messages, oldest first.", MessageList),
                path_params=ConversationPath,
                errors=no_conversation,
            ),
            Operation(
                "POST",
                "/api/conversations/{id}/messages/{message_id}/read",
                self.read_message,
                "readMessage",
                "Mark a customer's message read, and tell Meta",
                "messages",
                202,
                Reply(
                    "Its READ is stored (once: reads made again apply as one); once it "
                    "is applied, a `status` frame follows and the read receipt goes to "
                    "Meta, once.",
                    Read,
                ),
                path_params=ConversationMessagePath,
                errors={
                    404: "No such message in this conversation of the caller's organization.",
                    409: "The message is an agent's (`direction` `out`), not the customer's "
                    "(`not_inbound`); or its medium is still being fetched from Meta "
                    "(`not_arrived`: read it once its `message` frame came).",
                },
            ),
            Operation(
                "GET",
                "/api/conversations/{id}/changes",
                self.changes,
                "listChanges",
                "A conversation's changes after a seq",
                "messages",
                200,
                Reply(
                    "The frames after `since` (statuses, customers' messages), in seq order.",
                    Changes,
                ),
                path_params=ConversationPath,
                query=ChangesQuery,
                errors=no_conversation,
            ),
            Operation(
                "GET",
                "/api/messages/{message_id}",
                self.get_message,
                "getMessage",
                "A message with its status history",
                "messages",
                200,
                Reply("The message.", MessageWithHistory),
                path_params=MessagePath,
                errors=no_message,
            ),
            Operation(
                "GET",
                "/api/messages",
                self.find_message,
                "findMessage",
                "The message a provider knows by its id",
                "messages",
                200,
                Reply("The message.", MessageWithHistory),
                query=FindMessageQuery,
                errors=no_message,
            ),
        ]

    def identity(self, request: Request) -> Identity:
        token = bearer_token(request.headers.get("authorization"))
        if token is None:
            raise ApiError(401, "unauthorized", "an Authorization: Bearer token is required")
        try:
            identity = self._tokens.verify(token)
        except InvalidToken as exc:
            raise ApiError(401, "unauthorized", str(exc)) from exc
        if not self._org_limit.allow(identity.org_id):
            wait_s = self._org_limit.retry_after_s()
            raise ApiError(
                429,
                "rate_limited",
                f"too many requests for this organization; retry after {wait_s} s",
                headers={"Retry-After": str(wait_s)},
            )
        conversation_id = request.path_params.get("id")
        if conversation_id is not None and not valid_id(conversation_id):
            raise ApiError(400, "bad_request", "a conversation id is 1-128 of A-Z a-z 0-9 _ . : -")
        return identity

    async def _conversation(self, request: Request, identity: Identity) -> Conversation:
        conversation = await self._store.get_conversation(
            identity.org_id, request.path_params["id"]
        )
        if conversation is None:
            raise ApiError(404, "not_found", "no such conversation")
        return conversation

    async def create_conversation(self, request: Request) -> Response:
        identity = self.identity(request)
        body = await _body(request, NewConversation)
        conversation = await self._store.create_conversation(
            identity.org_id, body.channel, body.contact
        )
        return JSONResponse(conversation_json(conversation), status_code=201)

    async def get_conversation(self, request: Request) -> Response:
        identity = self.identity(request)
        return JSONResponse(conversation_json(await self._conversation(request, identity)))

    async def send_message(self, request: Request) -> Response:
        identity = self.identity(request)
        conversation = await self._conversation(request, identity)
        body = await _body(request, NewMessage)
        if body.media_id:
            await self._check_media(identity, conversation, body.media_id, body.text)
        tag = None
        if body.template is not None:
            # Meta's templates are WhatsApp's; they are sent outside the window too.
            if conversation.channel != "whatsapp":
                raise ApiError(
                    422,
                    "template_unsupported",
                    "templates are WhatsApp's: Instagram has none (answer within 24 h of "
                    "the customer's last message, or 7 days with the HUMAN_AGENT tag)",
                )
        elif self._settings.enforces_customer_window:
            tag = await self._check_window(conversation)
        # The message and the work of sending it (an outbox entry) are stored in one
        # transaction before the 202; a retry with the same client_message_id answers the
        # same message and adds no work. The relay hands the entry to the bus.
        message, created = await self._store.create_message(
            conversation,
            body.text,
            body.client_message_id,
            body.media_id or None,
            template=canonical(body.template) if body.template is not None else None,
            tag=tag,
        )
        if created:
            self._handoffs.set()
        return JSONResponse(
            {"message_id": message.id, "status": message.status.value},
            status_code=202,
        )

    async def _check_window(self, conversation: Conversation) -> str | None:
        """A free-form message goes out only within the customer service window: 24 h
        after the customer's last message. On Instagram a human agent may answer for 7
        days with the HUMAN_AGENT tag: the tag this message is sent with, if any."""
        last = await self._store.last_inbound_at(conversation.id)
        if last is None:
            raise ApiError(
                422,
                "outside_window",
                "the customer has not written in this conversation: a free-form message "
                "can be sent only within 24 h of the customer's last message"
                + (" (use a template)" if conversation.channel == "whatsapp" else ""),
            )
        now = utcnow()
        if conversation.channel == "instagram":
            closed_at = last + HUMAN_AGENT_WINDOW
            if closed_at <= now:
                raise ApiError(
                    422,
                    "outside_window",
                    f"the customer service window closed at {format_time(closed_at)} (7 days "
                    "after the customer's last message, with the HUMAN_AGENT tag): a message "
                    "can no longer be sent",
                )
            return HUMAN_AGENT if now - last >= HUMAN_AGENT_FROM else None
        closed_at = last + CUSTOMER_WINDOW
        if closed_at <= now:
            raise ApiError(
                422,
                "outside_window",
                f"the customer service window closed at {format_time(closed_at)} (24 h "
                "after the customer's last message): a free-form message can no longer "
                "be sent; a template can",
            )
        return None

    async def read_message(self, request: Request) -> Response:
        identity = self.identity(request)
        message_id = request.path_params["message_id"]
        if not valid_id(message_id):
            raise ApiError(400, "bad_request", "a message id is 1-128 of A-Z a-z 0-9 _ . : -")
        conversation = await self._conversation(request, identity)
        try:
            if await mark_read(self._store, conversation, message_id):
                self._handoffs.set()
        except ReadRefused as exc:
            raise ApiError(exc.status, exc.code, exc.message) from exc
        return JSONResponse({"message_id": message_id, "status": "READ"}, status_code=202)

    async def _check_media(
        self, identity: Identity, conversation: Conversation, media_id: str, caption: str
    ) -> None:
        record = await self._media.record(identity.org_id, media_id)
        if record is None:
            raise ApiError(404, "not_found", "no such media")
        if conversation.channel == "instagram":
            if caption:
                raise ApiError(
                    422,
                    "media_unsupported",
                    "Instagram sends a medium without a caption: send the text as a "
                    "message of its own",
                )
            try:
                instagram_attachment(record.content_type, record.size)
            except MediaRefused as exc:
                raise ApiError(422, exc.code, exc.message) from exc

    async def get_message(self, request: Request) -> Response:
        """One message of the caller's organization, with its status history."""
        identity = self.identity(request)
        message_id = request.path_params["message_id"]
        if not valid_id(message_id):
            raise ApiError(400, "bad_request", "a message id is 1-128 of A-Z a-z 0-9 _ . : -")
        return await self._with_history(identity, await self._store.get_message(message_id))

    async def find_message(self, request: Request) -> Response:
        """The caller's message the provider knows by `provider_message_id` (a WhatsApp
        wamid or an Instagram mid), on `channel` or on either."""
        identity = self.identity(request)
        query = _query(request, FindMessageQuery)
        found = None
        for name in [query.channel] if query.channel else CHANNELS:
            found = await self._store.find_by_provider_id(name, query.provider_message_id)
            if found is None:  # a customer's message: its id is made from Meta's
                found = await self._store.get_message(
                    inbound_message_id(name, query.provider_message_id)
                )
            if found is not None and found.org_id == identity.org_id:
                break
        return await self._with_history(identity, found)

    async def _with_history(self, identity: Identity, message: Message | None) -> Response:
        # Another organization's message answers exactly like one that does not exist.
        if message is None or message.org_id != identity.org_id:
            raise ApiError(404, "not_found", "no such message")
        history = await self._store.message_history(message.id)
        # The frames are stored as JSON text; splice them in rather than re-encoding.
        head = json.dumps(message_json(message))[:-1]
        return Response(
            f'{head}, "history": [{",".join(history)}]}}', media_type="application/json"
        )

    async def list_messages(self, request: Request) -> Response:
        identity = self.identity(request)
        messages = await self._store.list_messages(identity.org_id, request.path_params["id"])
        if messages is None:
            raise ApiError(404, "not_found", "no such conversation")
        return JSONResponse({"messages": [message_json(m) for m in messages]})

    async def changes(self, request: Request) -> Response:
        identity = self.identity(request)
        conversation = await self._conversation(request, identity)
        raw_since = request.query_params.get("since", "0")
        # isdigit() alone admits "²" and digit strings int() refuses to convert.
        if not (raw_since.isascii() and raw_since.isdigit() and len(raw_since) <= 18):
            raise ApiError(400, "bad_request", "query 'since' must be a non-negative integer")
        changes = await self._store.changes_since(
            conversation.id, int(raw_since), self._settings.replay_limit
        )
        # The frames are stored as JSON text; splice them in rather than re-encoding.
        head = json.dumps(
            {
                "conversation_id": conversation.id,
                "last_seq": changes.last_seq,
                "complete": changes.complete,
            }
        )[:-1]
        body = f'{head}, "frames": [{",".join(changes.frames)}]}}'
        return Response(body, media_type="application/json")
