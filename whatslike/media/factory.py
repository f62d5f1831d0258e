"""The media store the settings choose."""

from __future__ import annotations

import hashlib

from whatslike.media.local import LocalMediaStore
from whatslike.media.s3 import S3MediaStore
from whatslike.media.store import MediaStore
from whatslike.settings import Settings


def open_media_store(settings: Settings, signing_secret: str) -> MediaStore:
    """The media store the settings choose (not opened yet)."""
    if settings.media_store == "s3":
        return S3MediaStore(
            endpoint=settings.media_s3_endpoint,
            public_endpoint=settings.media_s3_public_endpoint,
            bucket=settings.media_s3_bucket,
            region=settings.media_s3_region,
            access_key=settings.media_s3_access_key,
            secret_key=settings.media_s3_secret_key,
        )
    return LocalMediaStore(
        settings.data_dir / "media",
        settings.base_url,
        hashlib.sha256(signing_secret.encode()).digest(),
    )
