"""The embedded default: media under `<data_dir>/media`, no server. Each medium is two
files in its organization's directory, `<id>.bin` (the bytes, written first) and
`<id>.json` (the record, written last, atomically by rename); a `.bin` without its record
does not exist for any read. URLs are this process's `/media/{id}`, signed with HMAC-SHA256
and expiring, so a link works without a token (Meta fetches it) and only until it expires.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import os
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from urllib.parse import urlencode

from whatslike.clock import utcnow
from whatslike.errors import BackendUnavailable
from whatslike.media.limits import MediaType
from whatslike.media.store import MEDIA_ID, MediaRecord, UploadCheck, org_key


class LocalMediaStore:
    def __init__(
        self,
        root: Path,
        base_url: str,
        signing_key: bytes,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.root = root
        self._base_url = base_url.rstrip("/")
        # A key of its own, derived: a media link never doubles as anything else.
        self._key = hmac.new(signing_key, b"whatslike media url", hashlib.sha256).digest()
        self._clock = clock

    async def open(self) -> None:
        try:
            await asyncio.to_thread(self.root.mkdir, mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise BackendUnavailable(
                f"cannot create the media directory {self.root}: {exc}"
            ) from exc

    async def close(self) -> None:
        return None

    def _paths(self, org_id: str, media_id: str) -> tuple[Path, Path]:
        folder = self.root / org_key(org_id)
        return folder / f"{media_id}.bin", folder / f"{media_id}.json"

    async def save(
        self,
        media_id: str,
        org_id: str,
        kind: MediaType,
        filename: str,
        chunks: AsyncIterator[bytes],
    ) -> MediaRecord:
        data, meta = self._paths(org_id, media_id)
        part = data.with_suffix(".bin.part")
        check = UploadCheck(kind)
        await asyncio.to_thread(data.parent.mkdir, mode=0o700, parents=True, exist_ok=True)
        fd = await asyncio.to_thread(os.open, part, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            try:
                async for chunk in chunks:
                    check.feed(chunk)
                    await asyncio.to_thread(os.write, fd, chunk)
                sha256 = check.finish()
                await asyncio.to_thread(os.fsync, fd)
            finally:
                os.close(fd)
            await asyncio.to_thread(os.replace, part, data)
            record = MediaRecord(
                media_id,
                org_id,
                kind.content_type,
                kind.kind,
                check.size,
                sha256,
                filename,
                utcnow(),
            )
            await asyncio.to_thread(_write_atomically, meta, json.dumps(record.to_json()).encode())
        except BaseException:
            for path in (part, data):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
            raise
        return record

    async def record(self, org_id: str, media_id: str) -> MediaRecord | None:
        if not MEDIA_ID.match(media_id):
            return None
        _, meta = self._paths(org_id, media_id)
        try:
            raw = await asyncio.to_thread(meta.read_bytes)
        except FileNotFoundError:
            return None
        record = MediaRecord.from_json(json.loads(raw))
        return record if record.org_id == org_id else None

    async def url(self, record: MediaRecord, ttl_s: int) -> str:
        owner = org_key(record.org_id)
        expires = int(self._clock()) + ttl_s
        query = urlencode(
            {"o": owner, "exp": expires, "sig": self._sign(owner, record.id, expires)}
        )
        return f"{self._base_url}/media/{record.id}?{query}"

    def signed(self, media_id: str, owner: str, expires: int, signature: str) -> bool:
        """Whether a URL's signature is this store's and it has not expired."""
        if not MEDIA_ID.match(media_id) or expires < self._clock():
            return False
        return hmac.compare_digest(signature, self._sign(owner, media_id, expires))

    async def signed_file(self, media_id: str, owner: str) -> tuple[Path, MediaRecord] | None:
        """The bytes and the record a signed URL names (`signed` said yes), or None when
        the medium is gone."""
        folder = self.root / owner
        try:
            raw = await asyncio.to_thread((folder / f"{media_id}.json").read_bytes)
        except FileNotFoundError:
            return None
        return folder / f"{media_id}.bin", MediaRecord.from_json(json.loads(raw))

    async def delete(self, org_id: str, media_id: str) -> None:
        data, meta = self._paths(org_id, media_id)
        for path in (meta, data):
            with contextlib.suppress(FileNotFoundError):
                await asyncio.to_thread(path.unlink)

    def _sign(self, owner: str, media_id: str, expires: int) -> str:
        message = f"{owner}/{media_id}/{expires}".encode()
        return hmac.new(self._key, message, hashlib.sha256).hexdigest()


def _write_atomically(path: Path, content: bytes) -> None:
    part = path.with_suffix(path.suffix + ".part")
    fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, content)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(part, path)
