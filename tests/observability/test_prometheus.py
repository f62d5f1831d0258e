"""Debian's Prometheus scrapes a running `whatslike serve`: the series a dashboard needs
exist and move while messages flow."""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from websockets.asyncio.client import connect

from tests.e2e.conftest import Server, Socket, api, free_port, start_server, stop_server

METRICS_TOKEN = "metrics-token-of-this-test"
WAIT_S = 60

#: Series the dashboard (deploy/grafana/dashboards/whatslike.json) is built on.
SERIES = (
    "whatslike_status_applied_total",
    "whatslike_status_fanout_seconds_bucket",
    "whatslike_status_provider_lag_seconds_bucket",
    "whatslike_webhooks_total",
    "whatslike_provider_sends_total",
    "whatslike_outbox_relayed_total",
    "whatslike_bus_published_total",
    "whatslike_bus_handled_total",
    "whatslike_ws_connections",
    "whatslike_ws_subscriptions",
    "whatslike_ws_frames_sent_total",
    "whatslike_stuck_messages",
)


@pytest.fixture
def prometheus_bin() -> str:
    binary = os.environ.get("WHATSLIKE_TEST_PROMETHEUS_BIN", "")
    if not binary or not Path(binary).exists():
        pytest.fail(
            "WHATSLIKE_TEST_PROMETHEUS_BIN is not set: run scripts/services.sh prometheus",
            pytrace=False,
        )
    return binary


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    running = start_server(
        tmp_path / "serve",
        {"WHATSLIKE_SIM_DELAY_MS": "20", "WHATSLIKE_METRICS_TOKEN": METRICS_TOKEN},
    )
    yield running
    stop_server(running)


@pytest.fixture
def prometheus(prometheus_bin: str, server: Server, tmp_path: Path) -> Iterator[str]:
    port = free_port()
    config = tmp_path / "prometheus.yml"
    target = server.url.removeprefix("http://")
    config.write_text(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
        "scrape_configs:\n"
        "  - job_name: whatslike\n"
        "    authorization:\n"
        f"      credentials: {METRICS_TOKEN}\n"
        f"    static_configs:\n      - targets: ['{target}']\n"
    )
    log = (tmp_path / "prometheus.log").open("w")
    process = subprocess.Popen(
        [
            prometheus_bin,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


async def query(client: httpx.AsyncClient, promql: str) -> float | None:
    """The summed value of `promql` now, or None when Prometheus has no such series."""
    try:
        answer = await client.get("/api/v1/query", params={"query": f"sum({promql})"})
    except httpx.TransportError:
        return None  # still starting
    result = answer.json()["data"]["result"] if answer.status_code == 200 else []
    return float(result[0]["value"][1]) if result else None


async def until(client: httpx.AsyncClient, promql: str, above: float) -> float:
    """Poll until `promql` is scraped with a value above `above`; fail after WAIT_S."""
    deadline = asyncio.get_running_loop().time() + WAIT_S
    while asyncio.get_running_loop().time() < deadline:
        value = await query(client, promql)
        if value is not None and value > above:
            return value
        await asyncio.sleep(0.5)
    pytest.fail(f"{promql} never went above {above} in Prometheus", pytrace=False)


async def new_conversation(server: Server, token: str) -> str:
    async with api(server, token) as client:
        created = await client.post(
            "/api/conversations", json={"channel": "whatsapp", "contact": "5511988877665"}
        )
        return str(created.json()["id"])


async def send_messages(server: Server, token: str, conversation: str, count: int) -> None:
    async with api(server, token) as client:
        url = f"/api/conversations/{conversation}/messages"
        for n in range(count):
            assert (await client.post(url, json={"text": f"m{n}"})).status_code == 202


async def test_prometheus_scrapes_the_series_and_they_move(server: Server, prometheus: str) -> None:
    token = server.token("acme")
    async with httpx.AsyncClient(base_url=prometheus, timeout=5) as client:
        assert await until(client, 'up{job="whatslike"}', 0) == 1
        conversation = await new_conversation(server, token)
        async with connect(f"{server.ws_url}?access_token={token}") as connection:
            socket = Socket(connection)
            await socket.next_of("connected")
            await socket.subscribe(conversation)
            await send_messages(server, token, conversation, 3)
            first = await until(client, "whatslike_status_applied_total", 0)
            for series in SERIES:
                assert await query(client, series) is not None, f"{series} is not scraped"
            assert await until(client, "whatslike_ws_subscriptions", 0) == 1
            assert await until(client, "whatslike_ws_frames_sent_total", 1) > 1
        await send_messages(server, token, conversation, 3)
        assert await until(client, "whatslike_status_applied_total", first) > first
        assert await until(client, "whatslike_outbox_relayed_total", 0) > 0
