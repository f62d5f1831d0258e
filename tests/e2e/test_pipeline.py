"""End to end through a real `whatslike serve`: HTTP in, simulator webhooks, store,
fan-out, WebSocket out; tenant isolation, auth and webhook signatures at the edges."""

from __future__ import annotations

import hashlib
import hmac
import json
import signal
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.e2e.conftest import (
    Server,
    Socket,
    api,
    split_deployment,
    start_server,
    stop_server,
)

OpenSocket = Callable[[Server, str], Awaitable[Socket]]


async def new_conversation(client: httpx.AsyncClient, channel: str = "whatsapp") -> str:
    response = await client.post(
        "/api/conversations", json={"channel": channel, "contact": "5511988877665"}
    )
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


async def send(client: httpx.AsyncClient, conversation: str, text: str = "Seu pedido") -> str:
    response = await client.post(
        f"/api/conversations/{conversation}/messages",
        json={"text": text, "client_message_id": uuid.uuid4().hex},
    )
    assert response.status_code == 202, response.text
    assert response.json()["status"] == "PENDING"
    return str(response.json()["message_id"])


async def statuses_until_final(
    socket: Socket, messages: set[str], final: str = "READ"
) -> list[dict[str, Any]]:
    """Collect status frames until every given message reached `final`."""
    frames: list[dict[str, Any]] = []
    waiting = set(messages)
    while waiting:
        frame = await socket.next_of("status", wait_s=20)
        frames.append(frame)
        if frame["status"] == final:
            waiting.discard(frame["message_id"])
    return frames


async def test_a_message_goes_sent_delivered_read_with_seq_1_2_3(
    server: Server, open_socket: OpenSocket
) -> None:
    token = server.token("org-a")
    async with api(server, token) as client:
        conversation = await new_conversation(client)
        socket = await open_socket(server, token)
        subscribed = await socket.subscribe(conversation, ref="r1")
        assert subscribed["ref"] == "r1"
        assert subscribed["seq"] == 0
        message = await send(client, conversation)

        frames = await statuses_until_final(socket, {message})
        assert [(f["status"], f["seq"]) for f in frames] == [
            ("SENT", 1),
            ("DELIVERED", 2),
            ("READ", 3),
        ]
        assert all(f["message_id"] == message for f in frames)
        assert all(f["conversation_id"] == conversation for f in frames)

        listed = (await client.get(f"/api/conversations/{conversation}/messages")).json()
        (row,) = listed["messages"]
        assert row["status"] == "READ"
        assert row["seq"] == 3
        assert row["sent_at"] <= row["delivered_at"] <= row["read_at"]

        # Resubscribing with `since` gives exactly the frames after it, then live ones.
        late = await open_socket(server, token)
        again = await late.subscribe(conversation, since=1)
        assert (again["seq"], again["recovered"]) == (3, True)
        replayed = [await late.next_of("status"), await late.next_of("status")]
        assert replayed == frames[1:]
        assert await late.ping_barrier() == []

        changes = (await client.get(f"/api/conversations/{conversation}/changes?since=2")).json()
        assert changes["frames"] == frames[2:]
        assert changes["last_seq"] == 3


async def test_another_organization_gets_forbidden_and_sees_nothing(
    server: Server, open_socket: OpenSocket
) -> None:
    token_a, token_b = server.token("org-a"), server.token("org-b", "intruder")
    async with api(server, token_a) as client_a, api(server, token_b) as client_b:
        conversation = await new_conversation(client_a)
        owner = await open_socket(server, token_a)
        await owner.subscribe(conversation)
        intruder = await open_socket(server, token_b)
        await intruder.send({"type": "subscribe", "conversation_id": conversation, "ref": 7})
        refused = await intruder.next_of("error")
        assert (refused["code"], refused["ref"]) == ("forbidden", 7)
        await intruder.send({"type": "subscribe", "conversation_id": "conv_does_not_exist"})
        assert (await intruder.next_of("error"))["code"] == "forbidden"

        message = await send(client_a, conversation)
        await statuses_until_final(owner, {message})
        assert await intruder.ping_barrier() == []

        assert (await client_b.get(f"/api/conversations/{conversation}")).status_code == 404
        assert (
            await client_b.get(f"/api/conversations/{conversation}/messages")
        ).status_code == 404
        sneaky = await client_b.post(
            f"/api/conversations/{conversation}/messages", json={"text": "hi"}
        )
        assert sneaky.status_code == 404


def _expired_token(server: Server) -> str:
    secret = (server.data_dir / "jwt-secret").read_text().strip()
    past = int(time.time()) - 7200
    claims = {"sub": "u", "org_id": "org-a", "iat": past, "nbf": past, "exp": past + 60}
    return jwt.encode(claims, secret, algorithm="HS256")


@pytest.mark.parametrize("kind", ["garbage", "wrong-secret", "expired", "missing"])
async def test_a_bad_token_cannot_open_the_socket(server: Server, kind: str) -> None:
    tokens = {
        "garbage": "not-a-jwt",
        "wrong-secret": jwt.encode(
            {"sub": "u", "org_id": "org-a", "exp": int(time.time()) + 600}, "x" * 32, "HS256"
        ),
        "expired": _expired_token(server),
        "missing": "",
    }
    url = server.ws_url + (f"?access_token={tokens[kind]}" if tokens[kind] else "")
    with pytest.raises(InvalidStatus) as refused:
        async with connect(url):
            pass
    assert refused.value.response.status_code == 401
    async with httpx.AsyncClient(base_url=server.url) as client:
        headers = {"Authorization": f"Bearer {tokens[kind]}"} if tokens[kind] else {}
        response = await client.get("/api/conversations/x", headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "unauthorized"


async def test_a_webhook_with_a_wrong_signature_gets_403_and_changes_nothing(
    server: Server, open_socket: OpenSocket
) -> None:
    token = server.token("org-a")
    async with api(server, token) as client:
        conversation = await new_conversation(client)
        socket = await open_socket(server, token)
        await socket.subscribe(conversation)
        message = await send(client, conversation)
        await statuses_until_final(socket, {message})
        before = (await client.get(f"/api/conversations/{conversation}/messages")).json()

        fixture = (
            Path(__file__).parents[2]
            / "tests"
            / "fixtures"
            / "meta"
            / "whatsapp-status-failed.json"
        )
        payload = json.loads(fixture.read_text())
        payload["entry"][0]["changes"][0]["value"]["statuses"][0]["biz_opaque_callback_data"] = (
            message
        )
        body = json.dumps(payload).encode()
        wrong = hmac.new(b"not-the-app-secret", body, hashlib.sha256).hexdigest()
        for headers in ({"X-Hub-Signature-256": f"sha256={wrong}"}, {}):
            response = await client.post(
                "/webhooks/whatsapp",
                content=body,
                headers={**headers, "Content-Type": "application/json"},
            )
            assert response.status_code == 403
            assert "error" in response.json()

        assert await socket.ping_barrier() == []
        after = (await client.get(f"/api/conversations/{conversation}/messages")).json()
        assert after == before


async def test_disorder_still_ends_every_message_right_with_gap_free_seqs(
    tmp_path: Path, open_socket: Callable[[Server, str], Awaitable[Socket]]
) -> None:
    disorderly = start_server(
        tmp_path,
        {
            "WHATSLIKE_SIM_DISORDER": "true",
            "WHATSLIKE_SIM_DELAY_MS": "20",
            "WHATSLIKE_SIM_SEED": "7",
        },
    )
    try:
        token = disorderly.token("org-d")
        async with api(disorderly, token) as client:
            conversations = [
                await new_conversation(client, "whatsapp"),
                await new_conversation(client, "whatsapp"),
                await new_conversation(client, "instagram"),
            ]
            socket = await open_socket(disorderly, token)
            for conversation in conversations:
                await socket.subscribe(conversation)
            sent = {
                await send(client, conversation, f"message {i}")
                for conversation in conversations
                for i in range(5)
            }
            frames = await statuses_until_final(socket, sent)

            for conversation in conversations:
                live = [f["seq"] for f in frames if f["conversation_id"] == conversation]
                assert live == list(range(1, len(live) + 1)), live
                stored = (
                    await client.get(f"/api/conversations/{conversation}/changes?since=0")
                ).json()
                assert [f["seq"] for f in stored["frames"]] == live
                listed = (await client.get(f"/api/conversations/{conversation}/messages")).json()
                for row in listed["messages"]:
                    assert row["status"] == "READ", row
                    assert row["read_at"] is not None
                    assert row["delivered_at"] is not None
    finally:
        stop_server(disorderly)


async def test_stopping_the_server_closes_sockets_with_1001(
    tmp_path: Path, open_socket: OpenSocket
) -> None:
    stopping = start_server(tmp_path)
    try:
        socket = await open_socket(stopping, stopping.token("org-s"))
        stopping.process.terminate()
        with pytest.raises(ConnectionClosed) as closed:
            await socket.next(wait_s=20)
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == 1001
    finally:
        stop_server(stopping)
    # uvicorn re-raises the SIGTERM it handled once shut down; -9 would mean it hung.
    assert stopping.process.returncode in (0, -signal.SIGTERM)


async def test_the_simulator_can_run_as_its_own_process(
    tmp_path: Path, open_socket: OpenSocket
) -> None:
    """Roles split over two processes joined only by HTTP, as Meta and we would be."""
    with split_deployment(tmp_path, sim_delay_ms=20) as split:
        token = split.pipeline.token("org-split")
        async with api(split.pipeline, token) as client:
            conversation = await new_conversation(client)
            socket = await open_socket(split.pipeline, token)
            await socket.subscribe(conversation)
            message = await send(client, conversation)
            frames = await statuses_until_final(socket, {message})
            # Webhooks travel concurrently: a READ may overtake its SENT or DELIVERED
            # (which then change nothing), so one to three changes, gap-free, ending READ.
            assert [f["seq"] for f in frames] in ([1], [1, 2], [1, 2, 3])
            assert frames[-1]["status"] == "READ"
        async with httpx.AsyncClient(base_url=split.simulator.url) as plain:
            assert (await plain.get("/api/conversations/x")).status_code == 404
            assert (await plain.get("/healthz")).json()["roles"] == ["simulator"]


@pytest.mark.parametrize("since", ["-1", "abc", "²", "9" * 5000])
async def test_a_bad_since_is_a_400_not_a_crash(server: Server, since: str) -> None:
    token = server.token("org-a")
    async with api(server, token) as client:
        conversation = await new_conversation(client)
        answer = await client.get(
            f"/api/conversations/{conversation}/changes", params={"since": since}
        )
        assert answer.status_code == 400
        assert answer.json()["error"]["code"] == "bad_request"
