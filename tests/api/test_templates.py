"""Templates and the customer service window in the HTTP API: a WhatsApp template is
taken any time, a free-form message only within the window (Instagram: 7 days with the
HUMAN_AGENT tag, which the API adds past 23 h), a template on Instagram never; a template
is validated with clear 400s and shown in the message answers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.api.test_http import client_for
from whatslike.app import Runtime
from whatslike.events import OutboundMessage
from whatslike.settings import load_settings
from whatslike.store.base import InboundMessage

TEMPLATE: dict[str, Any] = {
    "name": "order_update",
    "language": {"code": "pt_BR"},
    "components": [
        {"type": "header", "parameters": [{"type": "text", "text": "Pedido 42"}]},
        {"type": "body", "parameters": [{"type": "text", "text": "Ana"}]},
        {
            "type": "button",
            "sub_type": "quick_reply",
            "index": 0,
            "parameters": [{"type": "payload", "payload": "confirm-42"}],
        },
        {
            "type": "button",
            "sub_type": "url",
            "index": 1,
            "parameters": [{"type": "text", "text": "42"}],
        },
    ],
}


@pytest.fixture
async def enforced(tmp_path: Path) -> AsyncIterator[Runtime]:
    runtime = Runtime(load_settings(data_dir=tmp_path, customer_window="enforce"))
    await runtime.open()
    yield runtime
    await runtime.deps.store.close()


async def conversation(client: httpx.AsyncClient, channel: str, contact: str) -> str:
    created = await client.post("/api/conversations", json={"channel": channel, "contact": contact})
    return str(created.json()["id"])


async def sent_events(runtime: Runtime) -> dict[str, OutboundMessage]:
    items = await runtime.deps.store.outbox_batch("test", 100)
    events = (OutboundMessage.from_json(item.payload) for item in items)
    return {event.message_id: event for event in events}


async def customer_wrote(
    runtime: Runtime, channel: str, contact: str, ago: timedelta, mid: str
) -> None:
    await runtime.deps.store.receive_message(
        InboundMessage("acme", channel, contact, mid, "oi", datetime.now(UTC) - ago)
    )


async def test_a_template_is_taken_outside_the_window_where_a_text_is_refused(
    enforced: Runtime,
) -> None:
    async with await client_for(enforced) as client:
        url = f"/api/conversations/{await conversation(client, 'whatsapp', '+55')}/messages"
        text = await client.post(url, json={"text": "oi"})
        assert (text.status_code, text.json()["error"]["code"]) == (422, "outside_window")
        assert "use a template" in text.json()["error"]["message"]

        answer = await client.post(
            url, json={"type": "template", "template": TEMPLATE, "client_message_id": "t-1"}
        )
        assert answer.status_code == 202, answer.text
        message_id = answer.json()["message_id"]
        again = await client.post(
            url, json={"type": "template", "template": TEMPLATE, "client_message_id": "t-1"}
        )
        assert again.json() == answer.json()

        shown = (await client.get(f"/api/messages/{message_id}")).json()
        assert (shown["text"], shown["tag"]) == ("", None)
        assert shown["template"]["name"] == "order_update"
        assert shown["template"]["language"] == {"code": "pt_BR", "policy": "deterministic"}
        assert shown["template"]["components"][2]["parameters"] == [
            {"type": "payload", "payload": "confirm-42"}
        ]
        [listed] = (await client.get(url)).json()["messages"]
        assert listed["template"] == shown["template"]

        # The customer writes: a text goes out again.
        await customer_wrote(enforced, "whatsapp", "+55", timedelta(minutes=1), "wamid.in")
        assert (await client.post(url, json={"text": "oi"})).status_code == 202
    [event] = [e for e in (await sent_events(enforced)).values() if e.template is not None]
    assert event.message_id == message_id
    assert event.text == ""


async def test_instagram_answers_are_tagged_human_agent_after_23_hours_and_refused_after_7_days(
    enforced: Runtime,
) -> None:
    async with await client_for(enforced) as client:
        urls = {}
        for contact, ago in (("ig-fresh", 2), ("ig-day", 30), ("ig-week", 24 * 8)):
            urls[contact] = f"/api/conversations/{await conversation(client, 'instagram', contact)}"
            await customer_wrote(enforced, "instagram", contact, timedelta(hours=ago), contact)
        never = f"/api/conversations/{await conversation(client, 'instagram', 'ig-never')}"
        refused = await client.post(f"{never}/messages", json={"text": "oi"})
        assert (refused.status_code, refused.json()["error"]["code"]) == (422, "outside_window")

        fresh = await client.post(f"{urls['ig-fresh']}/messages", json={"text": "oi"})
        day = await client.post(f"{urls['ig-day']}/messages", json={"text": "oi"})
        assert (fresh.status_code, day.status_code) == (202, 202)
        week = await client.post(f"{urls['ig-week']}/messages", json={"text": "oi"})
        assert (week.status_code, week.json()["error"]["code"]) == (422, "outside_window")
        assert "7 days" in week.json()["error"]["message"]

        template = await client.post(
            f"{urls['ig-fresh']}/messages", json={"type": "template", "template": TEMPLATE}
        )
        assert (template.status_code, template.json()["error"]["code"]) == (
            422,
            "template_unsupported",
        )
        tags = {
            answer.json()["message_id"]: (
                await client.get(f"/api/messages/{answer.json()['message_id']}")
            ).json()["tag"]
            for answer in (fresh, day)
        }
    assert list(tags.values()) == [None, "HUMAN_AGENT"]
    events = await sent_events(enforced)
    assert {mid: events[mid].tag for mid in tags} == tags


async def test_without_enforcement_nothing_is_tagged_nor_refused(tmp_path: Path) -> None:
    runtime = Runtime(load_settings(data_dir=tmp_path, customer_window="off"))
    await runtime.open()
    try:
        async with await client_for(runtime) as client:
            url = f"/api/conversations/{await conversation(client, 'instagram', 'ig')}/messages"
            await customer_wrote(runtime, "instagram", "ig", timedelta(days=3), "mid.1")
            answer = await client.post(url, json={"text": "oi"})
            assert answer.status_code == 202
            shown = await client.get(f"/api/messages/{answer.json()['message_id']}")
            assert shown.json()["tag"] is None
    finally:
        await runtime.deps.store.close()


def with_template(**changes: Any) -> dict[str, Any]:
    return {"type": "template", "template": {**TEMPLATE, **changes}}


def body_text(text: str) -> dict[str, Any]:
    return with_template(
        components=[{"type": "body", "parameters": [{"type": "text", "text": text}]}]
    )


@pytest.mark.parametrize(
    ("body", "names"),
    [
        (with_template(name="Order Update"), "template.name"),
        (with_template(name="x" * 513), "template.name"),
        (with_template(language={"code": "portuguese"}), "template.language.code"),
        (with_template(language="pt_BR"), "template.language"),
        (body_text("x" * 1025), "template.components.0"),
        (body_text("two\nlines"), "template.components.0"),
        (
            with_template(
                components=[{"type": "body", "parameters": [{"type": "text", "text": "v"}] * 21}]
            ),
            "template.components.0",
        ),
        (
            with_template(
                components=[{"type": "header", "parameters": [{"type": "text", "text": "h" * 61}]}]
            ),
            "template.components.0",
        ),
        (
            with_template(
                components=[
                    {
                        "type": "button",
                        "sub_type": "quick_reply",
                        "index": 10,
                        "parameters": [{"type": "payload", "payload": "p"}],
                    }
                ]
            ),
            "template.components.0",
        ),
        ({"template": TEMPLATE}, "template message"),
        ({"type": "template"}, "template message"),
        ({**with_template(), "text": "oi"}, "no text nor media_id"),
        ({"type": "media", "text": "oi"}, "needs a media_id"),
    ],
)
async def test_a_malformed_template_is_a_400_naming_what_is_wrong(
    enforced: Runtime, body: dict[str, Any], names: str
) -> None:
    async with await client_for(enforced) as client:
        url = f"/api/conversations/{await conversation(client, 'whatsapp', '+55')}/messages"
        answer = await client.post(url, json=body)
    assert (answer.status_code, answer.json()["error"]["code"]) == (400, "bad_request")
    assert names in answer.json()["error"]["message"]
    assert await enforced.deps.store.outbox_size() == 0


async def test_a_template_campaign_is_taken_on_whatsapp_only(enforced: Runtime) -> None:
    async with await client_for(enforced) as client:
        body = {
            "client_campaign_id": "reengage",
            "channel": "whatsapp",
            "message": {"type": "template", "template": TEMPLATE},
            "contacts": ["+5511", "+5512"],
        }
        answer = await client.post("/api/campaigns", json=body)
        assert answer.status_code == 202, answer.text
        assert answer.json()["message"]["template"]["name"] == "order_update"
        shown = await client.get(f"/api/campaigns/{answer.json()['id']}")
        assert shown.json()["message"] == answer.json()["message"]
        instagram = await client.post(
            "/api/campaigns", json={**body, "client_campaign_id": "ig", "channel": "instagram"}
        )
    assert (instagram.status_code, instagram.json()["error"]["code"]) == (
        422,
        "template_unsupported",
    )
