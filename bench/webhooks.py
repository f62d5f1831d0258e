"""Outbound webhooks: how fast status changes reach an organization's endpoint, and what
an endpoint costs the send path (embedded `serve`, SQLite).

    python -m bench.webhooks --messages 2000 --conversations 200 --runs 3

Each run starts a fresh embedded `serve` (simulator `SIM_DELAY_MS=0`) and a receiver on a
loopback port (aiohttp, answering 204). With an endpoint, it POSTs `--messages` messages
(64 requests at once) over `--conversations` conversations and times the first POST to
the last change received by webhook (3 per message: SENT, DELIVERED, READ), checking
each conversation's seqs arrived in order; without one, the first POST to the last
message READ (polled over HTTP), for the cost of the deliveries written in the status
transaction.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

import aiohttp
from aiohttp import web

from tests.e2e.conftest import Server, start_server, stop_server

ENV = {
    "WHATSLIKE_WEBHOOK_ALLOW_PRIVATE": "true",
    "WHATSLIKE_SIM_DELAY_MS": "0",
    # Meta's upgraded tier, as bench/send.py: not paced at the default 80/s.
    "WHATSLIKE_WHATSAPP_SENDS_PER_S": "1000",
}
AT_ONCE = 64


class Receiver:
    def __init__(self) -> None:
        self.seqs: dict[str, list[int]] = {}
        self.count = 0
        self.last_at = 0.0

    async def handle(self, request: web.Request) -> web.Response:
        frame = json.loads(await request.read())["data"]
        self.seqs.setdefault(frame["conversation_id"], []).append(frame["seq"])
        self.count += 1
        self.last_at = time.perf_counter()
        return web.Response(status=204)


async def post_messages(
    session: aiohttp.ClientSession, url: str, conversations: list[str], messages: int
) -> None:
    slots = asyncio.Semaphore(AT_ONCE)

    async def one(n: int) -> None:
        async with slots:
            conversation = conversations[n % len(conversations)]
            path = f"{url}/api/conversations/{conversation}/messages"
            async with session.post(path, json={"text": f"m{n}"}) as answer:
                assert answer.status == 202, await answer.text()

    await asyncio.gather(*(one(n) for n in range(messages)))


async def all_read(session: aiohttp.ClientSession, url: str, conversations: list[str]) -> bool:
    for conversation in conversations:
        async with session.get(f"{url}/api/conversations/{conversation}/messages") as answer:
            listed = await answer.json()
        if any(m["status"] != "READ" for m in listed["messages"]):
            return False
    return True


async def one_run(server: Server, args: argparse.Namespace, *, endpoint: bool) -> float:
    receiver = Receiver()
    app = web.Application()
    app.router.add_post("/hook", receiver.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    org = f"bench-{time.monotonic_ns()}"
    headers = {"Authorization": f"Bearer {server.token(org)}"}
    try:
        async with aiohttp.ClientSession(headers=headers) as session:
            if endpoint:
                async with session.post(
                    f"{server.url}/api/webhooks", json={"url": f"http://127.0.0.1:{port}/hook"}
                ) as made:
                    assert made.status == 201, await made.text()
            conversations = []
            for n in range(args.conversations):
                async with session.post(
                    f"{server.url}/api/conversations",
                    json={"channel": "whatsapp", "contact": f"+{n}"},
                ) as made:
                    conversations.append((await made.json())["id"])
            start = time.perf_counter()
            await post_messages(session, server.url, conversations, args.messages)
            expected = 3 * args.messages
            deadline = time.monotonic() + 600
            if endpoint:
                while receiver.count < expected:
                    assert time.monotonic() < deadline, receiver.count
                    await asyncio.sleep(0.05)
                for seqs in receiver.seqs.values():
                    assert seqs == list(range(1, len(seqs) + 1)), seqs[:10]
                return receiver.last_at - start
            while not await all_read(session, server.url, conversations):
                assert time.monotonic() < deadline
                await asyncio.sleep(0.2)
            return time.perf_counter() - start
    finally:
        await runner.cleanup()


async def main(args: argparse.Namespace) -> None:
    for run in range(args.runs):
        for endpoint in (False, True):
            with tempfile.TemporaryDirectory() as workdir:
                server = start_server(Path(workdir), ENV)
                try:
                    took = await one_run(server, args, endpoint=endpoint)
                finally:
                    stop_server(server)
            what = "with an endpoint: last webhook" if endpoint else "no endpoint: last READ"
            print(
                f"run {run + 1}, {what}: {took:.2f} s, {args.messages / took:.0f} messages/s,"
                f" {3 * args.messages / took:.0f} changes/s",
                flush=True,
            )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--conversations", type=int, default=200)
    parser.add_argument("--runs", type=int, default=3)
    asyncio.run(main(parser.parse_args()))
