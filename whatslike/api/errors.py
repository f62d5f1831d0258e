"""HTTP errors as `{"error":{"code","message"}}`, and the handlers that make every failure
(ours included) answer that shape — never a stack trace."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

log = logging.getLogger(__name__)

_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "too_large",
    429: "rate_limited",
    503: "unavailable",
}


class ApiError(Exception):
    """A failure the client should see, with its HTTP status and error code."""

    def __init__(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(
        {"error": {"code": code, "message": message}}, status_code=status, headers=headers
    )


async def on_api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return error_response(exc.status, exc.code, exc.message, exc.headers)


async def on_http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = _CODES.get(exc.status_code, "error")
    # Its headers too: a 405 names the methods the path allows (`Allow`, RFC 9110).
    headers = dict(exc.headers) if exc.headers else None
    return error_response(exc.status_code, code, str(exc.detail), headers)


def unavailable_handler(retry_after_s: int) -> Callable[[Request, Exception], Awaitable[Response]]:
    """A backend out of reach answers 503 with a Retry-After: nothing was acknowledged,
    and the same request (the same client_message_id, the same webhook) is safe to retry."""

    async def on_unavailable(request: Request, exc: Exception) -> Response:
        log.warning("%s %s: 503, %s", request.method, request.url.path, exc)
        response = error_response(503, "unavailable", "temporarily unavailable; retry later")
        response.headers["Retry-After"] = str(retry_after_s)
        return response

    return on_unavailable


async def on_unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(500, "internal", "internal error; it has been logged")
