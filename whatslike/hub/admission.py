"""Who may open a `/ws/status` socket (protocol.md §4, "Connecting"): the token (from the
subprotocol, the Authorization header or the query), verified once and kept until it
expires; the Origin allow-list; the connection caps per user, per address (through
trusted proxies only) and in all. Refused upgrades are logged at most once per interval."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Final

import uvicorn
from uvicorn.middleware.proxy_headers import _TrustedHosts

from whatslike.auth import Identity, InvalidToken, TokenService, bearer_token
from whatslike.hub.caps import ConnectionCaps
from whatslike.hub.transport import Request
from whatslike.settings import Settings

logger = logging.getLogger(__name__)

#: Verified tokens kept (until they expire) so that a reconnecting client is not verified
#: again; emptied when full.
TOKEN_CACHE: Final = 50_000
_CAP_MESSAGES: Final = {
    "total": "the server holds as many connections as it may; retry later",
    "user": "this user holds as many connections as one user may",
    "ip": "this address holds as many connections as one address may",
}

#: The subprotocol a client offers to carry its token outside the URL, next to
#: SUBPROTOCOL (which the server selects: it never echoes the token back):
#: `Sec-WebSocket-Protocol: whatslike.v1, access_token.<JWT>`.
SUBPROTOCOL: Final = "whatslike.v1"
TOKEN_SUBPROTOCOL_PREFIX: Final = "access_token."

#: Refused upgrades are logged at INFO at most once per this many seconds; the ones in
#: between are counted into the next line (an attacker cannot flood the log).
REFUSAL_LOG_INTERVAL_S: Final = 10.0


@dataclass(slots=True)
class RefusalLog:
    last: float = float("-inf")
    suppressed: int = 0

    def note(self, status: int, code: str) -> None:
        now = time.monotonic()
        if now - self.last < REFUSAL_LOG_INTERVAL_S:
            self.suppressed += 1
            return
        logger.info(
            "refused a WebSocket upgrade: %d %s (%d more refused since the last such line)",
            status,
            code,
            self.suppressed,
        )
        self.last, self.suppressed = now, 0


@dataclass(frozen=True, slots=True)
class Admission:
    identity: Identity
    user: tuple[str, str]
    ip: str
    subprotocol: str | None


class Gate:
    """Admits upgrades: `admit` answers the identity of an acceptable one (its place
    under the caps taken; `release` gives it back) or why it is refused."""

    def __init__(self, settings: Settings, tokens: TokenService) -> None:
        self._settings = settings
        self.tokens = tokens
        self._caps = ConnectionCaps(
            settings.max_connections,
            settings.max_connections_per_user,
            settings.max_connections_per_ip,
        )
        self.refusals = RefusalLog()
        #: The server stops: every upgrade is refused (503).
        self.stopping = False
        self._verified: dict[str, Identity] = {}
        #: The addresses whose X-Forwarded-For is believed, as uvicorn's proxy headers
        #: middleware would (set from uvicorn's config at the first upgrade).
        self._proxies: _TrustedHosts | None = None
        self._proxy_config: object = None

    def configure(self, config: uvicorn.Config) -> None:
        """Believe X-Forwarded-For as uvicorn's own configuration says."""
        if config is not self._proxy_config:
            self._proxy_config = config
            self._proxies = (
                _TrustedHosts(config.forwarded_allow_ips) if config.proxy_headers else None
            )

    def release(self, user: tuple[str, str], ip: str) -> None:
        """A connection admitted is gone: its place under the caps is free."""
        self._caps.release(user, ip)

    def admit(self, request: Request) -> Admission | tuple[int, str, str]:
        """The identity of an acceptable upgrade, its connection counted against the caps;
        otherwise the HTTP status, error code and message to refuse it with."""
        if self.stopping:
            return 503, "unavailable", "the server is shutting down"
        headers = request.headers
        origin = headers.get("origin")
        allowed = self._settings.effective_allowed_origins
        # Only browsers send Origin, and only browsers can be tricked into connecting.
        if allowed and origin is not None and origin not in allowed:
            return 403, "forbidden_origin", "this origin is not allowed"
        offered = request.subprotocols
        token = (
            next(
                (
                    name[len(TOKEN_SUBPROTOCOL_PREFIX) :]
                    for name in offered
                    if name.startswith(TOKEN_SUBPROTOCOL_PREFIX)
                ),
                None,
            )
            or bearer_token(headers.get("authorization"))
            or next(iter(request.query.get("access_token", ())), None)
        )
        if not token:
            return 401, "unauthorized", "a token is required"
        try:
            identity = self.verify(token)
        except InvalidToken as exc:
            return 401, "unauthorized", exc.reason
        admission = Admission(
            identity,
            (identity.org_id, identity.user_id),
            self.client_ip(request),
            SUBPROTOCOL if SUBPROTOCOL in offered else None,
        )
        refused_by = self._caps.claim(admission.user, admission.ip)
        if refused_by is not None:
            status = 503 if refused_by == "total" else 429
            return status, "too_many_connections", _CAP_MESSAGES[refused_by]
        return admission

    def client_ip(self, request: Request) -> str:
        """The client's address as uvicorn's proxy headers middleware gives it: from
        X-Forwarded-For only when the peer is a trusted proxy."""
        proxies = self._proxies
        forwarded = request.headers.get("x-forwarded-for")
        if proxies is not None and forwarded is not None and request.peer in proxies:
            host, _ = proxies.get_trusted_client_address(forwarded)
            if host:
                return host
        return request.peer

    def verify(self, token: str) -> Identity:
        """The token's identity, verified once and then kept until it expires (a client
        reconnecting with the same token costs no signature check)."""
        identity = self._verified.get(token)
        if identity is not None and identity.exp > time.time():
            return identity
        identity = self.tokens.verify(token)
        if len(self._verified) >= TOKEN_CACHE:
            self._verified.clear()
        self._verified[token] = identity
        return identity
