"""The command line as operators meet it: help, one-line start errors, tokens."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jwt
import pytest

from whatslike.settings import load_settings
from whatslike.store.sqlite import SQLiteStore


def whatslike(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "whatslike", *args],
        capture_output=True,
        check=False,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.parametrize("command", [[], ["serve"], ["token"], ["stuck"]])
def test_help_everywhere(command: list[str]) -> None:
    done = whatslike(*command, "--help")
    assert done.returncode == 0
    assert "usage: whatslike" in done.stdout


@pytest.mark.parametrize(
    ("args", "env", "named"),
    [
        (["serve", "--port", "70000"], {}, "invalid setting port (WHATSLIKE_PORT)"),
        (["serve"], {"WHATSLIKE_ROLES": "api,gateway"}, "invalid setting roles"),
        (["serve"], {"WHATSLIKE_ROLES": "api"}, "add router, connector, status-worker"),
        (["serve"], {"WHATSLIKE_DATABASE_URL": "mysql://x"}, "invalid setting database_url"),
        (["serve"], {"WHATSLIKE_HEARTBEAT_S": "soon"}, "invalid setting heartbeat_s"),
        (
            ["serve", "--port", "0"],
            {"WHATSLIKE_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none"},
            "127.0.0.1",
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


def test_token_is_signed_with_the_secret_serve_uses(tmp_path: Path) -> None:
    done = whatslike(
        "token", "--org", "org-1", "--user", "ana", "--ttl", "120", "--data-dir", str(tmp_path)
    )
    assert done.returncode == 0, done.stderr
    secret = (tmp_path / "jwt-secret").read_text().strip()
    claims = jwt.decode(done.stdout.strip(), secret, algorithms=["HS256"])
    assert (claims["sub"], claims["org_id"]) == ("ana", "org-1")
    assert claims["exp"] - claims["iat"] == 120


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
