"""The stand-in's durable schedule alone: how fast it stores sends (issue 13).

    python -m bench.sim_schedule --inflight 64 --sends 1000

Each send is `WebhookSchedule.accept` of three 600-byte webhooks (a WhatsApp send's
sent, delivered, read), `--inflight` at once, in a fresh file; it prints sends stored per
second, the process's CPU per send (every thread: aiosqlite's included) and p50/p99.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from tests.scale.harness import percentile
from whatslike.simulator.schedule import Planned, WebhookSchedule

WEBHOOKS = 3
BODY = b"x" * 600


async def run(inflight: int, sends: int) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-sim-") as tmp:
        schedule = WebhookSchedule(Path(tmp) / "simulator.db", capacity=sends * WEBHOOKS)
        await schedule.open()
        gate = asyncio.Semaphore(inflight)
        took: list[float] = []

        async def one(n: int) -> None:
            async with gate:
                began, now = time.perf_counter(), time.time()
                planned = [Planned(now + i, "whatsapp", BODY) for i in range(WEBHOOKS)]
                assert await schedule.accept(f"whatsapp:m{n}", planned) is not None
                took.append(time.perf_counter() - began)

        cpu, began = time.process_time(), time.perf_counter()
        await asyncio.gather(*(one(n) for n in range(sends)))
        wall, cpu = time.perf_counter() - began, time.process_time() - cpu
        await schedule.close()
    took.sort()
    p50, p99 = percentile(took, 0.5) * 1000, percentile(took, 0.99) * 1000
    print(
        f"{inflight} at once: {sends / wall:.0f} sends/s, CPU {cpu / sends * 1000:.2f} ms per "
        f"send, p50 {p50:.1f} ms, p99 {p99:.1f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inflight", type=int, default=64)
    parser.add_argument("--sends", type=int, default=1000)
    args = parser.parse_args()
    asyncio.run(run(args.inflight, args.sends))


if __name__ == "__main__":
    main()
