"""The browser side of the api role: the client, the demo, and development tokens that
exist only in the embedded mode."""

from __future__ import annotations

from pathlib import Path

import httpx
import jwt

from whatslike.app import Runtime
from whatslike.settings import load_settings, resolve_jwt_secret

#: Credentials of a deployment outside the embedded mode (development ones are refused).
OWN_SECRETS = {
    "meta_app_secret": "app-secret-of-this-deployment",
    "meta_verify_token": "verify-token-of-this-deployment",
    "meta_access_token": "access-token-of-this-deployment",
}


def client_for(runtime: Runtime) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=runtime.app), base_url="http://t")


async def test_the_client_library_and_the_demo_are_served(tmp_path: Path) -> None:
    runtime = Runtime(load_settings(data_dir=tmp_path))
    async with client_for(runtime) as client:
        script = await client.get("/client/websocket-client.js")
        assert script.status_code == 200
        assert script.headers["content-type"].startswith("text/javascript")
        assert "export class ChatStatusClient" in script.text
        types = await client.get("/client/websocket-client.d.ts")
        assert "export declare class ChatStatusClient" in types.text
        page = await client.get("/demo")
        assert page.headers["content-type"].startswith("text/html")
        assert "/client/websocket-client.js" in page.text


async def test_embedded_mode_hands_out_demo_tokens(tmp_path: Path) -> None:
    settings = load_settings(data_dir=tmp_path)
    runtime = Runtime(settings)
    async with client_for(runtime) as client:
        config = (await client.get("/demo/config")).json()
        assert config == {"embedded": True, "simulator": True, "heartbeat_s": 25}
        answer = (await client.post("/demo/token")).json()
    claims = jwt.decode(answer["token"], resolve_jwt_secret(settings), algorithms=["HS256"])
    assert (claims["org_id"], claims["sub"]) == ("demo", "demo-agent")
    url = runtime.demo_url()
    assert url is not None
    assert url == f"{settings.base_url}/demo"  # no token: the page asks for one itself


async def test_demo_tokens_go_to_loopback_clients_unless_opted_in(tmp_path: Path) -> None:
    """Embedded on 0.0.0.0, anyone who reached the port got a working token."""
    exposed = load_settings(data_dir=tmp_path, host="0.0.0.0", **OWN_SECRETS)
    runtime = Runtime(exposed)
    for client, status in ((("203.0.113.9", 5000), 403), (("::ffff:127.0.0.1", 5000), 200)):
        transport = httpx.ASGITransport(app=runtime.app, client=client)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as remote:
            answer = await remote.post("/demo/token")
        assert answer.status_code == status, client
    assert answer.json()["org_id"] == "demo"
    opted = Runtime(load_settings(data_dir=tmp_path, demo_tokens_remote=True, **OWN_SECRETS))
    transport = httpx.ASGITransport(app=opted.app, client=("203.0.113.9", 5000))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as remote:
        assert (await remote.post("/demo/token")).status_code == 200


async def test_no_demo_tokens_outside_the_embedded_mode(tmp_path: Path) -> None:
    settings = load_settings(
        data_dir=tmp_path,
        roles="api,router,connector,status-worker",
        graph_url="http://127.0.0.1:9/simulator",
        **OWN_SECRETS,
    )
    runtime = Runtime(settings)
    async with client_for(runtime) as client:
        config = (await client.get("/demo/config")).json()
        assert (config["embedded"], config["simulator"]) == (False, False)
        refused = await client.post("/demo/token")
        assert refused.status_code == 404
        assert refused.json()["error"]["code"] == "not_found"
    assert runtime.demo_url() is None


async def test_the_root_leads_to_the_demo_or_to_an_index(tmp_path: Path) -> None:
    async with client_for(Runtime(load_settings(data_dir=tmp_path / "a"))) as client:
        root = await client.get("/")
        assert (root.status_code, root.headers["location"]) == (303, "/demo")
    split = load_settings(
        data_dir=tmp_path / "b", roles="api,router,connector,status-worker", **OWN_SECRETS
    )
    async with client_for(Runtime(split)) as client:
        index = (await client.get("/")).json()
        assert index["service"] == "whatslike"
        assert "/ws/status" in index["endpoints"]


async def test_metrics_can_be_protected_by_a_token(tmp_path: Path) -> None:
    settings = load_settings(data_dir=tmp_path, metrics_token="metrics-token-123")
    async with client_for(Runtime(settings)) as client:
        assert (await client.get("/metrics")).status_code == 401
        wrong = await client.get("/metrics", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        right = await client.get("/metrics", headers={"Authorization": "Bearer metrics-token-123"})
        assert right.status_code == 200
        assert "whatslike_" in right.text
    async with client_for(Runtime(load_settings(data_dir=tmp_path / "open"))) as client:
        assert (await client.get("/metrics")).status_code == 200
