"""The HTTP API's acknowledgements: a 202 means the message and the work of sending it
are stored; a store outage or a stop in progress answers 503 with a Retry-After, and the
same request is safe to repeat."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from whatslike.app import Runtime
from whatslike.auth import TokenService
from whatslike.clock import format_time
from whatslike.events import TOPIC_MESSAGES, OutboundMessage, StatusEvent
from whatslike.settings import load_settings, resolve_jwt_secret
from whatslike.status.rules import Status
from whatslike.store.base import InboundMessage


@pytest.fixture
async def runtime(tmp_path: Path) -> AsyncIterator[Runtime]:
    settings = load_settings(data_dir=tmp_path, retry_after_s=7)
    runtime = Runtime(settings)
    await runtime.open()
    yield runtime
    await runtime.deps.store.close()


async def client_for(runtime: Runtime) -> httpx.AsyncClient:
    settings = runtime.settings
    token = TokenService(resolve_jwt_secret(settings), "", "").mint("ana", "acme", 600)
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=runtime.app),
        base_url="http://t",
        headers={"Authorization": f"Bearer {token}"},
    )


async def messages_url(client: httpx.AsyncClient) -> str:
    """The messages URL of a new WhatsApp conversation."""
    created = await client.post(
        "/api/conversations", json={"channel": "whatsapp", "contact": "+55"}
    )
    return f"/api/conversations/{created.json()['id']}/messages"


async def test_a_202_means_the_message_and_its_send_are_stored(runtime: Runtime) -> None:
    async with await client_for(runtime) as client:
        url = await messages_url(client)
        answer = await client.post(url, json={"text": "oi", "client_message_id": "c-1"})
        assert answer.status_code == 202
        again = await client.post(url, json={"text": "oi", "client_message_id": "c-1"})
        assert again.json() == answer.json()
    [item] = await runtime.deps.store.outbox_batch("test", 10)
    assert item.topic == TOPIC_MESSAGES
    assert OutboundMessage.from_json(item.payload).message_id == answer.json()["message_id"]


async def test_a_store_outage_is_a_503_and_the_retry_is_safe(runtime: Runtime) -> None:
    store = runtime.deps.store
    async with await client_for(runtime) as client:
        url = await messages_url(client)
        await store.close()  # the database goes away
        refused = await client.post(url, json={"text": "oi", "client_message_id": "c-1"})
        assert refused.status_code == 503
        assert refused.headers["Retry-After"] == "7"
        assert refused.json()["error"]["code"] == "unavailable"
        assert "Traceback" not in refused.text
        ready = await client.get("/readyz")
        assert ready.status_code == 503
        await store.open()  # it is back
        assert (await client.get("/readyz")).status_code == 200
        first = await client.post(url, json={"text": "oi", "client_message_id": "c-1"})
        second = await client.post(url, json={"text": "oi", "client_message_id": "c-1"})
        assert first.status_code == second.status_code == 202
        assert first.json() == second.json()
        listed = (await client.get(url)).json()["messages"]
    assert [m["id"] for m in listed] == [first.json()["message_id"]]
    assert await store.outbox_size() == 1


async def test_a_stopping_process_takes_no_new_work(runtime: Runtime) -> None:
    async with await client_for(runtime) as client:
        await runtime.close_connections()  # what SIGTERM does first
        refused = await client.post(
            "/api/conversations", json={"channel": "whatsapp", "contact": "+55"}
        )
        assert refused.status_code == 503
        assert refused.headers["Retry-After"] == "7"
        assert (await client.get("/healthz")).status_code == 200


async def test_operators_find_a_message_by_id_or_provider_id(runtime: Runtime) -> None:
    store = runtime.deps.store
    async with await client_for(runtime) as client:
        url = await messages_url(client)
        message_id = (await client.post(url, json={"text": "oi"})).json()["message_id"]
        await store.link_provider_id("whatsapp", "wamid.HBgL", message_id)
        message = await store.get_message(message_id)
        assert message is not None
        for status, second in ((Status.SENT, 1), (Status.DELIVERED, 2)):
            await store.apply_status(
                StatusEvent(
                    f"evt_{status.value}",
                    message_id,
                    message.conversation_id,
                    "acme",
                    "whatsapp",
                    status,
                    "wamid.HBgL",
                    datetime(2026, 12, 1, 12, 0, second, tzinfo=UTC),
                )
            )
        by_id = await client.get(f"/api/messages/{message_id}")
        by_provider = await client.get("/api/messages?provider_message_id=wamid.HBgL")
        on_channel = await client.get(
            "/api/messages", params={"provider_message_id": "wamid.HBgL", "channel": "whatsapp"}
        )
        assert by_id.status_code == by_provider.status_code == on_channel.status_code == 200
        assert by_id.json() == by_provider.json() == on_channel.json()
        found = by_id.json()
        assert (found["status"], found["provider_message_id"]) == ("DELIVERED", "wamid.HBgL")
        assert [(f["status"], f["seq"]) for f in found["history"]] == [
            ("SENT", 1),
            ("DELIVERED", 2),
        ]
        elsewhere = await client.get(
            "/api/messages", params={"provider_message_id": "wamid.HBgL", "channel": "instagram"}
        )
        assert elsewhere.status_code == 404
        assert (await client.get("/api/messages")).status_code == 400
        assert (await client.get("/api/messages/msg_nope")).status_code == 404
    # Another organization's operator cannot tell it exists.
    token = TokenService(resolve_jwt_secret(runtime.settings), "", "").mint("eve", "other", 600)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=runtime.app),
        base_url="http://t",
        headers={"Authorization": f"Bearer {token}"},
    ) as foreign:
        for path in (f"/api/messages/{message_id}", "/api/messages?provider_message_id=wamid.HBgL"):
            refused = await foreign.get(path)
            assert refused.status_code == 404
            assert refused.json()["error"]["code"] == "not_found"


async def test_posting_a_message_answers_every_refusal_as_the_api_does(runtime: Runtime) -> None:
    """`POST …/messages` skips Starlette's routing (the busiest API route): its refusals
    are still the API's JSON errors, and only that path shape takes the short way."""
    async with await client_for(runtime) as client:
        url = await messages_url(client)
        bare = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=runtime.app), base_url="http://t"
        )
        async with bare:
            unsigned = await bare.post(url, json={"text": "oi"})
        unknown = await client.post("/api/conversations/conv_nope/messages", json={"text": "oi"})
        malformed = await client.post(url, content=b"{", headers={"Content-Type": "text/plain"})
        odd_id = await client.post("/api/conversations/a%20b/messages", json={"text": "oi"})
        nested = await client.post("/api/conversations/a/b/messages", json={"text": "oi"})
        empty = await client.post("/api/conversations//messages", json={"text": "oi"})
    assert (unsigned.status_code, unsigned.json()["error"]["code"]) == (401, "unauthorized")
    assert (unknown.status_code, unknown.json()["error"]["code"]) == (404, "not_found")
    assert (malformed.status_code, malformed.json()["error"]["code"]) == (400, "bad_request")
    assert (odd_id.status_code, odd_id.json()["error"]["code"]) == (400, "bad_request")
    for routed in (nested, empty):
        assert (routed.status_code, routed.json()["error"]["code"]) == (404, "not_found")


@pytest.mark.parametrize(
    ("window", "graph_url", "enforced"),
    [
        ("auto", "", False),  # the simulator: its customers never write first
        ("auto", "https://graph.facebook.com", True),
        ("enforce", "", True),
        ("off", "https://graph.facebook.com", False),
    ],
)
def test_the_customer_window_is_enforced_against_meta_only_by_default(
    tmp_path: Path, window: str, graph_url: str, enforced: bool
) -> None:
    settings = load_settings(data_dir=tmp_path, customer_window=window, graph_url=graph_url)
    assert settings.enforces_customer_window is enforced


async def test_a_free_form_send_outside_the_window_is_422_naming_when_it_closed(
    tmp_path: Path,
) -> None:
    runtime = Runtime(load_settings(data_dir=tmp_path, customer_window="enforce"))
    await runtime.open()
    store = runtime.deps.store
    try:
        async with await client_for(runtime) as client:
            url = await messages_url(client)
            never = await client.post(url, json={"text": "oi"})
            assert never.status_code == 422
            assert never.json()["error"]["code"] == "outside_window"
            assert "has not written" in never.json()["error"]["message"]

            wrote_at = datetime.now(UTC) - timedelta(hours=25)
            await store.receive_message(
                InboundMessage("acme", "whatsapp", "+55", "wamid.old", "oi", wrote_at)
            )
            closed = await client.post(url, json={"text": "oi"})
            assert closed.status_code == 422
            closed_at = format_time(wrote_at.replace(microsecond=0) + timedelta(hours=24))
            assert closed_at[:16] in closed.json()["error"]["message"]

            await store.receive_message(
                InboundMessage("acme", "whatsapp", "+55", "wamid.new", "oi", datetime.now(UTC))
            )
            assert (await client.post(url, json={"text": "oi"})).status_code == 202
    finally:
        await store.close()
