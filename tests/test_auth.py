"""Token minting and verification: every claim rule of protocol.md §4, and the aliases."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import jwt
import pytest

from whatslike.auth import Identity, InvalidToken, TokenService, bearer_token
from whatslike.settings import load_settings

SECRET = "test-secret-that-is-long-enough-for-hs256"
NOW = 1_800_000_000


def _soon() -> int:
    """An expiry within the maximum lifetime of a token, for hand-made claims: taken when a
    test runs, not at import (a long suite reaches this file more than 10 minutes later)."""
    return int(time.time()) + 600


def _raw(claims: dict[str, Any], secret: str = SECRET, **header: Any) -> str:
    return jwt.encode(claims, secret, algorithm="HS256", headers=header or None)


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
    token = jwt.encode({"sub": "u", "org_id": "o", "exp": _soon()}, None, algorithm="none")
    assert _reason(TokenService(SECRET), token) == "token algorithm is not accepted"


def test_configured_issuer_and_audience_are_enforced() -> None:
    strict = TokenService(SECRET, issuer="whatslike", audience="agents")
    assert strict.verify(strict.mint("u", "o", 60)).user_id == "u"
    wrong_issuer = TokenService(SECRET, issuer="other", audience="agents").mint("u", "o", 60)
    assert _reason(strict, wrong_issuer) == "token issuer is not accepted"
    wrong_audience = TokenService(SECRET, issuer="whatslike", audience="x").mint("u", "o", 60)
    assert _reason(strict, wrong_audience) == "token audience is not accepted"
    assert _reason(strict, TokenService(SECRET).mint("u", "o", 60)) == "token has no 'iss' claim"


def test_an_audience_that_is_not_ours_is_refused_even_when_none_is_configured() -> None:
    token = TokenService(SECRET, audience="billing-service").mint("u", "o", 60)
    assert _reason(TokenService(SECRET), token) == "token audience is not accepted"
    assert _reason(TokenService(SECRET, audience="agents"), token) == (
        "token audience is not accepted"
    )
    listed = _raw({"sub": "u", "org_id": "o", "exp": _soon(), "aud": ["agents", "billing"]})
    assert TokenService(SECRET, audience="agents").verify(listed).user_id == "u"


def test_minted_tokens_are_typed_and_the_type_is_checked() -> None:
    token = TokenService(SECRET).mint("u", "o", 60)
    assert jwt.get_unverified_header(token)["typ"] == "at+jwt"
    claims = {"sub": "u", "org_id": "o", "exp": _soon()}
    for accepted in ("JWT", "jwt", "at+jwt", "application/at+jwt"):
        assert TokenService(SECRET).verify(_raw(claims, typ=accepted)).user_id == "u"
    for refused in ("dpop+jwt", "logout+jwt", "", 7):
        token = _raw(claims, typ=refused)
        assert _reason(TokenService(SECRET), token) == "token type ('typ') is not accepted"
    untyped = _raw(claims, typ=None)
    assert "typ" not in jwt.get_unverified_header(untyped)
    assert _reason(TokenService(SECRET), untyped) == "token type ('typ') is not accepted"


@pytest.mark.parametrize(
    ("exp", "reason"),
    [
        (lambda: "9999999999", "token claim 'exp' must be a number of seconds"),
        (lambda: str(_soon()), "token claim 'exp' must be a number of seconds"),
        (lambda: True, "token expired"),  # PyJWT reads it as 1
        (lambda: 95_617_584_000, "token lives longer than 86400 s"),  # the year 5000
        (lambda: _soon() + 86_400, "token lives longer than 86400 s"),
    ],
)
def test_exp_is_a_number_within_the_maximum_lifetime(
    exp: Callable[[], object], reason: str
) -> None:
    token = _raw({"sub": "u", "org_id": "o", "exp": exp()})
    assert _reason(TokenService(SECRET), token) == reason


@pytest.mark.parametrize("name", ["exp", "nbf", "iat"])
@pytest.mark.parametrize(
    "value",
    [int("9" * 400), -int("9" * 400), float("inf"), 2**53 + 1],
    ids=["400 digits", "minus 400 digits", "infinity", "2**53 + 1"],
)
def test_a_time_past_any_float_is_refused_not_a_crash(name: str, value: float) -> None:
    # A 400-digit `exp` made verification raise OverflowError: a 500 and a 1011.
    token = _raw({"sub": "u", "org_id": "o", "exp": _soon(), name: value})
    assert _reason(TokenService(SECRET), token) in (
        f"token claim {name!r} must be a number of seconds",
        "token expired",
        "token is malformed",
        "token not yet valid",
    )


def test_nbf_and_iat_must_be_numbers_when_present() -> None:
    for name in ("nbf", "iat"):
        token = _raw({"sub": "u", "org_id": "o", "exp": _soon(), name: "0"})
        assert _reason(TokenService(SECRET), token) in (
            f"token claim {name!r} must be a number of seconds",
            "token is malformed",
        )


def test_the_maximum_lifetime_binds_minting_too() -> None:
    service = TokenService(SECRET, max_ttl_s=600)
    assert service.verify(service.mint("u", "o", 600)).user_id == "u"
    with pytest.raises(ValueError, match="1 to 600 seconds"):
        service.mint("u", "o", 601)


def test_leeway_is_small_and_applies_to_exp() -> None:
    with pytest.raises(ValueError, match="0 to 60"):
        TokenService(SECRET, leeway_s=61)
    service = TokenService(SECRET, leeway_s=30)
    just_expired = service.mint("u", "o", 60, now=int(time.time()) - 70)
    assert service.verify(just_expired).user_id == "u"
    long_expired = service.mint("u", "o", 60, now=int(time.time()) - 100)
    assert _reason(service, long_expired) == "token expired"


def test_a_verified_token_is_remembered_until_it_expires(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    service = TokenService(SECRET, leeway_s=0)
    token = service.mint("u", "o", ttl_s=1)
    other = service.mint("u2", "o", ttl_s=60)
    assert service.verify(token).user_id == "u"

    def no_decoding(*args: object, **kwargs: object) -> None:
        raise AssertionError("decoded again")

    monkeypatch.setattr(jwt, "decode", no_decoding)
    assert service.verify(token).user_id == "u"  # remembered: not decoded again
    with pytest.raises(AssertionError, match="decoded again"):
        service.verify(other)  # never verified: decoded
    monkeypatch.undo()
    # Once past its `exp`, a remembered token is verified again, and refused.
    exp = jwt.decode(token, options={"verify_signature": False})["exp"]
    time.sleep(max(0.0, exp - time.time()) + 0.05)
    assert _reason(service, token) == "token expired"
    assert _reason(service, token) == "token expired"


def test_a_refused_token_is_not_remembered() -> None:
    service = TokenService(SECRET)
    token = TokenService("another-secret-that-is-long-enough-too").mint("u", "o", 60)
    for _ in range(2):
        assert _reason(service, token) == "token signature is invalid"


def test_original_claim_names_are_accepted() -> None:
    exp = _soon()
    token = _raw({"userId": 42, "organizacaoId": "org-7", "exp": exp})
    assert TokenService(SECRET).verify(token) == Identity("42", "org-7", exp)


def test_standard_names_win_over_aliases() -> None:
    exp = _soon()
    token = _raw({"sub": "a", "userId": "b", "org_id": "o", "organizacaoId": "p", "exp": exp})
    assert TokenService(SECRET).verify(token) == Identity("a", "o", exp)


@pytest.mark.parametrize(
    ("claims", "reason"),
    [
        ({"org_id": "o"}, "token has no user id ('sub' or 'userId')"),
        ({"sub": "", "org_id": "o"}, "token has no user id ('sub' or 'userId')"),
        (
            {"userId": True, "org_id": "o"},
            "token has no user id ('sub' or 'userId')",
        ),
        ({"sub": 7, "org_id": "o"}, "token is malformed"),  # PyJWT: str only
        (
            {"sub": "u"},
            "token has no organization id ('org_id' or 'organizacaoId')",
        ),
        ({"sub": "u", "org_id": "o", "exp": None}, "token has no 'exp' claim"),
        ({"sub": "u", "org_id": "o", "exp": "soon"}, "token is malformed"),
    ],
)
def test_incomplete_claims_are_refused(claims: dict[str, Any], reason: str) -> None:
    # A claim set without "exp" gets one that has not expired (taken now, not at import);
    # "exp": None stands for no "exp" at all.
    claims = {"exp": _soon(), **claims}
    if claims["exp"] is None:
        del claims["exp"]
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


# -- the edges of every bound ------------------------------------------------------------


@pytest.mark.parametrize("leeway", [0, 1, 59, 60])
def test_a_leeway_of_0_to_60_seconds_is_taken(leeway: int) -> None:
    TokenService(SECRET, leeway_s=leeway)


@pytest.mark.parametrize("leeway", [-1, 61])
def test_a_leeway_outside_0_to_60_seconds_is_refused(leeway: int) -> None:
    with pytest.raises(ValueError, match="leeway must be 0 to 60 seconds"):
        TokenService(SECRET, leeway_s=leeway)


@pytest.mark.parametrize(("ttl", "takes"), [(-1, False), (0, False), (1, True), (600, True)])
def test_a_token_lives_1_second_to_the_maximum(ttl: int, takes: bool) -> None:
    service = TokenService(SECRET, max_ttl_s=600)
    if takes:
        claims = jwt.decode(
            service.mint("u", "o", ttl, now=NOW), options={"verify_signature": False}
        )
        assert claims["exp"] - claims["iat"] == ttl
    else:
        with pytest.raises(ValueError, match=f"a token lives 1 to 600 seconds, not {ttl}"):
            service.mint("u", "o", ttl, now=NOW)


def test_the_lifetime_bound_is_the_maximum_plus_the_default_leeway_of_30_s() -> None:
    """`verify(now=…)` measures the lifetime from the given time, not the clock's: a time
    far from the clock's tells the two apart."""
    service = TokenService(SECRET)
    now = int(time.time()) - 1000
    at_the_bound = _raw({"sub": "u", "org_id": "o", "exp": now + 86_400 + 30})
    assert service.verify(at_the_bound, now=now).user_id == "u"
    past_it = _raw({"sub": "u", "org_id": "o", "exp": now + 86_400 + 31})
    with pytest.raises(InvalidToken, match="token lives longer than 86400 s"):
        service.verify(past_it, now=now)


def test_tokens_are_minted_and_checked_with_the_configured_algorithm() -> None:
    long_secret = SECRET * 2  # HS512 wants 64 bytes or more
    service = TokenService(long_secret, algorithm="HS512")
    token = service.mint("u", "o", 60)
    assert jwt.get_unverified_header(token)["alg"] == "HS512"
    assert service.verify(token).user_id == "u"
    assert _reason(TokenService(long_secret), token) == "token algorithm is not accepted"


def test_a_token_that_is_not_utf8_text_is_malformed() -> None:
    assert _reason(TokenService(SECRET), "\ud800.a.b") == "token is malformed"


def test_from_settings_takes_issuer_audience_leeway_and_lifetime() -> None:
    settings = load_settings(
        jwt_issuer="iss-s", jwt_audience="aud-s", jwt_leeway_s=5, token_max_ttl_s=700
    )
    service = TokenService.from_settings(settings, SECRET)
    assert service.max_ttl_s == 700
    claims = jwt.decode(service.mint("u", "o", 700, now=NOW), options={"verify_signature": False})
    assert (claims["iss"], claims["aud"]) == ("iss-s", "aud-s")
    # A leeway of 5 s: 6 s past the maximum lifetime is refused, 5 s taken.
    now = int(time.time())
    token = _raw({"sub": "u", "org_id": "o", "exp": now + 705, "iss": "iss-s", "aud": "aud-s"})
    assert service.verify(token, now=now).user_id == "u"
    late = _raw({"sub": "u", "org_id": "o", "exp": now + 706, "iss": "iss-s", "aud": "aud-s"})
    with pytest.raises(InvalidToken, match="token lives longer than 700 s"):
        service.verify(late, now=now)
