"""Token logic of protocol.md §4-5: mint and verify the HS256 JWTs that name a user and
an organization. Pure: no I/O; the clock is read only when the caller gives no time.

Verification follows RFC 8725 and OWASP's JWT advice: one algorithm (HS256, never
`none`), an explicit `typ`, `exp` required and numeric, a maximum lifetime, `aud` refused
when it names anyone but us, and a small leeway for clock skew.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import jwt

from whatslike.errors import WhatslikeError

if TYPE_CHECKING:
    from whatslike.settings import Settings

#: Claim names accepted for each id, preferred first (the original design's names last).
_USER_CLAIMS = ("sub", "userId")
_ORG_CLAIMS = ("org_id", "organizacaoId")

#: The `typ` we mint (RFC 9068's access-token type), and the ones we accept: plain `JWT`
#: is what most libraries write, kept for tokens of the original design.
TOKEN_TYPE = "at+jwt"
_ACCEPTED_TYPES = frozenset({"at+jwt", "application/at+jwt", "jwt"})

#: RFC 8725 §3.10 asks for little clock skew; more than this is refused by the settings.
MAX_LEEWAY_S = 60

#: Tokens a `TokenService` verified lately and remembers (the oldest forgotten first): a
#: client sends the same token with every request, and PyJWT's verification (base64,
#: JSON, the HMAC) was 17 % of the API process's samples at 300 messages/s.
VERIFIED_KEPT = 4096


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
        self,
        secret: str,
        issuer: str = "",
        audience: str = "",
        algorithm: str = "HS256",
        *,
        leeway_s: int = 30,
        max_ttl_s: int = 86_400,
    ) -> None:
        if not 0 <= leeway_s <= MAX_LEEWAY_S:
            raise ValueError(f"leeway must be 0 to {MAX_LEEWAY_S} seconds")
        self._secret = secret
        self._issuer = issuer
        self._audience = audience
        self._algorithm = algorithm
        self._leeway_s = leeway_s
        self.max_ttl_s = max_ttl_s
        #: token → its identity and `exp` claim. Only expiry can turn a verified token
        #: invalid later (`nbf` and the lifetime bound only get easier as time passes),
        #: so a remembered token is checked for that alone.
        self._verified: dict[str, tuple[Identity, float]] = {}

    @classmethod
    def from_settings(cls, settings: Settings, secret: str) -> TokenService:
        return cls(
            secret,
            settings.jwt_issuer,
            settings.jwt_audience,
            leeway_s=settings.jwt_leeway_s,
            max_ttl_s=settings.token_max_ttl_s,
        )

    def __repr__(self) -> str:
        return (
            f"TokenService(issuer={self._issuer!r}, audience={self._audience!r}, "
            f"algorithm={self._algorithm!r})"
        )

    def mint(self, user_id: str, org_id: str, ttl_s: int, now: int | None = None) -> str:
        """A token for the user; ValueError when `ttl_s` is past the maximum lifetime."""
        if not 0 < ttl_s <= self.max_ttl_s:
            raise ValueError(f"a token lives 1 to {self.max_ttl_s} seconds, not {ttl_s}")
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
        return jwt.encode(
            claims, self._secret, algorithm=self._algorithm, headers={"typ": TOKEN_TYPE}
        )

    def verify(self, token: str, now: float | None = None) -> Identity:
        """The identity of a valid token; raises InvalidToken with the reason otherwise.
        `now` (tests) checks the lifetime bound at that time, and bypasses the memory."""
        if now is not None:
            return self._verify(token, now)[0]
        kept = self._verified.get(token)
        if kept is not None:
            identity, exp = kept
            # PyJWT's own test: expired once `exp <= now - leeway`.
            if exp > time.time() - self._leeway_s:
                return identity
            del self._verified[token]
        identity, exp = self._verify(token, None)
        if len(self._verified) >= VERIFIED_KEPT:
            del self._verified[next(iter(self._verified))]
        self._verified[token] = (identity, exp)
        return identity

    def _verify(self, token: str, now: float | None) -> tuple[Identity, float]:
        try:
            header = jwt.get_unverified_header(token)
            claims: dict[str, Any] = jwt.decode(
                token,
                self._secret,
                algorithms=[self._algorithm],
                issuer=self._issuer or None,
                # None: a token naming any audience is refused (it is meant for someone
                # else); a token without `aud` is accepted unless an audience is set.
                audience=self._audience or None,
                leeway=self._leeway_s,
                options={"require": ["exp"], "verify_aud": True},
            )
        except jwt.InvalidTokenError as exc:
            raise InvalidToken(_reason(exc)) from exc
        except (UnicodeError, ValueError, TypeError, OverflowError) as exc:
            # Odd bytes PyJWT lets through, or a time claim past any float (`1e400`).
            raise InvalidToken("token is malformed") from exc
        typ = header.get("typ")
        if not isinstance(typ, str) or typ.lower() not in _ACCEPTED_TYPES:
            raise InvalidToken("token type ('typ') is not accepted")
        for name in ("exp", "nbf", "iat"):
            value = claims.get(name)
            if value is not None and not _is_time(value):
                raise InvalidToken(f"token claim {name!r} must be a number of seconds")
        current = time.time() if now is None else now
        if claims["exp"] - current > self.max_ttl_s + self._leeway_s:
            raise InvalidToken(f"token lives longer than {self.max_ttl_s} s")
        user_id = _claimed_id(claims, _USER_CLAIMS)
        if user_id is None:
            raise InvalidToken("token has no user id ('sub' or 'userId')")
        org_id = _claimed_id(claims, _ORG_CLAIMS)
        if org_id is None:
            raise InvalidToken("token has no organization id ('org_id' or 'organizacaoId')")
        return Identity(user_id=user_id, org_id=org_id, exp=int(claims["exp"])), claims["exp"]


#: The largest NumericDate accepted: integers past it (a 400-digit `exp`) cannot become a
#: float, and no real token lives until the year 285 million.
MAX_TIME = 2**53


def _is_time(value: object) -> bool:
    """NumericDate of RFC 7519: a JSON number (PyJWT alone also takes "123" strings)."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return -MAX_TIME <= value <= MAX_TIME
    return isinstance(value, float) and math.isfinite(value)


def bearer_token(authorization_header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, or None."""
    if not authorization_header:
        return None
    scheme, _, token = authorization_header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token
