"""Token minting and verification: every claim rule of protocol.md §4, and the aliases."""

from __future__ import annotations

import time
from typing import Any

import jwt
import pytest

from whatslike.auth import Identity, InvalidToken, TokenService, bearer_token

SECRET = "test-secret-that-is-long-enough-for-hs256"
NOW = 1_800_000_000


def _raw(claims: dict[str, Any], secret: str = SECRET) -> str:
    return jwt.encode(claims, secret, algorithm="HS256")


def _reason(service: TokenService, token: str) -> str:
    with pytest.raises(InvalidToken) as caught:
        service.verify(token)
    return caught.value.reason


def test_minted_token_verifies_to_its_identity() -> None:
    service = TokenService(SECRET)
    token = service.mint("u1", "org1", ttl_s=60)
    identity = service.verify(token)
    assert identity.user_id == "u1"
    assert identity.org_id == "org1"
    assert identity.exp - int(time.time()) in range(58, 61)


def test_mint_sets_the_protocol_claims() -> None:
    token = TokenService(SECRET, issuer="iss-a", audience="aud-a").mint("u1", "o1", 30, now=NOW)
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims == {
        "sub": "u1",
        "org_id": "o1",
        "iat": NOW,
        "nbf": NOW,
        "exp": NOW + 30,
        "iss": "iss-a",
        "aud": "aud-a",
    }


def test_mint_leaves_out_unconfigured_issuer_and_audience() -> None:
    claims = jwt.decode(
        TokenService(SECRET).mint("u", "o", 30), options={"verify_signature": False}
    )
    assert "iss" not in claims
    assert "aud" not in claims


def test_expired_token_is_refused() -> None:
    service = TokenService(SECRET)
    token = service.mint("u", "o", ttl_s=10, now=int(time.time()) - 100)
    assert _reason(service, token) == "token expired"


def test_token_not_yet_valid_is_refused() -> None:
    service = TokenService(SECRET)
    token = service.mint("u", "o", ttl_s=600, now=int(time.time()) + 300)
    assert _reason(service, token) == "token not yet valid"


def test_other_secret_is_refused() -> None:
    token = TokenService("another-secret-that-is-long-enough-too").mint("u", "o", 60)
    assert _reason(TokenService(SECRET), token) == "token signature is invalid"


def test_garbage_is_refused() -> None:
    assert _reason(TokenService(SECRET), "not.a.jwt") == "token is malformed"
    assert _reason(TokenService(SECRET), "") == "token is malformed"


def test_unsigned_token_is_refused() -> None:
    token = jwt.encode({"sub": "u", "org_id": "o", "exp": NOW * 2}, None, algorithm="none")
    assert _reason(TokenService(SECRET), token) == "token algorithm is not accepted"


def test_configured_issuer_and_audience_are_enforced() -> None:
    strict = TokenService(SECRET, issuer="whatslike", audience="agents")
    assert strict.verify(strict.mint("u", "o", 60)).user_id == "u"
    wrong_issuer = TokenService(SECRET, issuer="other", audience="agents").mint("u", "o", 60)
    assert _reason(strict, wrong_issuer) == "token issuer is not accepted"
    wrong_audience = TokenService(SECRET, issuer="whatslike", audience="x").mint("u", "o", 60)
    assert _reason(strict, wrong_audience) == "token audience is not accepted"
    assert _reason(strict, TokenService(SECRET).mint("u", "o", 60)) == "token has no 'iss' claim"


def test_audience_is_ignored_when_not_configured() -> None:
    token = TokenService(SECRET, audience="someone").mint("u", "o", 60)
    assert TokenService(SECRET).verify(token).org_id == "o"


def test_original_claim_names_are_accepted() -> None:
    token = _raw({"userId": 42, "organizacaoId": "org-7", "exp": NOW * 2})
    assert TokenService(SECRET).verify(token) == Identity("42", "org-7", NOW * 2)


def test_standard_names_win_over_aliases() -> None:
    token = _raw({"sub": "a", "userId": "b", "org_id": "o", "organizacaoId": "p", "exp": NOW * 2})
    assert TokenService(SECRET).verify(token) == Identity("a", "o", NOW * 2)


@pytest.mark.parametrize(
    ("claims", "reason"),
    [
        ({"org_id": "o", "exp": NOW * 2}, "token has no user id ('sub' or 'userId')"),
        ({"sub": "", "org_id": "o", "exp": NOW * 2}, "token has no user id ('sub' or 'userId')"),
        (
            {"userId": True, "org_id": "o", "exp": NOW * 2},
            "token has no user id ('sub' or 'userId')",
        ),
        ({"sub": 7, "org_id": "o", "exp": NOW * 2}, "token is malformed"),  # PyJWT: str only
        (
            {"sub": "u", "exp": NOW * 2},
            "token has no organization id ('org_id' or 'organizacaoId')",
        ),
        ({"sub": "u", "org_id": "o"}, "token has no 'exp' claim"),
        ({"sub": "u", "org_id": "o", "exp": "soon"}, "token is malformed"),
    ],
)
def test_incomplete_claims_are_refused(claims: dict[str, Any], reason: str) -> None:
    assert _reason(TokenService(SECRET), _raw(claims)) == reason


def test_invalid_token_is_a_whatslike_error_with_its_reason() -> None:
    error = InvalidToken("token expired")
    assert str(error) == "token expired"
    assert error.reason == "token expired"


def test_repr_hides_the_secret() -> None:
    assert SECRET not in repr(TokenService(SECRET, issuer="i"))


@pytest.mark.parametrize(
    ("header", "token"),
    [
        ("Bearer abc.def.ghi", "abc.def.ghi"),
        ("bearer   abc  ", "abc"),
        ("BEARER abc", "abc"),
        ("Basic dXNlcjpwYXNz", None),
        ("Bearer", None),
        ("Bearer   ", None),
        ("", None),
        (None, None),
    ],
)
def test_bearer_token(header: str | None, token: str | None) -> None:
    assert bearer_token(header) == token
