"""Campaigns over HTTP (protocol.md §5), and the api role's background part that creates
their messages (see `whatslike.campaigns` for the rules).

`POST /api/campaigns` answers 202 once the campaign and all its recipients are stored in
one transaction. The background part then creates the messages in batches while the
channel's send queue holds less than `CAMPAIGN_QUEUE_S` of its rate; a batch (messages,
their outbox entries, the recipients' progress and the queued count) is one transaction,
so after a kill it resumes where the last commit left off and never sends a contact twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from whatslike import campaigns
from whatslike.api.contract import Link, Operation, Reply
from whatslike.api.errors import ApiError
from whatslike.api.http import Channel, Contact, MessageOut, _body, _query, message_json
from whatslike.auth import Identity
from whatslike.clock import format_time
from whatslike.errors import BackendUnavailable
from whatslike.events import CAMPAIGN_HINT, campaign_channel
from whatslike.hub.frames import valid_id
from whatslike.roles import BackgroundRole, Deps
from whatslike.store.base import Campaign, NewCampaign
from whatslike.templates import Template, canonical

log = logging.getLogger(__name__)

#: While campaigns have messages to create, the background part looks again this often.
TICK_S = 0.05
#: With none, it waits this long for another process's (or is woken by this one's).
IDLE_S = 1.0
#: Campaigns looked at per turn, oldest first.
RUN_LIMIT = 100
#: Recipients per page of `listCampaignMessages`.
PAGE_LIMIT = 1000

# -- requests ---------------------------------------------------------------------------


class TextContent(BaseModel):
    """A text message: free-form, so it reaches only customers within the window."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["text"] = "text"
    text: Annotated[str, Field(min_length=1, max_length=4096)]


class TemplateContent(BaseModel):
    """A WhatsApp template: what reaches customers outside the customer service window."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["template"]
    template: Template


Content = TextContent | TemplateContent


class NewCampaignBody(BaseModel):
    # A template only on WhatsApp (Instagram has none): 422 `template_unsupported`.
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "anyOf": [
                {"properties": {"channel": {"const": "whatsapp"}}},
                {"properties": {"message": {"not": {"required": ["template"]}}}},
            ]
        },
    )
    client_campaign_id: Annotated[
        str,
        Field(
            min_length=1,
            max_length=128,
            description="The caller's key: the same key with the same request answers the "
            "first campaign; with another request, 409.",
        ),
    ]
    channel: Channel
    message: Content
    contacts: Annotated[
        list[Contact],
        Field(
            min_length=1,
            max_length=campaigns.MAX_CONTACTS,
            description="Who gets the message; a contact given twice gets it once.",
        ),
    ]


class CampaignPath(BaseModel):
    campaign_id: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:-]{1,128}$")]


class RecipientsQuery(BaseModel):
    after: Annotated[
        int,
        Field(ge=-1, le=campaigns.MAX_CONTACTS, description="The recipients after this position."),
    ] = -1
    limit: Annotated[int, Field(ge=1, le=PAGE_LIMIT)] = PAGE_LIMIT


# -- responses --------------------------------------------------------------------------


class Counts(BaseModel):
    waiting: int = Field(ge=0, description="Recipients whose message is not created yet.")
    queued: int = Field(ge=0, description="Messages PENDING: waiting to be sent.")
    sent: int = Field(ge=0)
    delivered: int = Field(ge=0)
    read: int = Field(ge=0)
    failed: int = Field(ge=0)
    failed_by_code: dict[str, int] = Field(description="FAILED messages by provider error code.")


class CampaignOut(BaseModel):
    id: str
    client_campaign_id: str
    channel: Channel
    message: Content
    total: int = Field(ge=1, description="Distinct recipients.")
    created_at: datetime
    counts: Counts = Field(
        description="Each recipient in exactly one count: its message's status (the counts "
        "move in the same transaction as the statuses)."
    )
    finished: bool = Field(description="Every message created and none PENDING.")


class Recipient(BaseModel):
    position: int = Field(ge=0)
    contact: str
    message: MessageOut | None = Field(description="None until its message is created.")


class RecipientList(BaseModel):
    recipients: list[Recipient]
    next_after: int | None = Field(description="Ask again with `after` = this, if not null.")


def campaign_json(campaign: Campaign) -> dict[str, Any]:
    counts = campaigns.funnel(campaign.total, campaign.created, campaign.counts)
    return {
        "id": campaign.id,
        "client_campaign_id": campaign.client_campaign_id,
        "channel": campaign.channel,
        "message": (
            {"type": "template", "template": json.loads(campaign.template)}
            if campaign.template
            else {"type": "text", "text": campaign.text}
        ),
        "total": campaign.total,
        "created_at": format_time(campaign.created_at),
        "counts": counts,
        "finished": counts["waiting"] == 0 and counts["queued"] == 0,
    }


class Campaigns(BackgroundRole):
    """The campaign operations of the api role, and its background part."""

    name = "campaigns"

    def __init__(self, deps: Deps, identity: Callable[[Request], Identity]) -> None:
        self._store = deps.store
        self._settings = deps.settings
        self._handoffs = deps.handoffs
        self._fanout = deps.fanout
        self._identity = identity
        self._wake = asyncio.Event()

    def operations(self) -> list[Operation]:
        no_campaign = {404: "No such campaign in the caller's organization."}
        to_campaign = {"campaign_id": "$response.body#/id"}
        return [
            Operation(
                "POST",
                "/api/campaigns",
                self.create,
                "createCampaign",
                "Send one message to many contacts of a channel",
                "campaigns",
                202,
                Reply(
                    "The campaign and all its recipients are stored; its messages are "
                    "created and sent at the channel's pace, its counts move live.",
                    CampaignOut,
                ),
                body=NewCampaignBody,
                errors={
                    409: "The key names a campaign made with another request.",
                    422: "`template_unsupported`: a template on Instagram.",
                },
                links=[
                    Link("getCampaign", to_campaign),
                    Link("listCampaignMessages", to_campaign),
                ],
                description="At most 10,000 contacts and a 2 MiB body.",
            ),
            Operation(
                "GET",
                "/api/campaigns/{campaign_id}",
                self.get,
                "getCampaign",
                "A campaign with its live counts",
                "campaigns",
                200,
                Reply("The campaign.", CampaignOut),
                path_params=CampaignPath,
                errors=no_campaign,
            ),
            Operation(
                "GET",
                "/api/campaigns/{campaign_id}/messages",
                self.recipients,
                "listCampaignMessages",
                "A campaign's recipients with their messages",
                "campaigns",
                200,
                Reply("The recipients after `after`, in order.", RecipientList),
                path_params=CampaignPath,
                query=RecipientsQuery,
                errors=no_campaign,
            ),
        ]

    async def create(self, request: Request) -> Response:
        identity = self._identity(request)
        body = await _body(request, NewCampaignBody)
        given = body.model_dump(exclude={"client_campaign_id"})
        message = body.message
        if isinstance(message, TemplateContent) and body.channel != "whatsapp":
            raise ApiError(
                422, "template_unsupported", "templates are WhatsApp's: Instagram has none"
            )
        new = NewCampaign(
            org_id=identity.org_id,
            client_campaign_id=body.client_campaign_id,
            fingerprint=campaigns.fingerprint(given),
            channel=body.channel,
            text=message.text if isinstance(message, TextContent) else "",
            contacts=campaigns.distinct(body.contacts),
            template=canonical(message.template) if isinstance(message, TemplateContent) else None,
        )
        campaign, created = await self._store.create_campaign(new)
        if not created and campaign.fingerprint != new.fingerprint:
            raise ApiError(
                409, "conflict", "client_campaign_id names a campaign made with another request"
            )
        if created:
            self._wake.set()
        return JSONResponse(campaign_json(campaign), status_code=202)

    async def get(self, request: Request) -> Response:
        identity = self._identity(request)
        campaign = await self._store.get_campaign(identity.org_id, _campaign_id(request))
        if campaign is None:
            raise ApiError(404, "not_found", "no such campaign")
        return JSONResponse(campaign_json(campaign))

    async def recipients(self, request: Request) -> Response:
        identity = self._identity(request)
        campaign_id = _campaign_id(request)
        query = _query(request, RecipientsQuery)
        found = await self._store.campaign_recipients(
            identity.org_id, campaign_id, query.after, query.limit
        )
        if found is None:
            raise ApiError(404, "not_found", "no such campaign")
        return JSONResponse(
            {
                "recipients": [
                    {
                        "position": r.position,
                        "contact": r.contact,
                        "message": message_json(r.message) if r.message else None,
                    }
                    for r in found
                ],
                "next_after": found[-1].position if len(found) == query.limit else None,
            }
        )

    # -- the background part ---------------------------------------------------------

    async def run_forever(self) -> None:
        while True:
            try:
                running = await self.turn()
            except BackendUnavailable as exc:
                log.warning("campaigns: the store is out of reach (%s); trying again", exc)
                running = False
            if running:
                await asyncio.sleep(TICK_S)
            else:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(IDLE_S):
                        await self._wake.wait()
                self._wake.clear()

    async def turn(self) -> bool:
        """Create the messages the channels' send queues have room for; answer whether
        any campaign still has messages to create."""
        to_run = await self._store.campaigns_to_run(RUN_LIMIT)
        backlog: dict[str, int] = {}
        for campaign in to_run:
            channel = campaign.channel
            if channel not in backlog:
                backlog[channel] = await self._store.campaign_backlog(channel)
            room = campaigns.room(self._settings, channel, backlog[channel])
            if room:
                made = await self._store.campaign_step(campaign.id, room)
                backlog[channel] += made
                if made:
                    self._handoffs.set()
                    await self._hint(campaign.id)
        return bool(to_run)

    async def _hint(self, campaign_id: str) -> None:
        """Tell the hubs that follow the campaign that its counts moved (waiting to
        queued). Lost (the fan-out away, or a kill before it), the next hint brings the
        same news: every message made goes on to SENT or FAILED, which hints again."""
        try:
            await self._fanout.publish(campaign_channel(campaign_id), CAMPAIGN_HINT)
        except BackendUnavailable as exc:
            log.warning("campaigns: no hint for %s (%s)", campaign_id, exc)


def _campaign_id(request: Request) -> str:
    campaign_id: str = request.path_params["campaign_id"]
    if not valid_id(campaign_id):
        raise ApiError(400, "bad_request", "a campaign id is 1-128 of A-Z a-z 0-9 _ . : -")
    return campaign_id
