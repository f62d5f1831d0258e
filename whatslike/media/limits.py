"""Meta's limits on media (WhatsApp Cloud API, "Supported media types"), pure.

What a message may carry: a MIME type Meta takes, of at most its kind's size. The sizes
are in decimal megabytes (5 MB = 5,000,000 bytes), the stricter reading of Meta's "5 MB",
so nothing accepted here is refused there. Stickers (image/webp) are not offered: their
limit depends on whether they are animated, which the upload does not say.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

MediaKind = Literal["image", "document", "audio", "video"]

MB = 1_000_000

#: MIME type → (kind, the largest size Meta takes, in bytes).
SUPPORTED: dict[str, tuple[MediaKind, int]] = {
    "image/jpeg": ("image", 5 * MB),
    "image/png": ("image", 5 * MB),
    "audio/aac": ("audio", 16 * MB),
    "audio/amr": ("audio", 16 * MB),
    "audio/mpeg": ("audio", 16 * MB),
    "audio/mp4": ("audio", 16 * MB),
    "audio/ogg": ("audio", 16 * MB),  # Meta: Opus codecs only
    "video/mp4": ("video", 16 * MB),
    "video/3gpp": ("video", 16 * MB),
    "text/plain": ("document", 100 * MB),
    "application/pdf": ("document", 100 * MB),
    "application/msword": ("document", 100 * MB),
    "application/vnd.openxmlformats-officedocument.wordprocessingml.document": (
        "document",
        100 * MB,
    ),
    "application/vnd.ms-excel": ("document", 100 * MB),
    "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet": ("document", 100 * MB),
    "application/vnd.ms-powerpoint": ("document", 100 * MB),
    "application/vnd.openxmlformats-officedocument.presentationml.presentation": (
        "document",
        100 * MB,
    ),
}

#: What Instagram's Send API takes by URL (Meta, Instagram Messaging: "Send a Message",
#: "Upload Media"), among the types above: MIME type → (its attachment type, the largest
#: size it takes). Stricter than WhatsApp for documents (a PDF only, 25 MB) and audio.
INSTAGRAM_ATTACHMENTS: dict[str, tuple[str, int]] = {
    "image/jpeg": ("image", 8 * MB),
    "image/png": ("image", 8 * MB),
    "video/mp4": ("video", 25 * MB),
    "audio/aac": ("audio", 25 * MB),
    "audio/mp4": ("audio", 25 * MB),
    "application/pdf": ("file", 25 * MB),
}

#: The first bytes of the types whose content is checked against the declared type (a
#: browser's or a client's Content-Type is a claim; Meta checks the bytes).
_SIGNATURES: dict[str, tuple[bytes, ...]] = {
    "image/jpeg": (b"\xff\xd8\xff",),
    "image/png": (b"\x89PNG\r\n\x1a\n",),
    "application/pdf": (b"%PDF-",),
}
#: Bytes needed to check a signature.
SIGNATURE_BYTES = 8


class MediaRefused(Exception):
    """An upload Meta would refuse: `status` is the HTTP answer (413 too large, 415 a type
    Meta does not take, 422 content that is not what its type says)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class MediaType:
    content_type: str
    kind: MediaKind
    max_bytes: int


def media_type(declared: str | None) -> MediaType:
    """The media type of a Content-Type header (parameters such as `; codecs=opus` are
    dropped), or MediaRefused(415)."""
    content_type = (declared or "").split(";", 1)[0].strip().lower()
    found = SUPPORTED.get(content_type)
    if found is None:
        raise MediaRefused(
            415,
            "unsupported_media_type",
            f"media type {content_type or '(none)'!r} is not one Meta takes; supported: "
            + ", ".join(sorted(SUPPORTED)),
        )
    return MediaType(content_type, *found)


def check_size(kind: MediaType, size: int) -> None:
    """MediaRefused(413) once `size` bytes are over the kind's limit."""
    if size > kind.max_bytes:
        raise MediaRefused(
            413,
            "media_too_large",
            f"{kind.kind} media of type {kind.content_type} is at most {kind.max_bytes} bytes "
            "(Meta's limit)",
        )


def check_content(kind: MediaType, head: bytes) -> None:
    """MediaRefused(422) when the first bytes of the content are not of its declared
    type (for the types with a signature), or when it is empty."""
    if not head:
        raise MediaRefused(422, "empty_media", "the media is empty")
    signatures = _SIGNATURES.get(kind.content_type)
    if signatures is not None and not head.startswith(signatures):
        raise MediaRefused(
            422,
            "media_content_mismatch",
            f"the content is not {kind.content_type} (its first bytes say otherwise)",
        )


def instagram_attachment(content_type: str, size: int) -> str:
    """The Instagram attachment type a medium is sent as, or MediaRefused(422) when
    Instagram does not take its type or size."""
    found = INSTAGRAM_ATTACHMENTS.get(content_type)
    if found is None:
        raise MediaRefused(
            422,
            "media_unsupported",
            f"Instagram does not take {content_type} media; it takes "
            + ", ".join(sorted(INSTAGRAM_ATTACHMENTS)),
        )
    attachment, max_bytes = found
    if size > max_bytes:
        raise MediaRefused(
            422,
            "media_unsupported",
            f"Instagram takes {content_type} media of at most {max_bytes} bytes",
        )
    return attachment
