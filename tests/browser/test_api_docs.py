"""The contract's page, /docs, in Chromium: Swagger UI renders every operation of
/openapi.json from files this server serves, asking nothing of any other host."""

from __future__ import annotations

from urllib.parse import urlsplit

import httpx
from playwright.sync_api import Request, expect

from tests.browser.conftest import NewPage, screenshot
from tests.e2e.conftest import Server


def test_the_page_renders_every_operation_from_this_server_alone(
    embedded_server: Server, new_page: NewPage
) -> None:
    document = httpx.get(embedded_server.url + "/openapi.json", timeout=10).json()
    operations = [op for methods in document["paths"].values() for op in methods.values()]
    page = new_page(1280, 900)
    hosts: set[str] = set()

    def on_request(request: Request) -> None:
        if not request.url.startswith("data:"):
            hosts.add(urlsplit(request.url).netloc)

    page.on("request", on_request)
    page.goto(embedded_server.url + "/docs")
    expect(page.locator(".swagger-ui .info .title")).to_contain_text("Whatslike HTTP API")
    expect(page.locator(".opblock")).to_have_count(len(operations))
    expect(page.locator(".opblock-summary-path").first).to_be_visible()
    expect(page.get_by_role("button", name="Authorize")).to_be_visible()
    screenshot(page, "api-docs")
    assert hosts == {urlsplit(embedded_server.url).netloc}, hosts
