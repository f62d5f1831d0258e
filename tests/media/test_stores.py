"""Both media stores, against what they run on: a directory, and the real S3 server of
scripts/services.sh (S3Proxy): a round trip through a handed-out URL, refusals that leave
nothing stored, and another organization that finds nothing."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from whatslike.clock import new_id
from whatslike.media.limits import MB, MediaRefused, media_type
from whatslike.media.local import LocalMediaStore
from whatslike.media.s3 import PART_BYTES, S3MediaStore
from whatslike.media.store import MediaStore

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 200
PDF_HEAD = b"%PDF-1.7\n"


async def chunks(data: bytes, size: int = 65_536) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


@pytest.fixture(params=["local", "s3"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[MediaStore]:
    opened: MediaStore
    if request.param == "local":
        opened = LocalMediaStore(tmp_path / "media", "http://127.0.0.1:1", b"k" * 32)
    else:
        opened = S3MediaStore(
            endpoint=os.environ["WHATSLIKE_TEST_S3_URL"],
            bucket=os.environ["WHATSLIKE_TEST_S3_BUCKET"],
            region="us-east-1",
            access_key=os.environ["WHATSLIKE_TEST_S3_ACCESS_KEY"],
            secret_key=os.environ["WHATSLIKE_TEST_S3_SECRET_KEY"],
        )
    await opened.open()
    yield opened
    await opened.close()


def org() -> str:
    return f"org-{uuid.uuid4().hex[:8]}"


async def test_round_trip_and_isolation(store: MediaStore) -> None:
    owner, media_id = org(), new_id("med")
    saved = await store.save(media_id, owner, media_type("image/png"), "a.png", chunks(PNG))
    assert (saved.size, saved.kind, saved.filename) == (len(PNG), "image", "a.png")
    found = await store.record(owner, media_id)
    assert found == saved
    assert await store.record(org(), media_id) is None  # another organization
    if isinstance(store, S3MediaStore):
        async with httpx.AsyncClient() as client:
            answer = await client.get(await store.url(saved, 60))
        assert answer.status_code == 200
        assert answer.content == PNG
        assert answer.headers["content-type"] == "image/png"
    await store.delete(owner, media_id)
    assert await store.record(owner, media_id) is None


async def test_multipart_upload(store: MediaStore) -> None:
    """Beyond one part (S3: a multipart upload, its checksum written last)."""
    owner, media_id = org(), new_id("med")
    data = PDF_HEAD + os.urandom(PART_BYTES + 1000)
    saved = await store.save(media_id, owner, media_type("application/pdf"), "r.pdf", chunks(data))
    assert await store.record(owner, media_id) == saved
    assert saved.size == len(data)
    if isinstance(store, S3MediaStore):
        async with httpx.AsyncClient() as client:
            answer = await client.get(await store.url(saved, 60))
        assert answer.content == data
    await store.delete(owner, media_id)


@pytest.mark.parametrize(
    ("content_type", "data", "status"),
    [
        ("image/png", PNG + b"\x00" * (5 * MB), 413),
        ("application/pdf", PDF_HEAD + b"\x00" * (PART_BYTES * 2), 0),
        ("image/jpeg", PNG, 422),
        ("image/png", b"", 422),
    ],
)
async def test_refusals_leave_nothing(
    store: MediaStore, content_type: str, data: bytes, status: int
) -> None:
    owner, media_id = org(), new_id("med")
    kind = media_type(content_type)
    if status == 0:
        # Cut short by the client (here: an error after two parts were uploaded).
        async def broken() -> AsyncIterator[bytes]:
            async for chunk in chunks(data):
                yield chunk
            raise ConnectionResetError("client left")

        with pytest.raises(ConnectionResetError):
            await store.save(media_id, owner, kind, "", broken())
    else:
        with pytest.raises(MediaRefused) as refused:
            await store.save(media_id, owner, kind, "", chunks(data))
        assert refused.value.status == status
    assert await store.record(owner, media_id) is None
    if isinstance(store, LocalMediaStore):
        assert not any(store.root.rglob(f"{media_id}*"))
    else:
        assert isinstance(store, S3MediaStore)
        listed = await store._client.list_objects_v2(
            Bucket=os.environ["WHATSLIKE_TEST_S3_BUCKET"], Prefix=store._key(owner, media_id)
        )
        assert listed.get("KeyCount", 0) == 0
        uploads = await store._client.list_multipart_uploads(
            Bucket=os.environ["WHATSLIKE_TEST_S3_BUCKET"], Prefix=store._key(owner, media_id)
        )
        assert not uploads.get("Uploads")


async def test_local_signed_urls(tmp_path: Path) -> None:
    now = [1_000_000.0]
    store = LocalMediaStore(tmp_path, "http://h", b"k" * 32, clock=lambda: now[0])
    owner, media_id = org(), new_id("med")
    saved = await store.save(media_id, owner, media_type("image/png"), "", chunks(PNG))
    url = httpx.URL(await store.url(saved, 60))
    q = url.params
    assert url.path == f"/media/{media_id}"
    assert store.signed(media_id, q["o"], int(q["exp"]), q["sig"])
    found = await store.signed_file(media_id, q["o"])
    assert found is not None and found[0].read_bytes() == PNG and found[1] == saved
    assert not store.signed(media_id, q["o"], int(q["exp"]) + 1, q["sig"])
    assert not store.signed(new_id("med"), q["o"], int(q["exp"]), q["sig"])
    await store.delete(owner, media_id)
    assert await store.signed_file(media_id, q["o"]) is None
    now[0] += 61
    assert not store.signed(media_id, q["o"], int(q["exp"]), q["sig"])
