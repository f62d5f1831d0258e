"""Issue 8's attacks against a real `whatslike serve`, then its log: forged tokens over
the upgrade and HTTP, cross-tenant reads, forged webhooks, and afterwards not one JWT,
app secret or verify token in anything the server wrote."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import jwt
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus
from websockets.typing import Subprotocol

from tests.e2e.conftest import Server, api, start_server, stop_server
from whatslike.connectors.meta import sign
from whatslike.settings import DEV_SECRETS

FIXTURES = Path(__file__).parents[1] / "fixtures" / "meta"


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    running = start_server(tmp_path_factory.mktemp("target"), {"WHATSLIKE_SIM_DELAY_MS": "20"})
    yield running
    stop_server(running)


def _forged(server: Server) -> dict[str, str]:
    now = int(time.time())
    claims = {"sub": "u", "org_id": "org-a", "exp": now + 600}
    secret = (server.data_dir / "jwt-secret").read_text().strip()
    return {
        "wrong-secret": jwt.encode(claims, "w" * 40, "HS256"),
        "alg-none": jwt.encode(claims, None, "none"),
        "exp-string": jwt.encode({**claims, "exp": str(now + 600)}, secret, "HS256"),
        "exp-year-5000": jwt.encode({**claims, "exp": 95_617_584_000}, secret, "HS256"),
        "foreign-aud": jwt.encode({**claims, "aud": "billing"}, secret, "HS256"),
        "typ-dpop": jwt.encode(claims, secret, "HS256", headers={"typ": "dpop+jwt"}),
    }


async def test_forged_tokens_open_nothing_over_the_upgrade_or_http(target: Server) -> None:
    forged = _forged(target)
    target.secrets.update(forged.values())
    for kind, token in forged.items():
        for options in (
            {"uri": f"{target.ws_url}?access_token={token}"},
            {
                "uri": target.ws_url,
                "subprotocols": [Subprotocol("whatslike.v1"), Subprotocol(f"access_token.{token}")],
            },
        ):
            with pytest.raises(InvalidStatus) as refused:
                async with connect(**options):
                    pass
            assert refused.value.response.status_code == 401, kind
        async with api(target, token) as client:
            answer = await client.post(
                "/api/conversations", json={"channel": "whatsapp", "contact": "1"}
            )
            assert answer.status_code == 401, kind


async def test_the_subprotocol_carries_a_good_token(target: Server) -> None:
    token = target.token("org-a")
    offered = [Subprotocol("whatslike.v1"), Subprotocol(f"access_token.{token}")]
    async with connect(target.ws_url, subprotocols=offered) as ws:
        assert ws.subprotocol == "whatslike.v1"
        assert json.loads(await ws.recv())["type"] == "connected"


async def test_another_organization_reads_nothing_over_http(target: Server) -> None:
    async with api(target, target.token("org-a")) as ours:
        created = await ours.post(
            "/api/conversations", json={"channel": "whatsapp", "contact": "5511911112222"}
        )
        conversation = created.json()["id"]
    async with api(target, target.token("org-b")) as theirs:
        for method, path in (
            ("GET", f"/api/conversations/{conversation}"),
            ("GET", f"/api/conversations/{conversation}/messages"),
            ("GET", f"/api/conversations/{conversation}/changes?since=0"),
            ("POST", f"/api/conversations/{conversation}/messages"),
        ):
            answer = await theirs.request(method, path, json={"text": "hi"})
            assert answer.status_code == 404, path


async def test_forged_webhooks_change_nothing(target: Server) -> None:
    body = (FIXTURES / "whatsapp-status-failed.json").read_bytes()
    async with httpx.AsyncClient(base_url=target.url) as client:
        for secret in ("wrong-secret", "", DEV_SECRETS["meta_access_token"]):
            headers = {"Content-Type": "application/json"}
            if secret:
                headers["X-Hub-Signature-256"] = sign(secret, body)
            answer = await client.post("/webhooks/whatsapp", content=body, headers=headers)
            assert answer.status_code == 403
        handshake = {"hub.mode": "subscribe", "hub.challenge": "7", "hub.verify_token": "nope"}
        assert (await client.get("/webhooks/instagram", params=handshake)).status_code == 403


def test_after_the_attacks_no_log_line_carries_a_token_or_a_secret(tmp_path: Path) -> None:
    """A server of its own, driven through the paths that log a URL (a token in the query
    of an upgrade, the verify token of the handshake), then stopped and read whole."""
    server = start_server(tmp_path)
    token = server.token("org-l")
    refused = 0
    for url in (f"{server.ws_url}?access_token={token}", f"{server.ws_url}?access_token=x.y.z"):
        answer = httpx.get(
            url,
            headers={
                "Connection": "Upgrade",
                "Upgrade": "websocket",
                "Sec-WebSocket-Version": "13",
                "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
            },
            timeout=5,
        )
        refused += answer.status_code == 401
    verify = DEV_SECRETS["meta_verify_token"]
    challenge = httpx.get(
        f"{server.url}/webhooks/whatsapp",
        params={"hub.mode": "subscribe", "hub.challenge": "9", "hub.verify_token": verify},
        timeout=5,
    )
    assert (challenge.status_code, refused) == (200, 1)
    stop_server(server)  # asserts itself; checked again here to say what was looked at
    assert server.leaked() == []
    logged = "".join(server.output)
    assert "access_token=[redacted]" in logged  # the access log was on, and redacted
    assert "hub.verify_token=[redacted]" in logged
    # The refused upgrade is one INFO line of ours, not an ERROR per refusal.
    assert "refused a WebSocket upgrade: 401 unauthorized" in logged
    assert not [line for line in server.output if "ERROR" in line]
