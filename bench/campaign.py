"""A campaign through the embedded default (`whatslike serve`, the simulator as Meta): how
long it takes to finish, and how long an agent's message sent in the middle of it waits.

    python -m bench.campaign --contacts 1000 --rate 80
    python -m bench.campaign --contacts 10000 --rate 1000

`--rate` is WHATSAPP_SENDS_PER_S (the simulator takes any rate). Prints the time from the
202 until every message was created and none is PENDING (`finished`), the campaign's
sends per second, and the agent's message: how long from its 202 to SENT, and how many
campaign messages went out meanwhile (CAMPAIGN_QUEUE_S bounds that to about 1.25 s of the
rate; `--queue-s` changes it, e.g. 1000 to see the agent starved without the bound).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx


def start(data_dir: Path, rate: float, queue_s: float) -> tuple[subprocess.Popen[str], str]:
    env = {
        "WHATSLIKE_WHATSAPP_SENDS_PER_S": str(rate),
        "WHATSLIKE_CAMPAIGN_QUEUE_S": str(queue_s),
        "WHATSLIKE_SIM_DELAY_MS": "20",
        "WHATSLIKE_ORG_REQUESTS_PER_S": "100000",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "whatslike", "serve", "--port", "0", "--data-dir", str(data_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **env},
    )
    assert process.stdout is not None
    for line in process.stdout:
        found = re.search(r"listening on (http://\S+)", line)
        if found:
            # Keep reading its log, so that the server never blocks on a full pipe.
            threading.Thread(target=process.stdout.read, daemon=True).start()
            return process, found.group(1)
    raise SystemExit("whatslike serve did not start")


def token(data_dir: Path) -> str:
    command = [sys.executable, "-m", "whatslike", "token", "--org", "bench", "--user", "b"]
    done = subprocess.run(
        [*command, "--data-dir", str(data_dir)], capture_output=True, text=True, check=True
    )
    return done.stdout.strip()


def done_count(campaign: dict[str, Any]) -> int:
    counts = campaign["counts"]
    return int(counts["sent"] + counts["delivered"] + counts["read"] + counts["failed"])


async def run(url: str, bearer: str, contacts: int) -> None:
    headers = {"Authorization": f"Bearer {bearer}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=60) as client:
        conversation = (
            await client.post(
                "/api/conversations", json={"channel": "whatsapp", "contact": "5511999999999"}
            )
        ).json()["id"]
        started = time.monotonic()
        answer = await client.post(
            "/api/campaigns",
            json={
                "client_campaign_id": "bench",
                "channel": "whatsapp",
                "message": {"type": "text", "text": "Promo"},
                "contacts": [f"55119{n:08}" for n in range(contacts)],
            },
        )
        accepted = time.monotonic()
        assert answer.status_code == 202, answer.text
        campaign_id = answer.json()["id"]
        agent: dict[str, float] = {}
        while True:
            campaign = (await client.get(f"/api/campaigns/{campaign_id}")).json()
            if "posted" not in agent and done_count(campaign) >= contacts // 2:
                agent["before"] = done_count(campaign)
                agent["posted"] = time.monotonic()
                await client.post(
                    f"/api/conversations/{conversation}/messages", json={"text": "oi"}
                )
            elif "posted" in agent and "sent" not in agent:
                listed = await client.get(f"/api/conversations/{conversation}/messages")
                if listed.json()["messages"][0]["status"] != "PENDING":
                    agent["sent"] = time.monotonic()
                    agent["ahead"] = done_count(campaign) - agent["before"]
            if campaign["finished"] and "sent" in agent:
                break
            await asyncio.sleep(0.02)
        finished = time.monotonic()
    took = finished - started
    print(f"contacts {contacts}: 202 after {accepted - started:.2f} s, finished after {took:.1f} s")
    print(f"  campaign sends/s: {contacts / took:.0f}; counts {campaign['counts']}")
    print(
        f"  agent's message mid-campaign: SENT after {agent['sent'] - agent['posted']:.2f} s,"
        f" {agent['ahead']:.0f} campaign messages out meanwhile"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contacts", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=80)
    parser.add_argument("--queue-s", type=float, default=1.25)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        data_dir = Path(directory)
        process, url = start(data_dir, args.rate, args.queue_s)
        try:
            asyncio.run(run(url, token(data_dir), args.contacts))
        finally:
            process.terminate()
            process.wait(timeout=30)


if __name__ == "__main__":
    main()
