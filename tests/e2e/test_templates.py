"""End to end on the embedded default (`whatslike serve`, its simulator enforcing the
customer service window): a template reaches a customer who never wrote and is READ
where a free-form message is refused by the API; once the customer writes, free-form
goes out again; an Instagram answer a day later goes out tagged HUMAN_AGENT. And when
the API lets through what Meta refuses (the window not enforced by the API, a template
Meta does not know), the message ends FAILED with Meta's code."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import Server, api, start_server, stop_server

HELLO = {"name": "hello_world", "language": {"code": "en_US"}}
#: A day and six hours: outside the 24 h window, inside Instagram's 7 days.
A_DAY_AGO_S = 30 * 3600


def serve(data_dir: Path, owner: str, customer_window: str) -> Server:
    return start_server(
        data_dir,
        {
            "WHATSLIKE_CUSTOMER_WINDOW": customer_window,
            "WHATSLIKE_SIM_CUSTOMER_WINDOW": "true",
            "WHATSLIKE_SIM_DELAY_MS": "50",
            "WHATSLIKE_WHATSAPP_ORG_ID": owner,
            "WHATSLIKE_INSTAGRAM_ORG_ID": owner,
        },
    )


@pytest.fixture
def owner() -> str:
    return f"org-tpl-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def enforcing(tmp_path: Path, owner: str) -> Iterator[Server]:
    server = serve(tmp_path / "enforcing", owner, "enforce")
    yield server
    stop_server(server)


async def settled(
    client: httpx.AsyncClient, message_id: str, until: set[str], wait_s: float = 30
) -> dict[str, Any]:
    """The message once its status is one of `until` (bounded wait)."""
    deadline = time.monotonic() + wait_s
    while True:
        message: dict[str, Any] = (await client.get(f"/api/messages/{message_id}")).json()
        if message["status"] in until:
            return message
        assert time.monotonic() < deadline, f"never {until}: {message}"
        await asyncio.sleep(0.05)


async def conversation(client: httpx.AsyncClient, channel: str, contact: str) -> str:
    created = await client.post("/api/conversations", json={"channel": channel, "contact": contact})
    assert created.status_code == 201, created.text
    return f"/api/conversations/{created.json()['id']}/messages"


async def customer_writes(server: Server, channel: str, contact: str, ago_s: int = 0) -> None:
    """The simulator's customer writes (`ago_s` seconds ago); the message is stored."""
    reply = {"channel": channel, "contact": contact, "text": "Oi", "ago_s": ago_s}
    async with httpx.AsyncClient(base_url=server.url) as sim:
        answer = await sim.post("/simulator/reply", json=reply)
    assert answer.status_code == 202, answer.text


async def inbound_count(client: httpx.AsyncClient, url: str, count: int) -> None:
    deadline = time.monotonic() + 20
    while (
        len([m for m in (await client.get(url)).json()["messages"] if m["direction"] == "in"])
        < count
    ):
        assert time.monotonic() < deadline, "the customer's message was never stored"
        await asyncio.sleep(0.05)


async def test_a_template_reaches_a_customer_who_never_wrote_where_free_form_is_refused(
    enforcing: Server, owner: str
) -> None:
    async with api(enforcing, enforcing.token(owner)) as client:
        url = await conversation(client, "whatsapp", "5511977000001")
        refused = await client.post(url, json={"text": "Oi"})
        assert (refused.status_code, refused.json()["error"]["code"]) == (422, "outside_window")

        sent = await client.post(url, json={"type": "template", "template": HELLO})
        assert sent.status_code == 202, sent.text
        read = await settled(client, sent.json()["message_id"], {"READ", "FAILED"})
        assert (read["status"], read["error"]) == ("READ", None)
        assert read["template"] == {
            **HELLO,
            "language": {"code": "en_US", "policy": "deterministic"},
            "components": [],
        }

        # The customer answers: the window is open, free-form goes out and is READ.
        await customer_writes(enforcing, "whatsapp", "5511977000001")
        await inbound_count(client, url, 1)
        text = await client.post(url, json={"text": "Que bom!"})
        assert text.status_code == 202, text.text
        done = await settled(client, text.json()["message_id"], {"READ", "FAILED"})
        assert (done["status"], done["error"]) == ("READ", None)


async def test_an_instagram_answer_a_day_later_goes_out_tagged_human_agent(
    enforcing: Server, owner: str
) -> None:
    async with api(enforcing, enforcing.token(owner)) as client:
        url = await conversation(client, "instagram", "17840000000000077")
        await customer_writes(enforcing, "instagram", "17840000000000077", A_DAY_AGO_S)
        await inbound_count(client, url, 1)
        answer = await client.post(url, json={"text": "Seguimos com seu caso"})
        assert answer.status_code == 202, answer.text
        # The simulator refuses an untagged send a day later (code 10): SENT proves the tag.
        sent = await settled(client, answer.json()["message_id"], {"SENT", "READ", "FAILED"})
        assert (sent["status"] in {"SENT", "READ"}, sent["tag"]) == (True, "HUMAN_AGENT")

        stale = await conversation(client, "instagram", "17840000000000078")
        await customer_writes(enforcing, "instagram", "17840000000000078", 8 * 86_400)
        await inbound_count(client, stale, 1)
        closed = await client.post(stale, json={"text": "Oi"})
        assert (closed.status_code, closed.json()["error"]["code"]) == (422, "outside_window")


async def test_what_meta_refuses_anyway_ends_failed_with_its_code(
    tmp_path: Path, owner: str
) -> None:
    server = serve(tmp_path / "lenient", owner, "off")
    try:
        async with api(server, server.token(owner)) as client:
            whatsapp = await conversation(client, "whatsapp", "5511977000002")
            free_form = await client.post(whatsapp, json={"text": "Oi"})
            unknown = await client.post(
                whatsapp,
                json={"type": "template", "template": {**HELLO, "name": "order_shipped"}},
            )
            instagram = await conversation(client, "instagram", "17840000000000079")
            untagged = await client.post(instagram, json={"text": "Oi"})
            codes = {}
            for name, answer in (("window", free_form), ("template", unknown), ("ig", untagged)):
                assert answer.status_code == 202, answer.text
                failed = await settled(client, answer.json()["message_id"], {"FAILED", "READ"})
                codes[name] = (failed["status"], failed["error"]["code"])
        assert codes == {
            "window": ("FAILED", "131047"),
            "template": ("FAILED", "132001"),
            "ig": ("FAILED", "10"),
        }
    finally:
        stop_server(server)
