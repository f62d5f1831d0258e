"""The media operations of the HTTP API (protocol.md §5): an upload, checked against
Meta's limits while it streams, and the short-lived URL of a medium. With the local store
(the embedded default) this process also serves those URLs (`GET /media/{id}`, signed,
no token); with S3 they are the server's own pre-signed URLs, and the bucket is never
named to a client."""

from __future__ import annotations

import logging
import time
from datetime import datetime
from typing import Annotated, Any, Literal
from urllib.parse import quote

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response

from whatslike.api.contract import Operation, Reply
from whatslike.api.errors import ApiError
from whatslike.api.http import HttpApi
from whatslike.clock import format_time, from_unix, new_id
from whatslike.media.limits import SUPPORTED, MediaRefused, check_size, media_type
from whatslike.media.local import LocalMediaStore
from whatslike.media.store import FILENAME, MEDIA_ID, MediaRecord, MediaStore
from whatslike.roles import RoleDefaults
from whatslike.settings import Settings

log = logging.getLogger(__name__)

MediaId = Annotated[str, Field(pattern=MEDIA_ID.pattern)]


class UploadQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")
    filename: Annotated[
        str,
        Field(
            pattern=FILENAME.pattern,
            description="The name a document is shown with (no path).",
        ),
    ] = ""


class MediaPath(BaseModel):
    media_id: MediaId


class SignedQuery(BaseModel):
    o: Annotated[str, Field(pattern=r"^[0-9a-f]{32}$", description="The owner's key.")]
    exp: Annotated[int, Field(ge=0, le=2**40, description="Expiry, in Unix seconds.")]
    sig: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$", description="HMAC-SHA256.")]


class MediaOut(BaseModel):
    id: str = Field(description="The media id to send (`media_id` of a message).")
    content_type: str
    kind: Literal["image", "document", "audio", "video"]
    size: int = Field(ge=1, description="Bytes.")
    sha256: str
    filename: str
    created_at: datetime
    url: str = Field(
        description="Where the bytes can be fetched, without a token, until `url_expires_at`."
    )
    url_expires_at: datetime


def _refused(exc: MediaRefused) -> ApiError:
    return ApiError(exc.status, exc.code, exc.message)


class MediaApi(RoleDefaults):
    """Part of the api role: it shares the API's tokens and per-organization budget."""

    name = "api"

    def __init__(self, api: HttpApi, settings: Settings, store: MediaStore) -> None:
        self._api = api
        self._settings = settings
        self.store = store
        self._uploads = 0

    async def start(self) -> None:
        await self.store.open()

    async def stop(self) -> None:
        await self.store.close()

    def operations(self) -> list[Operation]:
        no_media = {404: "No such medium in the caller's organization."}
        operations = [
            Operation(
                "POST",
                "/api/media",
                self.upload,
                "uploadMedia",
                "Upload an image, a document, an audio or a video",
                "media",
                201,
                Reply("The medium is stored; send it with its `id`.", MediaOut),
                upload=tuple(sorted(SUPPORTED)),
                query=UploadQuery,
                errors={
                    413: "Over Meta's limit for its kind (image 5 MB, audio and video 16 MB, "
                    "document 100 MB); nothing is stored.",
                    415: "A type Meta does not take; nothing is stored.",
                    422: "The content is empty or not of its declared type; nothing is stored.",
                    503: "Too many uploads at work (`MEDIA_MAX_UPLOADS`), or the store is out "
                    "of reach; nothing is stored.",
                },
                description="The body is the file itself, its type in `Content-Type`. Its "
                "size and type are checked while it streams, against Meta's limits.",
            ),
            Operation(
                "GET",
                "/api/media/{media_id}",
                self.get,
                "getMedia",
                "A medium, with a short-lived URL of its bytes",
                "media",
                200,
                Reply("The medium.", MediaOut),
                path_params=MediaPath,
                errors=no_media,
            ),
        ]
        if isinstance(self.store, LocalMediaStore):
            operations.append(
                Operation(
                    "GET",
                    "/media/{media_id}",
                    self.download,
                    "downloadMedia",
                    "The bytes behind a signed media URL (the local store)",
                    "media",
                    200,
                    Reply("The medium's bytes, of its own type.", media_type="*/*"),
                    auth="none",
                    path_params=MediaPath,
                    query=SignedQuery,
                    errors={
                        403: "The link's signature is wrong, or it expired.",
                        404: "The medium is gone.",
                    },
                )
            )
        return operations

    async def _answer(self, record: MediaRecord, status: int) -> Response:
        ttl_s = self._settings.media_url_ttl_s
        body: dict[str, Any] = {
            "id": record.id,
            "content_type": record.content_type,
            "kind": record.kind,
            "size": record.size,
            "sha256": record.sha256,
            "filename": record.filename,
            "created_at": format_time(record.created_at),
            "url": await self.store.url(record, ttl_s),
            "url_expires_at": format_time(from_unix(int(time.time()) + ttl_s)),
        }
        return JSONResponse(body, status_code=status, headers={"Cache-Control": "no-store"})

    async def upload(self, request: Request) -> Response:
        identity = self._api.identity(request)
        try:
            query = UploadQuery.model_validate(dict(request.query_params))
        except ValidationError as exc:
            raise ApiError(400, "bad_request", f"query: {exc.errors()[0]['msg']}") from exc
        try:
            kind = media_type(request.headers.get("content-type"))
            length = request.headers.get("content-length", "")
            if length.isdigit():
                check_size(kind, int(length))  # refused before a byte is read
        except MediaRefused as exc:
            raise _refused(exc) from exc
        if self._uploads >= self._settings.media_max_uploads:
            raise ApiError(
                503,
                "busy",
                "too many uploads at work; retry later",
                headers={"Retry-After": str(self._settings.retry_after_s)},
            )
        self._uploads += 1
        try:
            record = await self.store.save(
                new_id("med"), identity.org_id, kind, query.filename, request.stream()
            )
        except MediaRefused as exc:
            raise _refused(exc) from exc
        finally:
            self._uploads -= 1
        log.info("media %s stored: %s, %d bytes", record.id, record.content_type, record.size)
        return await self._answer(record, 201)

    async def get(self, request: Request) -> Response:
        identity = self._api.identity(request)
        media_id = request.path_params["media_id"]
        record = (
            await self.store.record(identity.org_id, media_id) if MEDIA_ID.match(media_id) else None
        )
        if record is None:
            raise ApiError(404, "not_found", "no such media")
        return await self._answer(record, 200)

    async def download(self, request: Request) -> Response:
        assert isinstance(self.store, LocalMediaStore)
        try:
            query = SignedQuery.model_validate(dict(request.query_params))
        except ValidationError as exc:
            raise ApiError(400, "bad_request", f"query: {exc.errors()[0]['msg']}") from exc
        media_id = request.path_params["media_id"]
        if not self.store.signed(media_id, query.o, query.exp, query.sig):
            raise ApiError(403, "forbidden", "this media link is not valid, or it expired")
        found = await self.store.signed_file(media_id, query.o)
        if found is None:
            raise ApiError(404, "not_found", "no such media")
        data, record = found
        headers = {"Cache-Control": "private, max-age=60", "X-Content-Type-Options": "nosniff"}
        if record.kind == "document" and record.filename:
            name = quote(record.filename, safe="")
            headers["Content-Disposition"] = f"attachment; filename*=UTF-8''{name}"
        return FileResponse(data, media_type=record.content_type, headers=headers)
