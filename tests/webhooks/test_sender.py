"""The sender's resolver: aiohttp connects only to the addresses it answers, so a name
that resolves to a private or loopback address is never called (unless allowed)."""

from __future__ import annotations

import pytest

from whatslike.webhooks.sender import _CheckedResolver


async def test_a_name_of_a_loopback_address_is_refused_at_connection() -> None:
    resolver = _CheckedResolver(allow_private=False)
    try:
        with pytest.raises(OSError, match=r"refused: address 127\.0\.0\.1 is not public"):
            await resolver.resolve("localhost", 443)
    finally:
        await resolver.close()


async def test_it_is_answered_when_private_targets_are_allowed() -> None:
    resolver = _CheckedResolver(allow_private=True)
    try:
        found = await resolver.resolve("localhost", 443)
    finally:
        await resolver.close()
    assert {r["host"] for r in found} == {"127.0.0.1"}
