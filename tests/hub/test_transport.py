"""The frames the hub writes straight to sockets are the frames websockets would write."""

from __future__ import annotations

import pytest
from websockets.frames import Frame, Opcode

from whatslike.hub.transport import text_frame


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65_535, 65_536, 70_000])
def test_text_frame_is_an_unmasked_final_text_frame(size: int) -> None:
    payload = bytes(ord("a") + i % 26 for i in range(size))
    assert text_frame(payload) == Frame(Opcode.TEXT, payload).serialize(mask=False)
