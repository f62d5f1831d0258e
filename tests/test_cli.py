"""The command line as operators meet it: help, one-line start errors, tokens."""

from __future__ import annotations

import json
import os
import re
import socket
import stat
import subprocess
import sys
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import httpx
import jwt
import pytest

from tests.e2e.conftest import start_server, stop_server
from whatslike.bus.memory import dead_letter
from whatslike.clock import utcnow
from whatslike.events import TOPIC_MESSAGES, TOPIC_STATUS, StatusEvent
from whatslike.settings import load_settings, unknown_variables
from whatslike.status.rules import Status
from whatslike.store.base import WebhookEndpoint
from whatslike.store.sqlite import SQLiteStore
from whatslike.webhooks.core import new_secret

OWN_SECRETS = {
    "WHATSLIKE_META_APP_SECRET": "app-secret-of-this-deployment",
    "WHATSLIKE_META_VERIFY_TOKEN": "verify-token-of-this-deployment",
    "WHATSLIKE_META_ACCESS_TOKEN": "access-token-of-this-deployment",
}
PIPELINE = "api,router,connector,status-worker"
POSTGRES_NOBODY = "postgresql://nobody@127.0.0.1:1/none"


def whatslike(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "whatslike", *args],
        capture_output=True,
        check=False,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.parametrize(
    "command",
    [
        [],
        ["serve"],
        ["token"],
        ["stuck"],
        ["dlq"],
        ["dlq", "list"],
        ["dlq", "replay"],
        ["webhooks"],
    ],
)
def test_help_everywhere(command: list[str]) -> None:
    done = whatslike(*command, "--help")
    assert done.returncode == 0
    assert "usage: whatslike" in done.stdout


@pytest.mark.parametrize(
    ("args", "env", "named"),
    [
        (["serve", "--port", "70000"], {}, "invalid setting port (WHATSLIKE_PORT)"),
        (["serve", "--port", "0"], {"WHATSLIKE_ROLES": "api,gateway"}, "invalid setting roles"),
        (["serve", "--port", "0"], {"WHATSLIKE_ROLES": "api"}, "add router, connector"),
        (
            ["serve", "--port", "0"],
            {"WHATSLIKE_DATABASE_URL": "mysql://x"},
            "invalid setting database_url",
        ),
        (
            ["serve", "--port", "0"],
            {"WHATSLIKE_HEARTBEAT_S": "soon"},
            "invalid setting heartbeat_s",
        ),
        (
            ["serve", "--port", "0"],
            {"WHATSLIKE_DATABASE_URL": POSTGRES_NOBODY, "WHATSLIKE_ROLES": PIPELINE, **OWN_SECRETS},
            "127.0.0.1",
        ),
        # Outside the embedded mode: no development secret, no simulator nobody named.
        (
            ["serve", "--port", "0"],
            {"WHATSLIKE_DATABASE_URL": POSTGRES_NOBODY},
            "invalid setting roles (WHATSLIKE_ROLES): outside the embedded mode the simulator",
        ),
        *[
            (
                ["serve", "--port", "0"],
                {
                    "WHATSLIKE_ROLES": PIPELINE,
                    **OWN_SECRETS,
                    f"WHATSLIKE_{name}": f"whatslike-dev-{name[5:].lower().replace('_', '-')}",
                },
                f"invalid setting {name.lower()} (WHATSLIKE_{name}): the development value",
            )
            for name in ("META_APP_SECRET", "META_VERIFY_TOKEN", "META_ACCESS_TOKEN")
        ],
        (
            ["serve", "--port", "0"],
            {
                "WHATSLIKE_ROLES": PIPELINE,
                **OWN_SECRETS,
                "WHATSLIKE_META_PREVIOUS_APP_SECRETS": "old-one,whatslike-dev-app-secret",
            },
            "invalid setting meta_app_secret",
        ),
        (
            ["serve", "--port", "0"],
            {"WHATSLIKE_DATABASE_URL": POSTGRES_NOBODY, "WHATSLIKE_ROLES": f"{PIPELINE},simulator"},
            "the development value is accepted only in the embedded mode",
        ),
        (
            ["serve", "--port", "0", "--host", "0.0.0.0"],
            {},
            "the development value is accepted only in the embedded mode on a loopback address",
        ),
    ],
)
def test_a_start_that_cannot_succeed_says_why_in_one_line(
    tmp_path: Path, args: list[str], env: dict[str, str], named: str
) -> None:
    done = whatslike(*args, "--data-dir", str(tmp_path), env=env)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("whatslike: ")
    assert named in lines[0]


def closed_port() -> int:
    """A local port nothing listens on (bound, never listened, then closed)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_a_start_with_the_bus_away_says_why_in_one_line_and_exits(tmp_path: Path) -> None:
    """The default SQLite store (its thread once kept the process alive), Kafka at a
    closed port: one line naming the setting, exit code 1, no traceback, no hang (the
    60 s limit of `whatslike` would fail the test)."""
    started = time.monotonic()
    done = whatslike(
        "serve",
        "--port",
        "0",
        "--data-dir",
        str(tmp_path),
        env={
            "WHATSLIKE_BUS_URL": f"kafka://127.0.0.1:{closed_port()}",
            "WHATSLIKE_BUS_PUBLISH_TIMEOUT_S": "2",
            "WHATSLIKE_ROLES": PIPELINE,
            **OWN_SECRETS,
        },
    )
    assert done.returncode == 1
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("whatslike: Kafka at 127.0.0.1:"), lines
    assert "(WHATSLIKE_BUS_URL)" in lines[0]
    assert time.monotonic() - started < 30


def test_token_is_signed_with_the_secret_serve_uses(tmp_path: Path) -> None:
    done = whatslike(
        "token", "--org", "org-1", "--user", "ana", "--ttl", "120", "--data-dir", str(tmp_path)
    )
    assert done.returncode == 0, done.stderr
    secret = (tmp_path / "jwt-secret").read_text().strip()
    claims = jwt.decode(done.stdout.strip(), secret, algorithms=["HS256"])
    assert (claims["sub"], claims["org_id"]) == ("ana", "org-1")
    assert claims["exp"] - claims["iat"] == 120


def test_a_token_past_the_maximum_lifetime_is_not_minted(tmp_path: Path) -> None:
    done = whatslike(
        "token", "--org", "o", "--user", "u", "--ttl", "90000", "--data-dir", str(tmp_path)
    )
    assert done.returncode == 1
    assert done.stderr.startswith("whatslike: invalid setting token_ttl_s (--ttl): a token lives")


def test_unknown_variables_are_named_with_the_closest_setting() -> None:
    warnings = unknown_variables(
        {"WHATSLIKE_PROT": "1", "WHATSLIKE_PORT": "1", "WHATSLIKE_TEST_X": "1", "HOME": "/"}
    )
    assert warnings == ["unknown setting WHATSLIKE_PROT is ignored; did you mean WHATSLIKE_PORT?"]


def test_serve_warns_about_a_misspelled_variable_and_listens_once_it_accepts(
    tmp_path: Path,
) -> None:
    """The first request right after the "listening" line is served: no retry here."""
    for attempt in range(3):
        process = subprocess.Popen(
            [
                *(sys.executable, "-m", "whatslike", "serve", "--port", "0"),
                *("--data-dir", str(tmp_path / str(attempt)), "--log-level", "warning"),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "WHATSLIKE_SIM_DELAY": "5"},
        )
        assert process.stdout is not None
        try:
            seen: list[str] = []
            while not (
                match := re.search(r"listening on (http://\S+)", line := process.stdout.readline())
            ):
                assert line, "".join(seen)
                seen.append(line)
            assert httpx.get(match.group(1) + "/healthz", timeout=5).status_code == 200
            assert any("unknown setting WHATSLIKE_SIM_DELAY is ignored" in x for x in seen), seen
        finally:
            process.terminate()
            process.wait(timeout=15)


def test_the_data_directory_is_private(tmp_path: Path) -> None:
    data = tmp_path / "data"
    done = whatslike("token", "--org", "o", "--user", "u", "--data-dir", str(data))
    assert done.returncode == 0
    server = start_server(data)
    try:
        modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in [data, *data.iterdir()]}
    finally:
        stop_server(server)
    assert modes[data.name] == 0o700
    assert modes["jwt-secret"] == 0o600
    assert modes["whatslike.db"] == 0o600
    assert all(mode & 0o077 == 0 for mode in modes.values()), modes


def test_flags_win_over_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WHATSLIKE_PORT", "9001")
    assert load_settings().port == 9001
    assert load_settings(port=9002).port == 9002
    assert load_settings(port=None).port == 9001


async def test_stuck_lists_what_stopped_moving(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "whatslike.db")
    await store.open()
    conversation = await store.create_conversation("acme", "whatsapp", "+55")
    waiting, _ = await store.create_message(conversation, "waiting", "")
    unknown, _ = await store.create_message(conversation, "unknown", "")
    await store.begin_send(unknown.id)
    await store.close()
    done = whatslike("stuck", "--older-than", "0", "--json", "--data-dir", str(tmp_path))
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert [(r["kind"], r["message_id"], r["status"]) for r in rows] == [
        ("pending", waiting.id, "PENDING"),
        ("unknown", unknown.id, "PENDING"),
    ]
    assert all(r["org_id"] == "acme" and r["since"] for r in rows)
    quiet = whatslike("stuck", "--data-dir", str(tmp_path))  # default thresholds: minutes
    assert (quiet.returncode, quiet.stdout, quiet.stderr.strip()) == (0, "", "0 stuck")


async def test_dlq_lists_dead_letters_and_replays_a_status(tmp_path: Path) -> None:
    """What operators do with dead letters: list them (what each is now), replay a
    status into the outbox; a send, an unknown id and an unknown message are refused
    with one line each."""
    store = SQLiteStore(tmp_path / "whatslike.db")
    await store.open()
    conversation = await store.create_conversation("acme", "whatsapp", "+55")
    message, _ = await store.create_message(conversation, "hi", "")
    status = StatusEvent(
        event_id="evt_poison",
        message_id=message.id,
        conversation_id=conversation.id,
        org_id="acme",
        channel="whatsapp",
        status=Status.DELIVERED,
        provider_message_id="wamid.1",
        occurred_at=datetime(2026, 11, 25, 12, tzinfo=UTC),
    )
    ghost = replace(status, event_id="evt_ghost", message_id="msg_nobody")
    letters = [
        (TOPIC_STATUS, status.to_json(), "failed 12 times, last: ValueError: bug"),
        (TOPIC_MESSAGES, b'{"message_id": "msg_x"}', "failed 12 times, last: KeyError"),
        (TOPIC_STATUS, ghost.to_json(), "malformed: no message 'msg_nobody'"),
        (TOPIC_STATUS, b"\xff\xfe", "malformed: not JSON"),
    ]
    for topic, event, reason in letters:
        await store.record_dead_letter(topic, dead_letter(topic, "g", event, reason, 12), reason)
    outbox_before = await store.outbox_size()
    await store.close()

    listed = whatslike("dlq", "list", "--json", "--data-dir", str(tmp_path))
    assert listed.returncode == 0, listed.stderr
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [(r["topic"], r["kind"], r["message_id"]) for r in rows] == [
        (TOPIC_STATUS, "unreadable", None),
        (TOPIC_STATUS, "unknown_message", "msg_nobody"),
        (TOPIC_MESSAGES, "send", None),
        (TOPIC_STATUS, "unapplied", message.id),
    ]
    plain = whatslike("dlq", "list", "--data-dir", str(tmp_path))
    assert plain.stderr.strip() == "4 dead letters, 1 unapplied"

    replayed = whatslike("dlq", "replay", rows[3]["id"], "--data-dir", str(tmp_path))
    assert replayed.returncode == 0, replayed.stderr
    assert f"status DELIVERED of message {message.id} handed to the outbox" in replayed.stdout
    for row, why in [
        (rows[2], "is a send (messages): its message was made FAILED send_failed"),
        (rows[1], "no message 'msg_nobody' in this store"),
        (rows[0], "holds no status event that can be decoded"),
        ({"id": "12345"}, "no dead letter '12345'"),
    ]:
        refused = whatslike("dlq", "replay", row["id"], "--data-dir", str(tmp_path))
        assert refused.returncode == 1
        assert refused.stderr.count("\n") == 1 and why in refused.stderr, refused.stderr

    store = SQLiteStore(tmp_path / "whatslike.db")
    await store.open()
    try:
        assert await store.outbox_size() == outbox_before + 1  # the replayed status only
    finally:
        await store.close()


async def test_webhooks_lists_endpoints_and_replays_parked_deliveries(tmp_path: Path) -> None:
    """What operators do with parked webhook deliveries: list them, replay them; another
    organization's endpoint is refused with one line."""
    store = SQLiteStore(tmp_path / "whatslike.db")
    await store.open()
    endpoint = WebhookEndpoint("whe_1", "acme", "https://crm.example.com/h", new_secret(), utcnow())
    assert await store.add_webhook_endpoint(endpoint, 5) is not None
    conversation = await store.create_conversation("acme", "whatsapp", "+55")
    message, _ = await store.create_message(conversation, "hi", "")
    status = StatusEvent(
        event_id="evt_1",
        message_id=message.id,
        conversation_id=conversation.id,
        org_id="acme",
        channel="whatsapp",
        status=Status.SENT,
        provider_message_id="wamid.1",
        occurred_at=datetime(2026, 11, 25, 12, tzinfo=UTC),
    )
    await store.apply_status(status)
    [due] = await store.due_webhook_deliveries("whe_1", utcnow(), 10)
    await store.webhook_failed(due.id, None, "HTTP 500", utcnow())
    await store.close()

    listed = whatslike("webhooks", "list", "--org", "acme", "--json", "--data-dir", str(tmp_path))
    assert listed.returncode == 0, listed.stderr
    assert [json.loads(line)["id"] for line in listed.stdout.splitlines()] == ["whe_1"]
    assert endpoint.secret not in listed.stdout
    parked = whatslike(
        "webhooks", "parked", "whe_1", "--org", "acme", "--json", "--data-dir", str(tmp_path)
    )
    [row] = [json.loads(line) for line in parked.stdout.splitlines()]
    assert (row["webhook_id"], row["last_error"]) == (f"{conversation.id}:1", "HTTP 500")
    replayed = whatslike(
        "webhooks", "replay", "whe_1", "--org", "acme", "--data-dir", str(tmp_path)
    )
    assert replayed.stdout.split() == ["whe_1", "1"]
    other = whatslike("webhooks", "replay", "whe_1", "--org", "other", "--data-dir", str(tmp_path))
    assert other.returncode == 1
    assert other.stderr.strip() == "whatslike: no webhook endpoint whe_1 of other"
