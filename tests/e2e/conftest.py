"""A real `whatslike serve` subprocess on a free port, and clients that talk to it."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from websockets.asyncio.client import ClientConnection, connect

from whatslike.settings import DEV_SECRETS as DEV_VALUES

#: How long a `serve` may take to print its address, then to be ready. Generous: the
#: scaled tests start 8-9 processes at once, and at load 20+ on two cores (other suites,
#: Cassandra nodes) each took over 30 s; a process that exits fails at once anyway.
STARTUP_TIMEOUT_S = 90

#: The Meta credentials of a deployment outside the embedded mode (where the development
#: ones are refused): the split deployment's two processes share them.
OWN_SECRETS = {
    "WHATSLIKE_META_APP_SECRET": "e2e-app-secret-0f3c9a71",
    "WHATSLIKE_META_VERIFY_TOKEN": "e2e-verify-token-5d2b8e44",
    "WHATSLIKE_META_ACCESS_TOKEN": "e2e-access-token-9a6c1f20",
}
DEV_SECRETS = tuple(DEV_VALUES.values())
JWT_IN_TEXT = re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*")


@dataclass
class Server:
    url: str
    data_dir: Path
    process: subprocess.Popen[str]
    output: list[str] = field(default_factory=list)
    #: Every credential this server knows or was handed; none may appear in its output.
    secrets: set[str] = field(default_factory=set)
    reader: threading.Thread | None = None

    @property
    def ws_url(self) -> str:
        return self.url.replace("http://", "ws://") + "/ws/status"

    def token(self, org: str, user: str = "agent-1", ttl: int | None = None) -> str:
        """Mint a token the way a person would: with the `whatslike token` command."""
        command = [
            sys.executable,
            "-m",
            "whatslike",
            "token",
            "--org",
            org,
            "--user",
            user,
            "--data-dir",
            str(self.data_dir),
        ]
        if ttl is not None:
            command += ["--ttl", str(ttl)]
        done = subprocess.run(command, capture_output=True, text=True, check=True, timeout=30)
        token = done.stdout.strip()
        self.secrets.add(token)
        return token

    def drain(self) -> None:
        """Keep reading the server's output (its logs) into `output` until it exits."""
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.output.append(line)

    def leaked(self) -> list[str]:
        """Log lines that carry a JWT, a secret of this server or a development secret."""
        secrets = {*self.secrets, *DEV_SECRETS}
        jwt_secret = self.data_dir / "jwt-secret"
        if jwt_secret.exists():
            secrets.add(jwt_secret.read_text().strip())
        return [
            line
            for line in self.output
            if JWT_IN_TEXT.search(line) or any(secret in line for secret in secrets if secret)
        ]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


#: The size asked for the pipe of the server's output (Linux caps it at
#: /proc/sys/fs/pipe-max-size, 1 MiB by default).
PIPE_BYTES = 1 << 20


def start_server(data_dir: Path, env: dict[str, str] | None = None, port: int = 0) -> Server:
    """Start `whatslike serve` (on any free port by default); read the address it prints."""
    command = [sys.executable, "-m", "whatslike", "serve", "--port", str(port)]
    process = subprocess.Popen(
        # INFO: the access log and every refusal are written, so the log check sees them.
        [*command, "--data-dir", str(data_dir), "--log-level", "info"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **(env or {})},
    )
    assert process.stdout is not None
    # A pipe of 1 MiB (Linux): a reader that is not scheduled for a while (a busy test
    # or benchmark process) does not make the server block on its log writes.
    fcntl.fcntl(process.stdout.fileno(), fcntl.F_SETPIPE_SZ, PIPE_BYTES)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    output: list[str] = []
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        output.append(line)
        match = re.search(r"listening on (http://\S+)", line)
        if match:
            given = {value for name, value in (env or {}).items() if "SECRET" in name}
            given |= {value for name, value in (env or {}).items() if "TOKEN" in name}
            server = Server(match.group(1), data_dir, process, output, given)
            server.reader = threading.Thread(target=server.drain, daemon=True)
            server.reader.start()
            wait_healthy(server)
            return server
    process.kill()
    raise AssertionError("whatslike serve did not start:\n" + "".join(output))


def wait_healthy(server: Server) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            if httpx.get(server.url + "/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise AssertionError("whatslike serve never became ready")


def stop_server(server: Server) -> None:
    """Stop the server, then check its whole output: no token or secret in any line."""
    server.process.terminate()
    try:
        server.process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()
    if server.reader is not None:
        server.reader.join(timeout=15)
    leaked = server.leaked()
    assert not leaked, f"{len(leaked)} log lines carry a secret, e.g. {leaked[0][:200]!r}"


@dataclass
class Split:
    """The simulator in one process, the pipeline (api, router, connector, status-worker)
    in another on a fixed port, so the pipeline can stop and come back where it was."""

    simulator: Server
    pipeline: Server
    data_dir: Path
    env: dict[str, str]
    port: int

    def restart_pipeline(self) -> None:
        self.pipeline = start_server(self.data_dir, self.env, port=self.port)


@contextmanager
def split_deployment(tmp_path: Path, sim_delay_ms: int) -> Iterator[Split]:
    port = free_port()
    simulator = start_server(
        tmp_path / "simulator",
        {
            "WHATSLIKE_ROLES": "simulator",
            "WHATSLIKE_SIM_DELAY_MS": str(sim_delay_ms),
            "WHATSLIKE_SIM_WEBHOOK_URL": f"http://127.0.0.1:{port}",
            **OWN_SECRETS,
        },
    )
    env = {
        "WHATSLIKE_ROLES": "api,router,connector,status-worker",
        "WHATSLIKE_GRAPH_URL": f"{simulator.url}/simulator",
        **OWN_SECRETS,
    }
    try:
        pipeline = start_server(tmp_path / "pipeline", env, port=port)
        split = Split(simulator, pipeline, tmp_path / "pipeline", env, port)
        try:
            yield split
        finally:
            stop_server(split.pipeline)
    finally:
        stop_server(simulator)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    # 100 ms between a message's webhooks, so that a loaded machine does not let one
    # overtake the other (the tests of exact seqs 1, 2, 3 rely on the order).
    running = start_server(tmp_path_factory.mktemp("serve"), {"WHATSLIKE_SIM_DELAY_MS": "100"})
    yield running
    stop_server(running)


class Socket:
    """A WebSocket client that reads frames (unwrapping `batch`) with a timeout."""

    def __init__(self, connection: ClientConnection) -> None:
        self.connection = connection
        self.pending: list[dict[str, Any]] = []

    async def send(self, frame: dict[str, Any]) -> None:
        await self.connection.send(json.dumps(frame))

    async def next(self, wait_s: float = 10) -> dict[str, Any]:
        if not self.pending:
            raw = await asyncio.wait_for(self.connection.recv(), wait_s)
            frame = json.loads(raw)
            self.pending = frame["frames"] if frame["type"] == "batch" else [frame]
        return self.pending.pop(0)

    async def next_of(self, kind: str, wait_s: float = 10) -> dict[str, Any]:
        frame = await self.next(wait_s)
        assert frame["type"] == kind, frame
        return frame

    async def subscribe(self, conversation_id: str, **extra: Any) -> dict[str, Any]:
        """Subscribe and return the `subscribed` answer."""
        await self.send({"type": "subscribe", "conversation_id": conversation_id, **extra})
        return await self.next_of("subscribed")

    async def ping_barrier(self, ts: int = 1) -> list[dict[str, Any]]:
        """Send a ping and return every frame that arrived before its pong: frames on
        one connection are ordered, so this proves what was (not) sent up to now."""
        await self.send({"type": "ping", "ts": ts})
        before = []
        while (frame := await self.next())["type"] != "pong":
            before.append(frame)
        assert frame["ts"] == ts
        return before


@pytest_asyncio.fixture
async def open_socket() -> AsyncIterator[Any]:
    opened: list[ClientConnection] = []

    async def _open(server: Server, token: str) -> Socket:
        connection = await connect(f"{server.ws_url}?access_token={token}")
        opened.append(connection)
        socket = Socket(connection)
        hello = await socket.next_of("connected")
        assert hello["token_exp"] > time.time()
        return socket

    yield _open
    for connection in opened:
        await connection.close()


def api(server: Server, token: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=server.url, headers={"Authorization": f"Bearer {token}"}, timeout=10
    )


async def one_message_to_read(server: Server, wait_s: float) -> list[dict[str, Any]]:
    """Send one WhatsApp message through `server` and return its status frames up to READ,
    checked: seqs without gaps from 1, statuses only forward (a webhook that overtakes
    another may skip a step: READ implies DELIVERED)."""
    token = server.token("org-a")
    async with (
        api(server, token) as client,
        connect(f"{server.ws_url}?access_token={token}") as connection,
    ):
        socket = Socket(connection)
        await socket.next_of("connected")
        created = await client.post(
            "/api/conversations", json={"channel": "whatsapp", "contact": "5511988877665"}
        )
        conversation = created.json()["id"]
        await socket.subscribe(conversation)
        sent = await client.post(
            f"/api/conversations/{conversation}/messages",
            json={"text": "Seu pedido", "client_message_id": "one"},
        )
        assert sent.status_code == 202, sent.text
        frames = [await socket.next_of("status", wait_s=wait_s)]
        while frames[-1]["status"] != "READ":
            frames.append(await socket.next_of("status", wait_s=wait_s))
    ranks = {"SENT": 1, "DELIVERED": 2, "READ": 3}
    assert [f["seq"] for f in frames] == list(range(1, len(frames) + 1))
    assert [ranks[f["status"]] for f in frames] == sorted({ranks[f["status"]] for f in frames})
    return frames
