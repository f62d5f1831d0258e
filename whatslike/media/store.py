"""The media store port, the record of a stored medium, and the checks every upload goes
through while it streams (pure: no I/O here).

A medium is stored bytes first and its record last, and the record is what makes it
exist: an upload refused or cut short leaves no record (and its bytes are removed), so
nothing is ever half-stored. A medium is keyed by its organization and its id; a read
names both, so another organization's id is not found, like one that does not exist.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from whatslike.clock import format_time, parse_time
from whatslike.media.limits import (
    SIGNATURE_BYTES,
    MediaKind,
    MediaType,
    check_content,
    check_size,
)

#: A media id as handed out (`new_id("med")`), and as accepted back.
MEDIA_ID = re.compile(r"^med_[0-9a-f]{32}$")
#: The filename kept with a document (what WhatsApp shows): no path, no control character.
FILENAME = re.compile(r"^[^/\\\x00-\x1f\x7f]{1,240}$")


@dataclass(frozen=True, slots=True)
class MediaRecord:
    id: str
    org_id: str
    content_type: str
    kind: MediaKind
    size: int
    sha256: str
    filename: str
    created_at: datetime

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "org_id": self.org_id,
            "content_type": self.content_type,
            "kind": self.kind,
            "size": self.size,
            "sha256": self.sha256,
            "filename": self.filename,
            "created_at": format_time(self.created_at),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> MediaRecord:
        return cls(
            id=str(data["id"]),
            org_id=str(data["org_id"]),
            content_type=str(data["content_type"]),
            kind=data["kind"],
            size=int(data["size"]),
            sha256=str(data["sha256"]),
            filename=str(data["filename"]),
            created_at=parse_time(str(data["created_at"])),
        )


def org_key(org_id: str) -> str:
    """The organization's part of a storage key or path: a digest, so any org id (its
    characters chosen by whoever mints tokens) makes a safe key."""
    return hashlib.sha256(org_id.encode()).hexdigest()[:32]


class UploadCheck:
    """Counts, hashes and checks an upload chunk by chunk: its first bytes against its
    declared type (422), its size against its kind's limit (413) the moment it is
    passed, so a refused upload is never read to its end."""

    def __init__(self, kind: MediaType) -> None:
        self.kind = kind
        self.size = 0
        self._head = b""
        self._checked = False
        self._hash = hashlib.sha256()

    def feed(self, chunk: bytes) -> None:
        self.size += len(chunk)
        check_size(self.kind, self.size)
        if not self._checked:
            self._head += chunk[: SIGNATURE_BYTES - len(self._head)]
            if len(self._head) >= SIGNATURE_BYTES:
                check_content(self.kind, self._head)
                self._checked = True
        self._hash.update(chunk)

    def finish(self) -> str:
        """The content's sha256 (hex), once it all arrived; checks a content shorter than
        a signature too."""
        if not self._checked:
            check_content(self.kind, self._head)
            self._checked = True
        return self._hash.hexdigest()


class MediaStore(Protocol):
    async def open(self) -> None:
        """Reach the store (raises WhatslikeError with a one-line reason). Idempotent."""

    async def close(self) -> None: ...

    async def save(
        self,
        media_id: str,
        org_id: str,
        kind: MediaType,
        filename: str,
        chunks: AsyncIterator[bytes],
    ) -> MediaRecord:
        """Store the chunks, checked as they arrive (`UploadCheck`; MediaRefused), then the
        record. On any failure nothing stays stored."""

    async def record(self, org_id: str, media_id: str) -> MediaRecord | None:
        """The record of this organization's medium, or None."""

    async def url(self, record: MediaRecord, ttl_s: int) -> str:
        """A URL that serves the medium's bytes for `ttl_s` seconds, to anyone holding it
        (a browser, Meta), without any other credential."""

    async def delete(self, org_id: str, media_id: str) -> None:
        """Remove a medium (its record first, then its bytes); nothing when absent."""
