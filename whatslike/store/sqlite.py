"""The embedded store: the `Store` port on one SQLite file (WAL), for a single process.
Every call runs under one asyncio.Lock, and writes in `BEGIN IMMEDIATE` transactions."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal, TypeVar, cast

import aiosqlite

from whatslike import campaigns
from whatslike.clock import format_time, parse_time, utcnow
from whatslike.errors import BackendUnavailable
from whatslike.events import TOPIC_MESSAGES, TOPIC_STATUS, StatusEvent
from whatslike.grouping import Failed, Grouped
from whatslike.status import rules
from whatslike.status.rules import Effect, MessageState
from whatslike.store import common
from whatslike.store.base import (
    ApplyResult,
    Campaign,
    CampaignRecipient,
    Changes,
    Conversation,
    DeadLetter,
    InboundMedia,
    InboundMessage,
    Message,
    NewCampaign,
    OutboxEntry,
    OutboxItem,
    ParkedStatus,
    SendClaim,
    Stuck,
    SubscriptionRead,
    WebhookDelivery,
    WebhookEndpoint,
)
from whatslike.store.common import MESSAGE_COLUMNS
from whatslike.webhooks.core import event_body, event_type

#: Migration n (1-based) brings the schema from version n-1 to n.
_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE organizations (
            id TEXT PRIMARY KEY,
            created_at TEXT NOT NULL
        )""",
        """CREATE TABLE conversations (
            id TEXT PRIMARY KEY,
            org_id TEXT NOT NULL REFERENCES organizations (id),
            channel TEXT NOT NULL,
            contact TEXT NOT NULL,
            last_seq INTEGER NOT NULL DEFAULT 0,
            created_at TEXT NOT NULL
        )""",
        "CREATE INDEX conversations_org ON conversations (org_id)",
        """CREATE TABLE messages (
            id TEXT PRIMARY KEY,
            conversation_id TEXT NOT NULL REFERENCES conversations (id),
            org_id TEXT NOT NULL,
            channel TEXT NOT NULL,
            text TEXT NOT NULL,
            client_message_id TEXT NOT NULL DEFAULT '',
            created_at TEXT NOT NULL,
            status TEXT NOT NULL,
            seq INTEGER,
            sent_at TEXT,
            delivered_at TEXT,
            read_at TEXT,
            failed_at TEXT,
            error_code TEXT,
            error_title TEXT,
            provider_message_id TEXT
        )""",
        """CREATE UNIQUE INDEX messages_client_message_id
            ON messages (conversation_id, client_message_id) WHERE client_message_id <> ''""",
        "CREATE INDEX messages_conversation ON messages (conversation_id, created_at, id)",
        """CREATE TABLE provider_ids (
            channel TEXT NOT NULL,
            provider_message_id TEXT NOT NULL,
            message_id TEXT NOT NULL REFERENCES messages (id),
            PRIMARY KEY (channel, provider_message_id)
        )""",
        """CREATE TABLE parked_statuses (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            channel TEXT NOT NULL,
            provider_message_id TEXT NOT NULL,
            payload BLOB NOT NULL,
            parked_at TEXT NOT NULL
        )""",
        "CREATE INDEX parked_statuses_key ON parked_statuses (channel, provider_message_id)",
        "CREATE INDEX parked_statuses_age ON parked_statuses (parked_at)",
        """CREATE TABLE changes (
            conversation_id TEXT NOT NULL REFERENCES conversations (id),
            seq INTEGER NOT NULL,
            message_id TEXT NOT NULL REFERENCES messages (id),
            event_id TEXT NOT NULL,
            frame TEXT NOT NULL,
            PRIMARY KEY (conversation_id, seq)
        )""",
        "CREATE INDEX changes_event_id ON changes (event_id)",
        """CREATE TABLE dead_letters (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            topic TEXT NOT NULL,
            payload BLOB NOT NULL,
            reason TEXT NOT NULL,
            at TEXT NOT NULL
        )""",
    ),
    (
        "ALTER TABLE messages ADD COLUMN send_started_at TEXT",
        "ALTER TABLE messages ADD COLUMN updated_at TEXT",
        "UPDATE messages SET updated_at = created_at",
        "CREATE INDEX messages_stuck ON messages (status, updated_at)",
        """CREATE TABLE outbox (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            topic TEXT NOT NULL,
            key TEXT NOT NULL,
            payload BLOB NOT NULL,
            done_key TEXT NOT NULL,
            created_at TEXT NOT NULL,
            relayed_run TEXT,
            claimed_until TEXT
        )""",
        "CREATE INDEX outbox_done ON outbox (done_key, topic)",
    ),
    ("CREATE INDEX changes_message ON changes (message_id, seq)",),
    ("CREATE INDEX conversations_contact ON conversations (channel, contact)",),
    # Customers' messages: "in"; every message before them was an agent's.
    ("ALTER TABLE messages ADD COLUMN direction TEXT NOT NULL DEFAULT 'out'",),
    (
        """CREATE TABLE webhook_endpoints (
            id TEXT PRIMARY KEY,
            org_id TEXT NOT NULL,
            url TEXT NOT NULL,
            secret TEXT NOT NULL,
            previous_secret TEXT,
            previous_until TEXT,
            created_at TEXT NOT NULL,
            lease_owner TEXT,
            lease_until TEXT
        )""",
        "CREATE INDEX webhook_endpoints_org ON webhook_endpoints (org_id, created_at)",
        """CREATE TABLE webhook_deliveries (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            endpoint_id TEXT NOT NULL REFERENCES webhook_endpoints (id) ON DELETE CASCADE,
            conversation_id TEXT NOT NULL,
            seq INTEGER NOT NULL,
            event_type TEXT NOT NULL,
            body BLOB NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0,
            created_at TEXT NOT NULL,
            next_at TEXT NOT NULL,
            parked_at TEXT,
            last_error TEXT NOT NULL DEFAULT ''
        )""",
        """CREATE INDEX webhook_deliveries_head
            ON webhook_deliveries (endpoint_id, conversation_id, seq) WHERE parked_at IS NULL""",
        """CREATE INDEX webhook_deliveries_due
            ON webhook_deliveries (endpoint_id, next_at) WHERE parked_at IS NULL""",
        """CREATE INDEX webhook_deliveries_parked
            ON webhook_deliveries (endpoint_id, id) WHERE parked_at IS NOT NULL""",
    ),
    (
        """CREATE TABLE campaigns (
            id TEXT PRIMARY KEY,
            org_id TEXT NOT NULL REFERENCES organizations (id),
            client_campaign_id TEXT NOT NULL,
            fingerprint TEXT NOT NULL,
            channel TEXT NOT NULL,
            text TEXT NOT NULL,
            total INTEGER NOT NULL,
            created INTEGER NOT NULL DEFAULT 0,
            created_at TEXT NOT NULL,
            UNIQUE (org_id, client_campaign_id)
        )""",
        "CREATE INDEX campaigns_to_run ON campaigns (created_at) WHERE created < total",
        """CREATE TABLE campaign_recipients (
            campaign_id TEXT NOT NULL REFERENCES campaigns (id),
            position INTEGER NOT NULL,
            contact TEXT NOT NULL,
            message_id TEXT REFERENCES messages (id),
            PRIMARY KEY (campaign_id, position)
        )""",
        """CREATE UNIQUE INDEX campaign_recipients_message ON campaign_recipients (message_id)
            WHERE message_id IS NOT NULL""",
        """CREATE TABLE campaign_counts (
            campaign_id TEXT NOT NULL REFERENCES campaigns (id),
            bucket TEXT NOT NULL,
            n INTEGER NOT NULL,
            PRIMARY KEY (campaign_id, bucket)
        )""",
    ),
    # The medium a message carries (whatslike/media).
    ("ALTER TABLE messages ADD COLUMN media_id TEXT",),
    # Templates (whatslike/templates) of a message and of a campaign; Instagram's tag.
    (
        "ALTER TABLE messages ADD COLUMN template TEXT",
        "ALTER TABLE messages ADD COLUMN message_tag TEXT",
        "ALTER TABLE campaigns ADD COLUMN template TEXT",
    ),
    # inbound-media: a customer's medium as Meta described it, and its fetch's state.
    ("ALTER TABLE messages ADD COLUMN inbound_media TEXT",),
)

_Rows = list[sqlite3.Row]
_Work = Callable[[sqlite3.Connection], Any]
#: Write calls that share one transaction at most (each may itself be a batch).
_WRITES_PER_COMMIT = 64
SQLiteSynchronous = Literal["normal", "full"]
#: Ids bound in one `IN (...)`, well under SQLite's limit of bound variables.
_IDS_PER_QUERY = 500
T = TypeVar("T")


def _stored(at: datetime | None) -> str | None:
    return None if at is None else format_time(at)


def _conversation(row: sqlite3.Row) -> Conversation:
    return common.conversation_of(row, parse_time)


def _message(row: sqlite3.Row) -> Message:
    return common.message_of(row, parse_time)


class SQLiteStore:
    """The `Store` port on a SQLite file; the parent directory is created at `open()`."""

    def __init__(self, path: Path, *, synchronous: SQLiteSynchronous = "full") -> None:
        self.path = path
        self._synchronous = synchronous
        self._db: aiosqlite.Connection | None = None
        # One connection is shared; the lock also keeps reads from seeing another
        # coroutine's uncommitted transaction on that same connection.
        self._lock = asyncio.Lock()
        self._writes: Grouped[_Work, object] = Grouped(
            self._write_many, "sqlite-writes", _WRITES_PER_COMMIT
        )

    async def open(self) -> None:
        if self._db is None:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                db = await aiosqlite.connect(self.path, isolation_level=None)
            except (OSError, sqlite3.Error) as exc:
                raise BackendUnavailable(f"cannot open SQLite database {self.path}: {exc}") from exc
            db.row_factory = sqlite3.Row
            try:
                await db.execute("PRAGMA journal_mode = WAL")
                # NORMAL (under WAL): a commit is in the log before it returns, so it
                # survives the process dying; the log reaches the disk at checkpoints, so
                # a power loss may drop the last commits (README, "Durability"). FULL
                # syncs each commit (~5 ms here), which caps the commits per second.
                level = "FULL" if self._synchronous == "full" else "NORMAL"
                await db.execute(f"PRAGMA synchronous = {level}")
                await db.execute("PRAGMA foreign_keys = ON")
                # Another process on the same file (e.g. the CLI) waits instead of failing.
                await db.execute("PRAGMA busy_timeout = 5000")
            except sqlite3.Error as exc:
                await db.close()
                raise BackendUnavailable(f"cannot open SQLite database {self.path}: {exc}") from exc
            self._db = db
            self._writes.start()
        await self._migrate()

    async def close(self) -> None:
        if self._db is not None:
            await self._writes.stop()
            db, self._db = self._db, None
            async with self._lock:
                await db.close()

    async def ping(self) -> None:
        try:
            await self._read("SELECT 1")
        except (sqlite3.Error, ValueError) as exc:
            raise BackendUnavailable(f"SQLite database {self.path} does not answer: {exc}") from exc

    async def _migrate(self) -> None:
        async with self._transaction() as db:
            await db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            rows = await _fetch(db, "SELECT max(version) AS version FROM schema_version")
            version: int = rows[0]["version"] or 0
            pending = common.pending_migrations(version, _MIGRATIONS, f"of {self.path}")
            for number, statements in pending:
                for statement in statements:
                    await db.execute(statement)
                await db.execute("INSERT INTO schema_version (version) VALUES (?)", (number,))

    def _connection(self) -> aiosqlite.Connection:
        if self._db is None:
            raise BackendUnavailable(f"SQLite database {self.path} is not open")
        return self._db

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        async with self._lock, self._unavailable_on_error():
            db = self._connection()
            # IMMEDIATE takes the write lock up front, so a read-then-write never fails
            # halfway with SQLITE_BUSY against another process.
            await db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                if db.in_transaction:
                    await db.execute("ROLLBACK")
                raise
            await db.execute("COMMIT")

    @asynccontextmanager
    async def _reading(self) -> AsyncIterator[aiosqlite.Connection]:
        async with self._lock, self._unavailable_on_error():
            yield self._connection()

    @asynccontextmanager
    async def _unavailable_on_error(self) -> AsyncIterator[None]:
        """A database that cannot be written or read (locked past the busy timeout, disk
        full or failing) is an outage the caller may retry, not a bug."""
        try:
            yield
        except sqlite3.OperationalError as exc:
            raise BackendUnavailable(f"SQLite database {self.path}: {exc}") from exc

    async def _read(self, sql: str, parameters: Iterable[Any] = ()) -> _Rows:
        async with self._reading() as db:
            return await _fetch(db, sql, parameters)

    async def _in_thread(self, work: Callable[[sqlite3.Connection], T], *, write: bool) -> T:
        """Run `work` on the database thread in one hop (aiosqlite's own queue of calls,
        run in order on its thread): a transaction of many statements costs one
        thread round trip instead of one per statement. A write joins the writes
        waiting meanwhile in one `BEGIN IMMEDIATE` transaction (`_write_many`)."""
        if write:
            async with self._unavailable_on_error():
                outcome = await self._writes(work)
            if isinstance(outcome, Failed):
                async with self._unavailable_on_error():
                    raise outcome.error
            return cast(T, outcome)
        async with self._lock, self._unavailable_on_error():
            db = self._connection()
            result: T = await db._execute(work, db._conn)  # type: ignore[no-untyped-call]
            return result

    async def _write_many(self, works: list[_Work]) -> list[object]:
        """Group commit across callers: the writes that queued while the last one ran
        (a webhooks' hand-off, a batch of statuses, ...) share one transaction and one
        commit (one sync of the log with `synchronous=full`); each runs under a
        savepoint, so one that raises is undone alone and its caller gets its error.
        Every caller is answered after the commit."""
        async with self._lock:
            db = self._connection()
            outcomes: list[object] = await db._execute(  # type: ignore[no-untyped-call]
                _in_one_transaction(works), db._conn
            )
            return outcomes

    async def create_conversation(self, org_id: str, channel: str, contact: str) -> Conversation:
        conversation = common.new_conversation(org_id, channel, contact)
        async with self._transaction() as db:
            await _ensure_organization(db, org_id)
            await db.execute(
                "INSERT INTO conversations (id, org_id, channel, contact, last_seq, created_at)"
                " VALUES (?, ?, ?, ?, 0, ?)",
                (conversation.id, org_id, channel, contact, format_time(conversation.created_at)),
            )
        return conversation

    async def get_conversation(self, org_id: str, conversation_id: str) -> Conversation | None:
        rows = await self._read(
            "SELECT * FROM conversations WHERE id = ? AND org_id = ?", (conversation_id, org_id)
        )
        return _conversation(rows[0]) if rows else None

    async def create_message(
        self,
        conversation: Conversation,
        text: str,
        client_message_id: str,
        media_id: str | None = None,
        *,
        template: str | None = None,
        tag: str | None = None,
    ) -> tuple[Message, bool]:
        message = common.new_message(
            conversation, text, client_message_id, media_id, template=template, tag=tag
        )

        def work(conn: sqlite3.Connection) -> tuple[Message, bool]:
            inserted = conn.execute(
                "INSERT INTO messages (id, conversation_id, org_id, channel, text,"
                " client_message_id, created_at, status, updated_at, media_id, template,"
                " message_tag) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (conversation_id, client_message_id) WHERE client_message_id <> ''"
                " DO NOTHING RETURNING id",
                (
                    message.id,
                    message.conversation_id,
                    message.org_id,
                    message.channel,
                    text,
                    client_message_id,
                    format_time(message.created_at),
                    message.status.value,
                    format_time(message.created_at),
                    media_id,
                    template,
                    tag,
                ),
            ).fetchall()
            if inserted:
                _add_outbox(conn, [common.outbound_entry(conversation, message)], None)
                return message, True
            rows = conn.execute(
                f"SELECT {MESSAGE_COLUMNS} FROM messages m"
                " WHERE m.conversation_id = ? AND m.client_message_id = ?",
                (conversation.id, client_message_id),
            ).fetchall()
            return _message(rows[0]), False

        # One hop to the database thread, in the writes' group commit.
        return await self._in_thread(work, write=True)

    async def receive_message(self, inbound: InboundMessage) -> Message:
        def work(conn: sqlite3.Connection) -> Message:
            fresh = common.inbound_message(common.inbound_conversation(inbound), inbound)
            found = conn.execute(
                f"SELECT {MESSAGE_COLUMNS} FROM messages m WHERE m.id = ?", (fresh.id,)
            ).fetchall()
            if found:
                return _message(found[0])
            conversation = _latest_conversation(conn, inbound)
            message = replace(fresh, conversation_id=conversation.id, org_id=conversation.org_id)
            conn.execute(
                "INSERT INTO messages (id, conversation_id, org_id, channel, text,"
                " client_message_id, created_at, status, updated_at, provider_message_id,"
                " direction, inbound_media) VALUES (?, ?, ?, ?, ?, '', ?, ?, ?, ?, ?, ?)",
                (
                    message.id,
                    message.conversation_id,
                    message.org_id,
                    message.channel,
                    message.text,
                    format_time(message.created_at),
                    message.status.value,
                    format_time(message.created_at),
                    message.provider_message_id,
                    message.direction,
                    common.stored_inbound_media(message.inbound_media),
                ),
            )
            return message

        return await self._in_thread(work, write=True)

    async def set_inbound_media(
        self, message_id: str, media: InboundMedia, media_id: str | None
    ) -> None:
        def work(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE messages SET inbound_media = ?, media_id = ? WHERE id = ?"
                " AND direction = 'in'",
                (media.to_json(), media_id, message_id),
            )

        await self._in_thread(work, write=True)

    async def last_inbound_at(self, conversation_id: str) -> datetime | None:
        rows = await self._read(
            "SELECT max(created_at) AS at FROM messages"
            " WHERE conversation_id = ? AND direction = 'in'",
            (conversation_id,),
        )
        return parse_time(rows[0]["at"]) if rows and rows[0]["at"] is not None else None

    async def get_message(self, message_id: str) -> Message | None:
        rows = await self._read(
            f"SELECT {MESSAGE_COLUMNS} FROM messages m WHERE m.id = ?", (message_id,)
        )
        return _message(rows[0]) if rows else None

    async def get_messages(self, message_ids: Sequence[str]) -> list[Message]:
        ids = list(dict.fromkeys(message_ids))

        def work(conn: sqlite3.Connection) -> list[sqlite3.Row]:
            rows: list[sqlite3.Row] = []
            for start in range(0, len(ids), _IDS_PER_QUERY):
                chunk = ids[start : start + _IDS_PER_QUERY]
                marks = ",".join("?" * len(chunk))
                rows += conn.execute(
                    f"SELECT {MESSAGE_COLUMNS} FROM messages m WHERE m.id IN ({marks})", chunk
                ).fetchall()
            return rows

        return [_message(row) for row in await self._in_thread(work, write=False)] if ids else []

    async def list_messages(self, org_id: str, conversation_id: str) -> list[Message] | None:
        async with self._reading() as db:
            owned = await _fetch(
                db,
                "SELECT 1 FROM conversations WHERE id = ? AND org_id = ?",
                (conversation_id, org_id),
            )
            if not owned:
                return None
            rows = await _fetch(
                db,
                f"SELECT {MESSAGE_COLUMNS} FROM messages m WHERE m.conversation_id = ?"
                " ORDER BY m.created_at, m.id",
                (conversation_id,),
            )
        return [_message(row) for row in rows]

    async def unread_up_to(self, message_id: str) -> list[Message]:
        rows = await self._read(
            f"SELECT {MESSAGE_COLUMNS} FROM messages m JOIN messages t ON t.id = ?"
            " WHERE m.conversation_id = t.conversation_id AND m.created_at <= t.created_at"
            " AND m.status <> 'READ' AND m.provider_message_id IS NOT NULL"
            " AND m.direction = 'out'"
            " ORDER BY m.created_at, m.id",
            (message_id,),
        )
        return [_message(row) for row in rows]

    async def unread_sent_to(
        self, channel: str, contact: str, up_to: datetime, limit: int
    ) -> list[Message]:
        rows = await self._read(
            f"SELECT {MESSAGE_COLUMNS} FROM conversations c JOIN messages m"
            " ON m.conversation_id = c.id WHERE c.channel = ? AND c.contact = ?"
            " AND m.status <> 'READ' AND m.provider_message_id IS NOT NULL"
            " AND m.direction = 'out'"
            " AND m.sent_at <= ? ORDER BY m.created_at, m.id LIMIT ?",
            (channel, contact, format_time(up_to), limit),
        )
        return [_message(row) for row in rows]

    async def link_provider_id(
        self, channel: str, provider_message_id: str, message_id: str
    ) -> list[ParkedStatus]:
        key = (channel, provider_message_id)

        def work(conn: sqlite3.Connection) -> list[ParkedStatus]:
            # The first link of a provider id wins; a conflicting later one changes nothing.
            conn.execute(
                "INSERT INTO provider_ids (channel, provider_message_id, message_id)"
                " VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
                (*key, message_id),
            )
            conn.execute(
                "UPDATE messages SET provider_message_id = ?, updated_at = ? WHERE id ="
                " (SELECT message_id FROM provider_ids WHERE channel = ? AND"
                " provider_message_id = ?) AND provider_message_id IS NULL",
                (provider_message_id, format_time(utcnow()), *key),
            )
            return _parked(conn, channel, provider_message_id)

        return await self._in_thread(work, write=True)

    async def link_answer(
        self, channel: str, provider_message_id: str, message_id: str
    ) -> tuple[list[ParkedStatus], str | None]:
        def work(conn: sqlite3.Connection) -> tuple[list[ParkedStatus], str | None]:
            rows = conn.execute(
                "SELECT provider_message_id FROM messages WHERE id = ?", (message_id,)
            ).fetchall()
            before = rows[0]["provider_message_id"] if rows else None
            replaced = before if before not in (None, provider_message_id) else None
            if replaced is not None:
                conn.execute(
                    "DELETE FROM provider_ids WHERE channel = ? AND provider_message_id = ?"
                    " AND message_id = ?",
                    (channel, replaced, message_id),
                )
            conn.execute(
                "INSERT INTO provider_ids (channel, provider_message_id, message_id)"
                " VALUES (?, ?, ?) ON CONFLICT DO UPDATE SET message_id = excluded.message_id",
                (channel, provider_message_id, message_id),
            )
            if before != provider_message_id:
                conn.execute(
                    "UPDATE messages SET provider_message_id = ?, updated_at = ? WHERE id = ?",
                    (provider_message_id, format_time(utcnow()), message_id),
                )
            return _parked(conn, channel, provider_message_id), replaced

        # One hop to the database thread, in the writes' group commit.
        return await self._in_thread(work, write=True)

    async def expire_parked(self, before: datetime) -> int:
        async with self._transaction() as db:
            cursor = await db.execute(
                "DELETE FROM parked_statuses WHERE parked_at < ?", (format_time(before),)
            )
            return cursor.rowcount

    async def find_by_provider_id(self, channel: str, provider_message_id: str) -> Message | None:
        async with self._reading() as db:
            return await _by_provider_id(db, channel, provider_message_id)

    async def park_status(self, parked: ParkedStatus) -> Message | None:
        async with self._transaction() as db:
            linked = await _by_provider_id(db, parked.channel, parked.provider_message_id)
            if linked is not None:
                return linked
            await db.execute(
                "INSERT INTO parked_statuses (channel, provider_message_id, payload, parked_at)"
                " VALUES (?, ?, ?, ?)",
                (
                    parked.channel,
                    parked.provider_message_id,
                    parked.payload,
                    format_time(utcnow()),
                ),
            )
        return None

    async def apply_status(self, event: StatusEvent) -> ApplyResult:
        return (await self.apply_statuses([event]))[0]

    async def apply_statuses(self, events: Sequence[StatusEvent]) -> list[ApplyResult]:
        if not events:
            return []
        return await self._in_thread(lambda conn: [_apply(conn, e) for e in events], write=True)

    async def handoff(
        self,
        entries: Sequence[OutboxEntry] = (),
        *,
        done: Sequence[tuple[str, str]] = (),
        parked: Sequence[tuple[str, str]] = (),
        relayed_run: str | None = None,
        claim_s: float | None = None,
    ) -> list[int]:
        def work(conn: sqlite3.Connection) -> list[int]:
            if claim_s is None:
                _add_outbox(conn, entries, relayed_run)
                added: list[int] = []
            else:
                until = format_time(utcnow() + timedelta(seconds=claim_s))
                added = [
                    int(conn.execute(_CLAIMED_OUTBOX, (*row, until)).fetchall()[0]["id"])
                    for row in _outbox_rows(entries, relayed_run)
                ]
            conn.executemany(
                "DELETE FROM outbox WHERE done_key = ? AND topic = ?",
                [(done_key, topic) for topic, done_key in done],
            )
            conn.executemany(
                "DELETE FROM parked_statuses WHERE channel = ? AND provider_message_id = ?",
                parked,
            )
            return added

        return await self._in_thread(work, write=True)

    async def outbox_batch(self, run: str, limit: int) -> list[OutboxItem]:
        rows = await self._read(
            "SELECT id, topic, key, payload FROM outbox"
            " WHERE relayed_run IS NULL OR relayed_run <> ? ORDER BY id LIMIT ?",
            (run, limit),
        )
        return common.outbox_items(rows)

    async def claim_outbox(self, limit: int, lease_s: float) -> list[OutboxItem]:
        now = utcnow()
        async with self._transaction() as db:
            rows = await _fetch(
                db,
                "UPDATE outbox SET claimed_until = ? WHERE id IN (SELECT id FROM outbox"
                " WHERE claimed_until IS NULL OR claimed_until < ? ORDER BY id LIMIT ?)"
                " RETURNING id, topic, key, payload",
                (format_time(now + timedelta(seconds=lease_s)), format_time(now), limit),
            )
        return sorted(common.outbox_items(rows), key=lambda item: item.id)

    async def unclaim_outbox(self, ids: Sequence[int]) -> None:
        async with self._transaction() as db:
            await db.executemany(
                "UPDATE outbox SET claimed_until = NULL WHERE id = ?", [(i,) for i in ids]
            )

    async def mark_relayed(self, ids: Sequence[int], run: str) -> None:
        await self._in_thread(
            lambda conn: conn.executemany(
                "UPDATE outbox SET relayed_run = ? WHERE id = ?", [(run, i) for i in ids]
            ),
            write=True,
        )

    async def delete_outbox(self, ids: Sequence[int]) -> None:
        await self._in_thread(
            lambda conn: conn.executemany("DELETE FROM outbox WHERE id = ?", [(i,) for i in ids]),
            write=True,
        )

    async def outbox_size(self) -> int:
        rows = await self._read("SELECT count(*) AS n FROM outbox")
        return int(rows[0]["n"])

    async def begin_send(self, message_id: str) -> tuple[SendClaim, Message | None]:
        def work(conn: sqlite3.Connection) -> tuple[SendClaim, Message | None]:
            rows = conn.execute(
                f"SELECT {MESSAGE_COLUMNS} FROM messages m WHERE m.id = ?", (message_id,)
            ).fetchall()
            message = _message(rows[0]) if rows else None
            claim = common.send_claim(message)
            if message is not None and claim is SendClaim.GO:
                now = utcnow()
                conn.execute(
                    "UPDATE messages SET send_started_at = ?, updated_at = ? WHERE id = ?",
                    (format_time(now), format_time(now), message_id),
                )
                message = replace(message, send_started_at=now, updated_at=now)
            return claim, message

        return await self._in_thread(work, write=True)

    async def release_send(self, message_id: str) -> None:
        await self._in_thread(
            lambda conn: conn.execute(
                "UPDATE messages SET send_started_at = NULL, updated_at = ?"
                " WHERE id = ? AND provider_message_id IS NULL",
                (format_time(utcnow()), message_id),
            ),
            write=True,
        )

    async def stuck(
        self,
        pending_before: datetime,
        unknown_before: datetime,
        sent_before: datetime,
        limit: int,
    ) -> Stuck:
        select = f"SELECT {MESSAGE_COLUMNS} FROM messages m WHERE"
        async with self._reading() as db:
            pending = await _fetch(
                db,
                f"{select} m.status = 'PENDING' AND m.send_started_at IS NULL"
                " AND m.direction = 'out' AND m.updated_at < ? ORDER BY m.updated_at LIMIT ?",
                (format_time(pending_before), limit),
            )
            unknown = await _fetch(
                db,
                f"{select} m.status = 'PENDING' AND m.provider_message_id IS NULL"
                " AND m.send_started_at < ? ORDER BY m.send_started_at LIMIT ?",
                (format_time(unknown_before), limit),
            )
            sent = await _fetch(
                db,
                f"{select} m.status = 'SENT' AND m.updated_at < ? ORDER BY m.updated_at LIMIT ?",
                (format_time(sent_before), limit),
            )
        return Stuck(
            tuple(map(_message, pending)), tuple(map(_message, unknown)), tuple(map(_message, sent))
        )

    async def redrive(self, message_id: str) -> bool:
        async with self._transaction() as db:
            rows = await _fetch(
                db,
                f"SELECT {MESSAGE_COLUMNS}, c.contact FROM messages m"
                " JOIN conversations c ON c.id = m.conversation_id WHERE m.id = ?",
                (message_id,),
            )
            if not rows or not common.redrivable(_message(rows[0])):
                return False
            message = _message(rows[0])
            await db.execute(
                "DELETE FROM outbox WHERE done_key = ? AND topic = ?", (message_id, TOPIC_MESSAGES)
            )
            conversation = common.conversation_of_message(message, rows[0]["contact"])
            await _add_outbox_async(db, [common.outbound_entry(conversation, message)])
            await db.execute(
                "UPDATE messages SET updated_at = ? WHERE id = ?",
                (format_time(utcnow()), message_id),
            )
        return True

    async def changes_since(self, conversation_id: str, since: int, limit: int) -> Changes:
        async with self._reading() as db:
            rows = await _fetch(
                db, "SELECT last_seq FROM conversations WHERE id = ?", (conversation_id,)
            )
            # An unknown conversation answers as one without changes yet.
            last_seq = int(rows[0]["last_seq"]) if rows else 0
            answer = common.changes_window(last_seq, since, limit)
            if answer is not None:
                return answer
            frames = await _fetch(
                db,
                "SELECT frame FROM changes WHERE conversation_id = ? AND seq > ? ORDER BY seq",
                (conversation_id, since),
            )
        return common.changes(last_seq, since, common.frames_of(frames))

    async def subscription_changes(
        self, reads: Sequence[SubscriptionRead], limit: int
    ) -> list[Changes | None]:
        def one(db: sqlite3.Connection, read: SubscriptionRead) -> Changes | None:
            row = db.execute(
                "SELECT last_seq FROM conversations WHERE id = ? AND org_id = ?",
                (read.conversation_id, read.org_id),
            ).fetchone()
            if row is None:
                return None
            last_seq = int(row[0])
            since = last_seq if read.since is None else read.since
            answer = common.changes_window(last_seq, since, limit)
            if answer is not None:
                return answer
            frames = db.execute(
                "SELECT frame FROM changes WHERE conversation_id = ? AND seq > ? ORDER BY seq",
                (read.conversation_id, since),
            ).fetchall()
            return common.changes(last_seq, since, tuple(str(frame[0]) for frame in frames))

        # One hop to the database thread for them all.
        return await self._in_thread(lambda db: [one(db, read) for read in reads], write=False)

    async def message_history(self, message_id: str) -> tuple[str, ...]:
        rows = await self._read(
            "SELECT frame FROM changes WHERE message_id = ? ORDER BY seq", (message_id,)
        )
        return common.frames_of(rows)

    # -- campaigns -----------------------------------------------------------------

    async def create_campaign(self, new: NewCampaign) -> tuple[Campaign, bool]:
        campaign = common.new_campaign(new)

        def work(conn: sqlite3.Connection) -> tuple[Campaign, bool]:
            _ensure_organization_now(conn, new.org_id)
            inserted = conn.execute(
                "INSERT INTO campaigns (id, org_id, client_campaign_id, fingerprint, channel,"
                " text, total, created, created_at, template)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, 0, ?, ?)"
                " ON CONFLICT (org_id, client_campaign_id) DO NOTHING RETURNING id",
                (
                    campaign.id,
                    new.org_id,
                    new.client_campaign_id,
                    new.fingerprint,
                    new.channel,
                    new.text,
                    campaign.total,
                    format_time(campaign.created_at),
                    new.template,
                ),
            ).fetchall()
            if not inserted:
                rows = conn.execute(
                    "SELECT * FROM campaigns WHERE org_id = ? AND client_campaign_id = ?",
                    (new.org_id, new.client_campaign_id),
                ).fetchall()
                return _campaign(conn, rows[0]), False
            conn.executemany(
                "INSERT INTO campaign_recipients (campaign_id, position, contact) VALUES (?, ?, ?)",
                [(campaign.id, n, contact) for n, contact in enumerate(new.contacts)],
            )
            return campaign, True

        return await self._in_thread(work, write=True)

    async def get_campaign(self, org_id: str, campaign_id: str) -> Campaign | None:
        def work(conn: sqlite3.Connection) -> Campaign | None:
            rows = conn.execute(
                "SELECT * FROM campaigns WHERE id = ? AND org_id = ?", (campaign_id, org_id)
            ).fetchall()
            return _campaign(conn, rows[0]) if rows else None

        return await self._in_thread(work, write=False)

    async def campaign_recipients(
        self, org_id: str, campaign_id: str, after: int, limit: int
    ) -> list[CampaignRecipient] | None:
        def work(conn: sqlite3.Connection) -> list[CampaignRecipient] | None:
            if not conn.execute(
                "SELECT 1 FROM campaigns WHERE id = ? AND org_id = ?", (campaign_id, org_id)
            ).fetchall():
                return None
            rows = conn.execute(
                f"SELECT r.position, r.contact, {MESSAGE_COLUMNS} FROM campaign_recipients r"
                " LEFT JOIN messages m ON m.id = r.message_id"
                " WHERE r.campaign_id = ? AND r.position > ? ORDER BY r.position LIMIT ?",
                (campaign_id, after, limit),
            ).fetchall()
            return [
                CampaignRecipient(
                    row["position"], row["contact"], _message(row) if row["id"] else None
                )
                for row in rows
            ]

        return await self._in_thread(work, write=False)

    async def campaigns_to_run(self, limit: int) -> list[Campaign]:
        def work(conn: sqlite3.Connection) -> list[Campaign]:
            rows = conn.execute(
                "SELECT * FROM campaigns WHERE created < total ORDER BY created_at LIMIT ?",
                (limit,),
            ).fetchall()
            return [_campaign(conn, row) for row in rows]

        return await self._in_thread(work, write=False)

    async def campaign_backlog(self, channel: str) -> int:
        rows = await self._read(
            "SELECT coalesce(sum(k.n), 0) AS n FROM campaign_counts k"
            " JOIN campaigns c ON c.id = k.campaign_id WHERE c.channel = ? AND k.bucket = ?",
            (channel, rules.Status.PENDING.value),
        )
        return int(rows[0]["n"])

    async def campaign_step(self, campaign_id: str, limit: int) -> int:
        def work(conn: sqlite3.Connection) -> int:
            rows = conn.execute("SELECT * FROM campaigns WHERE id = ?", (campaign_id,)).fetchall()
            if not rows:
                return 0
            campaign = _campaign_row(rows[0])
            recipients = conn.execute(
                "SELECT position, contact FROM campaign_recipients"
                " WHERE campaign_id = ? AND position >= ? ORDER BY position LIMIT ?",
                (campaign_id, campaign.created, limit),
            ).fetchall()
            for recipient in recipients:
                conversation = _conversation_with(conn, campaign, recipient["contact"])
                message = common.new_message(
                    conversation, campaign.text, campaign_id, template=campaign.template
                )
                conn.execute(
                    "INSERT INTO messages (id, conversation_id, org_id, channel, text,"
                    " client_message_id, created_at, status, updated_at, template)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        message.id,
                        conversation.id,
                        message.org_id,
                        message.channel,
                        message.text,
                        campaign_id,
                        format_time(message.created_at),
                        message.status.value,
                        format_time(message.created_at),
                        message.template,
                    ),
                )
                _add_outbox(conn, [common.outbound_entry(conversation, message)], None)
                conn.execute(
                    "UPDATE campaign_recipients SET message_id = ?"
                    " WHERE campaign_id = ? AND position = ?",
                    (message.id, campaign_id, recipient["position"]),
                )
            if recipients:
                conn.execute(
                    "UPDATE campaigns SET created = created + ? WHERE id = ?",
                    (len(recipients), campaign_id),
                )
                conn.executemany(
                    "INSERT INTO campaign_counts (campaign_id, bucket, n) VALUES (?, ?, ?)"
                    " ON CONFLICT (campaign_id, bucket) DO UPDATE SET n = n + excluded.n",
                    [
                        (campaign_id, campaigns.CHANGES, 1),
                        (campaign_id, rules.Status.PENDING.value, len(recipients)),
                    ],
                )
            return len(recipients)

        return await self._in_thread(work, write=True)

    async def record_dead_letter(self, topic: str, payload: bytes, reason: str) -> None:
        async with self._transaction() as db:
            await db.execute(
                "INSERT INTO dead_letters (topic, payload, reason, at) VALUES (?, ?, ?, ?)",
                (topic, payload, reason, format_time(utcnow())),
            )

    async def dead_letter_count(self) -> int:
        rows = await self._read("SELECT count(*) AS n FROM dead_letters")
        return int(rows[0]["n"])

    async def dead_letters(self, limit: int) -> list[DeadLetter]:
        rows = await self._read(
            "SELECT id, topic, payload, reason, at FROM dead_letters ORDER BY id DESC LIMIT ?",
            (limit,),
        )
        return [_dead_letter_of(row) for row in rows]

    async def dead_letter(self, dead_letter_id: str) -> DeadLetter | None:
        if not dead_letter_id.isdigit() or len(dead_letter_id) > 18:
            return None
        rows = await self._read(
            "SELECT id, topic, payload, reason, at FROM dead_letters WHERE id = ?",
            (int(dead_letter_id),),
        )
        return _dead_letter_of(rows[0]) if rows else None

    # -- outbound webhooks (WebhookStore) ------------------------------------------------

    async def add_webhook_endpoint(
        self, endpoint: WebhookEndpoint, limit: int
    ) -> WebhookEndpoint | None:
        def work(conn: sqlite3.Connection) -> WebhookEndpoint | None:
            (count,) = conn.execute(
                "SELECT count(*) FROM webhook_endpoints WHERE org_id = ?", (endpoint.org_id,)
            ).fetchone()
            if count >= limit:
                return None
            conn.execute(
                "INSERT INTO webhook_endpoints (id, org_id, url, secret, created_at)"
                " VALUES (?, ?, ?, ?, ?)",
                (
                    endpoint.id,
                    endpoint.org_id,
                    endpoint.url,
                    endpoint.secret,
                    format_time(endpoint.created_at),
                ),
            )
            return endpoint

        return await self._in_thread(work, write=True)

    async def webhook_endpoints(self, org_id: str) -> list[WebhookEndpoint]:
        rows = await self._read(
            "SELECT * FROM webhook_endpoints WHERE org_id = ? ORDER BY created_at, id", (org_id,)
        )
        return [_endpoint(row) for row in rows]

    async def webhook_endpoint(self, org_id: str, endpoint_id: str) -> WebhookEndpoint | None:
        rows = await self._read(
            "SELECT * FROM webhook_endpoints WHERE org_id = ? AND id = ?", (org_id, endpoint_id)
        )
        return _endpoint(rows[0]) if rows else None

    async def delete_webhook_endpoint(self, org_id: str, endpoint_id: str) -> bool:
        # Its deliveries go with it (ON DELETE CASCADE).
        def work(conn: sqlite3.Connection) -> bool:
            gone = conn.execute(
                "DELETE FROM webhook_endpoints WHERE org_id = ? AND id = ?", (org_id, endpoint_id)
            )
            return gone.rowcount > 0

        return await self._in_thread(work, write=True)

    async def rotate_webhook_secret(
        self, org_id: str, endpoint_id: str, secret: str, previous_until: datetime
    ) -> WebhookEndpoint | None:
        def work(conn: sqlite3.Connection) -> WebhookEndpoint | None:
            rows = conn.execute(
                "UPDATE webhook_endpoints SET previous_secret = secret, previous_until = ?,"
                " secret = ? WHERE org_id = ? AND id = ? RETURNING *",
                (format_time(previous_until), secret, org_id, endpoint_id),
            ).fetchall()
            return _endpoint(rows[0]) if rows else None

        return await self._in_thread(work, write=True)

    async def claim_webhook_endpoints(
        self, owner: str, limit: int, lease_s: float, now: datetime
    ) -> list[WebhookEndpoint]:
        at = format_time(now)
        until = format_time(now + timedelta(seconds=lease_s))

        def work(conn: sqlite3.Connection) -> list[WebhookEndpoint]:
            rows = conn.execute(
                "UPDATE webhook_endpoints SET lease_owner = ?, lease_until = ? WHERE id IN"
                " (SELECT e.id FROM webhook_endpoints e WHERE (e.lease_until IS NULL"
                " OR e.lease_until < ? OR e.lease_owner = ?) AND EXISTS (SELECT 1 FROM"
                " webhook_deliveries d WHERE d.endpoint_id = e.id AND d.parked_at IS NULL"
                " AND d.next_at <= ? AND d.seq = (SELECT min(h.seq) FROM webhook_deliveries h"
                " WHERE h.endpoint_id = e.id AND h.conversation_id = d.conversation_id"
                " AND h.parked_at IS NULL)) LIMIT ?) RETURNING *",
                (owner, until, at, owner, at, limit),
            ).fetchall()
            return [_endpoint(row) for row in rows]

        return await self._in_thread(work, write=True)

    async def renew_webhook_lease(self, owner: str, endpoint_id: str, lease_s: float) -> bool:
        until = format_time(utcnow() + timedelta(seconds=lease_s))

        def work(conn: sqlite3.Connection) -> bool:
            renewed = conn.execute(
                "UPDATE webhook_endpoints SET lease_until = ? WHERE id = ? AND lease_owner = ?",
                (until, endpoint_id, owner),
            )
            return renewed.rowcount > 0

        return await self._in_thread(work, write=True)

    async def release_webhook_lease(self, owner: str, endpoint_id: str) -> None:
        await self._in_thread(
            lambda conn: conn.execute(
                "UPDATE webhook_endpoints SET lease_owner = NULL, lease_until = NULL"
                " WHERE id = ? AND lease_owner = ?",
                (endpoint_id, owner),
            ),
            write=True,
        )

    async def due_webhook_deliveries(
        self, endpoint_id: str, now: datetime, limit: int
    ) -> list[WebhookDelivery]:
        rows = await self._read(
            "SELECT * FROM webhook_deliveries d WHERE d.endpoint_id = ? AND d.parked_at IS NULL"
            " AND d.next_at <= ? AND d.seq = (SELECT min(h.seq) FROM webhook_deliveries h"
            " WHERE h.endpoint_id = d.endpoint_id AND h.conversation_id = d.conversation_id"
            " AND h.parked_at IS NULL) ORDER BY d.id LIMIT ?",
            (endpoint_id, format_time(now), limit),
        )
        return [_delivery(row) for row in rows]

    async def webhook_delivered(self, delivery_id: int) -> None:
        await self._in_thread(
            lambda conn: conn.execute(
                "DELETE FROM webhook_deliveries WHERE id = ?", (delivery_id,)
            ),
            write=True,
        )

    async def webhook_failed(
        self, delivery_id: int, next_at: datetime | None, error: str, now: datetime
    ) -> None:
        await self._in_thread(
            lambda conn: conn.execute(
                "UPDATE webhook_deliveries SET attempts = attempts + 1, last_error = ?,"
                " next_at = coalesce(?, next_at), parked_at = ? WHERE id = ?",
                (
                    error,
                    _stored(next_at),
                    format_time(now) if next_at is None else None,
                    delivery_id,
                ),
            ),
            write=True,
        )

    async def parked_webhook_deliveries(
        self, org_id: str, endpoint_id: str, limit: int
    ) -> list[WebhookDelivery] | None:
        if await self.webhook_endpoint(org_id, endpoint_id) is None:
            return None
        rows = await self._read(
            "SELECT * FROM webhook_deliveries WHERE endpoint_id = ? AND parked_at IS NOT NULL"
            " ORDER BY id LIMIT ?",
            (endpoint_id, limit),
        )
        return [_delivery(row) for row in rows]

    async def oldest_pending_webhook(self) -> datetime | None:
        rows = await self._read(
            "SELECT min(created_at) AS oldest FROM webhook_deliveries WHERE parked_at IS NULL"
        )
        oldest = rows[0]["oldest"]
        return parse_time(oldest) if oldest else None

    async def replay_parked_webhooks(
        self, org_id: str, endpoint_id: str, now: datetime
    ) -> int | None:
        def work(conn: sqlite3.Connection) -> int | None:
            found = conn.execute(
                "SELECT 1 FROM webhook_endpoints WHERE org_id = ? AND id = ?",
                (org_id, endpoint_id),
            ).fetchall()
            if not found:
                return None
            at = format_time(now)
            replayed = conn.execute(
                "UPDATE webhook_deliveries SET parked_at = NULL, attempts = 0, created_at = ?,"
                " next_at = ? WHERE endpoint_id = ? AND parked_at IS NOT NULL",
                (at, at, endpoint_id),
            )
            return replayed.rowcount

        return await self._in_thread(work, write=True)


def _latest_conversation(conn: sqlite3.Connection, inbound: InboundMessage) -> Conversation:
    """The organization's latest conversation with the contact on the channel, or a new
    one (inside the caller's transaction). Two made in the same millisecond are told
    apart by their rowid, the order they were inserted in (conversations are never
    deleted, so a rowid is never reused)."""
    rows = conn.execute(
        "SELECT * FROM conversations WHERE channel = ? AND contact = ? AND org_id = ?"
        " ORDER BY created_at DESC, rowid DESC LIMIT 1",
        (inbound.channel, inbound.contact, inbound.account_org_id),
    ).fetchall()
    if rows:
        return _conversation(rows[0])
    conversation = common.inbound_conversation(inbound)
    conn.execute(
        "INSERT INTO organizations (id, created_at) VALUES (?, ?) ON CONFLICT DO NOTHING",
        (conversation.org_id, format_time(conversation.created_at)),
    )
    conn.execute(
        "INSERT INTO conversations (id, org_id, channel, contact, last_seq, created_at)"
        " VALUES (?, ?, ?, ?, 0, ?)",
        (
            conversation.id,
            conversation.org_id,
            conversation.channel,
            conversation.contact,
            format_time(conversation.created_at),
        ),
    )
    return conversation


def _dead_letter_of(row: sqlite3.Row) -> DeadLetter:
    return DeadLetter(
        str(row["id"]), row["topic"], row["reason"], parse_time(row["at"]), bytes(row["payload"])
    )


async def _fetch(db: aiosqlite.Connection, sql: str, parameters: Iterable[Any] = ()) -> _Rows:
    return list(await db.execute_fetchall(sql, parameters))


def _outbox_rows(
    entries: Iterable[OutboxEntry], relayed_run: str | None = None
) -> list[tuple[str, str, bytes, str, str, str | None]]:
    now = format_time(utcnow())
    return [(e.topic, e.key, e.payload, e.done_key, now, relayed_run) for e in entries]


_INSERT_OUTBOX = (
    "INSERT INTO outbox (topic, key, payload, done_key, created_at, relayed_run)"
    " VALUES (?, ?, ?, ?, ?, ?)"
)

_CLAIMED_OUTBOX = (
    "INSERT INTO outbox (topic, key, payload, done_key, created_at, relayed_run, claimed_until)"
    " VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING id"
)


def _add_outbox(
    conn: sqlite3.Connection, entries: Iterable[OutboxEntry], relayed_run: str | None
) -> None:
    conn.executemany(_INSERT_OUTBOX, _outbox_rows(entries, relayed_run))


async def _add_outbox_async(db: aiosqlite.Connection, entries: Iterable[OutboxEntry]) -> None:
    await db.executemany(_INSERT_OUTBOX, _outbox_rows(entries))


def _in_one_transaction(works: list[_Work]) -> Callable[[sqlite3.Connection], list[object]]:
    """`works` in one `BEGIN IMMEDIATE` transaction, each under a savepoint: answers each
    one's result, or `Failed` for one that raised (its changes rolled back). If the
    transaction itself fails (begin, commit), it is rolled back and that error raised."""

    def run(conn: sqlite3.Connection) -> list[object]:
        conn.execute("BEGIN IMMEDIATE")
        try:
            outcomes: list[object] = []
            for work in works:
                conn.execute("SAVEPOINT work")
                try:
                    outcomes.append(work(conn))
                except Exception as exc:
                    conn.execute("ROLLBACK TO work")
                    outcomes.append(Failed(exc))
                conn.execute("RELEASE work")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return outcomes

    return run


def _apply(conn: sqlite3.Connection, event: StatusEvent) -> ApplyResult:
    """`apply_status` of one event, inside the caller's transaction."""
    rows = conn.execute(
        f"SELECT {MESSAGE_COLUMNS} FROM messages m WHERE m.id = ?", (event.message_id,)
    ).fetchall()
    if not rows:
        return common.UNKNOWN_MESSAGE
    message = _message(rows[0])
    conn.execute(
        "DELETE FROM outbox WHERE done_key = ? AND topic = ?", (event.event_id, TOPIC_STATUS)
    )
    earlier = conn.execute(
        "SELECT frame FROM changes WHERE event_id = ? AND message_id = ? ORDER BY seq",
        (event.event_id, message.id),
    ).fetchall()
    if earlier:
        return common.replayed(message, common.frames_of(earlier))
    transition = rules.apply(message.state, common.observation_of(event))
    if transition.effect is Effect.NOOP:
        return ApplyResult(effect=Effect.NOOP, message=message)
    state, seq = transition.state, message.seq
    frames: tuple[str, ...] = ()
    if transition.effect is Effect.CHANGED:
        bumped = conn.execute(
            "UPDATE conversations SET last_seq = last_seq + 1 WHERE id = ? RETURNING last_seq",
            (message.conversation_id,),
        ).fetchall()
        seq = int(bumped[0]["last_seq"])
        frame = common.change_frame(message, state, seq, event.occurred_at)
        frames = (frame,)
        conn.execute(
            "INSERT INTO changes (conversation_id, seq, message_id, event_id, frame)"
            " VALUES (?, ?, ?, ?, ?)",
            (message.conversation_id, seq, message.id, event.event_id, frame),
        )
        _queue_webhooks(conn, message, seq, frame)
    now = utcnow()
    conn.execute(
        "UPDATE messages SET status = ?, seq = ?, sent_at = ?, delivered_at = ?,"
        " read_at = ?, failed_at = ?, error_code = ?, error_title = ?, updated_at = ?"
        " WHERE id = ?",
        (
            state.status.value,
            seq,
            _stored(state.sent_at),
            _stored(state.delivered_at),
            _stored(state.read_at),
            _stored(state.failed_at),
            state.error.code if state.error else None,
            state.error.title if state.error else None,
            format_time(now),
            message.id,
        ),
    )
    _move_campaign_count(conn, message.id, message.state, state)
    return common.applied(message, transition, seq, frames, now)


def _move_campaign_count(
    conn: sqlite3.Connection, message_id: str, before: MessageState, after: MessageState
) -> None:
    """A campaign message's status change moves it between its campaign's counts, in the
    status change's transaction (nothing for a message of no campaign), and counts the
    move (the counts' version)."""
    old, new = campaigns.bucket_of(before), campaigns.bucket_of(after)
    if old != new:
        conn.execute(
            "INSERT INTO campaign_counts (campaign_id, bucket, n)"
            " SELECT r.campaign_id, d.bucket, d.delta FROM campaign_recipients r"
            " JOIN (SELECT ? AS bucket, -1 AS delta UNION ALL SELECT ?, 1"
            " UNION ALL SELECT ?, 1) d"
            " WHERE r.message_id = ?"
            " ON CONFLICT (campaign_id, bucket) DO UPDATE SET n = n + excluded.n",
            (old, new, campaigns.CHANGES, message_id),
        )


def _ensure_organization_now(conn: sqlite3.Connection, org_id: str) -> None:
    conn.execute(
        "INSERT INTO organizations (id, created_at) VALUES (?, ?) ON CONFLICT DO NOTHING",
        (org_id, format_time(utcnow())),
    )


def _campaign_row(row: sqlite3.Row) -> Campaign:
    return common.campaign_of(row, parse_time, {})


def _campaign(conn: sqlite3.Connection, row: sqlite3.Row) -> Campaign:
    counts = conn.execute(
        "SELECT bucket, n FROM campaign_counts WHERE campaign_id = ?", (row["id"],)
    ).fetchall()
    return common.campaign_of(row, parse_time, {c["bucket"]: int(c["n"]) for c in counts})


def _conversation_with(conn: sqlite3.Connection, campaign: Campaign, contact: str) -> Conversation:
    """The organization's oldest conversation with the contact on the campaign's channel
    (of two made in the same millisecond, the first inserted), or a new one."""
    rows = conn.execute(
        "SELECT * FROM conversations WHERE channel = ? AND contact = ? AND org_id = ?"
        " ORDER BY created_at, rowid LIMIT 1",
        (campaign.channel, contact, campaign.org_id),
    ).fetchall()
    if rows:
        return _conversation(rows[0])
    conversation = common.new_conversation(campaign.org_id, campaign.channel, contact)
    conn.execute(
        "INSERT INTO conversations (id, org_id, channel, contact, last_seq, created_at)"
        " VALUES (?, ?, ?, ?, 0, ?)",
        (
            conversation.id,
            campaign.org_id,
            campaign.channel,
            contact,
            format_time(conversation.created_at),
        ),
    )
    return conversation


async def _ensure_organization(db: aiosqlite.Connection, org_id: str) -> None:
    await db.execute(
        "INSERT INTO organizations (id, created_at) VALUES (?, ?) ON CONFLICT DO NOTHING",
        (org_id, format_time(utcnow())),
    )


async def _by_provider_id(
    db: aiosqlite.Connection, channel: str, provider_message_id: str
) -> Message | None:
    rows = await _fetch(
        db,
        f"SELECT {MESSAGE_COLUMNS} FROM provider_ids p JOIN messages m ON m.id = p.message_id"
        " WHERE p.channel = ? AND p.provider_message_id = ?",
        (channel, provider_message_id),
    )
    return _message(rows[0]) if rows else None


def _parked(conn: sqlite3.Connection, channel: str, provider_message_id: str) -> list[ParkedStatus]:
    """The statuses parked for a provider id (they arrived before its send answer)."""
    rows = conn.execute(
        "SELECT id, payload FROM parked_statuses WHERE channel = ? AND provider_message_id = ?",
        (channel, provider_message_id),
    ).fetchall()
    return common.parked_of(channel, provider_message_id, rows)


def _queue_webhooks(conn: sqlite3.Connection, message: Message, seq: int, frame: str) -> None:
    """The outbound webhook hook of a change: one delivery per endpoint of the message's
    organization, in the transaction that applies it (see whatslike/webhooks). The body
    is made only for an organization that has an endpoint (one indexed read otherwise)."""
    endpoints = conn.execute(
        "SELECT id FROM webhook_endpoints WHERE org_id = ? ORDER BY created_at, id",
        (message.org_id,),
    ).fetchall()
    if not endpoints:
        return
    now = utcnow()
    at = format_time(now)
    kind = event_type(frame)
    body = event_body(kind, frame, now)
    conn.executemany(
        "INSERT INTO webhook_deliveries (endpoint_id, conversation_id, seq, event_type, body,"
        " created_at, next_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
        [(row["id"], message.conversation_id, seq, kind, body, at, at) for row in endpoints],
    )


def _endpoint(row: sqlite3.Row) -> WebhookEndpoint:
    return WebhookEndpoint(
        id=row["id"],
        org_id=row["org_id"],
        url=row["url"],
        secret=row["secret"],
        created_at=parse_time(row["created_at"]),
        previous_secret=row["previous_secret"],
        previous_until=parse_time(row["previous_until"]) if row["previous_until"] else None,
    )


def _delivery(row: sqlite3.Row) -> WebhookDelivery:
    return WebhookDelivery(
        id=int(row["id"]),
        endpoint_id=row["endpoint_id"],
        conversation_id=row["conversation_id"],
        seq=int(row["seq"]),
        event_type=row["event_type"],
        body=bytes(row["body"]),
        attempts=int(row["attempts"]),
        created_at=parse_time(row["created_at"]),
        next_at=parse_time(row["next_at"]),
        parked_at=parse_time(row["parked_at"]) if row["parked_at"] else None,
        last_error=row["last_error"],
    )
