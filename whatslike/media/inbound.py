"""An inbound medium: a customer's image or document arrives as a Graph media id; its
bytes are fetched from Graph (`GET /<media id>` gives a short-lived URL, which is fetched
with the same access token) into the media store, checked like an upload, and its sha256
against Meta's. The access token is sent only to Graph and never logged."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp

from whatslike.clock import new_id
from whatslike.errors import WhatslikeError
from whatslike.media.limits import MediaRefused, check_size, media_type
from whatslike.media.store import MediaRecord, MediaStore

CHUNK_BYTES = 65_536


class MediaFetchFailed(WhatslikeError):
    """Graph did not give the medium (an error answer, a wrong checksum, a refused type or
    size): nothing was stored."""


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
    """Store the medium Graph knows by `graph_media_id` as `org_id`'s; its record."""
    headers = {"Authorization": f"Bearer {access_token}"}
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    about_url = f"{graph_url.rstrip('/')}/{api_version}/{graph_media_id}"
    async with http.get(about_url, headers=headers, timeout=timeout) as answer:
        if answer.status != 200:
            raise MediaFetchFailed(f"Graph answered {answer.status} for media {graph_media_id}")
        about = await answer.json()
    try:
        kind = media_type(str(about["mime_type"]))
        check_size(kind, int(about.get("file_size", 0)))
    except (KeyError, ValueError, MediaRefused) as exc:
        raise MediaFetchFailed(f"media {graph_media_id} refused: {exc}") from exc
    async with http.get(str(about["url"]), headers=headers, timeout=timeout) as download:
        if download.status != 200:
            raise MediaFetchFailed(
                f"Graph answered {download.status} for the bytes of media {graph_media_id}"
            )

        async def chunks() -> AsyncIterator[bytes]:
            async for chunk in download.content.iter_chunked(CHUNK_BYTES):
                yield chunk

        try:
            record = await store.save(new_id("med"), org_id, kind, "", chunks())
        except MediaRefused as exc:
            raise MediaFetchFailed(f"media {graph_media_id} refused: {exc}") from exc
    expected = about.get("sha256")
    if expected and expected != record.sha256:
        await store.delete(org_id, record.id)
        raise MediaFetchFailed(f"media {graph_media_id}: its sha256 is not Graph's")
    return record
