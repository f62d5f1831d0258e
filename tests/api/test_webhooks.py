"""The webhook operations of the HTTP API, in process (the deliveries themselves: see
tests/e2e/test_webhooks_out.py): tenant scoping, the secret shown once, the limit, the
refused targets; the scoping and the limit on every store."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest

from tests.api.test_web import OWN_SECRETS
from tests.store.conftest import fresh_cassandra_keyspace
from whatslike.app import Runtime
from whatslike.auth import TokenService
from whatslike.settings import load_settings, resolve_jwt_secret


@asynccontextmanager
async def opened(tmp_path: Path, **extra: str) -> AsyncIterator[Runtime]:
    settings = load_settings(data_dir=tmp_path, webhook_endpoints_per_org=2, **OWN_SECRETS, **extra)
    runtime = Runtime(settings)
    await runtime.open()
    try:
        yield runtime
    finally:
        await runtime.deps.store.close()


@pytest.fixture
async def runtime(tmp_path: Path) -> AsyncIterator[Runtime]:
    async with opened(tmp_path) as runtime:
        yield runtime


@pytest.fixture(params=["sqlite", pytest.param("cassandra", marks=pytest.mark.cassandra)])
async def any_runtime(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Runtime]:
    """A runtime on SQLite, or on a fresh Cassandra keyspace."""
    if request.param == "sqlite":
        async with opened(tmp_path) as runtime:
            yield runtime
        return
    async with (
        fresh_cassandra_keyspace() as url,
        opened(tmp_path, database_url=url, roles="api,router,connector,status-worker") as runtime,
    ):
        yield runtime


def client(runtime: Runtime, org: str) -> httpx.AsyncClient:
    token = TokenService(resolve_jwt_secret(runtime.settings), "", "").mint("ana", org, 600)
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=runtime.app),
        base_url="http://t",
        headers={"Authorization": f"Bearer {token}"},
    )


async def test_endpoints_are_the_organizations_own(any_runtime: Runtime) -> None:
    runtime = any_runtime
    async with client(runtime, "acme") as acme, client(runtime, "other") as other:
        made = await acme.post("/api/webhooks", json={"url": "https://crm.example.com/h"})
        assert made.status_code == 201, made.text
        endpoint = made.json()
        assert endpoint["secret"].startswith("whsec_")
        listed = (await acme.get("/api/webhooks")).json()["endpoints"]
        assert listed == [{k: v for k, v in endpoint.items() if k != "secret"}]
        assert (await other.get("/api/webhooks")).json() == {"endpoints": []}
        path = f"/api/webhooks/{endpoint['id']}"
        for method, suffix in [("POST", "/rotate"), ("GET", "/parked"), ("POST", "/replay")]:
            answer = await other.request(method, path + suffix)
            assert answer.status_code == 404, (method, suffix, answer.text)
        assert (await other.delete(path)).status_code == 404
        rotated = (await acme.post(path + "/rotate")).json()
        assert rotated["secret"] != endpoint["secret"]
        assert (await acme.get(path + "/parked")).json() == {"deliveries": []}
        assert (await acme.post(path + "/replay")).json() == {"replayed": 0}
        assert (await acme.delete(path)).status_code == 204
        assert (await acme.delete(path)).status_code == 404


async def test_an_organization_has_a_limit_of_endpoints(any_runtime: Runtime) -> None:
    runtime = any_runtime
    async with client(runtime, "acme") as acme:
        for n in range(2):
            made = await acme.post("/api/webhooks", json={"url": f"https://crm.example.com/{n}"})
            assert made.status_code == 201
        refused = await acme.post("/api/webhooks", json={"url": "https://crm.example.com/x"})
        assert refused.status_code == 409
        assert refused.json()["error"]["code"] == "too_many_endpoints"


@pytest.mark.parametrize(
    ("url", "status", "why"),
    [
        ("http://crm.example.com/h", 403, "must be https"),
        ("https://127.0.0.1/h", 403, "loopback"),
        ("https://10.0.0.7/h", 403, "not public"),
        ("https://localhost:8000/h", 403, "loopback"),
        ("file:///etc/passwd", 400, "url"),
        ("https://crm.example.com/h#frag", 400, "url"),
    ],
)
async def test_targets_that_may_not_be_called_are_refused(
    runtime: Runtime, url: str, status: int, why: str
) -> None:
    async with client(runtime, "acme") as acme:
        refused = await acme.post("/api/webhooks", json={"url": url})
    assert refused.status_code == status, refused.text
    assert why in refused.json()["error"]["message"]
