"""The HTTP API's contract: the OpenAPI document is built from the operations the process
serves, so every served API route is in it — the Starlette routes and the hot routes
alike — and it is a valid OpenAPI 3.1 document, served with its page."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Annotated

import httpx
import pytest
import schemathesis
from pydantic import Field, TypeAdapter, ValidationError
from starlette.responses import Response
from starlette.routing import BaseRoute, Mount, Route, WebSocketRoute

from whatslike.api.contract import Operation, Reply, document
from whatslike.api.http import HttpApi
from whatslike.app import Runtime
from whatslike.settings import load_settings

#: What a process serves outside the contract: pages, static files, the WebSocket
#: (protocol.md §4) and the simulator's stand-in for Meta's Graph API. A route under
#: /api/ or /webhooks/ is never one of them.
OUTSIDE_CONTRACT = {
    "/",
    "/openapi.json",
    "/docs",
    "/docs/assets",
    "/demo",
    "/demo/config",
    "/demo/token",
    "/client/websocket-client.js",
    "/client/websocket-client.d.ts",
    "/ws/status",
    "/simulator/control",
    "/simulator/sends",
    "/simulator/receipts",
    "/simulator/reply",
    "/simulator/media",
    "/simulator/media/{media_id}",
    "/simulator/attachments/{media_id}",
    "/simulator/{version}/{media_id}",
    "/simulator/{version}/me/messages",
    "/simulator/{version}/{phone_number_id}/messages",
}
CONTRACT_PREFIXES = ("/api/", "/webhooks/")


def served(runtime: Runtime) -> set[tuple[str, str]]:
    """(method, path) of every route the process serves: Starlette's and the hot ones."""
    routes: set[tuple[str, str]] = set()
    for route in runtime.starlette.routes:
        routes |= _methods(route)
    routes |= set(runtime.hot_routes.served())
    return routes


def _methods(route: BaseRoute) -> set[tuple[str, str]]:
    if isinstance(route, Route):
        return {(method, route.path) for method in route.methods or () if method != "HEAD"}
    if isinstance(route, Mount | WebSocketRoute):
        return {("*", route.path)}
    raise AssertionError(f"a route of an unknown kind: {route!r}")


def undocumented(runtime: Runtime) -> list[str]:
    paths = runtime.openapi["paths"]
    missing = []
    for method, path in sorted(served(runtime)):
        documented = method.lower() in paths.get(path, {})
        if documented:
            continue
        if path in OUTSIDE_CONTRACT and not path.startswith(CONTRACT_PREFIXES):
            continue
        missing.append(f"{method} {path}")
    return missing


@pytest.fixture
def runtime(tmp_path: Path) -> Runtime:
    return Runtime(load_settings(data_dir=tmp_path))


def test_every_served_api_route_is_in_the_document(runtime: Runtime) -> None:
    assert undocumented(runtime) == []
    # The hot routes are among what is checked, and the API's own are all there.
    assert ("POST", "/api/conversations/{id}/messages") in runtime.hot_routes.served()
    assert {path for path in runtime.openapi["paths"] if path.startswith("/api/")} == {
        "/api/conversations",
        "/api/conversations/{id}",
        "/api/conversations/{id}/messages",
        "/api/conversations/{id}/messages/{message_id}/read",
        "/api/conversations/{id}/changes",
        "/api/messages/{message_id}",
        "/api/messages",
        "/api/webhooks",
        "/api/webhooks/{endpoint_id}",
        "/api/webhooks/{endpoint_id}/rotate",
        "/api/webhooks/{endpoint_id}/parked",
        "/api/webhooks/{endpoint_id}/replay",
        "/api/campaigns",
        "/api/campaigns/{campaign_id}",
        "/api/campaigns/{campaign_id}/messages",
        "/api/media",
        "/api/media/{media_id}",
    }
    # The local store's signed links are served by this process too.
    assert "/media/{media_id}" in runtime.openapi["paths"]


def test_a_route_served_outside_the_operations_is_caught(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sibling adding `Route("/api/broadcasts", ...)` to a role's `routes()` instead of
    declaring an `Operation` fails the test above."""

    async def broadcasts(request: object) -> Response:
        return Response()

    monkeypatch.setattr(
        HttpApi, "routes", lambda self: [Route("/api/broadcasts", broadcasts, methods=["POST"])]
    )
    runtime = Runtime(load_settings(data_dir=tmp_path))
    assert undocumented(runtime) == ["POST /api/broadcasts"]


def test_the_document_is_valid_openapi_3_1(runtime: Runtime) -> None:
    assert runtime.openapi["openapi"] == "3.1.0"
    schemathesis.openapi.from_dict(runtime.openapi).validate()
    operations = [op for methods in runtime.openapi["paths"].values() for op in methods.values()]
    assert len({op["operationId"] for op in operations}) == len(operations)
    send = runtime.openapi["paths"]["/api/conversations/{id}/messages"]["post"]
    assert send["security"] == [{"bearerAuth": []}]
    assert {"202", "400", "401", "404", "413", "429", "503"} <= set(send["responses"])
    assert send["responses"]["202"]["links"]["GetMessage"] == {
        "operationId": "getMessage",
        "parameters": {"message_id": "$response.body#/message_id"},
    }


def test_a_declaration_that_contradicts_itself_is_refused() -> None:
    async def endpoint(request: object) -> Response:
        return Response()

    reply = Reply("ok")
    wrong_params = Operation("GET", "/api/x/{id}", endpoint, "x", "x", "t", 200, reply)
    with pytest.raises(ValueError, match="path parameters"):
        document([wrong_params], title="t", version="1", description="d")
    twice = Operation("GET", "/api/x", endpoint, "x", "x", "t", 200, reply)
    with pytest.raises(ValueError, match="declared twice"):
        document([twice, twice], title="t", version="1", description="d")


def test_a_path_template_matches_one_segment_per_parameter() -> None:
    async def endpoint(request: object) -> Response:
        return Response()

    op = Operation(
        "POST", "/api/conversations/{id}/messages", endpoint, "s", "s", "t", 202, Reply("ok")
    )
    template = op.path_regex()
    match = template.fullmatch("/api/conversations/c.1:x/messages")
    assert match is not None
    assert match.groupdict() == {"id": "c.1:x"}
    for other in (
        "/api/conversations//messages",
        "/api/conversations/a/b/messages",
        "/api/conversations/a/messages/",
        "/api/conversationsX/a/messages",
    ):
        assert template.fullmatch(other) is None, other


async def test_the_document_and_its_page_are_served_from_this_process(
    runtime: Runtime,
) -> None:
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=runtime.app), base_url="http://t"
    ) as client:
        served_document = await client.get("/openapi.json")
        assert served_document.headers["content-type"] == "application/json"
        assert served_document.json() == runtime.openapi
        page = await client.get("/docs")
        assert page.headers["content-type"].startswith("text/html")
        assets = re.findall(r'(?:src|href)="([^"]+)"', page.text)
        assert assets, page.text
        for asset in assets:
            if asset == "data:,":
                continue  # the empty icon: no request for /favicon.ico
            # Nothing from elsewhere: every file is this process's own.
            assert asset.startswith("/docs/assets/"), asset
            assert (await client.get(asset)).status_code == 200, asset
        license_file = await client.get("/docs/assets/swagger-ui/LICENSE")
        assert "Apache License" in license_file.text


async def test_a_method_a_path_does_not_serve_is_405_naming_the_ones_it_does(
    runtime: Runtime,
) -> None:
    """Found by schemathesis: 405s came without `Allow` (our handler dropped Starlette's
    headers), and a path of two operations would have named only one of them."""
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=runtime.app), base_url="http://t"
    ) as client:
        for method, path, allowed in (
            ("TRACE", "/api/conversations/c1/messages", {"GET", "HEAD", "POST"}),
            ("DELETE", "/api/conversations", {"POST"}),
            ("PUT", "/webhooks/whatsapp", {"GET", "HEAD", "POST"}),
        ):
            answer = await client.request(method, path)
            assert answer.status_code == 405, (method, path)
            assert answer.json()["error"]["code"] == "method_not_allowed"
            assert {m.strip() for m in answer.headers["allow"].split(",")} == allowed
        # Both operations of one path are still reached.
        assert (await client.get("/api/conversations/c1/messages")).status_code == 401
        assert (await client.post("/api/conversations/c1/messages")).status_code == 401


def patterns(node: object) -> set[str]:
    if isinstance(node, dict):
        found = {node["pattern"]} if isinstance(node.get("pattern"), str) else set()
        for value in node.values():
            found |= patterns(value)
        return found
    if isinstance(node, list):
        return set().union(*(patterns(value) for value in node)) if node else set()
    return set()


#: Where regex engines differ: white space and control characters of every kind.
TRICKY = ["a", "+5511", "a b", "\t", "\x7f", "\x85", "\xa0", "\u2028", "\u3000", "\ufeff", "é"]


def test_every_pattern_means_to_the_document_what_it_means_to_the_validator(
    runtime: Runtime,
) -> None:
    """Found by schemathesis: `contact` was `^\\S+$`, which pydantic (Rust's regexes)
    refuses for U+0085 while the document (ECMAScript's) allows it. Each pattern of the
    document is tried on both engines: node's for the document, pydantic's for us."""
    found = sorted(patterns(runtime.openapi))
    assert found
    script = (
        "const [patterns, samples] = JSON.parse(process.argv[1]);"
        "console.log(JSON.stringify(patterns.map("
        "p => samples.map(s => new RegExp(p, 'u').test(s)))));"
    )
    done = subprocess.run(
        ["node", "-e", script, json.dumps([found, TRICKY])],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    ecmascript = json.loads(done.stdout)
    for pattern, verdicts in zip(found, ecmascript, strict=True):
        adapter = TypeAdapter(Annotated[str, Field(pattern=pattern)])
        ours = []
        for sample in TRICKY:
            try:
                adapter.validate_python(sample)
                ours.append(True)
            except ValidationError:
                ours.append(False)
        assert ours == verdicts, (pattern, list(zip(TRICKY, ours, verdicts, strict=True)))
