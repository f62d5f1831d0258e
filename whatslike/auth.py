"""Token logic of protocol.md §4-5: mint and verify the HS256 JWTs that name a user and
an organization. Pure: no I/O; the clock is read only when the caller gives no time."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import jwt

from whatslike.errors import WhatslikeError

#: Claim names accepted for each id, preferred first (the original design's names last).
_USER_CLAIMS = ("sub", "userId")
_ORG_CLAIMS = ("org_id", "organizacaoId")


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a valid token speaks for, and until when (unix seconds)."""

    user_id: str
    org_id: str
    exp: int


class InvalidToken(WhatslikeError):
    """A token that must be refused; `reason` is short and safe to show the client."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _reason(exc: jwt.InvalidTokenError) -> str:
    # The order matters: the specific PyJWT errors subclass the generic ones.
    if isinstance(exc, jwt.ExpiredSignatureError):
        return "token expired"
    if isinstance(exc, jwt.ImmatureSignatureError):
        return "token not yet valid"
    if isinstance(exc, jwt.InvalidAudienceError):
        return "token audience is not accepted"
    if isinstance(exc, jwt.InvalidIssuerError):
        return "token issuer is not accepted"
    if isinstance(exc, jwt.MissingRequiredClaimError):
        return f"token has no {exc.claim!r} claim"
    if isinstance(exc, jwt.InvalidSignatureError):
        return "token signature is invalid"
    if isinstance(exc, jwt.InvalidAlgorithmError):
        return "token algorithm is not accepted"
    return "token is malformed"


def _claimed_id(claims: dict[str, Any], names: tuple[str, ...]) -> str | None:
    for name in names:
        value = claims.get(name)
        # Numeric ids appear in tokens of the original design; bools never are ids.
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        if isinstance(value, str) and value:
            return value
    return None


class TokenService:
    """Mints and verifies tokens with one secret; `iss`/`aud` are set and checked only
    when configured (non-empty)."""

    def __init__(
        self, secret: str, issuer: str = "", audience: str = "", algorithm: str = "HS256"
    ) -> None:
        self._secret = secret
        self._issuer = issuer
        self._audience = audience
        self._algorithm = algorithm

    def __repr__(self) -> str:
        return (
            f"TokenService(issuer={self._issuer!r}, audience={self._audience!r}, "
            f"algorithm={self._algorithm!r})"
        )

    def mint(self, user_id: str, org_id: str, ttl_s: int, now: int | None = None) -> str:
        issued = int(time.time()) if now is None else now
        claims: dict[str, Any] = {
            "sub": user_id,
            "org_id": org_id,
            "iat": issued,
            "nbf": issued,
            "exp": issued + ttl_s,
        }
        if self._issuer:
            claims["iss"] = self._issuer
        if self._audience:
            claims["aud"] = self._audience
        return jwt.encode(claims, self._secret, algorithm=self._algorithm)

    def verify(self, token: str) -> Identity:
        """The identity of a valid token; raises InvalidToken with the reason otherwise."""
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                self._secret,
                algorithms=[self._algorithm],
                issuer=self._issuer or None,
                audience=self._audience or None,
                # Without a configured audience a token's `aud` is not ours to judge.
                options={"require": ["exp"], "verify_aud": bool(self._audience)},
            )
        except jwt.InvalidTokenError as exc:
            raise InvalidToken(_reason(exc)) from exc
        user_id = _claimed_id(claims, _USER_CLAIMS)
        if user_id is None:
            raise InvalidToken("token has no user id ('sub' or 'userId')")
        org_id = _claimed_id(claims, _ORG_CLAIMS)
        if org_id is None:
            raise InvalidToken("token has no organization id ('org_id' or 'organizacaoId')")
        return Identity(user_id=user_id, org_id=org_id, exp=int(claims["exp"]))


def bearer_token(authorization_header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, or None."""
    if not authorization_header:
        return None
    scheme, _, token = authorization_header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token
