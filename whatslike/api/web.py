"""The api role's browser side: the JavaScript client and the demo page as static files,
and — in the embedded mode only — development tokens for the demo."""

from __future__ import annotations

import ipaddress
from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Route

from whatslike.api.errors import ApiError
from whatslike.auth import TokenService
from whatslike.roles import Deps, RoleDefaults

STATIC = Path(__file__).resolve().parent.parent / "static"

#: Who the demo acts as in the embedded mode.
DEMO_ORG = "demo"
DEMO_USER = "demo-agent"

_FILES = {
    "/client/websocket-client.js": ("websocket-client.js", "text/javascript"),
    "/client/websocket-client.d.ts": ("websocket-client.d.ts", "application/typescript"),
    "/demo": ("demo.html", "text/html"),
}


class WebAssets(RoleDefaults):
    name = "web"

    def __init__(self, deps: Deps) -> None:
        self._settings = deps.settings
        self._tokens = TokenService.from_settings(deps.settings, deps.jwt_secret)

    def routes(self) -> list[BaseRoute]:
        routes: list[BaseRoute] = [
            Route(path, self._file, methods=["GET", "HEAD"]) for path in _FILES
        ]
        routes += [
            Route("/demo/config", self._config, methods=["GET"]),
            Route("/demo/token", self._token, methods=["POST"]),
        ]
        return routes

    def demo_token(self) -> str:
        return self._tokens.mint(DEMO_USER, DEMO_ORG, self._settings.token_ttl_s)

    async def _file(self, request: Request) -> Response:
        name, media_type = _FILES[request.url.path]
        return FileResponse(
            STATIC / name, media_type=media_type, headers={"Cache-Control": "no-cache"}
        )

    async def _config(self, request: Request) -> Response:
        return JSONResponse(
            {
                "embedded": self._settings.embedded,
                "simulator": "simulator" in self._settings.roles,
                "heartbeat_s": self._settings.heartbeat_s,
            }
        )

    async def _token(self, request: Request) -> Response:
        # A token for anyone who asks is only acceptable when nothing leaves this process,
        # and, on an address others can reach, only for this machine's own clients.
        if not self._settings.embedded:
            raise ApiError(404, "not_found", "development tokens exist in the embedded mode only")
        client = request.client.host if request.client else ""
        if not (self._settings.demo_tokens_remote or is_loopback(client)):
            raise ApiError(
                403,
                "forbidden",
                "development tokens are handed to this machine only "
                "(WHATSLIKE_DEMO_TOKENS_REMOTE opts in to any client)",
            )
        return JSONResponse({"token": self.demo_token(), "org_id": DEMO_ORG, "user_id": DEMO_USER})


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and their IPv4-mapped forms; False for names."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback
