"""An inbound medium: a customer's image or document arrives as a Graph media id
(WhatsApp) or an attachment URL (Instagram); its bytes are fetched into the media store,
checked like an upload (Meta's types and sizes), and a WhatsApp one's sha256 against
Meta's. The access token is sent only to Graph (never to an Instagram attachment's URL,
a CDN's) and never logged."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp

from whatslike.clock import new_id
from whatslike.errors import WhatslikeError
from whatslike.media.limits import MediaRefused, check_size, media_type
from whatslike.media.store import MediaRecord, MediaStore

CHUNK_BYTES = 65_536


class MediaFetchFailed(WhatslikeError):
    """Meta did not give the medium (an error answer, a wrong checksum, a refused type or
    size): nothing was stored. `retriable` when trying again later may succeed (a 5xx or
    a 429); a refusal or a 4xx will not change."""

    def __init__(self, message: str, *, code: str, retriable: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.retriable = retriable


def _answer_failed(status: int, what: str) -> MediaFetchFailed:
    return MediaFetchFailed(
        f"Meta answered {status} for {what}",
        code=f"http_{status}",
        retriable=status >= 500 or status == 429,
    )


def _refused(exc: MediaRefused, what: str) -> MediaFetchFailed:
    return MediaFetchFailed(f"{what} refused: {exc.message}", code=exc.code)


async def _save(
    download: aiohttp.ClientResponse,
    declared: str | None,
    org_id: str,
    store: MediaStore,
    what: str,
) -> MediaRecord:
    try:
        kind = media_type(declared)
        length = download.content_length
        if length is not None:
            check_size(kind, length)  # refused before a byte is read

        async def chunks() -> AsyncIterator[bytes]:
            async for chunk in download.content.iter_chunked(CHUNK_BYTES):
                yield chunk

        return await store.save(new_id("med"), org_id, kind, "", chunks())
    except MediaRefused as exc:
        raise _refused(exc, what) from exc


async def fetch_inbound_media(
    http: aiohttp.ClientSession,
    *,
    graph_url: str,
    api_version: str,
    access_token: str,
    graph_media_id: str,
    org_id: str,
    store: MediaStore,
    timeout_s: float = 60.0,
) -> MediaRecord:
    """Store the medium Graph knows by `graph_media_id` as `org_id`'s; its record.
    MediaFetchFailed when Meta does not give it; aiohttp.ClientError or TimeoutError when
    Meta is out of reach."""
    headers = {"Authorization": f"Bearer {access_token}"}
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    what = f"media {graph_media_id}"
    about_url = f"{graph_url.rstrip('/')}/{api_version}/{graph_media_id}"
    async with http.get(about_url, headers=headers, timeout=timeout) as answer:
        if answer.status != 200:
            raise _answer_failed(answer.status, what)
        about = await answer.json()
    try:
        kind = media_type(str(about["mime_type"]))
        check_size(kind, int(about.get("file_size", 0)))
        url = str(about["url"])
    except MediaRefused as exc:
        raise _refused(exc, what) from exc
    except (KeyError, ValueError, TypeError) as exc:
        raise MediaFetchFailed(f"{what}: unreadable answer ({exc})", code="bad_answer") from exc
    async with http.get(url, headers=headers, timeout=timeout) as download:
        if download.status != 200:
            raise _answer_failed(download.status, f"the bytes of {what}")
        record = await _save(download, kind.content_type, org_id, store, what)
    expected = about.get("sha256")
    if expected and expected != record.sha256:
        await store.delete(org_id, record.id)
        raise MediaFetchFailed(f"{what}: its sha256 is not Graph's", code="sha256_mismatch")
    return record


async def fetch_attachment(
    http: aiohttp.ClientSession,
    *,
    url: str,
    org_id: str,
    store: MediaStore,
    timeout_s: float = 60.0,
) -> MediaRecord:
    """Store an Instagram attachment (its `payload.url`, fetched with no token: Meta's
    CDN URL is its own credential) as `org_id`'s, of the type its download says."""
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with http.get(url, timeout=timeout, allow_redirects=True) as download:
        if download.status != 200:
            raise _answer_failed(download.status, "an attachment")
        return await _save(
            download, download.headers.get("content-type"), org_id, store, "an attachment"
        )
