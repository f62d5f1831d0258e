"""Meta's webhook signature and verification handshake, on raw bytes and real requests."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from whatslike.connectors.meta import sign, signature_valid, verification_response

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "meta"
SECRET = "app-secret"


def test_sign_is_hmac_sha256_hex_with_prefix() -> None:
    # Reference computed independently: printf '{}' | openssl dgst -sha256 -hmac app-secret
    assert sign(SECRET, b"{}") == (
        "sha256=bd9549eb87a414d3df28b5a60ea86d4a11e2f1c6258edbd18f56d3c23c0f908d"
    )


def test_valid_signature_on_raw_fixture_bytes() -> None:
    body = (FIXTURES / "whatsapp-status-sent.json").read_bytes()
    assert signature_valid(SECRET, body, sign(SECRET, body))


def test_uppercase_hex_is_accepted() -> None:
    body = b'{"object":"instagram"}'
    header = "sha256=" + sign(SECRET, body).removeprefix("sha256=").upper()
    assert signature_valid(SECRET, body, header)


def test_reserialized_json_fails() -> None:
    body = (FIXTURES / "whatsapp-status-sent.json").read_bytes()
    header = sign(SECRET, body)
    reserialized = json.dumps(json.loads(body)).encode()
    assert reserialized != body
    assert not signature_valid(SECRET, reserialized, header)


def test_invalid_and_missing_signatures_fail() -> None:
    body = b'{"entry":[]}'
    good = sign(SECRET, body)
    assert not signature_valid(SECRET, body, None)
    assert not signature_valid(SECRET, body, "")
    assert not signature_valid(SECRET, body, good.removeprefix("sha256="))  # no prefix
    assert not signature_valid(SECRET, body, "sha1=" + good.removeprefix("sha256="))
    assert not signature_valid("other-secret", body, good)
    assert not signature_valid(SECRET, body + b" ", good)
    assert not signature_valid(SECRET, body, "sha256=zz")


def test_every_secret_of_a_rotation_is_accepted() -> None:
    body = b'{"entry":[]}'
    old, new = "app-secret-old", "app-secret-new"
    for signer in (old, new):
        assert signature_valid((new, old), body, sign(signer, body))
    assert not signature_valid((new, old), body, sign("app-secret-other", body))
    assert not signature_valid((), body, sign(new, body))
    assert not signature_valid(("",), body, sign("", body))  # an empty secret is no secret


def _handshake_app() -> Starlette:
    async def verify(request: Request) -> Response:
        return verification_response(request, "verify-me")

    return Starlette(routes=[Route("/hook", verify)])


async def _get(params: dict[str, str]) -> httpx.Response:
    transport = httpx.ASGITransport(app=_handshake_app())
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        return await client.get("/hook", params=params)


async def test_handshake_with_our_token_echoes_the_challenge() -> None:
    response = await _get(
        {"hub.mode": "subscribe", "hub.verify_token": "verify-me", "hub.challenge": "1158201444"}
    )
    assert response.status_code == 200
    assert response.text == "1158201444"
    assert response.headers["content-type"].startswith("text/plain")


async def test_handshake_with_a_wrong_token_is_forbidden() -> None:
    for params in (
        {"hub.mode": "subscribe", "hub.verify_token": "nope", "hub.challenge": "1"},
        {"hub.mode": "unsubscribe", "hub.verify_token": "verify-me", "hub.challenge": "1"},
        {"hub.mode": "subscribe", "hub.challenge": "1"},
        {"hub.mode": "subscribe", "hub.verify_token": "verify-me"},
    ):
        response = await _get(params)
        assert response.status_code == 403
        assert response.json()["error"]["code"] == "forbidden"
        assert response.json()["error"]["message"]
