"""Acknowledged work survives a stop: what the API answered 202 for is finished by the
next process, whatever the first one had in hand."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

from tests.e2e.conftest import OWN_SECRETS, api, free_port, start_server, stop_server


async def test_a_stop_while_the_provider_is_out_loses_nothing(tmp_path: Path) -> None:
    port = free_port()
    simulator = start_server(
        tmp_path / "simulator",
        {
            "WHATSLIKE_ROLES": "simulator",
            "WHATSLIKE_SIM_DELAY_MS": "20",
            "WHATSLIKE_SIM_WEBHOOK_URL": f"http://127.0.0.1:{port}",
            **OWN_SECRETS,
        },
    )
    roles = {"WHATSLIKE_ROLES": "api,router,connector,status-worker", **OWN_SECRETS}
    nowhere = f"http://127.0.0.1:{free_port()}/simulator"  # the provider is out
    try:
        pipeline = start_server(
            tmp_path / "pipeline", {**roles, "WHATSLIKE_GRAPH_URL": nowhere}, port=port
        )
        token = pipeline.token("acme")
        async with api(pipeline, token) as client:
            conversation = (
                await client.post(
                    "/api/conversations", json={"channel": "whatsapp", "contact": "+5511"}
                )
            ).json()
            url = f"/api/conversations/{conversation['id']}/messages"
            accepted = []
            for n in range(20):
                answer = await client.post(url, json={"text": f"m{n}"})
                assert answer.status_code == 202
                accepted.append(answer.json()["message_id"])
        await asyncio.sleep(0.5)  # sends are being retried against the missing provider
        stop_server(pipeline)
        # uvicorn re-raises the SIGTERM it handled once it has shut down; -9 would mean
        # the stop hung and was killed.
        assert pipeline.process.returncode in (0, -signal.SIGTERM)
        assert "lost" not in "".join(pipeline.output)

        # The next process, with the provider back, finishes every accepted message.
        pipeline = start_server(
            tmp_path / "pipeline",
            {**roles, "WHATSLIKE_GRAPH_URL": f"{simulator.url}/simulator"},
            port=port,
        )
        try:
            async with api(pipeline, token) as client:
                for _ in range(300):
                    listed = (await client.get(url)).json()["messages"]
                    if all(m["status"] == "READ" for m in listed):
                        break
                    await asyncio.sleep(0.1)
                assert [m["id"] for m in listed] == accepted
                assert {m["status"] for m in listed} == {"READ"}
                changes = await client.get(f"/api/conversations/{conversation['id']}/changes")
                frames = changes.json()["frames"]
                # No gap, and every message's READ among them; a SENT or DELIVERED whose
                # webhook the READ's overtook is not applied after it (1 to 3 a message).
                assert [frame["seq"] for frame in frames] == list(range(1, len(frames) + 1))
                assert sorted(f["message_id"] for f in frames if f["status"] == "READ") == sorted(
                    accepted
                )
        finally:
            stop_server(pipeline)
    finally:
        stop_server(simulator)
