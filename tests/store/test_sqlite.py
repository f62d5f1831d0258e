"""The SQLite store's own group commit: writes made at the same time share one
transaction, and one that fails is undone alone."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any, cast

from tests.store.test_contract import at, new_message, status_event
from whatslike.events import TOPIC_MESSAGES
from whatslike.status.rules import Status
from whatslike.store.common import status_entry
from whatslike.store.sqlite import SQLiteStore


async def test_writes_at_the_same_time_commit_together_and_fail_alone(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "w.db")
    await store.open()
    try:
        message = await new_message(store)
        event = status_event(message, Status.SENT, at(1))
        commits: list[str] = []
        # The statements on the database thread, to count the commits.
        assert store._db is not None
        await store._db.set_trace_callback(
            lambda sql: commits.append(sql) if sql == "COMMIT" else None
        )
        wrong = cast(Any, [("whatsapp",)])  # one value short: this write alone fails
        outcomes = await asyncio.gather(
            store.handoff([status_entry(event)]),
            store.handoff(parked=wrong),
            store.handoff(done=[(TOPIC_MESSAGES, message.id)]),
            return_exceptions=True,
        )
        assert outcomes[0] == [] and outcomes[2] == []  # (no claim: no ids)
        assert isinstance(outcomes[1], sqlite3.ProgrammingError)
        assert commits == ["COMMIT"]
        [item] = await store.outbox_batch("run", 10)
        assert item.key == message.conversation_id
    finally:
        await store.close()
