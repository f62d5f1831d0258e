"""Meta's limits and the checks of an upload as it streams (pure)."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from whatslike.media.limits import MB, MediaRefused, media_type
from whatslike.media.store import UploadCheck


def test_types_and_kinds() -> None:
    assert (media_type("image/png").kind, media_type("image/png").max_bytes) == ("image", 5 * MB)
    assert media_type("Application/PDF").max_bytes == 100 * MB
    assert media_type("audio/ogg; codecs=opus").kind == "audio"
    assert media_type("video/mp4").max_bytes == 16 * MB
    for refused in ("image/gif", "image/webp", "", None, "text/html"):
        with pytest.raises(MediaRefused) as caught:
            media_type(refused)
        assert caught.value.status == 415


@given(st.lists(st.binary(max_size=50), max_size=20))
def test_any_chunking_gives_the_same_answer(parts: list[bytes]) -> None:
    data = b"\x89PNG\r\n\x1a\n" + b"".join(parts)
    check = UploadCheck(media_type("image/png"))
    for start in range(0, len(data), 3):
        check.feed(data[start : start + 3])
    assert check.finish() == hashlib.sha256(data).hexdigest()
    assert check.size == len(data)


def test_size_refused_at_the_first_byte_over() -> None:
    check = UploadCheck(media_type("image/jpeg"))
    check.feed(b"\xff\xd8\xff" + b"\x00" * (5 * MB - 3))
    with pytest.raises(MediaRefused) as caught:
        check.feed(b"\x00")
    assert caught.value.status == 413


def test_content_checked_against_the_type() -> None:
    with pytest.raises(MediaRefused) as caught:
        UploadCheck(media_type("application/pdf")).feed(b"<html><body>")
    assert caught.value.status == 422
    short = UploadCheck(media_type("image/png"))
    short.feed(b"\x89PN")
    with pytest.raises(MediaRefused):
        short.finish()
    text = UploadCheck(media_type("text/plain"))
    text.feed(b"hi")
    assert text.finish() == hashlib.sha256(b"hi").hexdigest()
