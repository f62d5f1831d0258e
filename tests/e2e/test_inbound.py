"""End to end: a customer's reply, posted as Meta does (a signed webhook), arrives while
the agent's socket is down; the agent comes back and recovers it with `since`, in the
same seq stream as the statuses; another organization with the same contact never sees
it. Run here on the embedded default, and in tests/scale on the scaled-out layout."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
from websockets.asyncio.client import connect

from tests.e2e.conftest import Server, Socket, start_server, stop_server
from whatslike.connectors.meta import sign
from whatslike.settings import DEV_SECRETS, Settings
from whatslike.simulator import payloads

#: The phone number id of every deployment of these tests (the default).
PHONE: str = Settings.model_fields["whatsapp_phone_number_id"].default


async def socket_of(hub: Server, token: str) -> Socket:
    connection = await connect(f"{hub.ws_url}?access_token={token}")
    socket = Socket(connection)
    await socket.next_of("connected")
    return socket


async def messages_of(client: httpx.AsyncClient, conversation: str) -> list[dict[str, Any]]:
    answer = await client.get(f"/api/conversations/{conversation}/messages")
    assert answer.status_code == 200, answer.text
    messages: list[dict[str, Any]] = answer.json()["messages"]
    return messages


async def agent_reads_it(
    owner: httpx.AsyncClient,
    agent: Socket,
    frame: dict[str, Any],
    since: int,
    wamid: str,
    *,
    simulator: str | None,
) -> str:
    """The agent reads the customer's message (twice): READ once, Meta told once.
    Answers the path of the read call."""
    mine = frame["conversation_id"]
    read_path = f"/api/conversations/{mine}/messages/{frame['message_id']}/read"
    for _ in range(2):
        answer = await owner.post(read_path)
        assert answer.status_code == 202, answer.text
        assert answer.json() == {"message_id": frame["message_id"], "status": "READ"}
    read = await agent.next_of("status", wait_s=20)
    assert (read["message_id"], read["status"], read["seq"]) == (
        frame["message_id"],
        "READ",
        since + 2,
    )
    if simulator is not None:
        async with httpx.AsyncClient(base_url=simulator) as sim:
            deadline = time.monotonic() + 20
            while (await sim.get("/simulator/receipts")).json()["whatsapp"].get(wamid) != 1:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
    assert await agent.ping_barrier() == []
    return read_path


async def customer_reply_is_recovered_with_since(
    hubs: tuple[Server, Server],
    tokens: tuple[str, str],
    webhooks: str,
    app_secret: str,
    simulator: str | None = None,
) -> None:
    """`tokens`: of the organization owning the phone number, and of another one that
    talks to the same contact; `webhooks`: the base URL serving /webhooks/whatsapp;
    `simulator`: the simulator, when its count of read receipts is open to read."""
    contact = f"55119{uuid.uuid4().int % 10**8:08d}"
    owner_hub, other_hub = hubs
    owner_token, other_token = tokens
    async with (
        httpx.AsyncClient(
            base_url=owner_hub.url, headers={"Authorization": f"Bearer {owner_token}"}
        ) as owner,
        httpx.AsyncClient(
            base_url=other_hub.url, headers={"Authorization": f"Bearer {other_token}"}
        ) as other,
        httpx.AsyncClient(base_url=webhooks) as meta,
    ):
        mine = (
            await owner.post("/api/conversations", json={"channel": "whatsapp", "contact": contact})
        ).json()["id"]
        theirs = (
            await other.post("/api/conversations", json={"channel": "whatsapp", "contact": contact})
        ).json()["id"]
        watcher = await socket_of(other_hub, other_token)
        await watcher.subscribe(theirs)
        agent = await socket_of(owner_hub, owner_token)
        since = (await agent.subscribe(mine))["seq"]
        await agent.connection.close()  # the agent's socket is down

        wamid = f"wamid.{uuid.uuid4().hex}"
        message = payloads.whatsapp_message(contact, wamid, int(time.time()), "Oi, chegou sim!")
        webhook = payloads.whatsapp_message_webhook(PHONE, contact, [message])
        body = json.dumps(webhook).encode()
        headers = {"X-Hub-Signature-256": sign(app_secret, body)}
        for _ in range(2):  # Meta redelivers: stored once, one frame
            answer = await meta.post("/webhooks/whatsapp", content=body, headers=headers)
            assert answer.status_code == 200, answer.text

        # Its arrival is applied (a seq given) while nobody of the owner listens.
        deadline = time.monotonic() + 20
        while (listed := await messages_of(owner, mine)) == [] or listed[0]["seq"] is None:
            assert time.monotonic() < deadline, listed
            await asyncio.sleep(0.05)

        agent = await socket_of(owner_hub, owner_token)
        subscribed = await agent.subscribe(mine, since=since)
        assert (subscribed["seq"], subscribed["recovered"]) == (since + 1, True)
        frame = await agent.next_of("message")
        assert frame["seq"] == since + 1
        assert (frame["conversation_id"], frame["direction"], frame["text"]) == (
            mine,
            "in",
            "Oi, chegou sim!",
        )
        assert frame["status"] == "DELIVERED"
        assert await agent.ping_barrier() == []

        listed = await messages_of(owner, mine)
        assert [(m["id"], m["direction"], m["status"]) for m in listed] == [
            (frame["message_id"], "in", "DELIVERED")
        ]
        by_wamid = await owner.get("/api/messages", params={"provider_message_id": wamid})
        assert by_wamid.json()["id"] == frame["message_id"]
        changes = (await owner.get(f"/api/conversations/{mine}/changes?since={since}")).json()
        assert changes["frames"] == [frame]

        read_path = await agent_reads_it(owner, agent, frame, since, wamid, simulator=simulator)
        assert (await other.post(read_path.replace(mine, theirs))).status_code == 404
        ours = await owner.post(f"/api/conversations/{mine}/messages", json={"text": "De nada"})
        refused = await owner.post(
            f"/api/conversations/{mine}/messages/{ours.json()['message_id']}/read"
        )
        assert (refused.status_code, refused.json()["error"]["code"]) == (409, "not_inbound")

        # The other organization, with the same contact, sees none of it.
        assert await watcher.ping_barrier() == []
        assert await messages_of(other, theirs) == []
        assert (await other.get(f"/api/messages/{frame['message_id']}")).status_code == 404
        hidden = await other.get("/api/messages", params={"provider_message_id": wamid})
        assert hidden.status_code == 404
        for socket in (agent, watcher):
            await socket.connection.close()


async def test_a_reply_while_the_agent_is_away_is_recovered_on_the_embedded_default(
    tmp_path: Path,
) -> None:
    owner = f"org-owner-{uuid.uuid4().hex[:8]}"
    server = start_server(tmp_path / "serve", {"WHATSLIKE_WHATSAPP_ORG_ID": owner})
    try:
        await customer_reply_is_recovered_with_since(
            (server, server),
            (server.token(owner), server.token("org-other", "intruder")),
            server.url,
            DEV_SECRETS["meta_app_secret"],
            simulator=server.url,
        )
    finally:
        stop_server(server)


async def test_marking_read_from_the_socket(tmp_path: Path) -> None:
    """The `read` frame does what the read call does: twice, one READ change and one
    receipt to Meta, each answered `read_ok`; bad input is a clear error frame, another
    organization's conversation `forbidden` like a subscribe."""
    server = start_server(tmp_path / "serve")
    contact = f"55119{uuid.uuid4().int % 10**8:08d}"
    try:
        token = server.token("demo")
        async with httpx.AsyncClient(
            base_url=server.url, headers={"Authorization": f"Bearer {token}"}
        ) as owner:
            reply = {"channel": "whatsapp", "contact": contact, "text": "Oi"}
            wamid = (await owner.post("/simulator/reply", json=reply)).json()["provider_message_id"]
            by_wamid = "/api/messages"
            deadline = time.monotonic() + 20
            while (
                found := await owner.get(by_wamid, params={"provider_message_id": wamid})
            ).json().get("seq") is None:
                assert time.monotonic() < deadline, found.text
                await asyncio.sleep(0.05)
            message = found.json()
            conversation = message["conversation_id"]
            agent = await socket_of(server, token)
            since = (await agent.subscribe(conversation))["seq"]
            read = {"type": "read", "conversation_id": conversation, "message_id": message["id"]}
            for ref in ("r1", "r2"):
                await agent.send({**read, "ref": ref})
            answers = [await agent.next() for _ in range(3)]
            acks = [a for a in answers if a["type"] == "read_ok"]
            assert [a["ref"] for a in acks] == ["r1", "r2"]
            [status] = [a for a in answers if a["type"] == "status"]
            assert (status["message_id"], status["status"], status["seq"]) == (
                message["id"],
                "READ",
                since + 1,
            )
            deadline = time.monotonic() + 20
            while (await owner.get("/simulator/receipts")).json()["whatsapp"].get(wamid) != 1:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)

            ours = await owner.post(
                f"/api/conversations/{conversation}/messages", json={"text": "De nada"}
            )
            refusals = [
                ({**read, "message_id": "msg_none"}, "not_found"),
                ({**read, "message_id": ours.json()["message_id"]}, "not_inbound"),
                ({"type": "read", "conversation_id": conversation}, "bad_request"),
                ({**read, "message_id": "a/b"}, "bad_request"),
            ]
            checker = await socket_of(server, token)  # subscribed to nothing: no statuses
            for frame, code in refusals:
                await checker.send({**frame, "ref": code})
                error = await checker.next_of("error")
                assert (error["code"], error["ref"]) == (code, code), error
            assert await checker.ping_barrier() == []
            intruder = await socket_of(server, server.token("org-other", "intruder"))
            await intruder.send({**read, "ref": 9})
            refused = await intruder.next_of("error")
            assert (refused["code"], refused["ref"]) == ("forbidden", 9)
            for socket in (agent, checker, intruder):
                await socket.connection.close()
    finally:
        stop_server(server)
