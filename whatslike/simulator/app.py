"""The simulator role: a stand-in for Meta's Graph API. It answers sends like Meta, then
POSTs signed status webhooks back, with delays, failures and (on request) disorder.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import aiohttp
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from whatslike.api.contract import Operation
from whatslike.connectors.meta import SIGNATURE_HEADER, error_response, read_body, sign
from whatslike.connectors.pacing import TokenBucket
from whatslike.errors import BackendUnavailable
from whatslike.http_client import NotSent, OutcomeUnknown
from whatslike.media.limits import MediaRefused, instagram_attachment, media_type
from whatslike.media.store import UploadCheck
from whatslike.roles import Deps
from whatslike.settings import Settings, simulator_database
from whatslike.simulator import payloads
from whatslike.simulator.schedule import Backoff, Delivery, Planned, WebhookSchedule

log = logging.getLogger(__name__)

WORKERS = 4
#: Customers whose pair rate the simulator keeps track of at most (see RateLimits).
MAX_PAIR_BUCKETS = 100_000
MAX_REQUEST_BYTES = 64 * 1024
#: Media the simulator holds for its customers (Graph's media endpoints serve them); the
#: oldest is forgotten past this many.
MAX_MEDIA = 256
#: How long the fetch of a medium sent by link may take, whole.
MEDIA_FETCH_S = 30.0
MAX_DELAY_MS = 600_000
#: At most one warning about failed webhook attempts per this many seconds.
FAILURE_LOG_INTERVAL_S = 5.0

#: Customers whose last message the simulator keeps (for the window) at most; the one
#: that wrote longest ago is forgotten past this many.
MAX_CUSTOMERS = 100_000
#: The customer service window, and Instagram's with the HUMAN_AGENT tag (seconds).
WINDOW_S = 24 * 3600
HUMAN_AGENT_WINDOW_S = 7 * 24 * 3600
#: How long ago a customer's reply may say it was written (`ago_s`), for window tests.
MAX_REPLY_AGO_S = 30 * 24 * 3600

#: What the customer answers in auto-reply mode.
AUTO_REPLIES = ("Oi! Recebi, obrigada.", "Pode entregar amanhã?", "Perfeito 👍", "Qual o prazo?")

# How often each kind of disorder happens when disorder is on.
P_EARLY_WEBHOOK = 0.25
P_DUPLICATE = 0.3
P_REORDER = 0.5
P_SKIP_DELIVERED = 0.25
P_NO_CALLBACK_DATA = 0.3
P_BATCH = 0.3


@dataclass(frozen=True, slots=True)
class Controls:
    """What `/simulator/control` reads and changes at runtime."""

    disorder: bool
    failure_rate: float
    delay_ms: int
    #: The customer answers every message (after its statuses): the demo's two-way chat.
    auto_reply: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "disorder": self.disorder,
            "failure_rate": self.failure_rate,
            "delay_ms": self.delay_ms,
            "auto_reply": self.auto_reply,
        }


def changed_controls(current: Controls, data: Any) -> Controls:
    """The controls after a `POST /simulator/control` body; ValueError names a bad field."""
    if not isinstance(data, dict):
        raise ValueError("the body must be a JSON object")
    unknown = sorted(set(data) - {"disorder", "failure_rate", "delay_ms", "auto_reply"})
    if unknown:
        raise ValueError(f"unknown field {unknown[0]!r}")
    controls = current
    if "disorder" in data:
        if not isinstance(data["disorder"], bool):
            raise ValueError("disorder must be true or false")
        controls = replace(controls, disorder=data["disorder"])
    if "failure_rate" in data:
        rate = data["failure_rate"]
        if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0 <= rate <= 1:
            raise ValueError("failure_rate must be a number from 0 to 1")
        controls = replace(controls, failure_rate=float(rate))
    if "auto_reply" in data:
        if not isinstance(data["auto_reply"], bool):
            raise ValueError("auto_reply must be true or false")
        controls = replace(controls, auto_reply=data["auto_reply"])
    if "delay_ms" in data:
        delay = data["delay_ms"]
        if isinstance(delay, bool) or not isinstance(delay, int) or not 0 <= delay <= MAX_DELAY_MS:
            raise ValueError(f"delay_ms must be an integer from 0 to {MAX_DELAY_MS}")
        controls = replace(controls, delay_ms=delay)
    return controls


@dataclass(frozen=True, slots=True)
class CustomerReply:
    """A `POST /simulator/reply` body: the customer `contact` writes `text` on `channel`,
    or sends the medium `media_id` (of `POST /simulator/media`; `text` its caption,
    `filename` a document's name), `ago_s` seconds ago (0 if not given)."""

    channel: str
    contact: str
    text: str
    ago_s: float = 0.0
    media_id: str = ""
    filename: str = ""


def customer_reply(data: Any) -> CustomerReply:
    """The reply a `POST /simulator/reply` body asks for; ValueError says why not."""
    if not isinstance(data, dict):
        raise ValueError("the body must be a JSON object")
    unknown = sorted(set(data) - {"channel", "contact", "text", "ago_s", "media_id", "filename"})
    if unknown:
        raise ValueError(f"unknown field {unknown[0]!r}")
    channel, contact, text = data.get("channel"), data.get("contact"), data.get("text", "")
    media_id, filename = data.get("media_id", ""), data.get("filename", "")
    if channel not in ("whatsapp", "instagram"):
        raise ValueError("channel must be whatsapp or instagram")
    if not isinstance(contact, str) or not 0 < len(contact) <= 128 or not contact.isprintable():
        raise ValueError("contact must be 1 to 128 printable characters")
    if not isinstance(media_id, str) or not (media_id == "" or media_id.isdigit()):
        raise ValueError("media_id must be an id of POST /simulator/media")
    if not isinstance(filename, str) or len(filename) > 240 or not filename.isprintable():
        raise ValueError("filename must be at most 240 printable characters")
    shortest = 0 if media_id else 1
    if not isinstance(text, str) or not shortest <= len(text) <= payloads.WHATSAPP_TEXT_LIMIT:
        raise ValueError(f"text must be {shortest} to {payloads.WHATSAPP_TEXT_LIMIT} characters")
    ago_s = data.get("ago_s", 0)
    if (
        isinstance(ago_s, bool)
        or not isinstance(ago_s, int | float)
        or not 0 <= ago_s <= MAX_REPLY_AGO_S
    ):
        raise ValueError(f"ago_s must be a number of seconds from 0 to {MAX_REPLY_AGO_S}")
    return CustomerReply(channel, contact, text, float(ago_s), media_id, filename)


def customer_key(channel: str, contact: str) -> tuple[str, str]:
    """Who a customer is to the simulator: a WhatsApp number by its digits, as Meta."""
    if channel == "whatsapp":
        return channel, "".join(ch for ch in contact if ch.isdigit())
    return channel, contact


class FailureLog:
    """Warnings about failed webhook attempts, at most one per interval: a connector that
    is down fails every pending delivery, which would flood the log. Never the URL (it may
    carry credentials) nor a body."""

    def __init__(self, interval_s: float = FAILURE_LOG_INTERVAL_S) -> None:
        self._interval_s = interval_s
        self._last = -interval_s
        self._quiet = 0

    def failed(self, delivery: Delivery, problem: str, retry_in_s: float) -> None:
        now = time.monotonic()
        if now - self._last < self._interval_s:
            self._quiet += 1
            return
        log.warning(
            "simulator %s webhook attempt %d failed (%s), next in %.1f s;"
            " %d other failed attempts since the last warning",
            delivery.channel,
            delivery.failures,
            problem,
            retry_in_s,
            self._quiet,
        )
        self._last, self._quiet = now, 0


class RateLimits:
    """Meta's throughput limit per business number (130429) and pair rate limit per
    customer (131056), when the settings switch them on. The customers' buckets are
    bounded: past `MAX_PAIR_BUCKETS`, the full (idle) ones are forgotten."""

    def __init__(self, settings: Settings, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        rate = settings.sim_sends_per_s
        self._number = TokenBucket(rate, max(1.0, rate / 10)) if rate else None
        self._pair_burst = settings.sim_pair_burst
        self._pair_rate = 1 / settings.sim_pair_interval_s
        self._pairs: dict[str, TokenBucket] = {}

    def refusal(self, recipient: str) -> JSONResponse | None:
        now = self._clock()
        if self._number is not None and not self._number.take(now):
            return _graph_error(400, 130429, "(#130429) Rate limit hit")
        if self._pair_burst:
            if len(self._pairs) >= MAX_PAIR_BUCKETS:
                self._pairs = {k: b for k, b in self._pairs.items() if not b.full(now)}
            bucket = self._pairs.setdefault(
                recipient, TokenBucket(self._pair_rate, self._pair_burst)
            )
            if not bucket.take(now):
                return _graph_error(
                    400,
                    131056,
                    "(#131056) (Business Account, Consumer Account) pair rate limit hit",
                )
        return None


class Simulator:
    name = "simulator"

    def __init__(self, deps: Deps) -> None:
        self._settings = deps.settings
        self._http = deps.http
        self._rng = random.Random(deps.settings.sim_seed)
        self.controls = Controls(
            disorder=deps.settings.sim_disorder,
            failure_rate=deps.settings.sim_failure_rate,
            delay_ms=deps.settings.sim_delay_ms,
        )
        self.schedule = WebhookSchedule(
            simulator_database(deps.settings), deps.settings.sim_queue_size
        )
        self._backoff = Backoff(scale=deps.settings.sim_time_scale)
        self._failures = FailureLog()
        self._limits = RateLimits(deps.settings)
        self._webhook_urls = deps.settings.sim_webhook_urls
        self._next_url = 0
        self._workers: list[asyncio.Task[None]] = []
        #: Read receipts taken, by channel and what they name (a wamid; an Instagram
        #: customer), for a test oracle: each should be told once.
        self.receipts: Counter[tuple[str, str]] = Counter()
        # The control changes every tenant's statuses: it needs its own token, except for
        # the demo's switch in the embedded mode on a loopback address.
        token = deps.settings.sim_control_token
        self._control_auth = f"Bearer {token}".encode() if token else None
        self._control_open = not token and deps.settings.development
        #: Graph media id → (MIME type, bytes): what a customer sent (`add_media`).
        self.media: dict[str, tuple[str, bytes]] = {}
        #: `customer_key` → when that customer last wrote (Unix time), the window's start.
        #: In memory: a restarted simulator has heard from no customer.
        self.last_written: dict[tuple[str, str], float] = {}
        self._templates = deps.settings.sim_template_set

    def operations(self) -> list[Operation]:
        return []  # outside the HTTP API's contract: its routes are below

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/simulator/control", self.control, methods=["GET", "POST"]),
            Route("/simulator/sends", self.sends, methods=["GET"]),
            Route("/simulator/receipts", self.receipts_seen, methods=["GET"]),
            Route("/simulator/reply", self.reply, methods=["POST"]),
            Route("/simulator/media", self.post_media, methods=["POST"]),
            Route("/simulator/media/{media_id}", self.media_download, methods=["GET"]),
            Route("/simulator/attachments/{media_id}", self.attachment, methods=["GET"]),
            Route("/simulator/{version}/{media_id}", self.media_url, methods=["GET"]),
            # Before the WhatsApp route, which would otherwise take "me" for a phone id.
            Route("/simulator/{version}/me/messages", self.instagram_send, methods=["POST"]),
            Route(
                "/simulator/{version}/{phone_number_id}/messages",
                self.whatsapp_send,
                methods=["POST"],
            ),
        ]

    async def start(self) -> None:
        resumed = await self.schedule.open()
        if resumed:
            log.info("simulator resumes %d pending webhook deliveries", resumed)
        self._workers = [
            asyncio.create_task(self._deliver_forever(), name=f"simulator-webhooks-{n}")
            for n in range(WORKERS)
        ]

    async def stop(self) -> None:
        for task in self._workers:
            task.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers = []
        # Nothing is lost: every pending delivery is on disk and resumes at the next start.
        log.info(
            "simulator stopped with %d webhook deliveries pending in %s",
            self.schedule.pending,
            self.schedule.path,
        )
        await self.schedule.close()

    # -- control ----------------------------------------------------------------------

    def _refused(self, request: Request) -> Response | None:
        """403 unless the control is open or the request carries its token."""
        if self._control_open:
            return None
        given = request.headers.get("authorization", "").encode()
        if self._control_auth is not None and hmac.compare_digest(given, self._control_auth):
            return None
        return error_response(
            403, "forbidden", "the simulator's control needs WHATSLIKE_SIM_CONTROL_TOKEN"
        )

    async def control(self, request: Request) -> Response:
        refused = self._refused(request)
        if refused is not None:
            return refused
        if request.method == "POST":
            body = await read_body(request, MAX_REQUEST_BYTES)
            try:
                if body is None:
                    raise ValueError("body too large")
                self.controls = changed_controls(self.controls, json.loads(body))
            except ValueError as exc:  # JSONDecodeError is a ValueError too
                return error_response(400, "bad_request", str(exc))
            log.info("simulator controls now %s", self.controls)
        return JSONResponse(self.controls.to_json())

    async def sends(self, request: Request) -> Response:
        """The accepted sends, for a test oracle: how many, under how many keys, and the
        keys sent more than once (keys: `payloads.whatsapp_send_key`, `instagram_send_key`).
        The keys name every organization's recipients and texts: guarded like the control."""
        refused = self._refused(request)
        if refused is not None:
            return refused
        try:
            return JSONResponse(await self.schedule.sends())
        except BackendUnavailable as exc:
            log.error("simulator cannot count sends: %s", exc)
            return error_response(503, "unavailable", "the simulator's database is unavailable")

    async def receipts_seen(self, request: Request) -> Response:
        """The read receipts taken: `{"whatsapp": {wamid: n}, "instagram": {id: n}}`."""
        refused = self._refused(request)
        if refused is not None:
            return refused
        seen: dict[str, dict[str, int]] = {"whatsapp": {}, "instagram": {}}
        for (channel, name), count in self.receipts.items():
            seen[channel][name] = count
        return JSONResponse(seen)

    async def reply(self, request: Request) -> Response:
        """The customer `contact` writes `text` on `channel`: its webhook is stored with
        the others (it survives a restart) and delivered now. Answers Meta's id of it."""
        refused = self._refused(request)
        if refused is not None:
            return refused
        raw = await read_body(request, MAX_REQUEST_BYTES)
        try:
            asked = customer_reply(json.loads(raw if raw is not None else b""))
        except ValueError as exc:
            return error_response(400, "bad_request", str(exc))
        now = time.time()
        if asked.media_id:
            provider_id, webhook = self._customer_medium(asked, now - asked.ago_s)
        else:
            provider_id, webhook = self._customer_message(
                asked.channel, asked.contact, asked.text, now - asked.ago_s
            )
        try:
            deliveries = await self.schedule.accept(None, [Planned(now, asked.channel, webhook)])
        except BackendUnavailable as exc:
            log.error("simulator cannot store a reply: %s", exc)
            return error_response(503, "unavailable", "the simulator's database is unavailable")
        if deliveries is None:
            return error_response(429, "rate_limited", "the simulator's webhook queue is full")
        for delivery in deliveries:
            self.schedule.put(delivery)
        return JSONResponse({"provider_message_id": provider_id}, status_code=202)

    def _customer_message(
        self, channel: str, contact: str, text: str, at: float
    ) -> tuple[str, bytes]:
        """Meta's id and the webhook of a customer's message sent at `at`."""
        self._wrote(channel, contact, at)
        if channel == "whatsapp":
            provider_id = payloads.new_wamid()
            message = payloads.whatsapp_message(contact, provider_id, int(at), text)
            webhook = payloads.whatsapp_message_webhook(
                self._settings.whatsapp_phone_number_id, contact, [message]
            )
        else:
            provider_id = payloads.new_instagram_mid()
            account = self._settings.instagram_account_id
            at_ms = int(at * 1000)
            item = payloads.instagram_message(account, contact, provider_id, text, at_ms)
            webhook = payloads.instagram_webhook(account, [item], at_ms)
        return provider_id, _encode(webhook)

    def _wrote(self, channel: str, contact: str, at: float) -> None:
        """The customer wrote at `at`: their window opens (or stays open) from then."""
        key = customer_key(channel, contact)
        last = max(at, self.last_written.pop(key, at))
        if len(self.last_written) >= MAX_CUSTOMERS:
            del self.last_written[next(iter(self.last_written))]
        self.last_written[key] = last

    def _customer_medium(self, asked: CustomerReply, at: float) -> tuple[str, bytes]:
        """Meta's id and the webhook of a customer's medium sent at `at`: on WhatsApp
        its Graph media id, MIME type and sha256 (a medium the simulator does not hold
        is named all the same: Graph then answers 404 for it); on Instagram an
        attachment whose URL the simulator serves without a token, like Meta's CDN."""
        self._wrote(asked.channel, asked.contact, at)
        content_type, data = self.media.get(asked.media_id, ("image/jpeg", b""))
        kind = _media_kind(content_type)
        if asked.channel == "whatsapp":
            provider_id = payloads.new_wamid()
            media: dict[str, Any] = {
                "mime_type": content_type,
                "sha256": hashlib.sha256(data).hexdigest(),
                "id": asked.media_id,
            }
            if asked.text and kind != "audio":
                media["caption"] = asked.text
            if kind == "document" and asked.filename:
                media["filename"] = asked.filename
            message = payloads.whatsapp_media_message(
                asked.contact, provider_id, int(at), kind, media
            )
            webhook = payloads.whatsapp_message_webhook(
                self._settings.whatsapp_phone_number_id, asked.contact, [message]
            )
        else:
            provider_id = payloads.new_instagram_mid()
            account = self._settings.instagram_account_id
            at_ms = int(at * 1000)
            url = f"{self._settings.effective_graph_url}/attachments/{asked.media_id}"
            attachment = "file" if kind == "document" else kind
            item = payloads.instagram_attachment_message(
                account, asked.contact, provider_id, (attachment, url), at_ms
            )
            webhook = payloads.instagram_webhook(account, [item], at_ms)
        return provider_id, _encode(webhook)

    async def attachment(self, request: Request) -> Response:
        """An Instagram attachment's URL (Meta's CDN): the bytes, with no token."""
        held = self.media.get(request.path_params["media_id"])
        if held is None:
            return error_response(404, "not_found", "no such attachment")
        return Response(held[1], media_type=held[0])

    def _receipt(self, channel: str, name: Any) -> Response:
        if not isinstance(name, str) or not name:
            return _graph_error(400, 100, "(#100) The read receipt names no message")
        self.receipts[(channel, name)] += 1
        return JSONResponse({"success": True})

    def add_media(self, content_type: str, data: bytes) -> str:
        """Hold a customer's medium; answer its Graph media id."""
        if len(self.media) >= MAX_MEDIA:
            del self.media[next(iter(self.media))]
        media_id = str(self._rng.randrange(10**15, 10**16))
        self.media[media_id] = (content_type, data)
        return media_id

    async def post_media(self, request: Request) -> Response:
        """A customer's medium (the body, its type in Content-Type, up to 64 KiB), for a
        test or the demo: answers `{"id"}`, the Graph media id an inbound message names.
        Guarded like the control."""
        refused = self._refused(request)
        if refused is not None:
            return refused
        body = await read_body(request, MAX_REQUEST_BYTES)
        if not body:
            return error_response(400, "bad_request", "the body is the medium (up to 64 KiB)")
        content_type = request.headers.get("content-type", "application/octet-stream")
        return JSONResponse({"id": self.add_media(content_type, body)})

    # -- Graph API --------------------------------------------------------------------

    def _token_refused(self, request: Request) -> Response | None:
        expected = f"Bearer {self._settings.meta_access_token}".encode()
        given = request.headers.get("authorization", "").encode()
        if hmac.compare_digest(given, expected):
            return None
        return _graph_error(401, 190, "Invalid OAuth access token - Cannot parse access token")

    async def media_url(self, request: Request) -> Response:
        """Graph's `GET /<media id>`: where to download a medium (with the same token)."""
        refused = self._token_refused(request)
        if refused is not None:
            return refused
        media_id = request.path_params["media_id"]
        held = self.media.get(media_id)
        if held is None:
            return _graph_error(404, 100, "(#100) Invalid media id")
        content_type, data = held
        return JSONResponse(
            {
                "messaging_product": "whatsapp",
                "url": f"{self._settings.effective_graph_url}/media/{media_id}",
                "mime_type": content_type,
                "sha256": hashlib.sha256(data).hexdigest(),
                "file_size": len(data),
                "id": media_id,
            }
        )

    async def media_download(self, request: Request) -> Response:
        """The download URL `media_url` answers: the bytes, with the access token only."""
        refused = self._token_refused(request)
        if refused is not None:
            return refused
        held = self.media.get(request.path_params["media_id"])
        if held is None:
            return _graph_error(404, 100, "(#100) Invalid media id")
        return Response(held[1], media_type=held[0])

    async def whatsapp_send(self, request: Request) -> Response:
        body, refusal = await self._accept(request)
        if refusal is not None:
            return refusal
        phone_number_id = request.path_params["phone_number_id"]
        if phone_number_id != self._settings.whatsapp_phone_number_id:
            return _graph_error(
                400,
                100,
                f"Unsupported post request. Object with ID '{phone_number_id}' does not exist,"
                " cannot be loaded due to missing permissions, or does not support this"
                " operation.",
                subcode=33,
            )
        if isinstance(body, dict) and body.get("status") == "read":
            return self._receipt("whatsapp", body.get("message_id"))
        problem = payloads.whatsapp_send_problem(body)
        if problem is not None:
            return _graph_error(400, 100, problem)
        refusal = self._limits.refusal(body["to"])
        if refusal is not None:
            return refusal
        kind = body.get("type", "text")
        if kind == "template":
            if payloads.template_of(body) not in self._templates:
                return _graph_error(
                    400, 132001, "(#132001) Template name does not exist in the translation"
                )
            # A template is what may be sent outside the window.
            window_open = True
        else:
            window_open = self._window_open("whatsapp", body["to"], WINDOW_S)
        if kind in payloads.MEDIA_KINDS:
            refusal = await self._fetch_media(kind, body[kind])
            if refusal is not None:
                return refusal
        wamid = payloads.new_wamid()
        callback_data = body.get("biz_opaque_callback_data", "")
        plan = self._plan_whatsapp(wamid, body["to"], callback_data, window_open=window_open)
        content = payloads.whatsapp_send_content(body)
        key = payloads.whatsapp_send_key(body["to"], content, callback_data)
        answer = payloads.whatsapp_send_answer(body["to"], wamid)
        # Like Meta, a send outside the window is taken, then fails (131047) by webhook.
        customer = ("whatsapp", body["to"]) if window_open else None
        return await self._answer(answer, plan, key, customer)

    def _window_open(self, channel: str, contact: str, window_s: float) -> bool:
        """Whether a free-form message may reach the customer: always, unless the
        simulator enforces the window; then only within `window_s` of its last message."""
        if not self._settings.sim_customer_window:
            return True
        last = self.last_written.get(customer_key(channel, contact))
        return last is not None and time.time() - last <= window_s

    async def _fetch_media(self, kind: str, media: dict[str, Any]) -> Response | None:
        """Like Meta, fetch a medium sent by link before accepting the send (a held one,
        sent by id, is there already): of a type of its kind and within its limit, or
        the send is refused with 131053. The bytes are counted, then dropped."""
        if "link" not in media:
            if media["id"] in self.media:
                return None
            return _graph_error(400, 131053, "(#131053) Media upload error: unknown media id")
        try:
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=MEDIA_FETCH_S)) as http,
                http.get(media["link"]) as answer,
            ):
                if answer.status != 200:
                    raise MediaRefused(422, "fetch", f"the link answered {answer.status}")
                found = media_type(answer.headers.get("content-type"))
                if found.kind != kind:
                    raise MediaRefused(415, "kind", f"a {found.kind} sent as {kind}")
                check = UploadCheck(found)
                async for chunk in answer.content.iter_chunked(65_536):
                    check.feed(chunk)
                check.finish()
        except (aiohttp.ClientError, TimeoutError, MediaRefused) as exc:
            return _graph_error(
                400, 131053, f"(#131053) Media upload error: could not use the link ({exc})"
            )
        return None

    async def _fetch_attachment(self, attachment: dict[str, Any]) -> Response | None:
        """Like Meta, fetch an Instagram attachment's URL before accepting the send: of a
        type Instagram takes for its attachment type, within its limit; else the send is
        refused (#100, "Upload attachment failure")."""
        try:
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=MEDIA_FETCH_S)) as http,
                http.get(attachment["payload"]["url"]) as answer,
            ):
                if answer.status != 200:
                    raise MediaRefused(422, "fetch", f"the URL answered {answer.status}")
                found = media_type(answer.headers.get("content-type"))
                check = UploadCheck(found)
                async for chunk in answer.content.iter_chunked(65_536):
                    check.feed(chunk)
                check.finish()
                if instagram_attachment(found.content_type, check.size) != attachment["type"]:
                    raise MediaRefused(415, "kind", f"{found.content_type} sent as {attachment}")
        except (aiohttp.ClientError, TimeoutError, MediaRefused) as exc:
            return _graph_error(400, 100, f"(#100) Upload attachment failure ({exc})")
        return None

    async def instagram_send(self, request: Request) -> Response:
        body, refusal = await self._accept(request)
        if refusal is not None:
            return refusal
        if isinstance(body, dict) and body.get("sender_action") == "mark_seen":
            recipient = body.get("recipient")
            return self._receipt(
                "instagram", recipient.get("id") if isinstance(recipient, dict) else None
            )
        problem = payloads.instagram_send_problem(body)
        if problem is not None:
            return _graph_error(400, 100, problem)
        attachment = body["message"].get("attachment")
        if attachment is not None:
            refusal = await self._fetch_attachment(attachment)
            if refusal is not None:
                return refusal
        recipient_id = body["recipient"]["id"]
        tagged = body.get("tag") == "HUMAN_AGENT"
        window_s = HUMAN_AGENT_WINDOW_S if tagged else WINDOW_S
        if not self._window_open("instagram", recipient_id, window_s):
            return _graph_error(
                400, 10, "(#10) This message is sent outside of allowed window.", subcode=2534022
            )
        # Instagram has no failure webhooks: a failure is a refused send.
        if self._rng.random() < self.controls.failure_rate:
            return _graph_error(
                400, 551, "(#551) This person isn't available right now.", subcode=1545041
            )
        mid = payloads.new_instagram_mid()
        plan = self._plan_instagram(mid, recipient_id)
        key = payloads.instagram_send_key(
            recipient_id, payloads.instagram_send_content(body["message"])
        )
        answer = payloads.instagram_send_answer(recipient_id, mid)
        return await self._answer(answer, plan, key, ("instagram", recipient_id))

    async def _accept(self, request: Request) -> tuple[Any, Response | None]:
        """The JSON body of an authorized send, or the refusal Meta would give."""
        expected = f"Bearer {self._settings.meta_access_token}".encode()
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, expected):
            return None, _graph_error(
                401, 190, "Invalid OAuth access token - Cannot parse access token"
            )
        raw = await read_body(request, MAX_REQUEST_BYTES)
        if raw is None:
            return None, _graph_error(413, 100, "(#100) The request body is too large")
        try:
            return json.loads(raw), None
        except ValueError:
            return None, _graph_error(400, 100, "(#100) The request body must be JSON")

    async def _answer(
        self,
        answer: dict[str, Any],
        plan: list[tuple[str, bytes]],
        send_key: str,
        customer: tuple[str, str] | None,
    ) -> Response:
        """Store the send and its webhooks (and, in auto-reply mode, the `customer`'s
        (channel, contact) answer after them, if it reached one), then answer; 429 when
        they do not fit."""
        step = self.controls.delay_ms / 1000
        now = time.time()
        offsets = _offsets(plan, self._rng, self.controls)
        planned = [
            Planned(now + offset * step, channel, body)
            for offset, (channel, body) in zip(offsets, plan, strict=True)
        ]
        if self.controls.auto_reply and customer is not None:
            at = now + (max(offsets, default=0) + 1) * step
            text = AUTO_REPLIES[self._rng.randrange(len(AUTO_REPLIES))]
            _, webhook = self._customer_message(*customer, text, at)
            planned.append(Planned(at, customer[0], webhook))
        try:
            deliveries = await self.schedule.accept(send_key, planned)
        except BackendUnavailable as exc:
            log.error("simulator cannot store a send: %s", exc)
            return _graph_error(503, 2, "(#2) Service temporarily unavailable", transient=True)
        if deliveries is None:
            return _graph_error(429, 4, "(#4) Application request limit reached", transient=True)
        early = None
        if self.controls.disorder and self._rng.random() < P_EARLY_WEBHOOK:
            early = deliveries.pop(0)
        for delivery in deliveries:
            self.schedule.put(delivery)
        if early is not None:
            # Before the answer, like Meta under load: the connector has no provider id yet.
            await self._attempt([early], wait_s=min(2.0, self._settings.send_timeout_s / 2))
        return JSONResponse(answer)

    # -- plans: what webhooks one send produces ---------------------------------------

    def _plan_whatsapp(
        self, wamid: str, to: str, callback_data: str, *, window_open: bool = True
    ) -> list[tuple[str, bytes]]:
        controls, rng = self.controls, self._rng
        names = ["sent"]
        error = None
        if not window_open:
            names, error = ["failed"], payloads.REENGAGEMENT
        elif rng.random() < controls.failure_rate:
            names.append("failed")
        else:
            if not (controls.disorder and rng.random() < P_SKIP_DELIVERED):
                names.append("delivered")
            names.append("read")
        now, step = time.time(), controls.delay_ms / 1000
        recipient_id = "".join(ch for ch in to if ch.isdigit())
        statuses = []
        for position, name in enumerate(names, start=1):
            omit = controls.disorder and rng.random() < P_NO_CALLBACK_DATA
            at = int(now + position * step)
            statuses.append(
                payloads.whatsapp_status(
                    wamid, name, at, recipient_id, None if omit else callback_data, error=error
                )
            )
        if controls.disorder:
            statuses += [dict(s) for s in statuses if rng.random() < P_DUPLICATE]
            if rng.random() < P_REORDER:
                rng.shuffle(statuses)
        batches: list[list[dict[str, Any]]] = []
        for status in statuses:
            if batches and controls.disorder and rng.random() < P_BATCH:
                batches[-1].append(status)
            else:
                batches.append([status])
        phone_number_id = self._settings.whatsapp_phone_number_id
        return [
            ("whatsapp", _encode(payloads.whatsapp_status_webhook(phone_number_id, batch)))
            for batch in batches
        ]

    def _plan_instagram(self, mid: str, recipient_id: str) -> list[tuple[str, bytes]]:
        account_id = self._settings.instagram_account_id
        seen_ms = int((time.time() + self.controls.delay_ms / 1000) * 1000)
        seen = payloads.instagram_seen(account_id, recipient_id, mid, seen_ms)
        body = _encode(payloads.instagram_webhook(account_id, [seen], seen_ms + 300))
        copies = 2 if self.controls.disorder and self._rng.random() < P_DUPLICATE else 1
        return [("instagram", body)] * copies

    # -- delivery ---------------------------------------------------------------------

    async def _deliver_forever(self) -> None:
        while True:
            first = await self.schedule.take()
            # Notifications due together go out together, as Meta sends them under load.
            await self._attempt(self.schedule.take_due(first, self._settings.sim_webhook_batch))

    async def _attempt(self, deliveries: list[Delivery], wait_s: float | None = None) -> None:
        """POST them once, as one webhook; on failure store and queue a retry of each with
        back-off, or give up on those whose retry horizon has passed."""
        body = (
            deliveries[0].body
            if len(deliveries) == 1
            else payloads.merge_webhooks([d.body for d in deliveries])
        )
        problem = await self._post(
            deliveries[0].channel, body, wait_s or self._settings.send_timeout_s
        )
        if problem is None:
            await self.schedule.settle(deliveries)
            return
        now = time.time()
        for delivery in deliveries:
            delivery.failures += 1
            due = self._backoff.next_due(delivery.first_due, now, delivery.failures, self._rng)
            if due is None:
                log.error(
                    "simulator gave up a %s webhook after %d attempts (%s)",
                    delivery.channel,
                    delivery.failures,
                    problem,
                )
                await self.schedule.settle([delivery])
                continue
            self._failures.failed(delivery, problem, due - now)
            delivery.due = due
            await self.schedule.retry(delivery)

    async def _post(self, channel: str, body: bytes, wait_s: float) -> str | None:
        """POST one webhook body; None when answered 2xx, else what went wrong."""
        self._next_url = (self._next_url + 1) % len(self._webhook_urls)
        url = f"{self._webhook_urls[self._next_url]}/webhooks/{channel}"
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "facebookexternalua",
            SIGNATURE_HEADER: sign(self._settings.meta_app_secret, body),
        }
        try:
            response = await self._http.post(url, body, headers, wait_s)
        except (NotSent, OutcomeUnknown) as exc:
            return str(exc).split(":", 1)[0]  # the failure's kind, never the URL
        if not response.ok:
            return f"HTTP {response.status}"
        return None


def _offsets(plan: list[tuple[str, bytes]], rng: random.Random, controls: Controls) -> list[float]:
    """When each planned webhook goes out, in steps of the delay: one step apart, with
    jitter in disorder mode so duplicates and batches interleave."""
    if not controls.disorder:
        return [float(n + 1) for n in range(len(plan))]
    return [n + 1 + rng.uniform(-0.5, 0.5) for n in range(len(plan))]


def _encode(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, separators=(",", ":")).encode()


def _graph_error(
    status_code: int,
    code: int,
    message: str,
    *,
    subcode: int | None = None,
    transient: bool | None = None,
) -> JSONResponse:
    body = payloads.meta_error(code, message, subcode=subcode, transient=transient)
    return JSONResponse(body, status_code=status_code)


def _media_kind(content_type: str) -> str:
    """The WhatsApp message type of a medium of this MIME type (a document when it is
    none Meta takes: Graph then names it all the same)."""
    try:
        return media_type(content_type).kind
    except MediaRefused:
        return "document"
