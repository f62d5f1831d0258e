"""`open_fanout` picks the fan-out adapter from the configured URL (WHATSLIKE_FANOUT_URL)."""

from __future__ import annotations

from whatslike.fanout import Fanout
from whatslike.fanout.memory import MemoryFanout
from whatslike.fanout.redis import RedisFanout
from whatslike.settings import Settings


def open_fanout(settings: Settings) -> Fanout:
    """`memory://` (one process) or `redis://host:port/db` (any number of hubs)."""
    url = settings.fanout_url
    if url.startswith(("redis://", "rediss://")):
        return RedisFanout(url)
    return MemoryFanout()
