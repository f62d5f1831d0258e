"""Debian's Chromium driven by Playwright, and real `whatslike serve` processes for it.

Playwright cannot download its own browsers here: it launches /usr/bin/chromium, which
`make test` installs (scripts/browser.sh). Without it the tests fail, saying so.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, ConsoleMessage, Error, Page, sync_playwright

from tests.e2e.conftest import Server, start_server, stop_server

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"
SCREENSHOTS = ARTIFACTS / "screenshots"

#: Every expect() waits this long at most (statuses come within a few seconds).
EXPECT_TIMEOUT_MS = 20_000

NewPage = Callable[[int, int], Page]


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    # Module scope, not session: Playwright's sync API keeps an event loop running while
    # it is open, and the asyncio tests of later modules need theirs.
    if not CHROMIUM.exists():
        pytest.fail(
            f"{CHROMIUM} is missing: the browser tests drive Debian's Chromium "
            "(install it with `apt-get install chromium`, or run `make test`, which does)",
            pytrace=False,
        )
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        yield launched
        launched.close()


@pytest.fixture
def new_page(browser: Browser) -> Iterator[NewPage]:
    """Open pages of a given viewport, each in its own context; fail the test on any
    uncaught error or console error in them."""
    pages: list[Page] = []
    problems: list[str] = []

    def on_console(message: ConsoleMessage) -> None:
        if message.type == "error":
            problems.append(f"console error: {message.text}")

    def on_page_error(error: Error) -> None:
        problems.append(f"uncaught: {error}")

    def _open(width: int, height: int) -> Page:
        context = browser.new_context(viewport={"width": width, "height": height})
        context.set_default_timeout(EXPECT_TIMEOUT_MS)
        page = context.new_page()
        page.on("console", on_console)
        page.on("pageerror", on_page_error)
        pages.append(page)
        return page

    yield _open
    for page in pages:
        page.context.close()
    # A reconnecting page logs refused WebSocket upgrades: those are expected.
    unexpected = [p for p in problems if "WebSocket connection to" not in p]
    assert not unexpected, "\n".join(unexpected)


@pytest.fixture(scope="module")
def embedded_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Every role in one process (the embedded mode): the one `make run` starts."""
    running = start_server(tmp_path_factory.mktemp("demo"), {"WHATSLIKE_SIM_DELAY_MS": "300"})
    yield running
    stop_server(running)


def printed_demo_url(server: Server) -> str:
    """The demo link `serve` prints right after its address (the harness keeps reading
    the server's output into `server.output`)."""
    pattern = re.compile(r"^Demo \(embedded mode only\): (http://\S+)$")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for line in list(server.output):
            if match := pattern.match(line.strip()):
                return match.group(1)
        time.sleep(0.05)
    raise AssertionError("serve printed no demo link:\n" + "".join(server.output))


def screenshot(page: Page, name: str) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=str(path), full_page=True)
    return path
