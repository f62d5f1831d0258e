"""A consumer started right after the group's only member was killed (kill -9) waits out
the dead member's session and starts; it used to fail within the publish timeout."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import time

from tests.bus.test_kafka import kafka_settings, kafka_url, prefix
from whatslike.bus.kafka import SESSION_TIMEOUT_MS, KafkaBus, join_timeout_s
from whatslike.events import TOPIC_STATUS
from whatslike.metrics import Metrics

__all__ = ["kafka_url", "prefix"]

#: A member in a process of its own: joins the group, says so, then waits to be killed.
MEMBER = textwrap.dedent(
    """
    import asyncio, sys
    from tests.bus.test_kafka import kafka_settings
    from whatslike.bus.kafka import KafkaBus
    from whatslike.metrics import Metrics

    async def main() -> None:
        bus = KafkaBus(kafka_settings(sys.argv[1], sys.argv[2]), Metrics())
        async def handle(value: bytes) -> None:
            pass
        bus.subscribe(sys.argv[3], "g", handle)
        await bus.start()
        print("joined", flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())
    """
)


async def test_a_start_right_after_a_kill_9_waits_out_the_dead_member(
    kafka_url: str, prefix: str
) -> None:
    member = await asyncio.create_subprocess_exec(
        sys.executable, "-c", MEMBER, kafka_url, prefix, TOPIC_STATUS, stdout=subprocess.PIPE
    )
    try:
        assert member.stdout is not None
        line = await asyncio.wait_for(member.stdout.readline(), 60)
        assert line.strip() == b"joined"
    finally:
        member.kill()  # kill -9: no LeaveGroup, the broker waits for its session to end
        await asyncio.wait_for(member.wait(), 15)
    # A publish timeout well below what is left of the dead member's session.
    settings = kafka_settings(kafka_url, prefix, bus_publish_timeout_s=1.0)
    assert join_timeout_s(settings) > SESSION_TIMEOUT_MS / 1000
    bus = KafkaBus(settings, Metrics())

    async def handle(value: bytes) -> None:
        pass

    bus.subscribe(TOPIC_STATUS, "g", handle)
    began = time.monotonic()
    await bus.start()  # raised BackendUnavailable (TimeoutError) after 1 s before
    took = time.monotonic() - began
    try:
        assert len(bus.assignment("g")) == settings.kafka_partitions
    finally:
        await bus.stop()
    # It did have to wait for the broker to drop the dead member.
    assert took > 1.0, took
