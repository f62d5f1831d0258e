"""Media on an S3-compatible server (S3Proxy in `make test`, AWS S3, …), with aiobotocore:
botocore's request signing (SigV4), pre-signed URLs and multipart uploads, on aiohttp,
which Whatslike already uses for its outbound HTTP. Its objects stay inside this module.

An object is `media/<org digest>/<media id>`; its record is the object's own metadata
(`x-amz-meta-*`) with its Content-Type and length, so bytes and record appear together:
a single PUT up to `PART_BYTES`, beyond it a multipart upload whose object appears only at
its completion, then gets its checksum (a server-side copy onto itself): until then it has
no `sha256` and is not found. A refused or failed upload is aborted (its parts dropped).
The bucket is never exposed: readers get pre-signed GET URLs that expire.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from typing import Any
from urllib.parse import quote, unquote

from aiobotocore.session import get_session
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from whatslike.clock import format_time, parse_time, utcnow
from whatslike.errors import BackendUnavailable, ConfigError
from whatslike.media.limits import SUPPORTED, MediaType
from whatslike.media.store import MEDIA_ID, MediaRecord, UploadCheck, org_key

#: The size of each part of a multipart upload (S3's minimum is 5 MiB but for the last):
#: what one upload holds in memory at most.
PART_BYTES = 8 * 1024 * 1024

_CONFIG = Config(
    signature_version="s3v4",
    s3={"addressing_style": "path"},
    # botocore's default checksums (CRC32 trailers) are an AWS extension other S3 servers
    # refuse; compute them only where S3 requires one.
    request_checksum_calculation="when_required",
    response_checksum_validation="when_required",
    retries={"max_attempts": 3, "mode": "standard"},
)


class S3MediaStore:
    def __init__(
        self,
        *,
        endpoint: str,
        bucket: str,
        region: str,
        access_key: str,
        secret_key: str,
        public_endpoint: str = "",
    ) -> None:
        if not bucket:
            raise ConfigError("invalid setting media_s3_bucket (WHATSLIKE_MEDIA_S3_BUCKET): empty")
        self._bucket = bucket
        self._options: dict[str, Any] = {
            "region_name": region,
            "aws_access_key_id": access_key or None,
            "aws_secret_access_key": secret_key or None,
            "config": _CONFIG,
        }
        self._endpoint = endpoint or None
        self._public_endpoint = public_endpoint or self._endpoint
        self._stack: AsyncExitStack | None = None
        self._client: Any = None
        self._signer: Any = None

    async def open(self) -> None:
        if self._stack is not None:
            return
        session = get_session()
        stack = AsyncExitStack()
        try:
            self._client = await stack.enter_async_context(
                session.create_client("s3", endpoint_url=self._endpoint, **self._options)
            )
            # Pre-signed URLs are signed for the host their reader reaches (no I/O).
            self._signer = (
                self._client
                if self._public_endpoint == self._endpoint
                else await stack.enter_async_context(
                    session.create_client("s3", endpoint_url=self._public_endpoint, **self._options)
                )
            )
            try:
                await self._client.head_bucket(Bucket=self._bucket)
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket"):
                    raise
                # Created at start, like a store's schema.
                await self._client.create_bucket(Bucket=self._bucket)
        except (BotoCoreError, ClientError) as exc:
            await stack.aclose()
            raise BackendUnavailable(f"S3 bucket {self._bucket!r} is out of reach: {exc}") from exc
        self._stack = stack

    async def close(self) -> None:
        if self._stack is not None:
            stack, self._stack = self._stack, None
            await stack.aclose()

    def _key(self, org_id: str, media_id: str) -> str:
        return f"media/{org_key(org_id)}/{media_id}"

    async def save(
        self,
        media_id: str,
        org_id: str,
        kind: MediaType,
        filename: str,
        chunks: AsyncIterator[bytes],
    ) -> MediaRecord:
        key = self._key(org_id, media_id)
        created = utcnow()
        metadata = {"kind": kind.kind, "filename": quote(filename), "created": format_time(created)}
        check = UploadCheck(kind)
        buffer = bytearray()
        upload_id: str | None = None
        parts: list[dict[str, Any]] = []
        try:
            async for chunk in chunks:
                check.feed(chunk)
                buffer += chunk
                while len(buffer) >= PART_BYTES:
                    if upload_id is None:
                        started = await self._client.create_multipart_upload(
                            Bucket=self._bucket,
                            Key=key,
                            ContentType=kind.content_type,
                            Metadata=metadata,
                        )
                        upload_id = started["UploadId"]
                    parts.append(await self._part(key, upload_id, len(parts) + 1, buffer))
                    del buffer[:PART_BYTES]
            sha256 = check.finish()
            if upload_id is None:
                await self._client.put_object(
                    Bucket=self._bucket,
                    Key=key,
                    Body=bytes(buffer),
                    ContentType=kind.content_type,
                    Metadata={**metadata, "sha256": sha256},
                )
            else:
                if buffer:
                    parts.append(await self._part(key, upload_id, len(parts) + 1, buffer))
                await self._client.complete_multipart_upload(
                    Bucket=self._bucket,
                    Key=key,
                    UploadId=upload_id,
                    MultipartUpload={"Parts": parts},
                )
                upload_id = None
                # The record last: the checksum, known only now.
                await self._client.copy_object(
                    Bucket=self._bucket,
                    Key=key,
                    CopySource={"Bucket": self._bucket, "Key": key},
                    ContentType=kind.content_type,
                    Metadata={**metadata, "sha256": sha256},
                    MetadataDirective="REPLACE",
                )
        except BaseException as exc:
            with contextlib.suppress(BotoCoreError, ClientError):
                if upload_id is not None:
                    await self._client.abort_multipart_upload(
                        Bucket=self._bucket, Key=key, UploadId=upload_id
                    )
                else:
                    await self._client.delete_object(Bucket=self._bucket, Key=key)
            if isinstance(exc, (BotoCoreError, ClientError)):
                raise BackendUnavailable(f"S3 upload failed: {exc}") from exc
            raise
        return MediaRecord(
            media_id, org_id, kind.content_type, kind.kind, check.size, sha256, filename, created
        )

    async def _part(
        self, key: str, upload_id: str, number: int, buffer: bytearray
    ) -> dict[str, Any]:
        answer = await self._client.upload_part(
            Bucket=self._bucket,
            Key=key,
            UploadId=upload_id,
            PartNumber=number,
            Body=bytes(buffer[:PART_BYTES]),
        )
        return {"PartNumber": number, "ETag": answer["ETag"]}

    async def record(self, org_id: str, media_id: str) -> MediaRecord | None:
        if not MEDIA_ID.match(media_id):
            return None
        try:
            head = await self._client.head_object(
                Bucket=self._bucket, Key=self._key(org_id, media_id)
            )
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise BackendUnavailable(f"S3 read failed: {exc}") from exc
        except BotoCoreError as exc:
            raise BackendUnavailable(f"S3 read failed: {exc}") from exc
        metadata: dict[str, str] = head.get("Metadata", {})
        content_type = str(head.get("ContentType", "")).split(";", 1)[0]
        if "sha256" not in metadata or content_type not in SUPPORTED:
            return None  # a multipart upload whose record is not written yet
        return MediaRecord(
            media_id,
            org_id,
            content_type,
            SUPPORTED[content_type][0],
            int(head["ContentLength"]),
            metadata["sha256"],
            unquote(metadata.get("filename", "")),
            parse_time(metadata["created"]),
        )

    async def url(self, record: MediaRecord, ttl_s: int) -> str:
        url: str = await self._signer.generate_presigned_url(
            "get_object",
            Params={"Bucket": self._bucket, "Key": self._key(record.org_id, record.id)},
            ExpiresIn=ttl_s,
        )
        return url

    async def delete(self, org_id: str, media_id: str) -> None:
        try:
            await self._client.delete_object(Bucket=self._bucket, Key=self._key(org_id, media_id))
        except (BotoCoreError, ClientError) as exc:
            raise BackendUnavailable(f"S3 delete failed: {exc}") from exc
