"""The Meta simulator: payload shapes against Meta's fixtures, Graph API answers and
errors, runtime controls, and signed webhooks delivered to a real HTTP server."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import sqlite3
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from tests.connectors.test_whatsapp import RecordingBus
from whatslike.api.contract import routes
from whatslike.connectors import instagram
from whatslike.connectors.instagram import InstagramRead
from whatslike.connectors.meta import CustomerMessage, signature_valid
from whatslike.connectors.whatsapp import WhatsAppConnector, WhatsAppStatus, parse_webhook
from whatslike.errors import ConfigError
from whatslike.events import TOPIC_STATUS, OutboundMessage, StatusEvent
from whatslike.fanout.memory import MemoryFanout
from whatslike.http_client import AiohttpClient, HttpClient
from whatslike.metrics import Metrics
from whatslike.roles import Deps
from whatslike.settings import Settings, load_settings
from whatslike.simulator import payloads
from whatslike.simulator.app import (
    MAX_DELAY_MS,
    Controls,
    RateLimits,
    Simulator,
    changed_controls,
    customer_reply,
)
from whatslike.status.rules import Status
from whatslike.store.sqlite import SQLiteStore

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "meta"
SECRET = "sim-secret"
TOKEN = "sim-token"
PHONE = "109876543210987"
ACCOUNT = "17841400000000001"
WA_SEND = f"/simulator/v21.0/{PHONE}/messages"
IG_SEND = "/simulator/v21.0/me/messages"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def whatsapp_statuses(payload: dict[str, Any]) -> list[WhatsAppStatus]:
    return [item for item in parse_webhook(payload).items if isinstance(item, WhatsAppStatus)]


def fixture(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((FIXTURES / name).read_bytes())
    return data


def settings(data_dir: Path, port: int = 8123, **overrides: Any) -> Settings:
    return load_settings(
        meta_app_secret=SECRET,
        meta_access_token=TOKEN,
        port=port,
        sim_seed=7,
        data_dir=data_dir,
        **overrides,
    )


def deps(config: Settings, http: HttpClient, store: Any = None) -> Deps:
    return Deps(
        settings=config,
        store=store,
        bus=RecordingBus(),
        fanout=MemoryFanout(),
        http=http,
        metrics=Metrics(),
        jwt_secret="x",
    )


def shape(value: Any) -> Any:
    """The keys of nested objects (values dropped), to compare shapes with fixtures."""
    if isinstance(value, dict):
        return {key: shape(item) for key, item in value.items()}
    if isinstance(value, list):
        return [shape(item) for item in value]
    return type(value).__name__


# -- payload builders against the fixtures ---------------------------------------------


def test_status_webhooks_have_the_fixture_shapes() -> None:
    for name, callback in (("sent", "msg_01JCXZ7Q3W"), ("delivered", None), ("failed", None)):
        expected = fixture(f"whatsapp-status-{name}.json")
        wamid = expected["entry"][0]["changes"][0]["value"]["statuses"][0]["id"]
        recipient = expected["entry"][0]["changes"][0]["value"]["statuses"][0]["recipient_id"]
        status = payloads.whatsapp_status(wamid, name, 1764072000, recipient, callback)
        built = payloads.whatsapp_status_webhook(PHONE, [status])
        assert shape(built) == shape(expected)
    failed = payloads.whatsapp_status("w", "failed", 1, "55", None)
    assert (
        failed["errors"]
        == fixture("whatsapp-status-failed.json")["entry"][0]["changes"][0]["value"]["statuses"][0][
            "errors"
        ]
    )


def test_built_webhooks_parse_back() -> None:
    statuses = [
        payloads.whatsapp_status("w1", "sent", 1764072000, "55", "msg_1"),
        payloads.whatsapp_status("w1", "read", 1764072003, "55", None),
    ]
    parsed = whatsapp_statuses(payloads.whatsapp_status_webhook(PHONE, statuses))
    assert [(s.status, s.callback_data) for s in parsed] == [
        (Status.SENT, "msg_1"),
        (Status.READ, ""),
    ]
    seen = payloads.instagram_seen(ACCOUNT, "7000000000000042", "mid.1", 1764072300120)
    webhook = payloads.instagram_webhook(ACCOUNT, [seen], 1764072300500)
    assert shape(webhook) == shape(fixture("instagram-seen.json"))
    [read] = instagram.parse_webhook(webhook).items
    assert isinstance(read, InstagramRead)
    assert (read.account_id, read.provider_message_id) == (ACCOUNT, "mid.1")


def test_send_answers_have_the_fixture_shapes() -> None:
    wamid = payloads.new_wamid()
    assert wamid.startswith("wamid.") and wamid != payloads.new_wamid()
    answer = payloads.whatsapp_send_answer("+5511988877665", wamid)
    expected = fixture("whatsapp-send-response.json")
    expected["messages"][0]["id"] = wamid
    assert answer == expected
    mid = payloads.new_instagram_mid()
    assert payloads.instagram_send_answer("7000000000000042", mid) == {
        "recipient_id": "7000000000000042",
        "message_id": mid,
    }
    assert payloads.whatsapp_send_problem(fixture("whatsapp-send-request.json")) is None
    assert payloads.instagram_send_problem(fixture("instagram-send-request.json")) is None


def test_an_instagram_attachment_send_is_checked_like_meta() -> None:
    def send(message: dict[str, Any]) -> str | None:
        return payloads.instagram_send_problem({"recipient": {"id": "17841"}, "message": message})

    image = {"type": "image", "payload": {"url": "https://example.com/x.png"}}
    assert send({"attachment": image}) is None
    assert payloads.instagram_send_content({"attachment": image}) == "https://example.com/x.png"
    assert "Only one" in str(send({"attachment": image, "text": "oi"}))
    assert "type" in str(send({"attachment": {**image, "type": "sticker"}}))
    assert "url" in str(send({"attachment": {"type": "image", "payload": {"url": "ftp://x"}}}))


def test_a_customer_reply_may_carry_a_medium() -> None:
    reply = customer_reply(
        {"channel": "whatsapp", "contact": "5511", "media_id": "123", "filename": "a.pdf"}
    )
    assert (reply.text, reply.media_id, reply.filename) == ("", "123", "a.pdf")
    bad: Any
    for bad in (
        {"channel": "whatsapp", "contact": "5511"},  # neither a text nor a medium
        {"channel": "whatsapp", "contact": "5511", "media_id": "../x"},
        {"channel": "whatsapp", "contact": "5511", "media_id": "1", "filename": "a\nb"},
    ):
        with pytest.raises(ValueError):
            customer_reply(bad)


def test_controls_validation() -> None:
    start = Controls(disorder=False, failure_rate=0.0, delay_ms=300)
    assert changed_controls(start, {"disorder": True, "failure_rate": 1}) == Controls(
        True, 1.0, 300
    )
    bad: Any
    for bad in (
        [],
        {"disorder": "yes"},
        {"failure_rate": 1.5},
        {"failure_rate": True},
        {"delay_ms": -1},
        {"delay_ms": 2.5},
        {"delay": 3},
    ):
        with pytest.raises(ValueError):
            changed_controls(start, bad)


# -- Graph API answers, in-process -----------------------------------------------------


@asynccontextmanager
async def in_process(
    data_dir: Path, **overrides: Any
) -> AsyncIterator[tuple[Simulator, httpx.AsyncClient]]:
    """A simulator with its schedule open but no delivery workers: webhooks stay queued."""
    http = AiohttpClient(connections=1, keepalive_s=1.0)  # never used: no workers
    simulator = Simulator(deps(settings(data_dir, **overrides), http))
    await simulator.schedule.open()
    app = Starlette(routes=simulator.routes())
    transport = httpx.ASGITransport(app=app)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://sim") as client:
            yield simulator, client
    finally:
        await simulator.schedule.close()


async def test_whatsapp_send_answers_like_meta(tmp_path: Path) -> None:
    async with in_process(tmp_path) as (simulator, client):
        response = await client.post(
            WA_SEND, json=fixture("whatsapp-send-request.json"), headers=AUTH
        )
        assert response.status_code == 200
        body = response.json()
        assert shape(body) == shape(fixture("whatsapp-send-response.json"))
        assert body["messages"][0]["id"].startswith("wamid.")
        assert body["contacts"][0]["wa_id"] == "5511988877665"
        assert simulator.schedule.pending == 3  # sent, delivered, read


async def test_instagram_send_answers_like_meta(tmp_path: Path) -> None:
    async with in_process(tmp_path) as (simulator, client):
        response = await client.post(
            IG_SEND, json=fixture("instagram-send-request.json"), headers=AUTH
        )
        assert response.status_code == 200
        assert shape(response.json()) == shape(fixture("instagram-send-response.json"))
        assert simulator.schedule.pending == 1


def assert_meta_error(response: httpx.Response, status: int, code: int) -> None:
    assert response.status_code == status
    error = response.json()["error"]
    assert error["code"] == code
    assert error["message"] and error["type"] == "OAuthException" and error["fbtrace_id"]


async def test_graph_api_errors(tmp_path: Path) -> None:
    good = fixture("whatsapp-send-request.json")
    async with in_process(tmp_path) as (_, client):
        assert_meta_error(await client.post(WA_SEND, json=good), 401, 190)
        wrong = {"Authorization": "Bearer guess"}
        assert_meta_error(await client.post(IG_SEND, json=good, headers=wrong), 401, 190)
        for bad in ({**good, "to": ""}, {**good, "text": {}}, {"messaging_product": "sms"}):
            assert_meta_error(await client.post(WA_SEND, json=bad, headers=AUTH), 400, 100)
        not_json = await client.post(WA_SEND, content=b"{", headers=AUTH)
        assert_meta_error(not_json, 400, 100)
        other_phone = await client.post("/simulator/v21.0/1/messages", json=good, headers=AUTH)
        assert_meta_error(other_phone, 400, 100)
        no_text = {"recipient": {"id": "1"}, "message": {}}
        assert_meta_error(await client.post(IG_SEND, json=no_text, headers=AUTH), 400, 100)


async def test_full_queue_answers_429(tmp_path: Path) -> None:
    async with in_process(tmp_path, sim_queue_size=4) as (simulator, client):
        request = fixture("whatsapp-send-request.json")
        assert (await client.post(WA_SEND, json=request, headers=AUTH)).status_code == 200
        refused = await client.post(WA_SEND, json=request, headers=AUTH)
        assert_meta_error(refused, 429, 4)
        assert simulator.schedule.pending == 3


async def test_instagram_failure_is_a_refused_send(tmp_path: Path) -> None:
    async with in_process(tmp_path, sim_failure_rate=1.0) as (_, client):
        response = await client.post(
            IG_SEND, json=fixture("instagram-send-request.json"), headers=AUTH
        )
        assert_meta_error(response, 400, 551)


async def test_control_reads_and_changes_at_runtime(tmp_path: Path) -> None:
    async with in_process(tmp_path, sim_delay_ms=50) as (simulator, client):
        state = (await client.get("/simulator/control")).json()
        assert state == {
            "disorder": False,
            "failure_rate": 0.0,
            "delay_ms": 50,
            "auto_reply": False,
        }
        changed = await client.post("/simulator/control", json={"disorder": True})
        assert changed.json() == {**state, "disorder": True}
        assert simulator.controls.disorder
        bad = await client.post("/simulator/control", json={"failure_rate": 7})
        assert bad.status_code == 400
        assert bad.json()["error"]["code"] == "bad_request"
        assert (await client.post("/simulator/control", content=b"nope")).status_code == 400
        assert (await client.get("/simulator/control")).json()["disorder"] is True


# -- webhooks over real HTTP -----------------------------------------------------------


async def eventually(check: Callable[[], bool], timeout_s: float = 10) -> None:
    """Poll: uvicorn and the simulator's workers offer no event to wait on."""
    for _ in range(int(timeout_s / 0.01)):
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("not reached in time")


class Receiver:
    """Stands where the connectors' webhook routes would be; records every POST and the
    status it answered."""

    def __init__(self) -> None:
        self.posts: list[tuple[str, bytes, str | None]] = []
        self.answered: list[int] = []  # the status of each post, in order
        self.answers: list[int] = []  # statuses to answer first, then 200
        self.down = False  # answer 503 to everything
        self.gate = asyncio.Event()  # answers wait for it
        self.gate.set()

    def routes(self) -> list[BaseRoute]:
        return [Route("/webhooks/{channel}", self.receive, methods=["POST"])]

    async def receive(self, request: Request) -> Response:
        body = await request.body()
        await self.gate.wait()
        header = request.headers.get("X-Hub-Signature-256")
        self.posts.append((request.path_params["channel"], body, header))
        status = 503 if self.down else (self.answers.pop(0) if self.answers else 200)
        self.answered.append(status)
        return Response(status_code=status)

    def answers_by_body(self) -> dict[bytes, list[int]]:
        """The statuses answered to each distinct body, in order."""
        by_body: dict[bytes, list[int]] = {}
        for (_, body, _), status in zip(self.posts, self.answered, strict=True):
            by_body.setdefault(body, []).append(status)
        return by_body


Builder = Callable[[Settings, HttpClient], list[BaseRoute]]


@asynccontextmanager
async def served(
    build: Builder,
    roles: Callable[[], list[Simulator]],
    data_dir: Path,
    **overrides: Any,
) -> AsyncIterator[Settings]:
    """A real uvicorn server on a free port, with the routes `build` returns."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    config = settings(data_dir, port=sock.getsockname()[1], **overrides)
    http = AiohttpClient(connections=16, keepalive_s=config.http_keepalive_s)
    try:
        app = Starlette(routes=build(config, http))
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        task = asyncio.create_task(server.serve(sockets=[sock]))
        for role in roles():
            await role.start()
        try:
            await eventually(lambda: server.started)
            yield config
        finally:
            for role in roles():
                await role.stop()
            server.should_exit = True
            await task
            sock.close()
    finally:
        await http.close()


async def test_the_customer_replies_on_both_channels_by_signed_webhooks(tmp_path: Path) -> None:
    receiver = Receiver()
    sims: list[Simulator] = []

    def build(config: Settings, http: HttpClient) -> list[BaseRoute]:
        sims.append(Simulator(deps(config, http)))
        return sims[0].routes() + receiver.routes()

    async with served(build, lambda: sims, tmp_path) as config:
        async with httpx.AsyncClient(base_url=config.base_url) as client:
            ids = []
            for channel in ("whatsapp", "instagram"):
                reply = {"channel": channel, "contact": "5511988877665", "text": "Oi!"}
                answer = await client.post("/simulator/reply", json=reply)
                assert answer.status_code == 202, answer.text
                ids.append(answer.json()["provider_message_id"])
            for bad in ({"channel": "sms"}, {"channel": "whatsapp", "contact": "5", "text": ""}):
                assert (await client.post("/simulator/reply", json=bad)).status_code == 400
            # Not a send: the oracle of sends does not count it.
            assert (await client.get("/simulator/sends")).json()["sends"] == 0
        await eventually(lambda: len(receiver.posts) == 2)
    found = {}
    for channel, body, header in receiver.posts:
        assert signature_valid(SECRET, body, header)
        parse = parse_webhook if channel == "whatsapp" else instagram.parse_webhook
        [message] = parse(json.loads(body)).items
        assert isinstance(message, CustomerMessage)
        found[channel] = (message.contact, message.provider_message_id, message.text)
    assert found == {
        "whatsapp": ("5511988877665", ids[0], "Oi!"),
        "instagram": ("5511988877665", ids[1], "Oi!"),
    }


def items_of(receiver: Receiver) -> list[Any]:
    return [item for _, body, _ in receiver.posts for item in parse_webhook(json.loads(body)).items]


async def test_in_auto_reply_mode_the_customer_answers_after_the_statuses(
    tmp_path: Path,
) -> None:
    receiver = Receiver()
    sims: list[Simulator] = []

    def build(config: Settings, http: HttpClient) -> list[BaseRoute]:
        sims.append(Simulator(deps(config, http)))
        return sims[0].routes() + receiver.routes()

    async with served(build, lambda: sims, tmp_path, sim_delay_ms=20) as config:
        async with httpx.AsyncClient(base_url=config.base_url) as client:
            switched = await client.post("/simulator/control", json={"auto_reply": True})
            assert switched.json()["auto_reply"] is True
            request = fixture("whatsapp-send-request.json")
            await client.post(WA_SEND, json=request, headers=AUTH)
        # A busy simulator sends webhooks due together as one: count their items.
        await eventually(lambda: len(items_of(receiver)) == 4)
    items = items_of(receiver)
    assert [type(item) for item in items] == [WhatsAppStatus] * 3 + [CustomerMessage]
    reply = items[-1]
    assert isinstance(reply, CustomerMessage)
    assert reply.contact == request["to"]
    assert reply.text


async def test_whatsapp_webhooks_signed_in_order(tmp_path: Path) -> None:
    receiver = Receiver()
    sims: list[Simulator] = []

    def build(config: Settings, http: HttpClient) -> list[BaseRoute]:
        sims.append(Simulator(deps(config, http)))
        return sims[0].routes() + receiver.routes()

    async with served(build, lambda: sims, tmp_path, sim_delay_ms=20) as config:
        async with httpx.AsyncClient(base_url=config.base_url) as client:
            response = await client.post(
                WA_SEND, json=fixture("whatsapp-send-request.json"), headers=AUTH
            )
        wamid = response.json()["messages"][0]["id"]
        await eventually(lambda: len(receiver.posts) == 3)
    statuses = []
    for channel, body, header in receiver.posts:
        assert channel == "whatsapp"
        assert signature_valid(SECRET, body, header)
        statuses += whatsapp_statuses(json.loads(body))
    assert [s.status for s in statuses] == [Status.SENT, Status.DELIVERED, Status.READ]
    assert {s.provider_message_id for s in statuses} == {wamid}
    assert {s.callback_data for s in statuses} == {"msg_01JCXZ7Q3W"}
    times = [s.occurred_at for s in statuses]
    assert times == sorted(times)


async def test_instagram_seen_webhook_and_retries(tmp_path: Path) -> None:
    receiver = Receiver()
    receiver.answers = [500, 503]
    sims: list[Simulator] = []

    def build(config: Settings, http: HttpClient) -> list[BaseRoute]:
        sims.append(Simulator(deps(config, http)))
        return sims[0].routes() + receiver.routes()

    async with served(
        build, lambda: sims, tmp_path, sim_delay_ms=10, sim_time_scale=0.02
    ) as config:
        async with httpx.AsyncClient(base_url=config.base_url) as client:
            response = await client.post(
                IG_SEND, json=fixture("instagram-send-request.json"), headers=AUTH
            )
        mid = response.json()["message_id"]
        await eventually(lambda: sims[0].schedule.pending == 0)
        assert len(receiver.posts) == 3
    bodies = {body for _, body, _ in receiver.posts}
    assert len(bodies) == 1  # a retry resends the very same bytes
    [(channel, body, header)] = receiver.posts[-1:]
    assert channel == "instagram" and signature_valid(SECRET, body, header)
    [read] = instagram.parse_webhook(json.loads(body)).items
    assert isinstance(read, InstagramRead)
    assert (read.account_id, read.provider_message_id) == (ACCOUNT, mid)


async def test_disorder_with_the_real_connector(tmp_path: Path) -> None:
    """Duplicates, reorders, missing callback data and webhooks that beat the send answer:
    every message still ends with SENT and READ events (the status rules do the rest)."""
    store = SQLiteStore(tmp_path / "whatslike.db")
    await store.open()
    sims: list[Simulator] = []
    connectors: list[WhatsAppConnector] = []

    def build(config: Settings, http: HttpClient) -> list[BaseRoute]:
        sims.append(Simulator(deps(config, http)))
        connectors.append(WhatsAppConnector(deps(config, http, store)))
        return sims[0].routes() + routes(connectors[0].operations())

    async with served(
        build,
        lambda: sims,
        tmp_path / "sim",
        sim_delay_ms=5,
        sim_disorder=True,
        sim_time_scale=0.02,
    ) as config:
        conversation = await store.create_conversation("org1", "whatsapp", "+5511988877665")
        messages = [
            (await store.create_message(conversation, f"text {n}", f"c{n}"))[0] for n in range(12)
        ]
        for message in messages:
            outbound = OutboundMessage(
                "evt", message.id, conversation.id, "org1", "whatsapp",
                "+5511988877665", message.text, message.client_message_id, message.created_at,
            )  # fmt: skip
            await connectors[0].send(outbound.to_json())
        await eventually(lambda: sims[0].schedule.pending == 0)
        assert config.sim_disorder
    handed = await store.outbox_batch("test", 10_000)
    await store.close()
    seen: dict[str, set[Status]] = {}
    for item in handed:
        if item.topic == TOPIC_STATUS:
            event = StatusEvent.from_json(item.payload)
            seen.setdefault(event.message_id, set()).add(event.status)
    for message in messages:
        assert {Status.SENT, Status.READ} <= seen[message.id], message.id
    registry = connectors[0]._metrics.registry
    parked = registry.get_sample_value("whatslike_parked_statuses_total", {"channel": "whatsapp"})
    assert parked  # some webhooks beat the send answer and were applied from the park


def stored_deliveries(data_dir: Path) -> list[tuple[bytes, int]]:
    """The deliveries on the simulator's disk: body and failed attempts."""
    with sqlite3.connect(data_dir / "simulator.db") as db:
        rows = db.execute("SELECT body, failures FROM deliveries ORDER BY id").fetchall()
    return [(bytes(body), failures) for body, failures in rows]


def simulator_with(receiver: Receiver, sims: list[Simulator]) -> Builder:
    def build(config: Settings, http: HttpClient) -> list[BaseRoute]:
        sims.append(Simulator(deps(config, http)))
        return sims[-1].routes() + receiver.routes()

    return build


async def send_messages(config: Settings, whatsapp: int, instagram: int) -> None:
    """Distinct WhatsApp (by callback data) and Instagram (by text) sends, all accepted."""
    requests = [
        (WA_SEND, {**fixture("whatsapp-send-request.json"), "biz_opaque_callback_data": f"m{n}"})
        for n in range(whatsapp)
    ]
    instagram_request = fixture("instagram-send-request.json")
    requests += [
        (IG_SEND, {**instagram_request, "message": {"text": f"text {n}"}}) for n in range(instagram)
    ]
    async with httpx.AsyncClient(base_url=config.base_url) as client:
        for path, request in requests:
            assert (await client.post(path, json=request, headers=AUTH)).status_code == 200


async def test_the_schedule_survives_a_restart(tmp_path: Path) -> None:
    """A simulator whose connector refuses stops with its webhooks pending; a new one on the
    same data directory delivers them, the very same bytes, signed, to one that accepts."""
    refusing = Receiver()
    refusing.down = True
    first: list[Simulator] = []
    # One notification per webhook: each is recognised by its bytes.
    one = {"sim_webhook_batch": 1}
    async with served(simulator_with(refusing, first), lambda: first, tmp_path, **one) as config:
        await send_messages(config, whatsapp=2, instagram=1)
        # Every one of the 7 webhooks was tried and refused at least once.
        await eventually(lambda: len(refusing.answers_by_body()) == 7)
    assert {answer for answers in refusing.answers_by_body().values() for answer in answers} == {
        503
    }
    assert {body for body, _ in stored_deliveries(tmp_path)} == set(refusing.answers_by_body())

    accepting = Receiver()
    second: list[Simulator] = []
    async with served(simulator_with(accepting, second), lambda: second, tmp_path, **one):
        await eventually(lambda: second[0].schedule.pending == 0)
    assert accepting.answers_by_body() == {body: [200] for body in refusing.answers_by_body()}
    for _, body, header in accepting.posts:
        assert signature_valid(SECRET, body, header)
    assert stored_deliveries(tmp_path) == []


async def test_retries_outlast_an_outage(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The connector answers 503 until every webhook has failed 8 times (the old schedule
    gave up after 6); once it is back, each arrives and is answered 2xx exactly once."""
    caplog.set_level(logging.WARNING, logger="whatslike.simulator.app")
    receiver = Receiver()
    receiver.down = True
    sims: list[Simulator] = []
    build = simulator_with(receiver, sims)
    async with served(
        build, lambda: sims, tmp_path, sim_delay_ms=5, sim_time_scale=0.02, sim_webhook_batch=1
    ) as config:
        await send_messages(config, whatsapp=5, instagram=2)
        expected = 5 * 3 + 2

        def refused_long_enough() -> bool:
            by_body = receiver.answers_by_body()
            return len(by_body) == expected and all(len(a) >= 8 for a in by_body.values())

        await eventually(refused_long_enough, timeout_s=30)
        receiver.down = False
        await eventually(lambda: sims[0].schedule.pending == 0, timeout_s=30)
    by_body = receiver.answers_by_body()
    assert len(by_body) == expected
    for answers in by_body.values():
        assert answers == [503] * (len(answers) - 1) + [200]
    assert stored_deliveries(tmp_path) == []
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings and all("failed (HTTP 503)" in w for w in warnings)
    assert len(warnings) < len(receiver.posts) - expected  # rate-limited, not one per failure
    assert not any(config.base_url in w or SECRET in w for w in warnings)


async def test_an_early_webhook_that_fails_is_retried_like_any_other(tmp_path: Path) -> None:
    """Disorder mode posts some webhooks before the send is answered; one that fails is
    stored as a retry and arrives once the connector is back. The planned webhooks are
    minutes away, so every POST seen here is an early one or its retry."""
    receiver = Receiver()
    receiver.down = True
    sims: list[Simulator] = []
    build = simulator_with(receiver, sims)
    async with served(
        build,
        lambda: sims,
        tmp_path,
        sim_delay_ms=MAX_DELAY_MS,
        sim_disorder=True,
        sim_time_scale=0.02,
        sim_webhook_batch=1,
    ) as config:
        await send_messages(config, whatsapp=12, instagram=0)
        early = set(receiver.answers_by_body())
        assert early  # seed 7 makes some
        retries = {body for body, failures in stored_deliveries(tmp_path) if failures}
        assert retries == early
        pending = sims[0].schedule.pending
        receiver.down = False
        await eventually(lambda: sims[0].schedule.pending == pending - len(early))
        assert receiver.answers_by_body().keys() == early
        assert all(answers[-1] == 200 for answers in receiver.answers_by_body().values())
    # The early ones are gone from the disk; the planned ones (never tried) wait there.
    left = stored_deliveries(tmp_path)
    assert len(left) == sims[0].schedule.pending > 0
    assert all(failures == 0 for _, failures in left)


async def test_notifications_due_together_go_out_in_one_webhook(tmp_path: Path) -> None:
    receiver = Receiver()
    sims: list[Simulator] = []

    def build(config: Settings, http: HttpClient) -> list[BaseRoute]:
        sims.append(Simulator(deps(config, http)))
        return sims[0].routes() + receiver.routes()

    # The first webhooks wait for an answer until every send is in, so the notifications
    # behind them are all due together.
    receiver.gate.clear()
    async with served(build, lambda: sims, tmp_path, sim_delay_ms=0) as config:
        async with httpx.AsyncClient(base_url=config.base_url) as client:
            wamids = []
            for n in range(20):
                request = fixture("whatsapp-send-request.json")
                request["biz_opaque_callback_data"] = f"msg_{n}"
                response = await client.post(WA_SEND, json=request, headers=AUTH)
                wamids.append(response.json()["messages"][0]["id"])
        receiver.gate.set()
        await eventually(lambda: sims[0].schedule.pending == 0)
    statuses = []
    for channel, body, header in receiver.posts:
        assert channel == "whatsapp"
        assert signature_valid(SECRET, body, header)
        statuses += whatsapp_statuses(json.loads(body))
    assert len(receiver.posts) < len(statuses) == 60
    for wamid in wamids:
        mine = [s.status for s in statuses if s.provider_message_id == wamid]
        assert mine == [Status.SENT, Status.DELIVERED, Status.READ]


def test_merged_webhooks_keep_every_entry_in_order() -> None:
    bodies = [
        json.dumps(
            payloads.whatsapp_status_webhook(
                PHONE, [payloads.whatsapp_status(f"w{n}", "sent", 1764072000 + n, "55", None)]
            )
        ).encode()
        for n in range(3)
    ]
    merged = json.loads(payloads.merge_webhooks(bodies))
    assert [s.provider_message_id for s in whatsapp_statuses(merged)] == ["w0", "w1", "w2"]
    seen = payloads.instagram_webhook(ACCOUNT, [], 1)
    with pytest.raises(ValueError, match="different objects"):
        payloads.merge_webhooks([bodies[0], json.dumps(seen).encode()])


def test_the_simulator_takes_several_webhook_urls_in_turn(tmp_path: Path) -> None:
    config = settings(tmp_path, sim_webhook_url=" http://a:1/, http://b:2 ,")
    assert config.sim_webhook_urls == ("http://a:1", "http://b:2")
    assert settings(tmp_path, port=9).sim_webhook_urls == ("http://127.0.0.1:9",)


async def test_the_simulator_answers_meta_rate_limit_errors_when_asked(tmp_path: Path) -> None:
    sims: list[Simulator] = []

    def build(config: Settings, http: HttpClient) -> list[BaseRoute]:
        sims.append(Simulator(deps(config, http)))
        return sims[0].routes()

    request = fixture("whatsapp-send-request.json")
    other = {**request, "to": "+5511900000001"}
    async with (
        served(build, lambda: sims, tmp_path, sim_sends_per_s=0.001) as config,
        httpx.AsyncClient(base_url=config.base_url) as client,
    ):
        assert (await client.post(WA_SEND, json=request, headers=AUTH)).status_code == 200
        refused = await client.post(WA_SEND, json=other, headers=AUTH)
    assert refused.status_code == 400
    assert refused.json()["error"]["code"] == 130429

    sims.clear()
    async with (
        served(build, lambda: sims, tmp_path / "pair", sim_pair_burst=2) as config,
        httpx.AsyncClient(base_url=config.base_url) as client,
    ):
        codes = [
            (await client.post(WA_SEND, json=body, headers=AUTH)).status_code
            for body in (request, request, other, request)
        ]
        last = await client.post(WA_SEND, json=request, headers=AUTH)
    assert codes == [200, 200, 200, 400]
    assert last.json()["error"]["code"] == 131056


@pytest.mark.parametrize(
    ("limits", "code", "scope"),
    [
        ({"sim_sends_per_s": 1}, 130429, "throttled_account"),
        ({"sim_pair_burst": 1, "sim_pair_interval_s": 3}, 131056, "throttled_pair"),
    ],
)
async def test_throttled_sends_wait_and_never_fail(
    tmp_path: Path, limits: dict[str, float], code: int, scope: str
) -> None:
    """The simulator's clock stands still until it refuses a send, so every send after the
    first meets the limit (130429 for the number; 131056 for one customer) until the test
    moves the clock on: each one waits (the number held, the customer retried later) and
    goes once; none is FAILED, none is sent twice."""
    store = SQLiteStore(tmp_path / "whatslike.db")
    await store.open()
    sims: list[Simulator] = []
    connectors: list[WhatsAppConnector] = []
    now = [0.0]
    refusals: list[int] = []

    def build(config: Settings, http: HttpClient) -> list[BaseRoute]:
        sims.append(Simulator(deps(config, http)))
        real = RateLimits(config, clock=lambda: now[0])

        def refusal(recipient: str) -> Response | None:
            answer = real.refusal(recipient)
            if answer is not None:
                refusals.append(json.loads(bytes(answer.body))["error"]["code"])
            return answer

        sims[0]._limits = cast(RateLimits, SimpleNamespace(refusal=refusal))
        connectors.append(WhatsAppConnector(deps(config, http, store)))
        return sims[0].routes() + routes(connectors[0].operations())

    async with served(
        build,
        lambda: sims,
        tmp_path / "sim",
        sim_delay_ms=5,
        throttle_hold_s=0.01,
        pair_retry_s=0.01,
        **limits,
    ):
        conversation = await store.create_conversation("org1", "whatsapp", "+5511988877665")
        messages = [
            (await store.create_message(conversation, f"text {n}", f"c{n}"))[0] for n in range(3)
        ]
        sends = []
        for n, message in enumerate(messages):
            to = f"+551190000000{n}" if code == 130429 else "+5511988877665"
            outbound = OutboundMessage(
                "evt", message.id, conversation.id, "org1", "whatsapp",
                to, message.text, message.client_message_id, message.created_at,
            )  # fmt: skip
            sends.append(asyncio.create_task(connectors[0].send(outbound.to_json())))
        seen = 0
        while not all(send.done() for send in sends):
            if len(refusals) > seen:
                seen = len(refusals)
                now[0] += 3  # the limits let one more through
            await asyncio.sleep(0.01)
        await asyncio.gather(*sends)
        await eventually(lambda: sims[0].schedule.pending == 0)
        counted = await sims[0].schedule.sends()
    handed = await store.outbox_batch("test", 10_000)
    await store.close()
    assert set(refusals) == {code}
    statuses = [StatusEvent.from_json(i.payload) for i in handed if i.topic == TOPIC_STATUS]
    assert {e.message_id for e in statuses if e.status is Status.READ} == {m.id for m in messages}
    assert not [e for e in statuses if e.status is Status.FAILED]
    assert counted["sends"] == 3 and not counted["duplicates"]
    labels = {"channel": "whatsapp", "outcome": scope}
    sample = connectors[0]._metrics.registry.get_sample_value
    assert sample("whatslike_provider_sends_total", labels) == len(refusals)


# -- the customer service window and templates -----------------------------------------

TEMPLATE_SEND = {
    "messaging_product": "whatsapp",
    "recipient_type": "individual",
    "to": "5511988877665",
    "type": "template",
    "template": {"name": "hello_world", "language": {"code": "en_US"}},
    "biz_opaque_callback_data": "msg_t",
}


async def test_a_known_template_is_sent_any_time_and_an_unknown_one_is_132001(
    tmp_path: Path,
) -> None:
    async with in_process(tmp_path, sim_customer_window=True) as (simulator, client):
        # The customer never wrote: a template is what may reach them.
        known = await client.post(WA_SEND, json=TEMPLATE_SEND, headers=AUTH)
        assert known.status_code == 200, known.text
        assert simulator.schedule.pending == 3  # sent, delivered, read
        for name, code in (("hello_world", "pt_BR"), ("order_shipped", "en_US")):
            template = {"name": name, "language": {"code": code}}
            unknown = await client.post(
                WA_SEND, json={**TEMPLATE_SEND, "template": template}, headers=AUTH
            )
            assert_meta_error(unknown, 400, 132001)
        shapeless = {**TEMPLATE_SEND, "template": {"name": "hello_world"}}
        assert_meta_error(await client.post(WA_SEND, json=shapeless, headers=AUTH), 400, 100)
        assert simulator.schedule.pending == 3


def failed_codes(data_dir: Path) -> list[str]:
    """The error codes of the failed statuses queued on the simulator's disk."""
    return [
        item.error.code
        for body, _ in stored_deliveries(data_dir)
        for item in whatsapp_statuses(json.loads(body))
        if item.status is Status.FAILED and item.error is not None
    ]


async def test_the_window_when_enforced_fails_a_whatsapp_free_form_send_with_131047(
    tmp_path: Path,
) -> None:
    text = fixture("whatsapp-send-request.json")
    async with in_process(tmp_path, sim_customer_window=True) as (simulator, client):
        never = await client.post(WA_SEND, json=text, headers=AUTH)
        assert never.status_code == 200  # taken, then failed by webhook, as Meta does
        assert simulator.schedule.pending == 1
        assert failed_codes(tmp_path) == ["131047"]

        old = {"channel": "whatsapp", "contact": "+55 11 98887-7665", "text": "oi", "ago_s": 90_000}
        assert (await client.post("/simulator/reply", json=old)).status_code == 202
        await client.post(WA_SEND, json=text, headers=AUTH)
        assert failed_codes(tmp_path) == ["131047", "131047"]

        fresh = {**old, "ago_s": 60}
        assert (await client.post("/simulator/reply", json=fresh)).status_code == 202
        pending = simulator.schedule.pending
        assert (await client.post(WA_SEND, json=text, headers=AUTH)).status_code == 200
        assert simulator.schedule.pending == pending + 3  # sent, delivered, read
        assert failed_codes(tmp_path) == ["131047", "131047"]
        too_old = {**old, "ago_s": 31 * 86_400}
        assert (await client.post("/simulator/reply", json=too_old)).status_code == 400


async def test_the_window_is_not_enforced_unless_asked(tmp_path: Path) -> None:
    async with in_process(tmp_path) as (simulator, client):
        answer = await client.post(
            WA_SEND, json=fixture("whatsapp-send-request.json"), headers=AUTH
        )
        assert answer.status_code == 200
        assert simulator.schedule.pending == 3
        assert failed_codes(tmp_path) == []


async def test_instagram_outside_the_window_is_refused_unless_tagged_human_agent_within_7_days(
    tmp_path: Path,
) -> None:
    text = fixture("instagram-send-request.json")
    recipient = text["recipient"]["id"]
    tagged = {**text, "messaging_type": "MESSAGE_TAG", "tag": "HUMAN_AGENT"}
    async with in_process(tmp_path, sim_customer_window=True) as (_, client):
        assert_meta_error(await client.post(IG_SEND, json=text, headers=AUTH), 400, 10)
        wrote = {"channel": "instagram", "contact": recipient, "text": "oi", "ago_s": 3 * 86_400}
        assert (await client.post("/simulator/reply", json=wrote)).status_code == 202
        assert_meta_error(await client.post(IG_SEND, json=text, headers=AUTH), 400, 10)
        assert (await client.post(IG_SEND, json=tagged, headers=AUTH)).status_code == 200
        for bad in ({**text, "tag": "HUMAN_AGENT"}, {**tagged, "tag": "CONFIRMED_EVENT_UPDATE"}):
            assert_meta_error(await client.post(IG_SEND, json=bad, headers=AUTH), 400, 100)

    async with in_process(tmp_path / "week", sim_customer_window=True) as (_, client):
        wrote = {"channel": "instagram", "contact": recipient, "text": "oi", "ago_s": 8 * 86_400}
        assert (await client.post("/simulator/reply", json=wrote)).status_code == 202
        assert_meta_error(await client.post(IG_SEND, json=tagged, headers=AUTH), 400, 10)
        fresh = {**wrote, "ago_s": 0}
        assert (await client.post("/simulator/reply", json=fresh)).status_code == 202
        assert (await client.post(IG_SEND, json=text, headers=AUTH)).status_code == 200


def test_the_simulators_templates_are_name_and_language_pairs(tmp_path: Path) -> None:
    config = settings(tmp_path, sim_templates="a_1:en, b:pt_BR")
    assert config.sim_template_set == {("a_1", "en"), ("b", "pt_BR")}
    for bad in ("Hello:en", "hello", "hello:english"):
        with pytest.raises(ConfigError):
            settings(tmp_path, sim_templates=bad)
