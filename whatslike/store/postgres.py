"""The shared store: the `Store` port on PostgreSQL through an asyncpg pool, for many
processes. Row locks serialize a message's statuses; the conversation row hands out seqs.

Every connection bounds how long anything may hold or wait for a row (`SERVER_SETTINGS`):
a client paused or cut off inside a transaction loses its session after
`idle_in_transaction_session_timeout`, and with it its locks; a statement waits for a lock
at most `lock_timeout` and runs at most `statement_timeout`. Each ends in
`BackendUnavailable`, so the caller retries and nothing acknowledged is lost. An operator
may set other values in the database URL's query (``?lock_timeout=5s``).

The status group commit never waits on a conversation another transaction holds: it
locks with SKIP LOCKED, applies the other conversations' events, and answers `busy` for
that conversation's (after one brief wait), which the status worker retries.

The hot calls of the send path are group commits too (`_group`): the new messages of the
API's concurrent requests go in one statement, and the send claims, the links of the
provider's answers and the hand-offs of a connector's concurrent sends each share one
transaction; every caller is answered after the commit, with its own answer or error.
Every transaction that locks several things takes them in one order: the provider ids'
advisory locks (by hash), then messages, then conversations (each by id)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import TypeAlias, TypeVar, cast
from urllib.parse import parse_qs, urlsplit

import asyncpg

from whatslike import campaigns
from whatslike.clock import utcnow
from whatslike.errors import BackendUnavailable
from whatslike.events import TOPIC_MESSAGES, TOPIC_STATUS, StatusEvent
from whatslike.grouping import Failed, Grouped
from whatslike.status import rules
from whatslike.status.rules import Effect, MessageState, Status
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

_Connection: TypeAlias = "asyncpg.pool.PoolConnectionProxy[asyncpg.Record]"

A = TypeVar("A")
R = TypeVar("R")

#: Serializes schema migrations of processes starting together (an arbitrary constant).
_MIGRATION_LOCK = 7_310_224_681

#: Migration n (1-based) brings the schema from version n-1 to n.
_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE organizations (
            id text PRIMARY KEY,
            created_at timestamptz NOT NULL
        )""",
        """CREATE TABLE conversations (
            id text PRIMARY KEY,
            org_id text NOT NULL REFERENCES organizations (id),
            channel text NOT NULL,
            contact text NOT NULL,
            last_seq bigint NOT NULL DEFAULT 0,
            created_at timestamptz NOT NULL
        )""",
        "CREATE INDEX conversations_org ON conversations (org_id)",
        """CREATE TABLE messages (
            id text PRIMARY KEY,
            conversation_id text NOT NULL REFERENCES conversations (id),
            org_id text NOT NULL,
            channel text NOT NULL,
            text text NOT NULL,
            client_message_id text NOT NULL DEFAULT '',
            created_at timestamptz NOT NULL,
            status text NOT NULL,
            seq bigint,
            sent_at timestamptz,
            delivered_at timestamptz,
            read_at timestamptz,
            failed_at timestamptz,
            error_code text,
            error_title text,
            provider_message_id text
        )""",
        """CREATE UNIQUE INDEX messages_client_message_id
            ON messages (conversation_id, client_message_id) WHERE client_message_id <> ''""",
        """CREATE INDEX messages_conversation
            ON messages (conversation_id, created_at, id COLLATE "C")""",
        """CREATE TABLE provider_ids (
            channel text NOT NULL,
            provider_message_id text NOT NULL,
            message_id text NOT NULL REFERENCES messages (id),
            PRIMARY KEY (channel, provider_message_id)
        )""",
        """CREATE TABLE parked_statuses (
            id bigserial PRIMARY KEY,
            channel text NOT NULL,
            provider_message_id text NOT NULL,
            payload bytea NOT NULL,
            parked_at timestamptz NOT NULL
        )""",
        "CREATE INDEX parked_statuses_key ON parked_statuses (channel, provider_message_id)",
        "CREATE INDEX parked_statuses_age ON parked_statuses (parked_at)",
        """CREATE TABLE changes (
            conversation_id text NOT NULL REFERENCES conversations (id),
            seq bigint NOT NULL,
            message_id text NOT NULL REFERENCES messages (id),
            event_id text NOT NULL,
            frame text NOT NULL,
            PRIMARY KEY (conversation_id, seq)
        )""",
        "CREATE INDEX changes_event_id ON changes (event_id)",
        """CREATE TABLE dead_letters (
            id bigserial PRIMARY KEY,
            topic text NOT NULL,
            payload bytea NOT NULL,
            reason text NOT NULL,
            at timestamptz NOT NULL
        )""",
    ),
    (
        "ALTER TABLE messages ADD COLUMN send_started_at timestamptz",
        "ALTER TABLE messages ADD COLUMN updated_at timestamptz",
        "UPDATE messages SET updated_at = created_at",
        "CREATE INDEX messages_stuck ON messages (status, updated_at)",
        """CREATE TABLE outbox (
            id bigserial PRIMARY KEY,
            topic text NOT NULL,
            key text NOT NULL,
            payload bytea NOT NULL,
            done_key text NOT NULL,
            created_at timestamptz NOT NULL,
            relayed_run text,
            claimed_until timestamptz
        )""",
        "CREATE INDEX outbox_done ON outbox (done_key, topic)",
    ),
    ("CREATE INDEX changes_message ON changes (message_id, seq)",),
    ("CREATE INDEX conversations_contact ON conversations (channel, contact)",),
    # Customers' messages: "in"; every message before them was an agent's.
    ("ALTER TABLE messages ADD COLUMN direction text NOT NULL DEFAULT 'out'",),
    (
        """CREATE TABLE webhook_endpoints (
            id text PRIMARY KEY,
            org_id text NOT NULL,
            url text NOT NULL,
            secret text NOT NULL,
            previous_secret text,
            previous_until timestamptz,
            created_at timestamptz NOT NULL,
            lease_owner text,
            lease_until timestamptz
        )""",
        "CREATE INDEX webhook_endpoints_org ON webhook_endpoints (org_id, created_at)",
        """CREATE TABLE webhook_deliveries (
            id bigserial PRIMARY KEY,
            endpoint_id text NOT NULL REFERENCES webhook_endpoints (id) ON DELETE CASCADE,
            conversation_id text NOT NULL,
            seq bigint NOT NULL,
            event_type text NOT NULL,
            body bytea NOT NULL,
            attempts integer NOT NULL DEFAULT 0,
            created_at timestamptz NOT NULL,
            next_at timestamptz NOT NULL,
            parked_at timestamptz,
            last_error text NOT NULL DEFAULT ''
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
            id text PRIMARY KEY,
            org_id text NOT NULL REFERENCES organizations (id),
            client_campaign_id text NOT NULL,
            fingerprint text NOT NULL,
            channel text NOT NULL,
            text text NOT NULL,
            total integer NOT NULL,
            created integer NOT NULL DEFAULT 0,
            created_at timestamptz NOT NULL,
            UNIQUE (org_id, client_campaign_id)
        )""",
        "CREATE INDEX campaigns_to_run ON campaigns (created_at) WHERE created < total",
        """CREATE TABLE campaign_recipients (
            campaign_id text NOT NULL REFERENCES campaigns (id),
            position integer NOT NULL,
            contact text NOT NULL,
            message_id text REFERENCES messages (id),
            PRIMARY KEY (campaign_id, position)
        )""",
        """CREATE UNIQUE INDEX campaign_recipients_message ON campaign_recipients (message_id)
            WHERE message_id IS NOT NULL""",
        """CREATE TABLE campaign_counts (
            campaign_id text NOT NULL REFERENCES campaigns (id),
            bucket text NOT NULL,
            n integer NOT NULL,
            PRIMARY KEY (campaign_id, bucket)
        )""",
    ),
    # The medium a message carries (whatslike/media).
    ("ALTER TABLE messages ADD COLUMN media_id text",),
    # Templates (whatslike/templates) of a message and of a campaign; Instagram's tag.
    (
        "ALTER TABLE messages ADD COLUMN template text",
        "ALTER TABLE messages ADD COLUMN message_tag text",
        "ALTER TABLE campaigns ADD COLUMN template text",
    ),
    # inbound-media: a customer's medium as Meta described it, and its fetch's state.
    ("ALTER TABLE messages ADD COLUMN inbound_media text",),
    # The order conversations were made in (times are kept to the millisecond): which of
    # two made in the same millisecond is the later. Existing rows are numbered as stored.
    ("ALTER TABLE conversations ADD COLUMN made bigint GENERATED ALWAYS AS IDENTITY",),
)

#: Ids compare byte-wise, as in SQLite, whatever the database's collation.
_MESSAGE_ORDER = 'ORDER BY m.created_at, m.id COLLATE "C"'

_PROVIDER_KEY_LOCK = "SELECT pg_advisory_xact_lock(hashtext($1 || ':' || $2))"
#: The same locks for many `channel:provider id` keys at once, in the order of their
#: hash (volatile functions of a select list are evaluated after its ORDER BY), so two
#: transactions locking several keys cannot deadlock on them.
_PROVIDER_KEY_LOCKS = (
    "SELECT pg_advisory_xact_lock(h) FROM"
    " (SELECT DISTINCT hashtext(k) AS h FROM unnest($1::text[]) AS k) AS keys ORDER BY h"
)

#: New messages and their `messages` outbox entries in one statement (atomic): the
#: entries of the messages inserted, in the given order (outbox ids are that order).
_CREATE_MESSAGES = """
WITH given AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],
        $6::text[], $7::timestamptz[], $8::text[], $9::text[], $10::bytea[], $13::text[],
        $14::text[], $15::text[])
        WITH ORDINALITY AS g(id, conversation_id, org_id, channel, text, client_message_id,
            created_at, status, key, payload, media_id, template, message_tag, n)
), inserted AS (
    INSERT INTO messages (id, conversation_id, org_id, channel, text, client_message_id,
        created_at, status, updated_at, media_id, template, message_tag)
    SELECT id, conversation_id, org_id, channel, text, client_message_id, created_at,
        status, created_at, media_id, template, message_tag FROM given ORDER BY n
    ON CONFLICT (conversation_id, client_message_id) WHERE client_message_id <> ''
    DO NOTHING RETURNING id
), handed AS (
    INSERT INTO outbox (topic, key, payload, done_key, created_at)
    SELECT $11, g.key, g.payload, g.id, $12 FROM given g JOIN inserted i ON i.id = g.id
    ORDER BY g.n
)
SELECT id FROM inserted
"""


def _creation_arguments(made: list[Message], entries: list[OutboxEntry]) -> list[object]:
    """`_CREATE_MESSAGES`'s arguments for these messages and their outbox entries."""
    return [
        [m.id for m in made],
        [m.conversation_id for m in made],
        [m.org_id for m in made],
        [m.channel for m in made],
        [m.text for m in made],
        [m.client_message_id for m in made],
        [m.created_at for m in made],
        [m.status.value for m in made],
        [e.key for e in entries],
        [e.payload for e in entries],
        TOPIC_MESSAGES,
        utcnow(),
        [m.media_id for m in made],
        [m.template for m in made],
        [m.tag for m in made],
    ]


_CONNECTION_ERRORS = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)

#: Set on every connection, unless the database URL's query sets them. Our transactions
#: hold rows for milliseconds and never wait on anything but the database, so:
SERVER_SETTINGS = {
    # A client paused (SIGSTOP, a stalled host) or cut off inside a transaction holds its
    # rows until the server ends its session: 5 s, far above any pause of ours between
    # two statements of a transaction, and below Kafka's 10 s session timeout, so the rows
    # are free when its partitions move to another worker.
    "idle_in_transaction_session_timeout": "5s",
    # Waiting longer than this for a row means its holder is stuck: the caller retries
    # with back-off instead of spreading the stall to everyone queued behind it.
    "lock_timeout": "2s",
    # Our statements take milliseconds; one running this long holds a connection and
    # its locks for nothing (migrations lift it, as they may build indexes on big tables).
    "statement_timeout": "10s",
}

#: How a statement that changes several outbox rows locks them: in one order, so two
#: such statements cannot deadlock. Without it the status batch, completing its entries
#: (by event id, so in their order), and the publisher or relay, deleting the same
#: entries once Kafka took them (by id), did; PostgreSQL then failed one of them.
_IN_ID_ORDER = "ORDER BY id FOR UPDATE"

#: A campaign step's hold on its campaign: NO KEY UPDATE, like its update of `created`,
#: excludes another step but not the key-share lock of a status change moving the
#: campaign's counts (`campaign_counts` references the campaign): with FOR UPDATE the two
#: waited on each other and PostgreSQL failed one as a deadlock.
_CAMPAIGN_STEP_LOCK = "SELECT * FROM campaigns WHERE id = $1 FOR NO KEY UPDATE SKIP LOCKED"

#: How long the status group commit waits, once, for a conversation another
#: transaction holds (a send being linked holds a message for a few milliseconds), before
#: answering `busy` for its events.
BRIEF_LOCK_WAIT_MS = 100

#: Failures that mean the server is out of reach or refusing work for now (network,
#: restart, failover, too many connections), not a bug: the caller may retry.
_OUTAGES = (
    OSError,
    TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,  # includes statement_timeout
    asyncpg.exceptions.InsufficientResourcesError,
    asyncpg.exceptions.LockNotAvailableError,  # lock_timeout
    asyncpg.exceptions.IdleInTransactionSessionTimeoutError,
    # A deadlock or serialization failure: PostgreSQL rolled the transaction back so that
    # another could go on; the same work done again succeeds.
    asyncpg.exceptions.TransactionRollbackError,
)


def _where(dsn: str) -> str:
    """The server and database of a DSN, for messages: never the password."""
    try:
        parts = urlsplit(dsn)
        port = parts.port or 5432
    except ValueError:
        return "(unparsable PostgreSQL URL)"
    return f"{parts.hostname or 'localhost'}:{port}{parts.path or '/'}"


#: The answer to a status whose conversation another transaction holds: retry it.
_BUSY = ApplyResult(effect=Effect.NOOP, busy=True)


def _server_settings(dsn: str) -> dict[str, str]:
    """`SERVER_SETTINGS` but those the URL's query names (asyncpg passes a URL's unknown
    query parameters to the server, and an explicit setting would override them)."""
    try:
        named = parse_qs(urlsplit(dsn).query)
    except ValueError:
        named = {}
    return {name: value for name, value in SERVER_SETTINGS.items() if name not in named}


def _time(value: datetime) -> datetime:
    # asyncpg already reads timestamptz as an aware datetime.
    return value


def _conversation(row: asyncpg.Record) -> Conversation:
    return common.conversation_of(row, _time)


def _message(row: asyncpg.Record) -> Message:
    return common.message_of(row, _time)


class PostgresStore:
    """The `Store` port on PostgreSQL; `dsn` is a ``postgresql://`` URL."""

    def __init__(self, dsn: str, min_size: int = 1, max_size: int = 10) -> None:
        self._dsn = dsn
        self._min_size = min_size
        self._max_size = max_size
        self._pool: asyncpg.Pool[asyncpg.Record] | None = None
        # Group commit: the calls of one kind made while the last one ran share the next
        # statement or transaction (see `_group`), one round trip for all of them.
        self._creates = _group(self._create_messages, "pg-creates")
        self._claims = _group(self._begin_sends, "pg-send-claims")
        self._links = _group(self._link_answers, "pg-links")
        self._handoffs = _group(self._handoff_many, "pg-handoffs")
        self._conversation_reads = _group(self._get_conversations, "pg-conversation-reads")
        self._groups: tuple[Grouped[object, object], ...] = cast(
            "tuple[Grouped[object, object], ...]",
            (self._creates, self._claims, self._links, self._handoffs, self._conversation_reads),
        )

    async def open(self) -> None:
        if self._pool is None:
            try:
                self._pool = await asyncpg.create_pool(
                    self._dsn,
                    min_size=self._min_size,
                    max_size=self._max_size,
                    timeout=10,
                    server_settings=_server_settings(self._dsn),
                    reset=_reset,
                )
            except _CONNECTION_ERRORS as exc:
                raise BackendUnavailable(
                    f"cannot connect to PostgreSQL at {_where(self._dsn)}: {exc}"
                ) from exc
            for group in self._groups:
                group.start()
        await self._migrate()

    async def close(self) -> None:
        if self._pool is not None:
            for group in self._groups:
                await group.stop()
            pool, self._pool = self._pool, None
            await pool.close()

    async def ping(self) -> None:
        try:
            async with self._connection() as conn:
                await conn.fetchval("SELECT 1")
        except _CONNECTION_ERRORS as exc:
            raise BackendUnavailable(
                f"PostgreSQL at {_where(self._dsn)} does not answer: {exc}"
            ) from exc

    async def _migrate(self) -> None:
        async with self._connection() as conn, conn.transaction():
            # Another process may be migrating (building an index on a big table): wait.
            await conn.execute("SET LOCAL lock_timeout = 0")
            await conn.execute("SET LOCAL statement_timeout = 0")
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_version (version integer NOT NULL)"
            )
            version: int = await conn.fetchval("SELECT max(version) FROM schema_version") or 0
            pending = common.pending_migrations(version, _MIGRATIONS, f"at {_where(self._dsn)}")
            for number, statements in pending:
                for statement in statements:
                    await conn.execute(statement)
                await conn.execute("INSERT INTO schema_version (version) VALUES ($1)", number)

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[_Connection]:
        if self._pool is None:
            raise BackendUnavailable(f"PostgreSQL at {_where(self._dsn)} is not open")
        try:
            async with self._pool.acquire(timeout=10) as conn:
                yield conn
        except _OUTAGES as exc:
            raise BackendUnavailable(
                f"PostgreSQL at {_where(self._dsn)} is unavailable: {type(exc).__name__}"
            ) from exc

    async def create_conversation(self, org_id: str, channel: str, contact: str) -> Conversation:
        conversation = common.new_conversation(org_id, channel, contact)
        async with self._connection() as conn, conn.transaction():
            await _ensure_organization(conn, org_id)
            await conn.execute(
                "INSERT INTO conversations (id, org_id, channel, contact, last_seq, created_at)"
                " VALUES ($1, $2, $3, $4, 0, $5)",
                conversation.id,
                org_id,
                channel,
                contact,
                conversation.created_at,
            )
        return conversation

    async def get_conversation(self, org_id: str, conversation_id: str) -> Conversation | None:
        return await _one(self._conversation_reads, (org_id, conversation_id))

    async def _get_conversations(self, keys: list[tuple[str, str]]) -> list[Conversation | None]:
        """The conversations of (organization, id) pairs, in one read."""
        async with self._connection() as conn:
            rows = await conn.fetch(
                "SELECT * FROM conversations WHERE id = ANY($1::text[])",
                sorted({conversation_id for _, conversation_id in keys}),
            )
        found = {str(row["id"]): _conversation(row) for row in rows}
        answers: list[Conversation | None] = []
        for org_id, conversation_id in keys:
            conversation = found.get(conversation_id)
            answers.append(conversation if conversation and conversation.org_id == org_id else None)
        return answers

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
        return await _one(self._creates, (conversation, message))

    async def _create_messages(
        self, items: list[tuple[Conversation, Message]]
    ) -> list[tuple[Message, bool]]:
        """`create_message` of each item in ONE statement (the messages and their outbox
        entries, atomically), then one read of the messages that existed already.

        A concurrent insert of the same key waits for the first one to commit, then does
        nothing, as does a second item of the same key in the batch; the read after the
        statement (a new snapshot under READ COMMITTED) sees that first message."""
        made = [message for _, message in items]
        entries = [common.outbound_entry(c, m) for c, m in items]
        async with self._connection() as conn:
            rows = await conn.fetch(_CREATE_MESSAGES, *_creation_arguments(made, entries))
            inserted = {str(row["id"]) for row in rows}
            first: dict[tuple[str, str], Message] = {}
            others = [m for m in made if m.id not in inserted]
            if others:
                for row in await conn.fetch(
                    f"SELECT {MESSAGE_COLUMNS} FROM messages m JOIN unnest($1::text[],"
                    " $2::text[]) AS k(conversation_id, client_message_id)"
                    " ON m.conversation_id = k.conversation_id"
                    " AND m.client_message_id = k.client_message_id",
                    [m.conversation_id for m in others],
                    [m.client_message_id for m in others],
                ):
                    message = _message(row)
                    first[(message.conversation_id, message.client_message_id)] = message
        return [
            (m, True)
            if m.id in inserted
            else (first[(m.conversation_id, m.client_message_id)], False)
            for m in made
        ]

    async def receive_message(self, inbound: InboundMessage) -> Message:
        """Two webhooks carrying the same message (or a contact's first two) at once:
        the second insert waits for the first to commit, then does nothing, and the read
        after it (a new snapshot under READ COMMITTED) sees the first one's row."""
        fresh = common.inbound_message(common.inbound_conversation(inbound), inbound)
        select = f"SELECT {MESSAGE_COLUMNS} FROM messages m WHERE m.id = $1"
        async with self._connection() as conn, conn.transaction():
            found = await conn.fetchrow(select, fresh.id)
            if found is not None:
                return _message(found)
            conversation = await _latest_conversation(conn, inbound)
            message = replace(fresh, conversation_id=conversation.id, org_id=conversation.org_id)
            await conn.execute(
                "INSERT INTO messages (id, conversation_id, org_id, channel, text,"
                " client_message_id, created_at, status, updated_at, provider_message_id,"
                " direction, inbound_media)"
                " VALUES ($1, $2, $3, $4, $5, '', $6, $7, $6, $8, $9, $10)"
                " ON CONFLICT (id) DO NOTHING",
                message.id,
                message.conversation_id,
                message.org_id,
                message.channel,
                message.text,
                message.created_at,
                message.status.value,
                message.provider_message_id,
                message.direction,
                common.stored_inbound_media(message.inbound_media),
            )
            stored = await conn.fetchrow(select, message.id)
        return _message(stored) if stored is not None else message

    async def set_inbound_media(
        self, message_id: str, media: InboundMedia, media_id: str | None
    ) -> None:
        async with self._connection() as conn:
            await conn.execute(
                "UPDATE messages SET inbound_media = $2, media_id = $3"
                " WHERE id = $1 AND direction = 'in'",
                message_id,
                media.to_json(),
                media_id,
            )

    async def last_inbound_at(self, conversation_id: str) -> datetime | None:
        async with self._connection() as conn:
            at = await conn.fetchval(
                "SELECT max(created_at) FROM messages"
                " WHERE conversation_id = $1 AND direction = 'in'",
                conversation_id,
            )
        return _time(at) if at is not None else None

    async def get_message(self, message_id: str) -> Message | None:
        async with self._connection() as conn:
            row = await conn.fetchrow(
                f"SELECT {MESSAGE_COLUMNS} FROM messages m WHERE m.id = $1", message_id
            )
        return _message(row) if row else None

    async def get_messages(self, message_ids: Sequence[str]) -> list[Message]:
        if not message_ids:
            return []
        async with self._connection() as conn:
            rows = await conn.fetch(
                f"SELECT {MESSAGE_COLUMNS} FROM messages m WHERE m.id = ANY($1::text[])",
                list(message_ids),
            )
        return [_message(row) for row in rows]

    async def list_messages(self, org_id: str, conversation_id: str) -> list[Message] | None:
        async with self._connection() as conn:
            owned = await conn.fetchval(
                "SELECT 1 FROM conversations WHERE id = $1 AND org_id = $2",
                conversation_id,
                org_id,
            )
            if owned is None:
                return None
            rows = await conn.fetch(
                f"SELECT {MESSAGE_COLUMNS} FROM messages m WHERE m.conversation_id = $1"
                f" {_MESSAGE_ORDER}",
                conversation_id,
            )
        return [_message(row) for row in rows]

    async def unread_up_to(self, message_id: str) -> list[Message]:
        async with self._connection() as conn:
            rows = await conn.fetch(
                f"SELECT {MESSAGE_COLUMNS} FROM messages m JOIN messages t ON t.id = $1"
                " WHERE m.conversation_id = t.conversation_id AND m.created_at <= t.created_at"
                " AND m.status <> 'READ' AND m.provider_message_id IS NOT NULL"
                " AND m.direction = 'out'"
                f" {_MESSAGE_ORDER}",
                message_id,
            )
        return [_message(row) for row in rows]

    async def unread_sent_to(
        self, channel: str, contact: str, up_to: datetime, limit: int
    ) -> list[Message]:
        async with self._connection() as conn:
            rows = await conn.fetch(
                f"SELECT {MESSAGE_COLUMNS} FROM conversations c JOIN messages m"
                " ON m.conversation_id = c.id WHERE c.channel = $1 AND c.contact = $2"
                " AND m.status <> 'READ' AND m.provider_message_id IS NOT NULL"
                " AND m.direction = 'out'"
                f" AND m.sent_at <= $3 {_MESSAGE_ORDER} LIMIT $4",
                channel,
                contact,
                up_to,
                limit,
            )
        return [_message(row) for row in rows]

    async def link_provider_id(
        self, channel: str, provider_message_id: str, message_id: str
    ) -> list[ParkedStatus]:
        async with self._connection() as conn, conn.transaction():
            await conn.execute(_PROVIDER_KEY_LOCK, channel, provider_message_id)
            # The first link of a provider id wins; a conflicting later one changes nothing.
            await conn.execute(
                "INSERT INTO provider_ids (channel, provider_message_id, message_id)"
                " VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
                channel,
                provider_message_id,
                message_id,
            )
            await conn.execute(
                "UPDATE messages SET provider_message_id = $2, updated_at = $3 WHERE id ="
                " (SELECT message_id FROM provider_ids WHERE channel = $1 AND"
                " provider_message_id = $2) AND provider_message_id IS NULL",
                channel,
                provider_message_id,
                utcnow(),
            )
            return await _parked(conn, channel, provider_message_id)

    async def link_answer(
        self, channel: str, provider_message_id: str, message_id: str
    ) -> tuple[list[ParkedStatus], str | None]:
        return await _one(self._links, (channel, provider_message_id, message_id))

    async def _link_answers(
        self, items: list[tuple[str, str, str]]
    ) -> list[tuple[list[ParkedStatus], str | None]]:
        """`link_answer` of each (channel, provider id, message id) in one transaction.
        The locks are taken in the one order every transaction here uses: the provider
        ids' advisory locks (by their hash), then the messages (by id)."""
        if len({(c, p) for c, p, _ in items}) < len(items) or len({m for _, _, m in items}) < len(
            items
        ):
            raise _OneByOne("a provider id or a message twice in one group")
        now = utcnow()
        async with self._connection() as conn, conn.transaction():
            await conn.execute(_PROVIDER_KEY_LOCKS, [f"{c}:{p}" for c, p, _ in items])
            before = {
                str(row["id"]): row["provider_message_id"]
                for row in await conn.fetch(
                    "SELECT id, provider_message_id FROM messages WHERE id = ANY($1::text[])"
                    " ORDER BY id FOR UPDATE",
                    sorted(m for _, _, m in items),
                )
            }
            replaced: dict[str, str] = {}
            for channel, provider_message_id, message_id in items:
                earlier = before.get(message_id)
                if earlier is None or earlier == provider_message_id:
                    continue
                replaced[message_id] = earlier
                await conn.execute(_PROVIDER_KEY_LOCK, channel, earlier)
                await conn.execute(
                    "DELETE FROM provider_ids WHERE channel = $1 AND provider_message_id = $2"
                    " AND message_id = $3",
                    channel,
                    earlier,
                    message_id,
                )
            channels = [c for c, _, _ in items]
            provider_ids = [p for _, p, _ in items]
            await conn.execute(
                "INSERT INTO provider_ids (channel, provider_message_id, message_id)"
                " SELECT * FROM unnest($1::text[], $2::text[], $3::text[])"
                " ON CONFLICT (channel, provider_message_id)"
                " DO UPDATE SET message_id = excluded.message_id",
                channels,
                provider_ids,
                [m for _, _, m in items],
            )
            changed = [(m, p) for _, p, m in items if before.get(m) != p]
            if changed:
                await conn.execute(
                    "UPDATE messages AS m SET provider_message_id = u.provider_message_id,"
                    " updated_at = $3 FROM unnest($1::text[], $2::text[])"
                    " AS u(id, provider_message_id) WHERE m.id = u.id",
                    [m for m, _ in changed],
                    [p for _, p in changed],
                    now,
                )
            parked: dict[tuple[str, str], list[asyncpg.Record]] = {}
            for row in await conn.fetch(
                "SELECT p.channel, p.provider_message_id, p.id, p.payload FROM parked_statuses p"
                " JOIN unnest($1::text[], $2::text[]) AS k(channel, provider_message_id)"
                " ON p.channel = k.channel AND p.provider_message_id = k.provider_message_id",
                channels,
                provider_ids,
            ):
                key = (str(row["channel"]), str(row["provider_message_id"]))
                parked.setdefault(key, []).append(row)
        return [
            (common.parked_of(c, p, parked.get((c, p), [])), replaced.get(m)) for c, p, m in items
        ]

    async def expire_parked(self, before: datetime) -> int:
        async with self._connection() as conn:
            done = await conn.execute("DELETE FROM parked_statuses WHERE parked_at < $1", before)
        return int(done.split()[-1])

    async def find_by_provider_id(self, channel: str, provider_message_id: str) -> Message | None:
        async with self._connection() as conn:
            return await _by_provider_id(conn, channel, provider_message_id)

    async def park_status(self, parked: ParkedStatus) -> Message | None:
        async with self._connection() as conn, conn.transaction():
            await conn.execute(_PROVIDER_KEY_LOCK, parked.channel, parked.provider_message_id)
            linked = await _by_provider_id(conn, parked.channel, parked.provider_message_id)
            if linked is not None:
                return linked
            await conn.execute(
                "INSERT INTO parked_statuses (channel, provider_message_id, payload, parked_at)"
                " VALUES ($1, $2, $3, $4)",
                parked.channel,
                parked.provider_message_id,
                parked.payload,
                utcnow(),
            )
        return None

    async def apply_status(self, event: StatusEvent) -> ApplyResult:
        return (await self.apply_statuses([event]))[0]

    async def apply_statuses(self, events: Sequence[StatusEvent]) -> list[ApplyResult]:
        if not events:
            return []
        async with self._connection() as conn, conn.transaction():
            results = await _apply_batch(conn, events, skip_locked=True)
        held = [i for i, result in enumerate(results) if result.busy]
        if held:
            again = await self._apply_waiting([events[i] for i in held])
            for i, result in zip(held, again, strict=True):
                results[i] = result
        return results

    async def _apply_waiting(self, events: Sequence[StatusEvent]) -> list[ApplyResult]:
        """The events of conversations held by another transaction, applied once their
        rows are free, if that is within `BRIEF_LOCK_WAIT_MS`; else each is `busy`."""
        try:
            async with self._connection() as conn, conn.transaction():
                await conn.execute(f"SET LOCAL lock_timeout = {BRIEF_LOCK_WAIT_MS}")
                return await _apply_batch(conn, events, skip_locked=False)
        except BackendUnavailable as exc:
            if not isinstance(exc.__cause__, asyncpg.exceptions.LockNotAvailableError):
                raise
        return [_BUSY] * len(events)

    async def handoff(
        self,
        entries: Sequence[OutboxEntry] = (),
        *,
        done: Sequence[tuple[str, str]] = (),
        parked: Sequence[tuple[str, str]] = (),
        relayed_run: str | None = None,
        claim_s: float | None = None,
    ) -> list[int]:
        if not (entries or done or parked):
            return []
        item = _Handoff(tuple(entries), tuple(done), tuple(parked), relayed_run, claim_s)
        return await _one(self._handoffs, item)

    async def _handoff_many(self, items: list[_Handoff]) -> list[list[int]]:
        """`handoff` of each item in one transaction: the entries added in the items'
        order, then the completed entries and the parked statuses deleted. Deleting after
        adding is what the items one after another would do, unless an item completes
        an entry that an item after it adds: such a group goes one by one."""
        added = [(e, item) for item in items for e in item.entries]
        ids: dict[int, int] = {}  # the position of an entry in `added`: its id
        done = [key for item in items for key in item.done]
        parked = [key for item in items for key in item.parked]
        if len(items) > 1 and done and added:
            last_adding: dict[tuple[str, str], int] = {}
            for n, item in enumerate(items):
                for entry in item.entries:
                    last_adding[(entry.topic, entry.done_key)] = n
            for n, item in enumerate(items):
                if any(last_adding.get(key, n) > n for key in item.done):
                    raise _OneByOne("an entry completed before it is added")
        async with self._connection() as conn, conn.transaction():
            if added:
                rows = await conn.fetch(
                    _ADD_OUTBOX,
                    [e.topic for e, _ in added],
                    [e.key for e, _ in added],
                    [e.payload for e, _ in added],
                    [e.done_key for e, _ in added],
                    [item.relayed_run for _, item in added],
                    utcnow(),
                    [item.claim_s for _, item in added],
                )
                ids = {int(row["n"]) - 1: int(row["id"]) for row in rows}
            if done:
                await conn.execute(
                    "DELETE FROM outbox WHERE id IN (SELECT o.id FROM outbox AS o"
                    " JOIN unnest($1::text[], $2::text[]) AS d(topic, done_key)"
                    " ON o.done_key = d.done_key AND o.topic = d.topic"
                    f" {_IN_ID_ORDER} OF o)",
                    [topic for topic, _ in done],
                    [done_key for _, done_key in done],
                )
            if parked:
                await conn.execute(
                    "DELETE FROM parked_statuses AS p USING unnest($1::text[], $2::text[])"
                    " AS k(channel, provider_message_id) WHERE p.channel = k.channel"
                    " AND p.provider_message_id = k.provider_message_id",
                    [channel for channel, _ in parked],
                    [provider_message_id for _, provider_message_id in parked],
                )
        answers: list[list[int]] = []
        start = 0
        for item in items:
            end = start + len(item.entries)
            answers.append([ids[n] for n in range(start, end)] if item.claim_s is not None else [])
            start = end
        return answers

    async def outbox_batch(self, run: str, limit: int) -> list[OutboxItem]:
        async with self._connection() as conn:
            rows = await conn.fetch(
                "SELECT id, topic, key, payload FROM outbox"
                " WHERE relayed_run IS DISTINCT FROM $1 ORDER BY id LIMIT $2",
                run,
                limit,
            )
        return common.outbox_items(rows)

    async def claim_outbox(self, limit: int, lease_s: float) -> list[OutboxItem]:
        async with self._connection() as conn:
            # SKIP LOCKED: relays of several processes claim different entries at once.
            rows = await conn.fetch(
                "UPDATE outbox SET claimed_until = now() + make_interval(secs => $2)"
                " WHERE id IN (SELECT id FROM outbox WHERE claimed_until IS NULL"
                " OR claimed_until < now() ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED)"
                " RETURNING id, topic, key, payload",
                limit,
                lease_s,
            )
        return sorted(common.outbox_items(rows), key=lambda item: item.id)

    async def unclaim_outbox(self, ids: Sequence[int]) -> None:
        async with self._connection() as conn:
            await conn.execute(
                "UPDATE outbox SET claimed_until = NULL WHERE id IN (SELECT id FROM outbox"
                f" WHERE id = ANY($1::bigint[]) {_IN_ID_ORDER})",
                list(ids),
            )

    async def mark_relayed(self, ids: Sequence[int], run: str) -> None:
        async with self._connection() as conn:
            await conn.execute(
                "UPDATE outbox SET relayed_run = $2 WHERE id IN (SELECT id FROM outbox"
                f" WHERE id = ANY($1::bigint[]) {_IN_ID_ORDER})",
                list(ids),
                run,
            )

    async def delete_outbox(self, ids: Sequence[int]) -> None:
        async with self._connection() as conn:
            await conn.execute(
                "DELETE FROM outbox WHERE id IN (SELECT id FROM outbox"
                f" WHERE id = ANY($1::bigint[]) {_IN_ID_ORDER})",
                list(ids),
            )

    async def outbox_size(self) -> int:
        async with self._connection() as conn:
            return int(await conn.fetchval("SELECT count(*) FROM outbox"))

    async def begin_send(self, message_id: str) -> tuple[SendClaim, Message | None]:
        return await _one(self._claims, message_id)

    async def _begin_sends(self, message_ids: list[str]) -> list[tuple[SendClaim, Message | None]]:
        """`begin_send` of each message in one transaction (in order: the same message
        twice gets `GO`, then `UNKNOWN`), the rows locked by id."""
        async with self._connection() as conn, conn.transaction():
            found = {
                str(row["id"]): _message(row)
                for row in await conn.fetch(
                    f"SELECT {MESSAGE_COLUMNS} FROM messages m WHERE m.id = ANY($1::text[])"
                    " ORDER BY m.id FOR UPDATE",
                    sorted(set(message_ids)),
                )
            }
            now = utcnow()
            answers: list[tuple[SendClaim, Message | None]] = []
            claimed: list[str] = []
            for message_id in message_ids:
                message = found.get(message_id)
                claim = common.send_claim(message)
                if message is not None and claim is SendClaim.GO:
                    message = found[message_id] = replace(
                        message, send_started_at=now, updated_at=now
                    )
                    claimed.append(message_id)
                answers.append((claim, message))
            if claimed:
                await conn.execute(
                    "UPDATE messages SET send_started_at = $2, updated_at = $2"
                    " WHERE id = ANY($1::text[])",
                    claimed,
                    now,
                )
        return answers

    async def release_send(self, message_id: str) -> None:
        async with self._connection() as conn:
            await conn.execute(
                "UPDATE messages SET send_started_at = NULL, updated_at = $2"
                " WHERE id = $1 AND provider_message_id IS NULL",
                message_id,
                utcnow(),
            )

    async def stuck(
        self,
        pending_before: datetime,
        unknown_before: datetime,
        sent_before: datetime,
        limit: int,
    ) -> Stuck:
        select = f"SELECT {MESSAGE_COLUMNS} FROM messages m WHERE"
        async with self._connection() as conn:
            pending = await conn.fetch(
                f"{select} m.status = 'PENDING' AND m.send_started_at IS NULL"
                " AND m.direction = 'out' AND m.updated_at < $1 ORDER BY m.updated_at LIMIT $2",
                pending_before,
                limit,
            )
            unknown = await conn.fetch(
                f"{select} m.status = 'PENDING' AND m.provider_message_id IS NULL"
                " AND m.send_started_at < $1 ORDER BY m.send_started_at LIMIT $2",
                unknown_before,
                limit,
            )
            sent = await conn.fetch(
                f"{select} m.status = 'SENT' AND m.updated_at < $1 ORDER BY m.updated_at LIMIT $2",
                sent_before,
                limit,
            )
        return Stuck(
            tuple(map(_message, pending)), tuple(map(_message, unknown)), tuple(map(_message, sent))
        )

    async def redrive(self, message_id: str) -> bool:
        async with self._connection() as conn, conn.transaction():
            row = await conn.fetchrow(
                f"SELECT {MESSAGE_COLUMNS}, c.contact FROM messages m"
                " JOIN conversations c ON c.id = m.conversation_id WHERE m.id = $1"
                " FOR UPDATE OF m",
                message_id,
            )
            if row is None or not common.redrivable(_message(row)):
                return False
            message = _message(row)
            await conn.execute(
                "DELETE FROM outbox WHERE done_key = $1 AND topic = $2", message_id, TOPIC_MESSAGES
            )
            conversation = common.conversation_of_message(message, row["contact"])
            await _add_outbox(conn, [common.outbound_entry(conversation, message)])
            await conn.execute(
                "UPDATE messages SET updated_at = $2 WHERE id = $1", message_id, utcnow()
            )
        return True

    async def changes_since(self, conversation_id: str, since: int, limit: int) -> Changes:
        async with self._connection() as conn:
            # An unknown conversation answers as one without changes yet.
            last_seq: int = (
                await conn.fetchval(
                    "SELECT last_seq FROM conversations WHERE id = $1", conversation_id
                )
                or 0
            )
            return await _changes_up_to(conn, conversation_id, since, last_seq, limit)

    async def subscription_changes(
        self, reads: Sequence[SubscriptionRead], limit: int
    ) -> list[Changes | None]:
        async with self._connection() as conn:
            return [await _subscription_changes(conn, read, limit) for read in reads]

    async def message_history(self, message_id: str) -> tuple[str, ...]:
        async with self._connection() as conn:
            rows = await conn.fetch(
                "SELECT frame FROM changes WHERE message_id = $1 ORDER BY seq", message_id
            )
        return common.frames_of(rows)

    # -- campaigns -----------------------------------------------------------------

    async def create_campaign(self, new: NewCampaign) -> tuple[Campaign, bool]:
        campaign = common.new_campaign(new)
        async with self._connection() as conn, conn.transaction():
            await _ensure_organization(conn, new.org_id)
            inserted = await conn.fetchval(
                "INSERT INTO campaigns (id, org_id, client_campaign_id, fingerprint, channel,"
                " text, total, created, created_at, template)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, 0, $8, $9)"
                " ON CONFLICT (org_id, client_campaign_id) DO NOTHING RETURNING id",
                campaign.id,
                new.org_id,
                new.client_campaign_id,
                new.fingerprint,
                new.channel,
                new.text,
                campaign.total,
                campaign.created_at,
                new.template,
            )
            if inserted is None:
                row = await conn.fetchrow(
                    "SELECT * FROM campaigns WHERE org_id = $1 AND client_campaign_id = $2",
                    new.org_id,
                    new.client_campaign_id,
                )
                assert row is not None  # the conflict was with it; campaigns are not deleted
                return await _campaign(conn, row), False
            await conn.execute(
                "INSERT INTO campaign_recipients (campaign_id, position, contact)"
                " SELECT $1, n - 1, contact"
                " FROM unnest($2::text[]) WITH ORDINALITY AS c(contact, n)",
                campaign.id,
                list(new.contacts),
            )
        return campaign, True

    async def get_campaign(self, org_id: str, campaign_id: str) -> Campaign | None:
        # One snapshot for the row (`created`) and its counts: read apart, a step that
        # commits between the two would show counts that do not add up to the total.
        async with (
            self._connection() as conn,
            conn.transaction(isolation="repeatable_read", readonly=True),
        ):
            row = await conn.fetchrow(
                "SELECT * FROM campaigns WHERE id = $1 AND org_id = $2", campaign_id, org_id
            )
            return await _campaign(conn, row) if row else None

    async def campaign_recipients(
        self, org_id: str, campaign_id: str, after: int, limit: int
    ) -> list[CampaignRecipient] | None:
        async with self._connection() as conn:
            owned = await conn.fetchval(
                "SELECT 1 FROM campaigns WHERE id = $1 AND org_id = $2", campaign_id, org_id
            )
            if owned is None:
                return None
            rows = await conn.fetch(
                f"SELECT r.position, r.contact, {MESSAGE_COLUMNS} FROM campaign_recipients r"
                " LEFT JOIN messages m ON m.id = r.message_id"
                " WHERE r.campaign_id = $1 AND r.position > $2 ORDER BY r.position LIMIT $3",
                campaign_id,
                after,
                limit,
            )
        return [
            CampaignRecipient(
                int(row["position"]), str(row["contact"]), _message(row) if row["id"] else None
            )
            for row in rows
        ]

    async def campaigns_to_run(self, limit: int) -> list[Campaign]:
        async with self._connection() as conn:
            rows = await conn.fetch(
                "SELECT * FROM campaigns WHERE created < total ORDER BY created_at LIMIT $1",
                limit,
            )
            return [await _campaign(conn, row) for row in rows]

    async def campaign_backlog(self, channel: str) -> int:
        async with self._connection() as conn:
            backlog = await conn.fetchval(
                "SELECT coalesce(sum(k.n), 0) FROM campaign_counts k"
                " JOIN campaigns c ON c.id = k.campaign_id WHERE c.channel = $1 AND k.bucket = $2",
                channel,
                Status.PENDING.value,
            )
        return int(backlog)

    async def campaign_step(self, campaign_id: str, limit: int) -> int:
        async with self._connection() as conn, conn.transaction():
            # Another process's step of the same campaign holds the row: it does this one.
            row = await conn.fetchrow(_CAMPAIGN_STEP_LOCK, campaign_id)
            if row is None:
                return 0
            campaign = common.campaign_of(row, _time, {})
            contacts = [
                str(r["contact"])
                for r in await conn.fetch(
                    "SELECT contact FROM campaign_recipients WHERE campaign_id = $1"
                    " AND position >= $2 ORDER BY position LIMIT $3",
                    campaign_id,
                    campaign.created,
                    limit,
                )
            ]
            if not contacts:
                return 0
            conversations = await _conversations_with(conn, campaign, contacts)
            made = [
                common.new_message(c, campaign.text, campaign_id, template=campaign.template)
                for c in conversations
            ]
            entries = [
                common.outbound_entry(c, m) for c, m in zip(conversations, made, strict=True)
            ]
            await conn.execute(_CREATE_MESSAGES, *_creation_arguments(made, entries))
            await conn.execute(
                "UPDATE campaign_recipients r SET message_id = g.id"
                " FROM unnest($2::text[]) WITH ORDINALITY AS g(id, n)"
                " WHERE r.campaign_id = $1 AND r.position = $3 + g.n - 1",
                campaign_id,
                [m.id for m in made],
                campaign.created,
            )
            await conn.execute(
                "UPDATE campaigns SET created = created + $2 WHERE id = $1",
                campaign_id,
                len(made),
            )
            # Both rows in one statement, in bucket order like the status changes' moves.
            await conn.execute(
                "INSERT INTO campaign_counts (campaign_id, bucket, n)"
                " SELECT $1, b, n FROM unnest($2::text[], $3::int[]) AS k(b, n) ORDER BY b"
                " ON CONFLICT (campaign_id, bucket)"
                " DO UPDATE SET n = campaign_counts.n + excluded.n",
                campaign_id,
                [campaigns.CHANGES, Status.PENDING.value],
                [1, len(made)],
            )
        return len(made)

    async def record_dead_letter(self, topic: str, payload: bytes, reason: str) -> None:
        async with self._connection() as conn:
            await conn.execute(
                "INSERT INTO dead_letters (topic, payload, reason, at) VALUES ($1, $2, $3, $4)",
                topic,
                payload,
                reason,
                utcnow(),
            )

    async def dead_letter_count(self) -> int:
        async with self._connection() as conn:
            return int(await conn.fetchval("SELECT count(*) FROM dead_letters"))

    async def dead_letters(self, limit: int) -> list[DeadLetter]:
        async with self._connection() as conn:
            rows = await conn.fetch(
                "SELECT id, topic, payload, reason, at FROM dead_letters ORDER BY id DESC LIMIT $1",
                limit,
            )
        return [_dead_letter_of(row) for row in rows]

    async def dead_letter(self, dead_letter_id: str) -> DeadLetter | None:
        if not dead_letter_id.isdigit() or len(dead_letter_id) > 18:
            return None
        async with self._connection() as conn:
            row = await conn.fetchrow(
                "SELECT id, topic, payload, reason, at FROM dead_letters WHERE id = $1",
                int(dead_letter_id),
            )
        return _dead_letter_of(row) if row is not None else None

    # -- outbound webhooks (WebhookStore) ------------------------------------------------

    async def add_webhook_endpoint(
        self, endpoint: WebhookEndpoint, limit: int
    ) -> WebhookEndpoint | None:
        async with self._connection() as conn, conn.transaction():
            # One organization's adds one at a time, so two at once cannot pass the limit.
            await conn.execute(
                "SELECT pg_advisory_xact_lock(hashtext('webhooks:' || $1))", endpoint.org_id
            )
            count = await conn.fetchval(
                "SELECT count(*) FROM webhook_endpoints WHERE org_id = $1", endpoint.org_id
            )
            if count >= limit:
                return None
            await conn.execute(
                "INSERT INTO webhook_endpoints (id, org_id, url, secret, created_at)"
                " VALUES ($1, $2, $3, $4, $5)",
                endpoint.id,
                endpoint.org_id,
                endpoint.url,
                endpoint.secret,
                endpoint.created_at,
            )
        return endpoint

    async def webhook_endpoints(self, org_id: str) -> list[WebhookEndpoint]:
        async with self._connection() as conn:
            rows = await conn.fetch(
                "SELECT * FROM webhook_endpoints WHERE org_id = $1 ORDER BY created_at, id",
                org_id,
            )
        return [_endpoint(row) for row in rows]

    async def webhook_endpoint(self, org_id: str, endpoint_id: str) -> WebhookEndpoint | None:
        async with self._connection() as conn:
            row = await conn.fetchrow(
                "SELECT * FROM webhook_endpoints WHERE org_id = $1 AND id = $2",
                org_id,
                endpoint_id,
            )
        return _endpoint(row) if row is not None else None

    async def delete_webhook_endpoint(self, org_id: str, endpoint_id: str) -> bool:
        # Its deliveries go with it (ON DELETE CASCADE).
        async with self._connection() as conn:
            gone = await conn.fetchval(
                "WITH gone AS (DELETE FROM webhook_endpoints WHERE org_id = $1 AND id = $2"
                " RETURNING 1) SELECT count(*) FROM gone",
                org_id,
                endpoint_id,
            )
        return bool(gone)

    async def rotate_webhook_secret(
        self, org_id: str, endpoint_id: str, secret: str, previous_until: datetime
    ) -> WebhookEndpoint | None:
        async with self._connection() as conn:
            row = await conn.fetchrow(
                "UPDATE webhook_endpoints SET previous_secret = secret, previous_until = $1,"
                " secret = $2 WHERE org_id = $3 AND id = $4 RETURNING *",
                previous_until,
                secret,
                org_id,
                endpoint_id,
            )
        return _endpoint(row) if row is not None else None

    async def claim_webhook_endpoints(
        self, owner: str, limit: int, lease_s: float, now: datetime
    ) -> list[WebhookEndpoint]:
        async with self._connection() as conn:
            rows = await conn.fetch(
                "UPDATE webhook_endpoints SET lease_owner = $1,"
                " lease_until = $2 + make_interval(secs => $3) WHERE id IN"
                " (SELECT e.id FROM webhook_endpoints e WHERE (e.lease_until IS NULL"
                " OR e.lease_until < $2 OR e.lease_owner = $1) AND EXISTS (SELECT 1 FROM"
                " webhook_deliveries d WHERE d.endpoint_id = e.id AND d.parked_at IS NULL"
                " AND d.next_at <= $2 AND d.seq = (SELECT min(h.seq) FROM webhook_deliveries h"
                " WHERE h.endpoint_id = e.id AND h.conversation_id = d.conversation_id"
                " AND h.parked_at IS NULL)) LIMIT $4 FOR UPDATE SKIP LOCKED) RETURNING *",
                owner,
                now,
                lease_s,
                limit,
            )
        return [_endpoint(row) for row in rows]

    async def renew_webhook_lease(self, owner: str, endpoint_id: str, lease_s: float) -> bool:
        async with self._connection() as conn:
            renewed = await conn.fetchval(
                "WITH renewed AS (UPDATE webhook_endpoints"
                " SET lease_until = $3 WHERE id = $1 AND lease_owner = $2 RETURNING 1)"
                " SELECT count(*) FROM renewed",
                endpoint_id,
                owner,
                utcnow() + timedelta(seconds=lease_s),
            )
        return bool(renewed)

    async def release_webhook_lease(self, owner: str, endpoint_id: str) -> None:
        async with self._connection() as conn:
            await conn.execute(
                "UPDATE webhook_endpoints SET lease_owner = NULL, lease_until = NULL"
                " WHERE id = $1 AND lease_owner = $2",
                endpoint_id,
                owner,
            )

    async def due_webhook_deliveries(
        self, endpoint_id: str, now: datetime, limit: int
    ) -> list[WebhookDelivery]:
        async with self._connection() as conn:
            rows = await conn.fetch(
                "SELECT * FROM webhook_deliveries d WHERE d.endpoint_id = $1"
                " AND d.parked_at IS NULL AND d.next_at <= $2 AND d.seq = (SELECT min(h.seq)"
                " FROM webhook_deliveries h WHERE h.endpoint_id = d.endpoint_id"
                " AND h.conversation_id = d.conversation_id AND h.parked_at IS NULL)"
                " ORDER BY d.id LIMIT $3",
                endpoint_id,
                now,
                limit,
            )
        return [_delivery(row) for row in rows]

    async def webhook_delivered(self, delivery_id: int) -> None:
        async with self._connection() as conn:
            await conn.execute("DELETE FROM webhook_deliveries WHERE id = $1", delivery_id)

    async def webhook_failed(
        self, delivery_id: int, next_at: datetime | None, error: str, now: datetime
    ) -> None:
        async with self._connection() as conn:
            await conn.execute(
                "UPDATE webhook_deliveries SET attempts = attempts + 1, last_error = $2,"
                " next_at = coalesce($3, next_at), parked_at = $4 WHERE id = $1",
                delivery_id,
                error,
                next_at,
                now if next_at is None else None,
            )

    async def parked_webhook_deliveries(
        self, org_id: str, endpoint_id: str, limit: int
    ) -> list[WebhookDelivery] | None:
        if await self.webhook_endpoint(org_id, endpoint_id) is None:
            return None
        async with self._connection() as conn:
            rows = await conn.fetch(
                "SELECT * FROM webhook_deliveries WHERE endpoint_id = $1"
                " AND parked_at IS NOT NULL ORDER BY id LIMIT $2",
                endpoint_id,
                limit,
            )
        return [_delivery(row) for row in rows]

    async def oldest_pending_webhook(self) -> datetime | None:
        async with self._connection() as conn:
            oldest: datetime | None = await conn.fetchval(
                "SELECT min(created_at) FROM webhook_deliveries WHERE parked_at IS NULL"
            )
        return oldest

    async def replay_parked_webhooks(
        self, org_id: str, endpoint_id: str, now: datetime
    ) -> int | None:
        async with self._connection() as conn, conn.transaction():
            found = await conn.fetchval(
                "SELECT 1 FROM webhook_endpoints WHERE org_id = $1 AND id = $2 FOR UPDATE",
                org_id,
                endpoint_id,
            )
            if found is None:
                return None
            replayed = await conn.fetchval(
                "WITH replayed AS (UPDATE webhook_deliveries SET parked_at = NULL,"
                " attempts = 0, created_at = $2, next_at = $2"
                " WHERE endpoint_id = $1 AND parked_at IS NOT NULL RETURNING 1)"
                " SELECT count(*) FROM replayed",
                endpoint_id,
                now,
            )
        return int(replayed)


def _dead_letter_of(row: asyncpg.Record) -> DeadLetter:
    return DeadLetter(str(row["id"]), row["topic"], row["reason"], row["at"], row["payload"])


@dataclass(frozen=True, slots=True)
class _Locked:
    """What `_lock` read: the messages by id, the last seq of their conversations, the
    ids of the messages passed over (`busy`), and of those whose organization has a
    webhook endpoint (`hooked`) or that are in a campaign (`in_campaign`)."""

    messages: dict[str, Message]
    last_seq: dict[str, int]
    busy: set[str]
    hooked: set[str]
    in_campaign: set[str]


async def _lock(conn: _Connection, events: Sequence[StatusEvent], *, skip_locked: bool) -> _Locked:
    """Lock the rows of the events' messages and conversations (see `_apply_batch`);
    the messages passed over (only with `skip_locked`) are `busy`, with every other of
    their conversations'. The same read tells which messages have a webhook endpoint or
    a campaign to update, so that a change with neither costs no statement for them."""
    lock = "FOR NO KEY UPDATE SKIP LOCKED" if skip_locked else "FOR NO KEY UPDATE"
    wanted = sorted({e.message_id for e in events})
    rows = await conn.fetch(
        f"SELECT {MESSAGE_COLUMNS}, EXISTS (SELECT 1 FROM webhook_endpoints e"
        " WHERE e.org_id = m.org_id) AS hooked, EXISTS (SELECT 1 FROM campaign_recipients r"
        " WHERE r.message_id = m.id) AS in_campaign"
        f" FROM messages m WHERE m.id = ANY($1::text[]) ORDER BY m.id {lock}",
        wanted,
    )
    messages = {str(row["id"]): _message(row) for row in rows}
    hooked = {str(row["id"]) for row in rows if row["hooked"]}
    in_campaign = {str(row["id"]) for row in rows if row["in_campaign"]}
    #: The conversation of each message passed over (held by another transaction).
    passed: dict[str, str] = {}
    if skip_locked and len(messages) < len(wanted):
        # Passed over, or not there at all (an unknown message): a plain read tells.
        passed = {
            str(row["id"]): str(row["conversation_id"])
            for row in await conn.fetch(
                "SELECT id, conversation_id FROM messages WHERE id = ANY($1::text[])",
                [i for i in wanted if i not in messages],
            )
        }
    held = set(passed.values())  # conversations another transaction holds a row of
    conversations = sorted({m.conversation_id for m in messages.values()} - held)
    last_seq = {
        str(row["id"]): int(row["last_seq"])
        for row in await conn.fetch(
            f"SELECT id, last_seq FROM conversations WHERE id = ANY($1::text[]) ORDER BY id {lock}",
            conversations,
        )
    }
    held.update(c for c in conversations if c not in last_seq)
    busy = set(passed) | {m.id for m in messages.values() if m.conversation_id in held}
    return _Locked(messages, last_seq, busy, hooked, in_campaign)


async def _apply_batch(
    conn: _Connection, events: Sequence[StatusEvent], *, skip_locked: bool
) -> list[ApplyResult]:
    """`apply_status` of each event in turn, inside the caller's transaction, in a fixed
    number of statements: the rows are read and locked up front, in one order (messages,
    then conversations, each by id: two batches cannot deadlock), the rules run here, and
    the writes go out as pipelined `executemany`.

    The row lock serializes the statuses of one message; the conversation's, its seqs.
    Both are FOR NO KEY UPDATE, which rows referenced by a concurrent insert (a new
    message, a change) do not block. With `skip_locked`, rows another transaction holds
    are passed over: every event of a conversation with such a row is `busy` (none is
    applied, so their order is kept) and touches nothing, the others are applied."""
    locked = await _lock(conn, events, skip_locked=skip_locked)
    messages, last_seq, busy = locked.messages, locked.last_seq, locked.busy
    before = {message_id: m.state for message_id, m in messages.items()}
    event_ids = [e.event_id for e in events if e.message_id not in busy]
    earlier: dict[tuple[str, str], tuple[str, ...]] = {}
    for row in await conn.fetch(_COMPLETE_AND_READ_EARLIER, TOPIC_STATUS, event_ids):
        key = (str(row["event_id"]), str(row["message_id"]))
        earlier[key] = (*earlier.get(key, ()), str(row["frame"]))
    results: list[ApplyResult] = []
    changes: list[tuple[str, int, str, str, str]] = []
    updated: dict[str, Message] = {}
    for event in events:
        if event.message_id in busy:
            results.append(_BUSY)
            continue
        message = messages.get(event.message_id)
        if message is None:
            results.append(common.UNKNOWN_MESSAGE)
            continue
        if (event.event_id, message.id) in earlier:
            results.append(common.replayed(message, earlier[(event.event_id, message.id)]))
            continue
        transition = rules.apply(message.state, common.observation_of(event))
        if transition.effect is Effect.NOOP:
            results.append(ApplyResult(effect=Effect.NOOP, message=message))
            continue
        seq, frames = message.seq, tuple[str, ...]()
        if transition.effect is Effect.CHANGED:
            seq = last_seq[message.conversation_id] = last_seq[message.conversation_id] + 1
            frame = common.change_frame(message, transition.state, seq, event.occurred_at)
            frames = (frame,)
            changes.append((message.conversation_id, seq, message.id, event.event_id, frame))
            earlier[(event.event_id, message.id)] = frames
        result = common.applied(message, transition, seq, frames, utcnow())
        assert result.message is not None  # `applied` always answers with the message
        messages[message.id] = updated[message.id] = result.message
        results.append(result)
    if updated:
        bumped = sorted({change[0] for change in changes})
        states = [m.state for m in updated.values()]
        await conn.execute(
            _WRITE_APPLIED,
            [c[0] for c in changes],
            [c[1] for c in changes],
            [c[2] for c in changes],
            [c[3] for c in changes],
            [c[4] for c in changes],
            bumped,
            [last_seq[cid] for cid in bumped],
            list(updated),
            [state.status.value for state in states],
            [m.seq for m in updated.values()],
            [state.sent_at for state in states],
            [state.delivered_at for state in states],
            [state.read_at for state in states],
            [state.failed_at for state in states],
            [state.error.code if state.error else None for state in states],
            [state.error.title if state.error else None for state in states],
            [m.updated_at for m in updated.values()],
        )
        hooked = [change for change in changes if change[2] in locked.hooked]
        if hooked:
            await _queue_webhooks(conn, hooked, messages)
        await _move_campaign_counts(
            conn, before, [m for m in updated.values() if m.id in locked.in_campaign]
        )
    return results


#: A status batch's outbox entries completed, and the changes its events made before
#: (a redelivery), in one round trip.
_COMPLETE_AND_READ_EARLIER = f"""
WITH completed AS (
    DELETE FROM outbox WHERE id IN (
        SELECT id FROM outbox WHERE topic = $1 AND done_key = ANY($2::text[]) {_IN_ID_ORDER}
    )
)
SELECT event_id, message_id, frame FROM changes WHERE event_id = ANY($2::text[]) ORDER BY seq
"""

#: A status batch's writes in one statement: its changes, the conversations' last seqs
#: and the messages' new states (three tables, each row written once).
_WRITE_APPLIED = """
WITH added AS (
    INSERT INTO changes (conversation_id, seq, message_id, event_id, frame)
    SELECT * FROM unnest($1::text[], $2::bigint[], $3::text[], $4::text[], $5::text[])
), bumped AS (
    UPDATE conversations AS c SET last_seq = u.last_seq
    FROM unnest($6::text[], $7::bigint[]) AS u(id, last_seq) WHERE c.id = u.id
)
UPDATE messages AS m SET status = u.status, seq = u.seq, sent_at = u.sent_at,
    delivered_at = u.delivered_at, read_at = u.read_at, failed_at = u.failed_at,
    error_code = u.error_code, error_title = u.error_title, updated_at = u.updated_at
FROM unnest($8::text[], $9::text[], $10::bigint[], $11::timestamptz[], $12::timestamptz[],
    $13::timestamptz[], $14::timestamptz[], $15::text[], $16::text[], $17::timestamptz[])
    AS u(id, status, seq, sent_at, delivered_at, read_at, failed_at, error_code,
        error_title, updated_at)
WHERE m.id = u.id
"""


async def _move_campaign_counts(
    conn: _Connection, before: dict[str, MessageState], after: Iterable[Message]
) -> None:
    """Campaign messages' status changes move them between their campaigns' counts, in
    the status changes' transaction (nothing for messages of no campaign). One row per
    (campaign, bucket), in that order, so concurrent batches cannot deadlock on them;
    each move also counts in its campaign's `CHANGES` row (the counts' version)."""
    moves = [
        (m.id, old, new)
        for m in after
        if (old := campaigns.bucket_of(before[m.id])) != (new := campaigns.bucket_of(m.state))
    ]
    if moves:
        await conn.execute(
            "INSERT INTO campaign_counts (campaign_id, bucket, n)"
            " SELECT r.campaign_id, d.bucket, sum(d.delta) FROM unnest($1::text[], $2::text[],"
            " $3::text[]) AS k(message_id, old, new) JOIN campaign_recipients r"
            " ON r.message_id = k.message_id"
            " CROSS JOIN LATERAL (VALUES (k.old, -1), (k.new, 1), ($4, 1)) AS d(bucket, delta)"
            " GROUP BY r.campaign_id, d.bucket ORDER BY r.campaign_id, d.bucket"
            " ON CONFLICT (campaign_id, bucket) DO UPDATE SET n = campaign_counts.n + excluded.n",
            [m for m, _, _ in moves],
            [old for _, old, _ in moves],
            [new for _, _, new in moves],
            campaigns.CHANGES,
        )


async def _add_outbox(
    conn: _Connection, entries: Sequence[OutboxEntry], relayed_run: str | None = None
) -> None:
    if entries:
        now = utcnow()
        await conn.executemany(
            "INSERT INTO outbox (topic, key, payload, done_key, created_at, relayed_run)"
            " VALUES ($1, $2, $3, $4, $5, $6)",
            [(e.topic, e.key, e.payload, e.done_key, now, relayed_run) for e in entries],
        )


async def _latest_conversation(conn: _Connection, inbound: InboundMessage) -> Conversation:
    """The organization's latest conversation with the contact on the channel, or a new
    one (inside the caller's transaction). Two made in the same millisecond are told
    apart by the order they were made in (`made`)."""
    select = (
        "SELECT * FROM conversations WHERE channel = $1 AND contact = $2 AND org_id = $3"
        " ORDER BY created_at DESC, made DESC LIMIT 1"
    )
    keys = (inbound.channel, inbound.contact, inbound.account_org_id)
    row = await conn.fetchrow(select, *keys)
    if row is not None:
        return _conversation(row)
    conversation = common.inbound_conversation(inbound)
    await _ensure_organization(conn, conversation.org_id)
    await conn.execute(
        "INSERT INTO conversations (id, org_id, channel, contact, last_seq, created_at)"
        " VALUES ($1, $2, $3, $4, 0, $5) ON CONFLICT (id) DO NOTHING",
        conversation.id,
        conversation.org_id,
        conversation.channel,
        conversation.contact,
        conversation.created_at,
    )
    row = await conn.fetchrow(select, *keys)
    return _conversation(row) if row is not None else conversation


async def _campaign(conn: _Connection, row: asyncpg.Record) -> Campaign:
    counts = await conn.fetch(
        "SELECT bucket, n FROM campaign_counts WHERE campaign_id = $1", row["id"]
    )
    return common.campaign_of(row, _time, {str(c["bucket"]): int(c["n"]) for c in counts})


async def _conversations_with(
    conn: _Connection, campaign: Campaign, contacts: list[str]
) -> list[Conversation]:
    """For each contact, the organization's oldest conversation with it on the campaign's
    channel, or a new one (inserted here)."""
    found = {
        str(row["contact"]): _conversation(row)
        for row in await conn.fetch(
            "SELECT DISTINCT ON (contact) * FROM conversations WHERE channel = $1"
            " AND contact = ANY($2::text[]) AND org_id = $3"
            " ORDER BY contact, created_at, made",
            campaign.channel,
            contacts,
            campaign.org_id,
        )
    }
    new = [
        common.new_conversation(campaign.org_id, campaign.channel, contact)
        for contact in contacts
        if contact not in found
    ]
    if new:
        await conn.executemany(
            "INSERT INTO conversations (id, org_id, channel, contact, last_seq, created_at)"
            " VALUES ($1, $2, $3, $4, 0, $5)",
            [(c.id, c.org_id, c.channel, c.contact, c.created_at) for c in new],
        )
        found.update((c.contact, c) for c in new)
    return [found[contact] for contact in contacts]


async def _ensure_organization(conn: _Connection, org_id: str) -> None:
    await conn.execute(
        "INSERT INTO organizations (id, created_at) VALUES ($1, $2) ON CONFLICT DO NOTHING",
        org_id,
        utcnow(),
    )


async def _by_provider_id(
    conn: _Connection, channel: str, provider_message_id: str
) -> Message | None:
    row = await conn.fetchrow(
        f"SELECT {MESSAGE_COLUMNS} FROM provider_ids p JOIN messages m ON m.id = p.message_id"
        " WHERE p.channel = $1 AND p.provider_message_id = $2",
        channel,
        provider_message_id,
    )
    return _message(row) if row else None


async def _subscription_changes(
    conn: _Connection, read: SubscriptionRead, limit: int
) -> Changes | None:
    last_seq: int | None = await conn.fetchval(
        "SELECT last_seq FROM conversations WHERE id = $1 AND org_id = $2",
        read.conversation_id,
        read.org_id,
    )
    if last_seq is None:
        return None
    since = last_seq if read.since is None else read.since
    return await _changes_up_to(conn, read.conversation_id, since, last_seq, limit)


async def _changes_up_to(
    conn: _Connection, conversation_id: str, since: int, last_seq: int, limit: int
) -> Changes:
    """A conversation's changes after `since`, bounded by the `last_seq` its caller read:
    changes committed since then are left for the next call, so `frames` and `last_seq`
    always agree."""
    answer = common.changes_window(last_seq, since, limit)
    if answer is not None:
        return answer
    rows = await conn.fetch(
        "SELECT frame FROM changes WHERE conversation_id = $1 AND seq > $2"
        " AND seq <= $3 ORDER BY seq",
        conversation_id,
        since,
        last_seq,
    )
    return common.changes(last_seq, since, common.frames_of(rows))


async def _reset(conn: asyncpg.Connection) -> None:
    """What a connection needs before it goes back to the pool, past what asyncpg does with
    a custom reset anyway (it rolls back a transaction left open): nothing. asyncpg's default
    reset is a round trip on every release (UNLISTEN, RESET ALL, advisory unlocks, CLOSE
    ALL) for session state this store never creates; a profile of the connector found it
    at 12 % of the process's samples."""
    return None


async def _parked(conn: _Connection, channel: str, provider_message_id: str) -> list[ParkedStatus]:
    """The statuses parked for a provider id (they arrived before its send answer)."""
    rows = await conn.fetch(
        "SELECT id, payload FROM parked_statuses WHERE channel = $1 AND provider_message_id = $2",
        channel,
        provider_message_id,
    )
    return common.parked_of(channel, provider_message_id, rows)


#: How many calls of one kind share a statement or transaction at most.
_GROUP_LIMIT = 256


@dataclass(frozen=True, slots=True)
class _Handoff:
    entries: tuple[OutboxEntry, ...]
    done: tuple[tuple[str, str], ...]
    parked: tuple[tuple[str, str], ...]
    relayed_run: str | None
    claim_s: float | None


#: The outbox entries of a group of hand-offs, in order (a claim with `claim_s`), and
#: their ids by position (n): each id is drawn once (the CTE is materialized), in order.
_ADD_OUTBOX = """
WITH e AS MATERIALIZED (
    SELECT nextval('outbox_id_seq') AS id, e.*
    FROM unnest($1::text[], $2::text[], $3::bytea[], $4::text[], $5::text[], $7::float8[])
        WITH ORDINALITY AS e(topic, key, payload, done_key, relayed_run, claim_s, n)
), added AS (
    INSERT INTO outbox (id, topic, key, payload, done_key, created_at, relayed_run,
        claimed_until)
    SELECT id, topic, key, payload, done_key, $6, relayed_run,
        now() + make_interval(secs => claim_s)
    FROM e ORDER BY n
)
SELECT id, n FROM e
"""


class _OneByOne(Exception):
    """A group that cannot share one transaction: its calls are made one by one."""


def _group(many: Callable[[list[A]], Awaitable[list[R]]], name: str) -> Grouped[A, R | Failed]:
    """Group commit of one kind of call (whatslike/grouping.py): the calls made while
    the last group ran share one statement or transaction, and every caller is answered
    after its commit. An outage fails the whole group (nothing of it was committed, each
    caller retries). Anything else, a row lock not free within `lock_timeout` included,
    belongs to one call, not to all: the group is then made again call by call, each in
    its own transaction, and only the call that fails gets its error."""

    async def run(items: list[A]) -> list[R | Failed]:
        try:
            return list(await many(items))
        except BackendUnavailable as exc:
            lock_wait = isinstance(exc.__cause__, asyncpg.exceptions.LockNotAvailableError)
            if len(items) == 1 or not lock_wait:
                raise
        except Exception:
            if len(items) == 1:
                raise
        outcomes: list[R | Failed] = []
        for item in items:
            try:
                outcomes.extend(await many([item]))
            except Exception as exc:
                outcomes.append(Failed(exc))
        return outcomes

    return Grouped(run, name, _GROUP_LIMIT)


async def _one(group: Grouped[A, R | Failed], item: A) -> R:
    """One call through its group: its own answer, or its own error."""
    outcome = await group(item)
    if isinstance(outcome, Failed):
        raise outcome.error
    return outcome


async def _queue_webhooks(
    conn: _Connection,
    changes: Sequence[tuple[str, int, str, str, str]],
    messages: dict[str, Message],
) -> None:
    """The outbound webhook hook of changes (conversation, seq, message id, event id,
    frame): one delivery per endpoint of each message's organization, in the transaction
    that applies them (see whatslike/webhooks)."""
    now = utcnow()
    kinds = [event_type(c[4]) for c in changes]
    await conn.execute(
        "INSERT INTO webhook_deliveries (endpoint_id, conversation_id, seq, event_type, body,"
        " created_at, next_at) SELECT e.id, c.conversation_id, c.seq, c.kind, c.body, $6, $6"
        " FROM unnest($1::text[], $2::text[], $3::bigint[], $4::text[], $5::bytea[])"
        " WITH ORDINALITY AS c(org_id, conversation_id, seq, kind, body, n)"
        " JOIN webhook_endpoints e ON e.org_id = c.org_id ORDER BY c.n, e.id",
        [messages[c[2]].org_id for c in changes],
        [c[0] for c in changes],
        [c[1] for c in changes],
        kinds,
        [event_body(kind, c[4], now) for kind, c in zip(kinds, changes, strict=True)],
        now,
    )


def _endpoint(row: asyncpg.Record) -> WebhookEndpoint:
    return WebhookEndpoint(
        id=row["id"],
        org_id=row["org_id"],
        url=row["url"],
        secret=row["secret"],
        created_at=row["created_at"],
        previous_secret=row["previous_secret"],
        previous_until=row["previous_until"],
    )


def _delivery(row: asyncpg.Record) -> WebhookDelivery:
    return WebhookDelivery(
        id=int(row["id"]),
        endpoint_id=row["endpoint_id"],
        conversation_id=row["conversation_id"],
        seq=int(row["seq"]),
        event_type=row["event_type"],
        body=bytes(row["body"]),
        attempts=int(row["attempts"]),
        created_at=row["created_at"],
        next_at=row["next_at"],
        parked_at=row["parked_at"],
        last_error=row["last_error"],
    )
