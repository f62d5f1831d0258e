"""The server's own defences (whatslike.serving) on a real uvicorn with the real runtime:
request heads (431, 408), bodies (413 before reading), redacted logs; and, in process,
the per-organization budget and forged webhooks against a deployment with its own
secrets (issue 8's attack matrix, HTTP side)."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import uvicorn

from whatslike.app import Runtime
from whatslike.connectors.meta import sign
from whatslike.connectors.whatsapp import WhatsAppConnector
from whatslike.serving import (
    REDACTED,
    SERVER_KEEPALIVE_S,
    DeferredFlush,
    RedactSecrets,
    defer_access_flush,
    server_config,
)
from whatslike.settings import DEV_SECRETS, load_settings, resolve_jwt_secret

TIMEOUT_S = 10.0
OWN = {
    "meta_app_secret": "app-secret-new-7c1d",
    "meta_previous_app_secrets": "app-secret-old-2b9e",
    "meta_verify_token": "verify-token-4e8a",
    "meta_access_token": "access-token-93f0",
}
PIPELINE = "api,router,connector,status-worker"


@asynccontextmanager
async def serving(tmp_path: Path, **overrides: Any) -> AsyncIterator[tuple[str, int]]:
    """The embedded runtime behind uvicorn configured by `server_config`; answers the
    host and port it listens on."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    settings = load_settings(data_dir=tmp_path, port=port, sim_delay_ms=10, **overrides)
    runtime = Runtime(settings)
    await runtime.open()
    server = uvicorn.Server(server_config(runtime.app, settings, "warning", runtime.ws_protocol))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    deadline = time.monotonic() + TIMEOUT_S
    while not server.started:
        assert not task.done() and time.monotonic() < deadline, "uvicorn did not start"
        await asyncio.sleep(0.01)
    try:
        yield "127.0.0.1", port
    finally:
        server.should_exit = True
        await task
        sock.close()


def test_an_idle_connection_is_kept_well_past_the_time_our_client_keeps_it() -> None:
    """Our outbound client gives an idle connection up (http_keepalive_s) with as long again
    to spare before our server (the simulator's too) closes it: by its keep-alive or by
    the head timeout, whichever is first."""

    async def app(scope: Any, receive: Any, send: Any) -> None: ...

    settings = load_settings()
    config = server_config(app, settings, "warning", None)
    assert config.timeout_keep_alive == SERVER_KEEPALIVE_S
    server_closes_after = min(config.timeout_keep_alive, settings.header_timeout_s)
    assert server_closes_after >= 2 * settings.http_keepalive_s


async def _exchange(host: str, port: int, *chunks: bytes, pause_s: float = 0) -> bytes:
    """Send raw bytes (pausing between chunks), then read until the server closes."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        for chunk in chunks:
            writer.write(chunk)
            await writer.drain()
            if pause_s:
                await asyncio.sleep(pause_s)
        return await asyncio.wait_for(reader.read(), TIMEOUT_S)
    finally:
        writer.close()


def _status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


UPGRADE = (
    b"Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
)


BIG = b"a" * 10_000
LONG_TOKEN = b"e" * 65_536


@pytest.mark.parametrize(
    ("name", "request_head"),
    [
        ("big header", b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + BIG + b"\r\n"),
        ("many headers", b"GET /healthz HTTP/1.1\r\n" + b"X-A: b\r\n" * 2000),
        ("upgrade, 10 KB head", b"GET /ws/status HTTP/1.1\r\n" + UPGRADE + b"X: " + BIG + b"\r\n"),
        (
            "upgrade, 64 KB token",
            b"GET /ws/status?access_token=" + LONG_TOKEN + b" HTTP/1.1\r\n" + UPGRADE,
        ),
        (
            "HTTP, 64 KB bearer",
            b"GET /api/conversations/c1 HTTP/1.1\r\nAuthorization: Bearer " + LONG_TOKEN + b"\r\n",
        ),
    ],
)
async def test_request_heads_over_the_limit_get_431(
    tmp_path: Path, name: str, request_head: bytes
) -> None:
    async with serving(tmp_path) as (host, port):
        answer = await _exchange(host, port, request_head + b"\r\n")
        assert _status(answer) == 431, name
        assert b'"header_too_large"' in answer
        ok = await _exchange(host, port, b"GET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n")
        assert _status(ok) == 200


async def test_a_head_that_never_ends_gets_408_and_the_connection_closed(tmp_path: Path) -> None:
    async with serving(tmp_path, header_timeout_s=1) as (host, port):
        started = time.monotonic()
        # Slowloris: a header line now and then, never the blank line that ends the head.
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"GET /healthz HTTP/1.1\r\n")
        answer = b""
        for n in range(40):
            try:
                writer.write(f"X-{n}: a\r\n".encode())
                await writer.drain()
            except ConnectionError:
                break
            try:
                chunk = await asyncio.wait_for(reader.read(4096), 0.25)
            except TimeoutError:
                continue
            answer += chunk
            if not chunk:
                break
        writer.close()
        assert _status(answer) == 408
        assert time.monotonic() - started < 8  # the timeout, not the 40 x 0.25 s loop


async def test_a_body_over_the_limit_gets_413_before_it_is_sent(tmp_path: Path) -> None:
    """Only the head is sent, announcing 12 MB: the 413 comes back without the server
    waiting for (or reading) any of the body."""
    async with serving(tmp_path) as (host, port):
        head = (
            b"POST /api/conversations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 12000000\r\n\r\n"
        )
        answer = await _exchange(host, port, head)
        assert _status(answer) == 413
        assert b'"too_large"' in answer


async def test_a_chunked_body_is_cut_at_the_limit_with_413(tmp_path: Path) -> None:
    async with serving(tmp_path, max_body_bytes=2048) as (host, port):
        token = _token(tmp_path, "org-a")
        head = (
            "POST /api/conversations HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            f"Authorization: Bearer {token}\r\nTransfer-Encoding: chunked\r\n\r\n"
        ).encode()
        chunk = b"400\r\n" + b"x" * 1024 + b"\r\n"
        answer = await _exchange(host, port, head, chunk, chunk, chunk, b"0\r\n\r\n")
        assert _status(answer) == 413
        assert b'"too_large"' in answer


async def test_a_body_never_sent_after_its_head_gets_408_and_the_connection_closed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 14: the unauthenticated webhook waited for ever for a body announced and
    never sent (300 such connections took /healthz down under 256 descriptors)."""
    async with serving(tmp_path, body_timeout_s=0.5) as (host, port):
        started = time.monotonic()
        head = b"POST /webhooks/whatsapp HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n"
        answer = await _exchange(host, port, head)  # read until the server closes
        assert _status(answer) == 408
        assert b'"timeout"' in answer
        assert time.monotonic() - started < 5
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_body_trickled_a_byte_at_a_time_gets_408_at_the_timeout(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with serving(tmp_path, body_timeout_s=1) as (host, port):
        token = _token(tmp_path, "org-a")
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(
            b"POST /api/conversations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
            b"\r\nAuthorization: Bearer " + token.encode() + b"\r\nContent-Length: 1000\r\n\r\n"
        )
        started = time.monotonic()
        answer = b""
        for _ in range(100):  # a byte each 0.1 s: 10 s, were it not cut
            try:
                writer.write(b" ")
                await writer.drain()
                answer += await asyncio.wait_for(reader.read(4096), 0.1)
            except TimeoutError:
                continue
            except ConnectionError:
                break
            if answer and not answer.endswith(b"}"):
                continue
            if answer:
                break
        writer.close()
        assert _status(answer) == 408
        assert 0.9 < time.monotonic() - started < 5
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def _token(data_dir: Path, org: str) -> str:
    settings = load_settings(data_dir=data_dir)
    now = int(time.time())
    claims = {"sub": "u", "org_id": org, "iat": now, "nbf": now, "exp": now + 600}
    return jwt.encode(claims, resolve_jwt_secret(settings), "HS256", headers={"typ": "at+jwt"})


# -- logs ---------------------------------------------------------------------------

_JWT_SAMPLE = jwt.encode({"sub": "u", "exp": 1}, "k" * 32, "HS256")


@pytest.mark.parametrize(
    ("logged", "hidden"),
    [
        ("/ws/status?%61ccess_token=opaque-credential-1&since=4", "opaque-credential-1"),
        ("/ws/status?access%5Ftoken=opaque-credential-2", "opaque-credential-2"),
        ("/ws/status?%2561ccess_token=opaque-credential-3", "opaque-credential-3"),
        ("/x?a%3Dy%26access_token%3Dopaque-credential-4", "opaque-credential-4"),
        (f"/ws?t%3D{_JWT_SAMPLE.replace('.', '%2E')}", _JWT_SAMPLE.split(".")[2]),
        ("secret app%2Dsecret%2Dxyz in a line", "secret-xyz"),
    ],
    ids=["name", "underscore", "twice", "whole query", "jwt dots", "configured secret"],
)
def test_redaction_sees_through_percent_encoding(logged: str, hidden: str) -> None:
    redactor = RedactSecrets(["app-secret-xyz"])
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "GET %s", (logged,), None)
    redactor.filter(record)
    line = record.getMessage()
    assert hidden not in line
    assert hidden.replace("-", "%2D") not in line
    assert REDACTED in line


def test_log_records_lose_tokens_secrets_and_credential_query_values() -> None:
    token = jwt.encode({"sub": "u", "exp": 1}, "k" * 32, "HS256")
    redactor = RedactSecrets(["app-secret-xyz", "short"])
    record = logging.LogRecord(
        "uvicorn.access",
        logging.INFO,
        __file__,
        1,
        '%s - "%s %s HTTP/%s" %d',
        (
            "127.0.0.1:5",
            "GET",
            f"/ws/status?access_token={token}&since=4",
            "1.1",
            101,
        ),
        None,
    )
    assert redactor.filter(record)
    line = record.getMessage()
    assert token not in line
    assert f"access_token={REDACTED}&since=4" in line
    other = logging.LogRecord(
        "x",
        logging.WARNING,
        __file__,
        1,
        "secret app-secret-xyz in %s, token %s, challenge ?hub.verify_token=abc&hub.mode=s",
        ("a message", f"access_token.{token}"),
        None,
    )
    redactor.filter(other)
    text = other.getMessage()
    assert "app-secret-xyz" not in text and token not in text and "=abc" not in text
    assert "hub.mode=s" in text


# -- the per-organization budget, forged webhooks (in process) -------------------------


def _client(runtime: Runtime) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=runtime.app), base_url="http://t")


async def test_an_organization_past_its_budget_gets_429_and_others_do_not(
    tmp_path: Path,
) -> None:
    settings = load_settings(data_dir=tmp_path, org_request_burst=3, org_requests_per_s=0.01)
    runtime = Runtime(settings)
    await runtime.open()
    async with _client(runtime) as client:
        busy = {"Authorization": f"Bearer {_token(tmp_path, 'org-busy')}"}
        calm = {"Authorization": f"Bearer {_token(tmp_path, 'org-calm')}"}
        codes = [(await client.get("/api/conversations/c1", headers=busy)).status_code]
        codes += [(await client.get("/api/conversations/c1", headers=busy)).status_code]
        codes += [(await client.get("/api/conversations/c1", headers=busy)).status_code]
        refused = await client.get("/api/conversations/c1", headers=busy)
        assert codes == [404, 404, 404]
        assert refused.status_code == 429
        assert refused.json()["error"]["code"] == "rate_limited"
        assert refused.headers["retry-after"] == "100"  # one request per 100 s
        assert (await client.get("/api/conversations/c1", headers=calm)).status_code == 404
    await runtime.deps.store.close()


@pytest.mark.parametrize(
    ("path", "code"),
    [("/api/conversations/c%ED%A0%80", 400), ("/api/conversations/c%20d", 400)],
)
async def test_ids_outside_the_pattern_are_bad_requests_over_http(
    tmp_path: Path, path: str, code: int
) -> None:
    runtime = Runtime(load_settings(data_dir=tmp_path))
    await runtime.open()
    async with _client(runtime) as client:
        headers = {"Authorization": f"Bearer {_token(tmp_path, 'org-a')}"}
        answer = await client.get(path, headers=headers)
        assert answer.status_code == code
        assert answer.json()["error"]["code"] == "bad_request"
        surrogate = await client.post(
            "/api/conversations",
            content=b'{"channel":"whatsapp","contact":"\\ud800"}',
            headers=headers,
        )
        assert surrogate.status_code == 400
    await runtime.deps.store.close()


FIXTURE = Path(__file__).parent / "fixtures" / "meta" / "whatsapp-status-failed.json"


@pytest.mark.parametrize(
    ("signer", "status"),
    [
        (DEV_SECRETS["meta_app_secret"], 403),  # the development secret, outside embedded
        ("a-wrong-secret", 403),
        ("", 403),  # no signature at all
        (OWN["meta_app_secret"], 200),
        (OWN["meta_previous_app_secrets"], 200),  # the secret being rotated out
    ],
)
async def test_forged_webhooks_are_refused_by_a_deployment_with_its_own_secrets(
    tmp_path: Path, signer: str, status: int
) -> None:
    settings = load_settings(
        data_dir=tmp_path, roles=PIPELINE, graph_url="http://127.0.0.1:9/graph", **OWN
    )
    runtime = Runtime(settings)
    await runtime.open()
    body = FIXTURE.read_bytes()
    headers = {"Content-Type": "application/json"}
    if signer:
        headers["X-Hub-Signature-256"] = sign(signer, body)
    async with _client(runtime) as client:
        answer = await client.post("/webhooks/whatsapp", content=body, headers=headers)
        assert answer.status_code == status, answer.text
        handshake = {"hub.mode": "subscribe", "hub.challenge": "42"}
        dev = await client.get(
            "/webhooks/whatsapp",
            params={**handshake, "hub.verify_token": DEV_SECRETS["meta_verify_token"]},
        )
        assert dev.status_code == 403
        own = await client.get(
            "/webhooks/whatsapp", params={**handshake, "hub.verify_token": OWN["meta_verify_token"]}
        )
        assert (own.status_code, own.text) == (200, "42")
    await runtime.deps.store.close()


async def test_webhooks_taken_past_the_router_keep_the_error_and_drain_answers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`POST /webhooks/<channel>` goes straight to its connector: a bug still answers
    500 `internal` (logged, no trace to the client), and a stopping process 503."""
    settings = load_settings(
        data_dir=tmp_path, roles=PIPELINE, graph_url="http://127.0.0.1:9/graph", **OWN
    )
    runtime = Runtime(settings)
    await runtime.open()
    body = FIXTURE.read_bytes()
    headers = {
        "Content-Type": "application/json",
        "X-Hub-Signature-256": sign(OWN["meta_app_secret"], body),
    }
    [connector] = [role for role in runtime.roles if isinstance(role, WhatsAppConnector)]

    def broken(payload: Any) -> list[Any]:
        raise RuntimeError("a bug in parsing")

    monkeypatch.setattr(connector, "parse", broken)
    async with _client(runtime) as client:
        failed = await client.post("/webhooks/whatsapp", content=body, headers=headers)
        assert failed.status_code == 500
        assert failed.json()["error"]["code"] == "internal"
        assert "a bug" not in failed.text
        runtime.draining = True
        refused = await client.post("/webhooks/whatsapp", content=body, headers=headers)
        assert refused.status_code == 503
        assert refused.headers["retry-after"] == str(settings.retry_after_s)
    await runtime.deps.store.close()


async def test_the_simulator_control_needs_its_own_token(tmp_path: Path) -> None:
    open_runtime = Runtime(load_settings(data_dir=tmp_path / "embedded"))
    async with _client(open_runtime) as client:  # embedded, no token set: the demo's switch
        assert (await client.get("/simulator/control")).status_code == 200
    outside = load_settings(
        data_dir=tmp_path / "outside",
        roles=f"{PIPELINE},simulator",
        database_url="postgresql://nobody@127.0.0.1:1/none",
        **OWN,
    )
    async with _client(Runtime(outside)) as client:  # not embedded, no token: closed
        assert (await client.get("/simulator/control")).status_code == 403
        # The sends name every organization's recipients and texts: closed alike.
        assert (await client.get("/simulator/sends")).status_code == 403
    guarded = load_settings(
        data_dir=tmp_path / "guarded", sim_control_token="control-token-5a1f", **OWN
    )
    runtime = Runtime(guarded)
    async with _client(runtime) as client:
        change = json.dumps({"delay_ms": 600_000})
        refused = await client.post("/simulator/control", content=change)
        assert refused.status_code == 403
        wrong = {"Authorization": "Bearer nope"}
        assert (
            await client.post("/simulator/control", content=change, headers=wrong)
        ).status_code == 403
        right = {"Authorization": "Bearer control-token-5a1f"}
        assert (await client.get("/simulator/sends", headers=wrong)).status_code == 403
        # Past the guard (503: this test never opened the simulator's database).
        assert (await client.get("/simulator/sends", headers=right)).status_code == 503
        answer = await client.post("/simulator/control", content=change, headers=right)
        assert (answer.status_code, answer.json()["delay_ms"]) == (200, 600_000)
        send = await client.post(
            "/simulator/v21.0/109876543210987/messages",
            json={"messaging_product": "whatsapp", "to": "1", "type": "text"},
            headers={"Authorization": f"Bearer {DEV_SECRETS['meta_access_token']}"},
        )
        assert send.status_code == 401  # the development access token opens nothing


class CountingStream(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.flushes = 0

    def flush(self) -> None:
        self.flushes += 1
        super().flush()


def access_record(path: str) -> logging.LogRecord:
    return logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, "%s", (path,), None)


async def test_access_lines_are_flushed_together_within_the_delay() -> None:
    stream = CountingStream()
    handler = DeferredFlush(stream, 0.05)
    for n in range(3):
        handler.handle(access_record(f"/api/{n}"))
    assert stream.getvalue() == "/api/0\n/api/1\n/api/2\n"
    assert stream.flushes == 0  # one flush for the three, after the delay
    deadline = time.monotonic() + 5
    while stream.flushes == 0:
        assert time.monotonic() < deadline, "never flushed"
        await asyncio.sleep(0.01)
    assert stream.flushes == 1
    handler.handle(access_record("/api/3"))  # a new delay
    handler.close()  # flushed on close, its timer dropped
    assert stream.flushes == 2 and stream.getvalue().endswith("/api/3\n")
    await asyncio.sleep(0.1)
    assert stream.flushes == 2


def test_outside_an_event_loop_a_line_is_flushed_at_once() -> None:
    stream = CountingStream()
    DeferredFlush(stream, 60).handle(access_record("/x"))
    assert (stream.getvalue(), stream.flushes) == ("/x\n", 1)


def test_the_access_log_moves_to_a_deferred_handler_with_its_filters() -> None:
    stream = CountingStream()
    access = logging.getLogger("uvicorn.access")
    plain = logging.StreamHandler(stream)
    plain.addFilter(RedactSecrets(["s3cr3t-value"]))
    saved = access.handlers[:]
    access.handlers[:] = [plain]
    try:
        defer_access_flush(60)
        [handler] = access.handlers
        assert isinstance(handler, DeferredFlush)
        handler.handle(access_record("/x?token=abc s3cr3t-value"))
        handler.flush()
        assert stream.getvalue() == f"/x?token={REDACTED} {REDACTED}\n"
    finally:
        access.handlers[:] = saved
