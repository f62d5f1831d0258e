"""The `Store` port on Apache Cassandra (cassandra-driver), for many processes.

Cassandra has no multi-partition transactions, so every rule that PostgreSQL keeps with a
transaction is kept here by a lightweight transaction (Paxos) on ONE partition:

- A conversation's seqs: a change row ``changes((conversation_id, bucket), seq)`` is
  inserted ``IF NOT EXISTS`` with ``seq = last + 1`` after reading ``last``. The row *is*
  the claim of its seq and carries its frame, so a seq is never taken without its change
  (no gap, even on a crash), and two workers never take the same one. Buckets of
  `bucket_size` seqs keep the partitions bounded.
- A message's statuses: the message row carries a ``version``; each update is
  conditional on it. A change first writes the new state with a *pending* marker (the
  event, the time), then claims the seq and records it under the message
  (``message_changes``): the record completes the change. The marker stays on the row
  until the next change of the message clears it (and writes the seq): a reader that
  finds a marker looks for its record; without one, the change is under way, and it
  waits, or — after `pending_lease` (its writer died) — completes it. Two lightweight
  transactions per change, not three.
- A provider id and its parked statuses share one partition: the link is a static
  column set ``IF message_id = null`` and parking is conditional on it, so a status is
  either parked before the link (and the link returns it) or refused after it.

- A send claim: one LWT on the message row, ``IF send_started_at = null AND
  provider_message_id = null AND status = 'PENDING'``: of concurrent claims one applies.
  It writes a claim id of its own (``send_claim``): a claim that timed out at the client
  but was applied is recognized by the read that follows as ours, not someone else's.

Where no condition is needed, several partitions change together in a LOGGED batch (all
of it, or — until the batch log replays it — none): a new message with its place in the
conversation, its outbox entry and its watchdog entry; a `handoff`. The outbox lives in
partitions of `index_bucket` of insertion time, ids are microseconds times a million
plus the writer's random node (increasing in insertion order, varint); a relay claims an
entry by an LWT on its lease (``IF claimed_until = <as read>``), the entries of one
bucket (one partition) together, in one conditional batch. A status's outbox entry
is completed right after its change is stored; a crash in between leaves it, and its
redelivery is a replay (found by event id) that completes it. The watchdog's index
(kind, time bucket) is written before each change of a message and its old entry
removed after; an entry whose message moved on is dropped when the watchdog reads it.

Outbound webhooks (whatslike/webhooks), where PostgreSQL has one transaction:

- A change's deliveries (one per endpoint of its organization, read beside the seq claim)
  go in ONE logged batch with the record that completes the change (`message_changes`):
  the change is complete with its deliveries or not at all, and it is complete before
  `apply_status` returns, so before the status worker completes the event (outbox entry,
  bus offset). A change left incomplete by a crash is completed by its event's
  redelivery, which writes the same rows again: a delivery's key is (endpoint,
  conversation, seq) and its id a hash of that key, so nothing is queued twice. An
  endpoint added or deleted while a change is applied is seen by it or not, as if it
  came before or after; a delivery written for an endpoint deleted meanwhile is never
  leased (the endpoint is gone from the senders' list) nor measured.
- An endpoint's deliveries are one partition keyed (conversation, seq), so the first row
  of each conversation (``GROUP BY``) is its head: per-conversation order. Parked ones
  are moved to a partition of their own (a logged batch), so heads are never parked.
- A sender leases an endpoint by a lightweight transaction on its lease row, conditional
  on the lease as read: of two senders one wins, and only the holder writes the
  endpoint's deliveries (delivered: deleted; failed: written whole, or moved to parked),
  so those writes need no condition. A lease that lapses is taken over as on PostgreSQL.
- The limit of endpoints per organization: an add is a lightweight transaction on the
  organization's partition, conditional on its add count (a static column) read with the
  endpoints; a delete and a rotation are lightweight transactions too, so their write
  times are ordered with the adds' (Paxos ballots), not by the clients' clocks.

Campaigns (whatslike/campaigns), where PostgreSQL has one transaction:

- A create writes the recipients first (under a fresh id: nothing names them yet), then
  claims the organization's key by a lightweight transaction carrying the campaign's
  definition, then writes the campaign's row and its place among the running ones. Of
  concurrent creates one claims the key; the others drop their recipients and answer its
  campaign. A create that died after its claim is completed by the next with the key.
- A step claims its recipients (up to its limit, from the campaign's `created`) by one
  conditional batch on the recipients' partition, ``IF message_id = null`` each: of
  concurrent steps one wins, the others do nothing. The claim records each message's id,
  conversation and time, so its message — one logged batch with its hand-off (an outbox
  id made of its time and id), its list and watchdog entries, its row of the counts and
  its channel's backlog — is the same rows whoever writes it; a claim left by a step that
  died is completed after `pending_lease` by the next (messages that exist are left
  alone), and `created` moves on by a lightweight transaction. A conversation the
  organization lacks with a contact is made with an id of (organization, channel,
  contact), as for a customer's first message: concurrent steps make one.
- The counts are not counters (a counter is not idempotent): each campaign message has one
  row in its campaign's partition (``campaign_buckets``: its bucket), written with a
  write time of its version at that state plus one (`moved`), so the latest state wins
  whatever the order of the writes, and writing it again changes nothing. A status change
  writes it before the record that completes the change (a change completed after a crash
  writes it again); a silent change (FILLED: a FAILED message's error) after its write,
  repaired by the event's redelivery (a NOOP that finds its row stale). The counts are
  counted on read (a campaign's partition: at most `MAX_CONTACTS` rows); the version is
  the sum of the rows' `moved`, which grows with every row written anew.
- The backlog (PENDING campaign messages of a channel): a row per message in a partition
  of (channel, `index_bucket` of its creation), deleted (with the move's write time, so a
  completed step's batch never brings it back) when it leaves PENDING; a count of each
  listed bucket, the buckets found empty leaving the list.

Partitions are bounded: messages, provider ids and conversations are one row each; a
conversation's message list is bucketed by month, its changes by `bucket_size` seqs, its
unread (accepted, not READ) messages are removed when READ; dead letters by day; the
outbox and the watchdog's index by `index_bucket` of time (their lists of buckets lose
the buckets found empty). Not bounded by time: an endpoint's queued deliveries (what
waits for it: at most the retry period's worth, `WEBHOOK_RETRY_FOR_S`) and its parked
ones (until replayed or the endpoint deleted); the senders' list of endpoints (one
partition, `WEBHOOK_ENDPOINTS_PER_ORG` per organization); the running campaigns (one
partition, the campaigns with messages still to create). A campaign's recipients and
counts are `MAX_CONTACTS` rows at most; a channel's backlog is bucketed by time.

Reads are at the consistency of writes, not SERIAL (a serial read is a Paxos round):
they see every lightweight transaction that answered, and a read that missed one still
under way leads to a transaction that completes it first and is refused. Serial reads
are kept where no transaction follows: telling a send claim whose answer was lost, and
finding the seq a dead worker claimed.

Durability and availability: writes are QUORUM and lightweight transactions SERIAL by
default (``?consistency=LOCAL_QUORUM&serial_consistency=LOCAL_SERIAL`` in the URL for
several data centres), so with ``replication_factor=3`` a node may be lost; a write is
durable when acknowledged only if the nodes sync their commit log before answering
(``commitlog_sync: batch`` or ``group``: see the README). An unreachable or timing-out
cluster is `BackendUnavailable` (a 503, a retry), and the driver tries a lost node again
every `_RECONNECT_S`.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import re
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, urlsplit

from cassandra import (
    ConsistencyLevel,
    DriverException,
    OperationTimedOut,
    ReadTimeout,
    Unavailable,
    WriteTimeout,
)
from cassandra.cluster import (
    EXEC_PROFILE_DEFAULT,
    Cluster,
    ExecutionProfile,
    NoHostAvailable,
    ResponseFuture,
    Session,
)
from cassandra.connection import ConnectionException
from cassandra.policies import (
    ConstantReconnectionPolicy,
    DCAwareRoundRobinPolicy,
    TokenAwarePolicy,
)
from cassandra.query import (
    BatchStatement,
    BatchType,
    PreparedStatement,
    SimpleStatement,
    dict_factory,
)
from cassandra.util import datetime_from_uuid1

from whatslike.campaigns import CHANGES, bucket_of
from whatslike.clock import new_id, utcnow
from whatslike.errors import BackendUnavailable, ConfigError
from whatslike.events import TOPIC_MESSAGES, TOPIC_STATUS, StatusEvent
from whatslike.status import rules
from whatslike.status.rules import Effect, Status
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
from whatslike.webhooks.core import event_body, event_type

log = logging.getLogger(__name__)

Row = dict[str, Any]
#: A prepared statement's name and its parameters, for a logged batch.
Step = tuple[str, Sequence[Any]]

#: Outbox ids are the insertion time in microseconds times this, plus the writer's node.
_NODES = 1_000_000
#: How far this host's clock may run ahead of Cassandra's; see `_written_at`.
_INSERT_SKEW_US = 1_000_000
#: How long after its end an empty bucket of the outbox or the watchdog's index may still
#: receive a write (a slow writer, a batch replayed from the batch log); see `_prune_after`.
_PRUNE_GRACE = timedelta(minutes=10)
#: Rows read per query when scanning the outbox.
_OUTBOX_PAGE = 500
#: Outbox entries claimed by one lightweight transaction (a conditional batch).
_CLAIM_BATCH = 100
#: Claimed entries whose topic and done key are kept for their delete (`_claimed`).
_CLAIMS_KEPT = 10_000
#: A campaign's recipients written per batch (one partition; well below the server's
#: batch size limits).
_RECIPIENTS_BATCH = 100

#: Failures that mean the cluster is out of reach or cannot answer now (too few replicas
#: up, a timeout), not a bug: the caller may retry. A timed-out write may have applied.
_OUTAGES = (
    NoHostAvailable,
    OperationTimedOut,
    Unavailable,
    ReadTimeout,
    WriteTimeout,
    ConnectionException,
    OSError,
)
#: How often the driver tries a node it lost again (its default backs off to 10 min).
_RECONNECT_S = 1.0
#: How many times a send claim whose outcome is unknown (the answer was lost) is looked
#: at again before the outage is reported; see `CassandraStore.begin_send`.
_CLAIM_TRIES = 8
#: The consistency levels the URL may name: any that keeps a quorum.
_CONSISTENCY = {
    name: getattr(ConsistencyLevel, name)
    for name in ("QUORUM", "LOCAL_QUORUM", "EACH_QUORUM", "ALL")
}
_SERIAL_CONSISTENCY = {name: getattr(ConsistencyLevel, name) for name in ("SERIAL", "LOCAL_SERIAL")}

_DEFAULT_PORT = 9042
#: Cassandra 4.0 and later speak native protocol v5 (per-statement keyspaces).
_PROTOCOL_VERSION = 5
_KEYSPACE = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,47}")

#: Migration n (1-based) brings the schema from version n-1 to n.
_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE IF NOT EXISTS conversations (
            id text PRIMARY KEY, org_id text, channel text, contact text,
            created_at timestamp)""",
        # The latest seq a worker saw, written with the seq as its write time so the
        # highest wins: where the search for the conversation's last change starts.
        """CREATE TABLE IF NOT EXISTS seq_hints (
            conversation_id text PRIMARY KEY, last_seq bigint)""",
        """CREATE TABLE IF NOT EXISTS messages (
            id text PRIMARY KEY, conversation_id text, org_id text, channel text,
            text text, client_message_id text, created_at timestamp, status text,
            seq bigint, sent_at timestamp, delivered_at timestamp, read_at timestamp,
            failed_at timestamp, error_code text, error_title text,
            provider_message_id text, version bigint,
            pending_event text, pending_at timestamp, pending_floor bigint,
            pending_since timestamp)""",
        """CREATE TABLE IF NOT EXISTS client_message_ids (
            conversation_id text, client_message_id text, message_id text,
            PRIMARY KEY ((conversation_id, client_message_id)))""",
        """CREATE TABLE IF NOT EXISTS conversation_months (
            conversation_id text, month int, PRIMARY KEY (conversation_id, month))""",
        """CREATE TABLE IF NOT EXISTS conversation_messages (
            conversation_id text, month int, created_at timestamp, id text,
            PRIMARY KEY ((conversation_id, month), created_at, id))""",
        """CREATE TABLE IF NOT EXISTS unread (
            conversation_id text, created_at timestamp, id text,
            PRIMARY KEY (conversation_id, created_at, id))""",
        """CREATE TABLE IF NOT EXISTS changes (
            conversation_id text, bucket bigint, seq bigint, message_id text,
            event_id text, frame text,
            PRIMARY KEY ((conversation_id, bucket), seq))""",
        """CREATE TABLE IF NOT EXISTS message_changes (
            message_id text, event_id text, seq bigint, frame text,
            PRIMARY KEY (message_id, event_id, seq))""",
        """CREATE TABLE IF NOT EXISTS provider_keys (
            channel text, provider_message_id text, message_id text STATIC,
            parked_id timeuuid, payload blob, parked_at timestamp,
            PRIMARY KEY ((channel, provider_message_id), parked_id))""",
        """CREATE TABLE IF NOT EXISTS parked_days (
            one int, day date, PRIMARY KEY (one, day))""",
        """CREATE TABLE IF NOT EXISTS parked_by_day (
            day date, parked_at timestamp, channel text, provider_message_id text,
            parked_id timeuuid,
            PRIMARY KEY (day, parked_at, channel, provider_message_id, parked_id))""",
        """CREATE TABLE IF NOT EXISTS dead_letters (
            day date, id timeuuid, topic text, payload blob, reason text,
            PRIMARY KEY (day, id))""",
        """CREATE TABLE IF NOT EXISTS dead_letter_totals (one int PRIMARY KEY, n counter)""",
    ),
    (
        "ALTER TABLE messages ADD IF NOT EXISTS send_started_at timestamp",
        "ALTER TABLE messages ADD IF NOT EXISTS updated_at timestamp",
        # The outbox, one partition per `index_bucket` of insertion time; ids increase in
        # insertion order (microseconds, then the writer's random node number).
        """CREATE TABLE IF NOT EXISTS outbox (
            bucket bigint, id varint, topic text, key text, payload blob, done_key text,
            relayed_run text, claimed_until timestamp, PRIMARY KEY (bucket, id))""",
        """CREATE TABLE IF NOT EXISTS outbox_done (
            done_key text, topic text, id varint, PRIMARY KEY ((done_key, topic), id))""",
        """CREATE TABLE IF NOT EXISTS outbox_buckets (
            one int, bucket bigint, PRIMARY KEY (one, bucket))""",
        # The watchdog's index: messages by kind (pending, unknown, sent) and the time
        # they stopped moving, one partition per kind and `index_bucket`.
        """CREATE TABLE IF NOT EXISTS stuck_entries (
            kind text, bucket bigint, at timestamp, message_id text,
            PRIMARY KEY ((kind, bucket), at, message_id))""",
        """CREATE TABLE IF NOT EXISTS stuck_buckets (
            kind text, bucket bigint, PRIMARY KEY (kind, bucket))""",
    ),
    # A channel's conversations with one contact, for read watermarks. Conversations
    # made before this migration are not in it: their watermark reads apply nothing.
    (
        """CREATE TABLE IF NOT EXISTS contact_conversations (
            channel text, contact text, conversation_id text,
            PRIMARY KEY ((channel, contact), conversation_id))""",
    ),
    # Who made a send claim: one id per attempt.
    ("ALTER TABLE messages ADD IF NOT EXISTS send_claim uuid",),
    # Customers' messages: "in"; null (every message before them) is an agent's. And when
    # each conversation's customer last wrote (the customer service window), written with
    # that time as its write time, so the latest wins whatever the order of arrival.
    (
        "ALTER TABLE messages ADD IF NOT EXISTS direction text",
        """CREATE TABLE IF NOT EXISTS inbound_times (
            conversation_id text PRIMARY KEY, last_at timestamp)""",
    ),
    # The medium a message carries (whatslike/media).
    ("ALTER TABLE messages ADD IF NOT EXISTS media_id text",),
    # The WhatsApp template a message is (whatslike/templates); Instagram's message tag.
    (
        "ALTER TABLE messages ADD IF NOT EXISTS template text",
        "ALTER TABLE messages ADD IF NOT EXISTS message_tag text",
    ),
    # inbound-media: a customer's medium as Meta described it, and its fetch's state.
    ("ALTER TABLE messages ADD IF NOT EXISTS inbound_media text",),
    # Outbound webhooks (whatslike/webhooks): an organization's endpoints in its one
    # partition (`version` counts its adds: the limit's lightweight transaction), every
    # endpoint in one list for the senders, their leases, and the deliveries of each
    # endpoint in its partition (parked ones apart), found by id through an index.
    (
        """CREATE TABLE IF NOT EXISTS org_webhook_endpoints (
            org_id text, id text, version bigint STATIC, url text, secret text,
            previous_secret text, previous_until timestamp, created_at timestamp,
            PRIMARY KEY (org_id, id))""",
        """CREATE TABLE IF NOT EXISTS webhook_endpoint_list (
            one int, id text, org_id text, PRIMARY KEY (one, id))""",
        """CREATE TABLE IF NOT EXISTS webhook_leases (
            endpoint_id text PRIMARY KEY, owner text, until timestamp)""",
        """CREATE TABLE IF NOT EXISTS webhook_deliveries (
            endpoint_id text, conversation_id text, seq bigint, id bigint, event_type text,
            body blob, attempts int, created_at timestamp, next_at timestamp, last_error text,
            PRIMARY KEY (endpoint_id, conversation_id, seq))""",
        """CREATE TABLE IF NOT EXISTS webhook_parked (
            endpoint_id text, conversation_id text, seq bigint, id bigint, event_type text,
            body blob, attempts int, created_at timestamp, next_at timestamp, last_error text,
            parked_at timestamp, PRIMARY KEY (endpoint_id, conversation_id, seq))""",
        """CREATE TABLE IF NOT EXISTS webhook_delivery_ids (
            id bigint PRIMARY KEY, endpoint_id text, conversation_id text, seq bigint)""",
    ),
    # Campaigns (whatslike/campaigns): a campaign's definition under its key (the
    # idempotency claim) and its id, its recipients in its partition (each claimed with
    # its message id), the campaigns with messages still to create, the bucket of each of
    # its messages (counted on read), and the PENDING campaign messages of each channel
    # by `index_bucket` of their creation. A campaign message names its campaign.
    (
        "ALTER TABLE messages ADD IF NOT EXISTS campaign_id text",
        """CREATE TABLE IF NOT EXISTS campaign_keys (
            org_id text, client_campaign_id text, campaign_id text, fingerprint text,
            channel text, text text, template text, total int, created_at timestamp,
            PRIMARY KEY ((org_id, client_campaign_id)))""",
        """CREATE TABLE IF NOT EXISTS campaigns (
            id text PRIMARY KEY, org_id text, client_campaign_id text, fingerprint text,
            channel text, text text, template text, total int, created int,
            created_at timestamp)""",
        """CREATE TABLE IF NOT EXISTS campaigns_running (
            one int, created_at timestamp, id text, PRIMARY KEY (one, created_at, id))""",
        """CREATE TABLE IF NOT EXISTS campaign_recipients (
            campaign_id text, position int, contact text, message_id text,
            conversation_id text, claimed_at timestamp, PRIMARY KEY (campaign_id, position))""",
        """CREATE TABLE IF NOT EXISTS campaign_buckets (
            campaign_id text, message_id text, bucket text, moved bigint,
            PRIMARY KEY (campaign_id, message_id))""",
        """CREATE TABLE IF NOT EXISTS campaign_pending (
            channel text, bucket bigint, message_id text,
            PRIMARY KEY ((channel, bucket), message_id))""",
        """CREATE TABLE IF NOT EXISTS campaign_pending_buckets (
            channel text, bucket bigint, PRIMARY KEY (channel, bucket))""",
    ),
    # When a conversation was made, to a tenth of a microsecond (a version-1 UUID, in
    # the order one process made them): which of two made in the same millisecond is
    # the later. Conversations made before it have none and tie as before, by id.
    ("ALTER TABLE conversations ADD IF NOT EXISTS made timeuuid",),
)

_PENDING_COLUMNS = ("pending_event", "pending_at", "pending_floor", "pending_since")
_MESSAGE_COLUMNS = (
    "id, conversation_id, org_id, channel, text, client_message_id, created_at, status,"
    " seq, sent_at, delivered_at, read_at, failed_at, error_code, error_title,"
    " provider_message_id, version, pending_event, pending_at, pending_floor, pending_since,"
    " send_started_at, updated_at, send_claim, direction, media_id,"
    " template, message_tag, inbound_media, campaign_id"
)
_STATE = (
    "status = ?, sent_at = ?, delivered_at = ?, read_at = ?, failed_at = ?,"
    " error_code = ?, error_title = ?, updated_at = ?"
)

#: Every statement, prepared once at `open`.
_CQL = {
    "conversation": "SELECT * FROM conversations WHERE id = ?",
    "insert_conversation": (
        "INSERT INTO conversations (id, org_id, channel, contact, created_at, made)"
        " VALUES (?, ?, ?, ?, ?, ?)"
    ),
    "index_contact": (
        "INSERT INTO contact_conversations (channel, contact, conversation_id) VALUES (?, ?, ?)"
    ),
    "contact_conversations": (
        "SELECT conversation_id FROM contact_conversations WHERE channel = ? AND contact = ?"
    ),
    "open_conversation": (
        "INSERT INTO conversations (id, org_id, channel, contact, created_at, made)"
        " VALUES (?, ?, ?, ?, ?, ?) IF NOT EXISTS"
    ),
    "receive_message": (
        "INSERT INTO messages (id, conversation_id, org_id, channel, text, client_message_id,"
        " created_at, status, updated_at, provider_message_id, direction, inbound_media,"
        " version) VALUES (?, ?, ?, ?, ?, '', ?, ?, ?, ?, ?, ?, 0) IF NOT EXISTS"
    ),
    # A lightweight transaction like the row's other writes (none is versioned: a status
    # change under way keeps its version).
    "set_inbound_media": (
        "UPDATE messages SET inbound_media = ?, media_id = ? WHERE id = ? IF direction = 'in'"
    ),
    "set_inbound_time": (
        "UPDATE inbound_times USING TIMESTAMP ? SET last_at = ? WHERE conversation_id = ?"
    ),
    "inbound_time": "SELECT last_at FROM inbound_times WHERE conversation_id = ?",
    "hint": "SELECT last_seq FROM seq_hints WHERE conversation_id = ?",
    "set_hint": "UPDATE seq_hints USING TIMESTAMP ? SET last_seq = ? WHERE conversation_id = ?",
    "message": f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE id = ?",
    "message_serial": f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE id = ?",
    "insert_message": (
        "INSERT INTO messages (id, conversation_id, org_id, channel, text, client_message_id,"
        " created_at, status, updated_at, media_id, template, message_tag, version)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0)"
        " IF NOT EXISTS"
    ),
    # In the logged batch of a new message: its id is fresh, or claimed by its client id.
    "add_message": (
        "INSERT INTO messages (id, conversation_id, org_id, channel, text, client_message_id,"
        " created_at, status, updated_at, media_id, template, message_tag, version)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0) USING TIMESTAMP ?"
    ),
    "claim_client_id": (
        "INSERT INTO client_message_ids (conversation_id, client_message_id, message_id)"
        " VALUES (?, ?, ?) IF NOT EXISTS"
    ),
    "add_month": "INSERT INTO conversation_months (conversation_id, month) VALUES (?, ?)",
    "months": "SELECT month FROM conversation_months WHERE conversation_id = ?",
    "list_entry": (
        "INSERT INTO conversation_messages (conversation_id, month, created_at, id)"
        " VALUES (?, ?, ?, ?)"
    ),
    "list": "SELECT id FROM conversation_messages WHERE conversation_id = ? AND month = ?",
    "add_unread": "INSERT INTO unread (conversation_id, created_at, id) VALUES (?, ?, ?)",
    "drop_unread": "DELETE FROM unread WHERE conversation_id = ? AND created_at = ? AND id = ?",
    "unread": "SELECT id FROM unread WHERE conversation_id = ? AND created_at <= ?",
    "last_change": (
        "SELECT seq FROM changes WHERE conversation_id = ? AND bucket = ? ORDER BY seq DESC LIMIT 1"
    ),
    "last_change_serial": (
        "SELECT seq FROM changes WHERE conversation_id = ? AND bucket = ? ORDER BY seq DESC LIMIT 1"
    ),
    "claim_seq": (
        "INSERT INTO changes (conversation_id, bucket, seq, message_id, event_id, frame)"
        " VALUES (?, ?, ?, ?, ?, ?) IF NOT EXISTS"
    ),
    "changes_after": (
        "SELECT seq, message_id, event_id, frame FROM changes"
        " WHERE conversation_id = ? AND bucket = ? AND seq > ? AND seq <= ?"
    ),
    "record_change": (
        "INSERT INTO message_changes (message_id, event_id, seq, frame) VALUES (?, ?, ?, ?)"
    ),
    "message_changes": (
        "SELECT seq, frame FROM message_changes WHERE message_id = ? AND event_id = ?"
    ),
    # Both clear a marker found complete, and write the seq it was given.
    "update_state": (
        f"UPDATE messages SET {_STATE}, seq = ?, version = ?, pending_event = null,"
        " pending_at = null, pending_floor = null, pending_since = null WHERE id = ?"
        " IF version = ?"
    ),
    "begin_change": (
        f"UPDATE messages SET {_STATE}, seq = ?, version = ?, pending_event = ?, pending_at = ?,"
        " pending_floor = ?, pending_since = ? WHERE id = ? IF version = ?"
    ),
    "take_over": "UPDATE messages SET version = ?, pending_since = ? WHERE id = ? IF version = ?",
    # Not versioned: it would make a status change under way fail its last step.
    "set_provider_id": (
        "UPDATE messages SET provider_message_id = ?, updated_at = ? WHERE id = ?"
        " IF provider_message_id = null"
    ),
    "replace_provider_id": (
        "UPDATE messages SET provider_message_id = ?, updated_at = ? WHERE id = ?"
        " IF provider_message_id = ?"
    ),
    "begin_send": (
        "UPDATE messages SET send_started_at = ?, updated_at = ?, send_claim = ? WHERE id = ?"
        " IF send_started_at = null AND provider_message_id = null AND status = 'PENDING'"
    ),
    "release_send": (
        "UPDATE messages SET send_started_at = null, updated_at = ?, send_claim = null"
        " WHERE id = ? IF provider_message_id = null"
    ),
    "redrive": (
        "UPDATE messages SET updated_at = ? WHERE id = ?"
        " IF send_started_at = null AND provider_message_id = null AND status = 'PENDING'"
    ),
    "history": "SELECT seq, frame FROM message_changes WHERE message_id = ?",
    "add_outbox": (
        "INSERT INTO outbox (bucket, id, topic, key, payload, done_key) VALUES (?, ?, ?, ?, ?, ?)"
    ),
    "add_outbox_relayed": (
        "INSERT INTO outbox (bucket, id, topic, key, payload, done_key, relayed_run)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)"
    ),
    "add_outbox_claimed": (
        "INSERT INTO outbox (bucket, id, topic, key, payload, done_key, claimed_until)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)"
    ),
    "add_outbox_done": "INSERT INTO outbox_done (done_key, topic, id) VALUES (?, ?, ?)",
    "add_outbox_bucket": "INSERT INTO outbox_buckets (one, bucket) VALUES (0, ?)",
    "outbox_buckets": "SELECT bucket FROM outbox_buckets WHERE one = 0",
    "drop_outbox_bucket": "DELETE FROM outbox_buckets WHERE one = 0 AND bucket = ?",
    "outbox_page": (
        "SELECT id, topic, key, payload, done_key, relayed_run, claimed_until FROM outbox"
        " WHERE bucket = ? AND id > ? LIMIT ?"
    ),
    "outbox_row": "SELECT topic, done_key FROM outbox WHERE bucket = ? AND id = ?",
    "outbox_count": "SELECT count(topic) AS n FROM outbox WHERE bucket = ?",
    "outbox_done": "SELECT id FROM outbox_done WHERE done_key = ? AND topic = ?",
    "delete_outbox": "DELETE FROM outbox WHERE bucket = ? AND id = ?",
    "delete_outbox_done": "DELETE FROM outbox_done WHERE done_key = ? AND topic = ? AND id = ?",
    # Conditional, so that a claim never brings back a deleted entry as a partial row.
    "claim_outbox": (
        "UPDATE outbox SET claimed_until = ? WHERE bucket = ? AND id = ?"
        " IF done_key = ? AND claimed_until = ?"
    ),
    "unclaim_outbox": (
        "UPDATE outbox SET claimed_until = null WHERE bucket = ? AND id = ? IF EXISTS"
    ),
    "mark_relayed": "UPDATE outbox SET relayed_run = ? WHERE bucket = ? AND id = ? IF EXISTS",
    "add_stuck": "INSERT INTO stuck_entries (kind, bucket, at, message_id) VALUES (?, ?, ?, ?)",
    "add_stuck_bucket": "INSERT INTO stuck_buckets (kind, bucket) VALUES (?, ?)",
    "stuck_buckets": "SELECT bucket FROM stuck_buckets WHERE kind = ? AND bucket <= ?",
    "drop_stuck_bucket": "DELETE FROM stuck_buckets WHERE kind = ? AND bucket = ?",
    "stuck_entries": (
        "SELECT at, message_id FROM stuck_entries WHERE kind = ? AND bucket = ? AND at < ?"
    ),
    "drop_stuck": (
        "DELETE FROM stuck_entries WHERE kind = ? AND bucket = ? AND at = ? AND message_id = ?"
    ),
    "link": (
        "UPDATE provider_keys SET message_id = ? WHERE channel = ? AND provider_message_id = ?"
        " IF message_id = null"
    ),
    "relink": (
        "UPDATE provider_keys SET message_id = ? WHERE channel = ? AND provider_message_id = ?"
    ),
    "unlink": (
        "UPDATE provider_keys SET message_id = null WHERE channel = ? AND provider_message_id = ?"
        " IF message_id = ?"
    ),
    "linked": (
        "SELECT message_id FROM provider_keys WHERE channel = ? AND provider_message_id = ? LIMIT 1"
    ),
    "parked": (
        "SELECT parked_id, payload FROM provider_keys WHERE channel = ? AND provider_message_id = ?"
    ),
    "park": (
        "UPDATE provider_keys SET payload = ?, parked_at = ? WHERE channel = ?"
        " AND provider_message_id = ? AND parked_id = ? IF message_id = null"
    ),
    "unpark": (
        "DELETE FROM provider_keys WHERE channel = ? AND provider_message_id = ? AND parked_id = ?"
    ),
    "parked_row": (
        "SELECT parked_id FROM provider_keys WHERE channel = ? AND provider_message_id = ?"
        " AND parked_id = ?"
    ),
    "add_parked_day": "INSERT INTO parked_days (one, day) VALUES (0, ?)",
    "parked_days": "SELECT day FROM parked_days WHERE one = 0 AND day <= ?",
    "drop_parked_day": "DELETE FROM parked_days WHERE one = 0 AND day = ?",
    "index_parked": (
        "INSERT INTO parked_by_day (day, parked_at, channel, provider_message_id, parked_id)"
        " VALUES (?, ?, ?, ?, ?)"
    ),
    "parked_before": (
        "SELECT parked_at, channel, provider_message_id, parked_id FROM parked_by_day"
        " WHERE day = ? AND parked_at < ?"
    ),
    "unindex_parked": (
        "DELETE FROM parked_by_day WHERE day = ? AND parked_at = ? AND channel = ?"
        " AND provider_message_id = ? AND parked_id = ?"
    ),
    "dead_letter": (
        "INSERT INTO dead_letters (day, id, topic, payload, reason) VALUES (?, now(), ?, ?, ?)"
    ),
    "count_dead_letter": "UPDATE dead_letter_totals SET n = n + 1 WHERE one = 0",
    "dead_letters": "SELECT n FROM dead_letter_totals WHERE one = 0",
    "list_dead_letters": "SELECT day, id, topic, payload, reason FROM dead_letters LIMIT ?",
    "one_dead_letter": (
        "SELECT day, id, topic, payload, reason FROM dead_letters WHERE day = ? AND id = ?"
    ),
    "ping": "SELECT release_version FROM system.local",
    # -- outbound webhooks
    "org_hooks": (
        "SELECT id, version, org_id, url, secret, previous_secret, previous_until, created_at"
        " FROM org_webhook_endpoints WHERE org_id = ?"
    ),
    "org_hook_ids": "SELECT id FROM org_webhook_endpoints WHERE org_id = ?",
    "org_hook": (
        "SELECT id, org_id, url, secret, previous_secret, previous_until, created_at"
        " FROM org_webhook_endpoints WHERE org_id = ? AND id = ?"
    ),
    "add_org_hook": (
        "UPDATE org_webhook_endpoints SET version = ?, url = ?, secret = ?, created_at = ?"
        " WHERE org_id = ? AND id = ? IF version = ?"
    ),
    "drop_org_hook": "DELETE FROM org_webhook_endpoints WHERE org_id = ? AND id = ? IF EXISTS",
    "rotate_hook": (
        "UPDATE org_webhook_endpoints SET secret = ?, previous_secret = ?, previous_until = ?"
        " WHERE org_id = ? AND id = ? IF secret = ?"
    ),
    "list_hook": "INSERT INTO webhook_endpoint_list (one, id, org_id) VALUES (0, ?, ?)",
    "unlist_hook": "DELETE FROM webhook_endpoint_list WHERE one = 0 AND id = ?",
    "hook_list": "SELECT id, org_id FROM webhook_endpoint_list WHERE one = 0",
    "hook_lease": "SELECT owner, until FROM webhook_leases WHERE endpoint_id = ?",
    "take_hook_lease": (
        "UPDATE webhook_leases SET owner = ?, until = ? WHERE endpoint_id = ? IF until = ?"
    ),
    "renew_hook_lease": "UPDATE webhook_leases SET until = ? WHERE endpoint_id = ? IF owner = ?",
    "release_hook_lease": (
        "UPDATE webhook_leases SET owner = null, until = null WHERE endpoint_id = ? IF owner = ?"
    ),
    "drop_hook_lease": "DELETE FROM webhook_leases WHERE endpoint_id = ? IF EXISTS",
    "queue_delivery": (
        "INSERT INTO webhook_deliveries (endpoint_id, conversation_id, seq, id, event_type,"
        " body, attempts, created_at, next_at, last_error) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
    ),
    "index_delivery": (
        "INSERT INTO webhook_delivery_ids (id, endpoint_id, conversation_id, seq)"
        " VALUES (?, ?, ?, ?)"
    ),
    "delivery_key": (
        "SELECT endpoint_id, conversation_id, seq FROM webhook_delivery_ids WHERE id = ?"
    ),
    "unindex_delivery": "DELETE FROM webhook_delivery_ids WHERE id = ?",
    "delivery": (
        "SELECT * FROM webhook_deliveries WHERE endpoint_id = ? AND conversation_id = ? AND seq = ?"
    ),
    # The first (lowest seq) row of each conversation: the heads of its queues.
    "delivery_heads": (
        "SELECT * FROM webhook_deliveries WHERE endpoint_id = ? GROUP BY endpoint_id,"
        " conversation_id"
    ),
    "drop_delivery": (
        "DELETE FROM webhook_deliveries WHERE endpoint_id = ? AND conversation_id = ? AND seq = ?"
    ),
    "oldest_delivery": (
        "SELECT min(created_at) AS oldest FROM webhook_deliveries WHERE endpoint_id = ?"
    ),
    "delivery_ids": "SELECT id FROM webhook_deliveries WHERE endpoint_id = ?",
    "drop_deliveries": "DELETE FROM webhook_deliveries WHERE endpoint_id = ?",
    "park_delivery": (
        "INSERT INTO webhook_parked (endpoint_id, conversation_id, seq, id, event_type, body,"
        " attempts, created_at, next_at, last_error, parked_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
    ),
    "parked_deliveries": "SELECT * FROM webhook_parked WHERE endpoint_id = ?",
    "unpark_delivery": (
        "DELETE FROM webhook_parked WHERE endpoint_id = ? AND conversation_id = ? AND seq = ?"
    ),
    "drop_parked_deliveries": "DELETE FROM webhook_parked WHERE endpoint_id = ?",
    # -- campaigns
    "campaign_key": ("SELECT * FROM campaign_keys WHERE org_id = ? AND client_campaign_id = ?"),
    "claim_campaign_key": (
        "INSERT INTO campaign_keys (org_id, client_campaign_id, campaign_id, fingerprint,"
        " channel, text, template, total, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
        " IF NOT EXISTS"
    ),
    # Written with a time of its creation, so that writing it again (a create completing
    # one whose writer died) never undoes the steps' moves of `created`.
    "add_campaign": (
        "INSERT INTO campaigns (id, org_id, client_campaign_id, fingerprint, channel, text,"
        " template, total, created, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 0, ?)"
        " USING TIMESTAMP ?"
    ),
    "campaign": "SELECT * FROM campaigns WHERE id = ?",
    "advance_campaign": "UPDATE campaigns SET created = ? WHERE id = ? IF created = ?",
    "run_campaign": "INSERT INTO campaigns_running (one, created_at, id) VALUES (0, ?, ?)",
    "running_campaigns": "SELECT created_at, id FROM campaigns_running WHERE one = 0",
    "ran_campaign": "DELETE FROM campaigns_running WHERE one = 0 AND created_at = ? AND id = ?",
    "add_recipient": (
        "INSERT INTO campaign_recipients (campaign_id, position, contact) VALUES (?, ?, ?)"
    ),
    "drop_recipients": "DELETE FROM campaign_recipients WHERE campaign_id = ?",
    "recipients_after": (
        "SELECT position, contact, message_id FROM campaign_recipients"
        " WHERE campaign_id = ? AND position > ? LIMIT ?"
    ),
    "recipients_from": (
        "SELECT position, contact, message_id, conversation_id, claimed_at"
        " FROM campaign_recipients WHERE campaign_id = ? AND position >= ? LIMIT ?"
    ),
    "claim_recipient": (
        "UPDATE campaign_recipients SET message_id = ?, conversation_id = ?, claimed_at = ?"
        " WHERE campaign_id = ? AND position = ? IF message_id = null"
    ),
    "add_campaign_message": (
        "INSERT INTO messages (id, conversation_id, org_id, channel, text, client_message_id,"
        " created_at, status, updated_at, media_id, template, message_tag, campaign_id, version)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0) USING TIMESTAMP ?"
    ),
    # A message's bucket, written with its `moved` (the message's version at the state,
    # plus one) as its write time: the latest state wins whatever the order of writes.
    "move_campaign": (
        "INSERT INTO campaign_buckets (campaign_id, message_id, bucket, moved)"
        " VALUES (?, ?, ?, ?) USING TIMESTAMP ?"
    ),
    "campaign_bucket": (
        "SELECT bucket FROM campaign_buckets WHERE campaign_id = ? AND message_id = ?"
    ),
    "campaign_buckets": "SELECT bucket, moved FROM campaign_buckets WHERE campaign_id = ?",
    "queue_campaign": (
        "INSERT INTO campaign_pending (channel, bucket, message_id) VALUES (?, ?, ?)"
        " USING TIMESTAMP 1"
    ),
    "unqueue_campaign": (
        "DELETE FROM campaign_pending USING TIMESTAMP ? WHERE channel = ? AND bucket = ?"
        " AND message_id = ?"
    ),
    "add_pending_bucket": ("INSERT INTO campaign_pending_buckets (channel, bucket) VALUES (?, ?)"),
    "pending_buckets": "SELECT bucket FROM campaign_pending_buckets WHERE channel = ?",
    "drop_pending_bucket": (
        "DELETE FROM campaign_pending_buckets WHERE channel = ? AND bucket = ?"
    ),
    "pending_count": (
        "SELECT count(*) AS n FROM campaign_pending WHERE channel = ? AND bucket = ?"
    ),
}

#: Reads that complete a lightweight transaction whose answer may have been lost (its
#: proposal accepted, not yet committed) before they read. Every other read is at the
#: consistency of writes: it sees every transaction that answered, and one that reads a
#: stale row is refused by the condition of the transaction that follows it.
_SERIAL_READS = frozenset({"message_serial", "last_change_serial"})


@dataclass(frozen=True, slots=True)
class CassandraAddress:
    """Where the store lives, parsed from ``cassandra://host[:port][,host…]/keyspace``
    with an optional ``?replication_factor=N`` (default 1) used when the keyspace is
    created (an existing keyspace keeps its own replication), ``consistency`` of reads
    and writes (QUORUM, LOCAL_QUORUM, EACH_QUORUM or ALL; default QUORUM) and
    ``serial_consistency`` of lightweight transactions (SERIAL or LOCAL_SERIAL)."""

    hosts: tuple[str, ...]
    port: int
    keyspace: str
    replication_factor: int
    consistency: str = "QUORUM"
    serial_consistency: str = "SERIAL"

    @classmethod
    def parse(cls, url: str) -> CassandraAddress:
        where = "WHATSLIKE_DATABASE_URL"
        parts = urlsplit(url)
        if parts.scheme != "cassandra" or parts.password is not None:
            raise ConfigError(f"{where}: expected cassandra://host:port/keyspace")
        hosts: list[str] = []
        port = _DEFAULT_PORT
        for item in parts.netloc.split(","):
            host, _, port_text = item.partition(":")
            if not host or (port_text and not port_text.isdigit()):
                raise ConfigError(f"{where}: bad Cassandra host {item!r}")
            hosts.append(host)
            port = int(port_text) if port_text else port
        keyspace = parts.path.lstrip("/")
        if not _KEYSPACE.fullmatch(keyspace):
            raise ConfigError(
                f"{where}: the Cassandra keyspace must be a letter then up to 47 letters,"
                f" digits or underscores, not {keyspace!r}"
            )
        query = parse_qs(parts.query)
        factor_text = query.get("replication_factor", ["1"])[-1]
        if not factor_text.isdigit() or int(factor_text) < 1:
            raise ConfigError(f"{where}: replication_factor must be a positive integer")
        consistency = query.get("consistency", ["QUORUM"])[-1].upper()
        if consistency not in _CONSISTENCY:
            raise ConfigError(f"{where}: consistency must be one of {', '.join(_CONSISTENCY)}")
        serial = query.get("serial_consistency", ["SERIAL"])[-1].upper()
        if serial not in _SERIAL_CONSISTENCY:
            raise ConfigError(
                f"{where}: serial_consistency must be one of {', '.join(_SERIAL_CONSISTENCY)}"
            )
        return cls(tuple(hosts), port, keyspace, int(factor_text), consistency, serial)

    def __str__(self) -> str:
        return f"{','.join(self.hosts)}:{self.port}/{self.keyspace}"


@dataclass(frozen=True, slots=True)
class _Pending:
    """A status change written to its message but not yet numbered: the event, the time
    of its frame, and a seq the conversation had already reached before it."""

    event_id: str
    occurred_at: datetime
    floor: int


_TABLE = re.compile(r"\b(FROM|INTO|UPDATE) (\w+)\b(?!\.)")


def _qualified(cql: str, keyspace: str) -> str:
    """The statement with its table names in `keyspace` (``system.*`` names kept)."""
    return _TABLE.sub(lambda match: f"{match[1]} {keyspace}.{match[2]}", cql)


def _time(value: datetime) -> datetime:
    # The driver reads a timestamp as a naive datetime in UTC.
    return value.replace(tzinfo=UTC)


def _ms(at: datetime) -> datetime:
    return at.replace(microsecond=at.microsecond // 1000 * 1000)


def _made() -> uuid.UUID:
    """A conversation's `made`: a version-1 UUID, whose time (in tenths of a
    microsecond) grows with each one this process makes. With a `clock_seq` given,
    `uuid.uuid1` makes it itself and keeps its times increasing; without, it may use
    the system's generator, which does not say it does."""
    return uuid.uuid1(clock_seq=random.getrandbits(14))


def _made_order(row: Row) -> tuple[datetime, int, str]:
    """Conversations in the order they were made: by time, then (within a millisecond)
    by `made`; those without one (made before it was kept) first, then by id."""
    made = row["made"]
    return row["created_at"], made.time if made is not None else -1, row["id"]


def _month(at: datetime) -> int:
    return at.year * 100 + at.month


def _message(row: Row) -> Message:
    return common.message_of(row, _time)


def _stuck_key(message: Message) -> tuple[str, datetime] | None:
    """The watchdog's kind of a message and the time it stopped moving, if of a kind."""
    if message.updated_at is None:
        return None
    if message.status is Status.PENDING:
        if message.send_started_at is None:
            return "pending", message.updated_at
        if message.provider_message_id is None:
            return "unknown", message.send_started_at
        return None
    if message.status is Status.SENT:
        return "sent", message.updated_at
    return None


def _state_values(message: Message) -> list[Any]:
    state = message.state
    error = state.error
    return [
        state.status.value,
        state.sent_at,
        state.delivered_at,
        state.read_at,
        state.failed_at,
        error.code if error else None,
        error.title if error else None,
        message.updated_at,
    ]


class CassandraStore:
    """The `Store` port on Cassandra; `url` is ``cassandra://host:port/keyspace``.

    `bucket_size` seqs share a `changes` partition; `pending_lease` is how long a
    status change may stay half-done before another worker completes it;
    `index_bucket` is the span of time one partition of the outbox and of the watchdog's
    index covers; `missing_wait` how long a send waits for its message to become
    readable (batch log replays included) before it is taken as missing."""

    def __init__(
        self,
        url: str,
        *,
        bucket_size: int = 10_000,
        pending_lease: timedelta = timedelta(seconds=10),
        request_timeout_s: float = 10.0,
        index_bucket: timedelta = timedelta(minutes=1),
        missing_wait: timedelta = timedelta(seconds=30),
    ) -> None:
        self.address = CassandraAddress.parse(url)
        self._bucket_size = bucket_size
        self._index_us = max(1, int(index_bucket / timedelta(microseconds=1)))
        # A bucket found empty leaves its list only this long after it ended: a writer
        # that picked it (or the batch log replaying that writer's batch) is done by then.
        self._prune_after = max(2 * index_bucket, _PRUNE_GRACE)
        # This writer's outbox id suffix, and the last microsecond it used.
        self._node = random.randrange(_NODES)
        self._last_us = 0
        self._lease = pending_lease
        self._missing_wait = missing_wait
        self._timeout = request_timeout_s
        self._cluster: Cluster | None = None
        self._session: Session | None = None
        self._prepared: dict[str, PreparedStatement] = {}
        self._serial = _SERIAL_CONSISTENCY[self.address.serial_consistency]
        # The outbox entries this process claimed (`claim_outbox`, `handoff` with a
        # claim) and has not deleted or given back yet: id -> (topic, done key).
        self._claimed: dict[int, tuple[str, str]] = {}

    # -- connection and schema ----------------------------------------------------------

    async def open(self) -> None:
        if self._session is None:
            try:
                self._session = await asyncio.to_thread(self._connect)
            except (NoHostAvailable, DriverException, OSError) as exc:
                raise BackendUnavailable(
                    f"cannot connect to Cassandra at {self.address}: {exc}"
                ) from exc
        await self._migrate()
        self._prepared = await asyncio.to_thread(self._prepare_all)
        await self._check_commitlog()

    async def _check_commitlog(self) -> None:
        """Say so when the node acknowledges writes before they are on disk."""
        try:
            rows = await self._cql(
                "SELECT value FROM system_views.settings WHERE name = 'commitlog_sync'",
                [],
                in_keyspace=False,
            )
        except (BackendUnavailable, DriverException):
            return  # before Cassandra 4.0 there is no such table: nothing to tell
        if rows and rows[0]["value"] == "periodic":
            log.warning(
                "Cassandra at %s runs commitlog_sync: periodic: it acknowledges writes before"
                " they are on disk, and a node that dies loses them; set commitlog_sync:"
                " batch (see the README, 'On Cassandra')",
                self.address,
            )

    def _connect(self) -> Session:
        profile = ExecutionProfile(
            load_balancing_policy=TokenAwarePolicy(DCAwareRoundRobinPolicy()),
            consistency_level=_CONSISTENCY[self.address.consistency],
            serial_consistency_level=self._serial,
            request_timeout=self._timeout,
            row_factory=dict_factory,
        )
        cluster = Cluster(
            list(self.address.hosts),
            port=self.address.port,
            execution_profiles={EXEC_PROFILE_DEFAULT: profile},
            protocol_version=_PROTOCOL_VERSION,
            connect_timeout=self._timeout,
            reconnection_policy=ConstantReconnectionPolicy(_RECONNECT_S, max_attempts=None),
        )
        try:
            session = cluster.connect()
        except BaseException:
            cluster.shutdown()
            raise
        self._cluster = cluster
        return session

    def _prepare_all(self) -> dict[str, PreparedStatement]:
        session = self._live()
        prepared = {}
        for name, cql in _CQL.items():
            # The keyspace goes with each table name, not with the session (Cassandra 5
            # warns about prepared statements that leave it to a keyspace given apart).
            statement = session.prepare(_qualified(cql, self.address.keyspace))
            if name in _SERIAL_READS:
                statement.consistency_level = self._serial
            prepared[name] = statement
        return prepared

    async def _migrate(self) -> None:
        keyspace = self.address.keyspace
        factor = self.address.replication_factor
        await self._cql(
            f"CREATE KEYSPACE IF NOT EXISTS {keyspace} WITH replication ="
            f" {{'class': 'SimpleStrategy', 'replication_factor': {factor}}}",
            [],
            in_keyspace=False,
        )
        await self._ddl(
            "CREATE TABLE IF NOT EXISTS schema_version (one int PRIMARY KEY, version int)"
        )
        rows = await self._cql("SELECT version FROM schema_version WHERE one = 0", [], serial=True)
        version = int(rows[0]["version"]) if rows else 0
        where = f"in keyspace {keyspace} at {self.address}"
        for number, statements in common.pending_migrations(version, _MIGRATIONS, where):
            # Every statement is idempotent (IF NOT EXISTS): processes starting together
            # may both run a migration; the version only moves forward.
            for statement in statements:
                await self._ddl(statement)
            await self._cql(
                "UPDATE schema_version SET version = %s WHERE one = 0 IF version = %s"
                if version
                else "INSERT INTO schema_version (one, version) VALUES (0, %s) IF NOT EXISTS",
                [number, version] if version else [number],
            )
            version = number

    async def _ddl(self, statement: str) -> None:
        await self._cql(statement, [])

    async def close(self) -> None:
        cluster, self._cluster, self._session = self._cluster, None, None
        self._prepared = {}
        if cluster is not None:
            await asyncio.to_thread(cluster.shutdown)

    async def ping(self) -> None:
        try:
            await self._run("ping")
        except (NoHostAvailable, DriverException, OSError) as exc:
            raise BackendUnavailable(f"Cassandra at {self.address} does not answer: {exc}") from exc

    def _live(self) -> Session:
        if self._session is None:
            raise BackendUnavailable(f"Cassandra at {self.address} is not open")
        return self._session

    # -- running statements -------------------------------------------------------------

    async def _run(self, name: str, *params: Any) -> list[Row]:
        """Every row of the prepared statement `name` (all pages)."""
        statement = self._prepared.get(name)
        if self._session is None or statement is None:
            raise BackendUnavailable(f"Cassandra at {self.address} is not open")
        return await self._execute(self._session.execute_async(statement, params))

    async def _cql(
        self, cql: str, params: Sequence[Any], *, serial: bool = False, in_keyspace: bool = True
    ) -> list[Row]:
        """Every row of an unprepared statement (schema work)."""
        session = self._live()
        level = self._serial if serial else None
        keyspace = self.address.keyspace if in_keyspace else None
        statement = SimpleStatement(cql, consistency_level=level, keyspace=keyspace)
        return await self._execute(session.execute_async(statement, list(params)))

    async def _execute(self, future: ResponseFuture) -> list[Row]:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[list[Row]] = loop.create_future()
        rows: list[Row] = []

        def settle(result: list[Row] | BaseException) -> None:
            if done.done():
                return
            if isinstance(result, BaseException):
                done.set_exception(result)
            else:
                done.set_result(result)

        # Called on the driver's event-loop thread, once per page (None for schema changes).
        def on_page(page: list[Row] | None) -> None:
            try:
                rows.extend(page or ())
                if future.has_more_pages:
                    future.start_fetching_next_page()
                    return
            except Exception as exc:  # the driver would swallow it, and we would hang
                loop.call_soon_threadsafe(settle, exc)
                return
            loop.call_soon_threadsafe(settle, rows)

        def on_error(exc: BaseException) -> None:
            loop.call_soon_threadsafe(settle, exc)

        future.add_callbacks(on_page, on_error)
        try:
            return await done
        except _OUTAGES as exc:
            raise BackendUnavailable(
                f"Cassandra at {self.address} is unavailable: {type(exc).__name__}"
            ) from exc

    async def _lwt(self, name: str, *params: Any) -> tuple[bool, Row]:
        """Run a conditional statement: whether it applied, and the row it found."""
        [row] = await self._run(name, *params)
        return bool(row["[applied]"]), row

    async def _batch(self, steps: Sequence[Step], *, logged: bool = True) -> None:
        """Run the steps as one logged batch: all of them happen, or (until the batch log
        replays them) none. Not `logged` (no batch log: two commit-log syncs fewer), all
        of them happened when it returns, and any of them may have when it raises: for
        steps that nothing relies on until the call has returned."""
        if not steps:
            return
        batch = BatchStatement(batch_type=BatchType.LOGGED if logged else BatchType.UNLOGGED)
        for name, params in steps:
            statement = self._prepared.get(name)
            if statement is None:
                raise BackendUnavailable(f"Cassandra at {self.address} is not open")
            batch.add(statement, params)
        await self._execute(self._live().execute_async(batch))

    # -- conversations ------------------------------------------------------------------

    async def create_conversation(self, org_id: str, channel: str, contact: str) -> Conversation:
        conversation = common.new_conversation(org_id, channel, contact)
        conversation = replace(conversation, created_at=_ms(conversation.created_at))
        await self._batch(
            [
                ("index_contact", (channel, contact, conversation.id)),
                (
                    "insert_conversation",
                    (conversation.id, org_id, channel, contact, conversation.created_at, _made()),
                ),
            ]
        )
        return conversation

    async def get_conversation(self, org_id: str, conversation_id: str) -> Conversation | None:
        rows = await self._run("conversation", conversation_id)
        if not rows or rows[0]["org_id"] != org_id:
            return None
        row = rows[0]
        return Conversation(
            row["id"],
            row["org_id"],
            row["channel"],
            row["contact"],
            await self._last_seq(conversation_id),
            _time(row["created_at"]),
        )

    # -- messages -----------------------------------------------------------------------

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
        created_at = _ms(message.created_at)
        message = replace(message, created_at=created_at, updated_at=created_at)
        if client_message_id:
            applied, row = await self._lwt(
                "claim_client_id", conversation.id, client_message_id, message.id
            )
            if not applied:
                return await self._claimed_message(conversation, message, str(row["message_id"]))
        # The id is fresh or ours by the claim above: the message, its place in the
        # conversation, its send hand-off and its watchdog entry go in one logged batch.
        await self._batch(
            [
                ("add_message", [*self._message_values(message), self._written_at(message)]),
                *self._indexed_message(conversation, message),
            ]
        )
        return message, True

    @staticmethod
    def _written_at(message: Message) -> int:
        """The write time of a new message's row (the batch's insert is the only write to
        it that is not a lightweight transaction): a skew before its creation, so that
        every change after it — timestamped by the servers' Paxos ballots — wins even
        if this host's clock runs ahead of theirs by up to that skew."""
        return int(message.created_at.timestamp() * 1_000_000) - _INSERT_SKEW_US

    def _message_values(self, message: Message) -> list[Any]:
        return [
            message.id,
            message.conversation_id,
            message.org_id,
            message.channel,
            message.text,
            message.client_message_id,
            message.created_at,
            message.status.value,
            message.updated_at,
            message.media_id,
            message.template,
            message.tag,
        ]

    def _indexed_message(
        self, conversation: Conversation, message: Message, outbox_id: int | None = None
    ) -> list[Step]:
        """What goes with a new message: its place in the conversation's list, the work
        of sending it (the outbox entry, `outbox_id` if given) and its watchdog entry."""
        month = _month(message.created_at)
        entry = common.outbound_entry(conversation, message)
        return [
            ("add_month", (message.conversation_id, month)),
            ("list_entry", (message.conversation_id, month, message.created_at, message.id)),
            *self._outbox_inserts([entry], ids=None if outbox_id is None else [outbox_id]),
            *self._stuck_inserts(message),
        ]

    async def _claimed_message(
        self, conversation: Conversation, mine: Message, claimed_id: str
    ) -> tuple[Message, bool]:
        """The message a client id was claimed for. Its writer may still be writing it:
        wait up to the lease; a writer that died meanwhile is replaced by this call."""
        deadline = utcnow() + self._lease
        while utcnow() < deadline:
            found = await self.get_message(claimed_id)
            if found is not None:
                return found, False
            await asyncio.sleep(0.05)
        message = replace(mine, id=claimed_id)
        applied, row = await self._lwt("insert_message", *self._message_values(message))
        if not applied:
            return _message(row), False
        # Only the winner of the insert adds the rest; if it dies before, the watchdog
        # finds the message PENDING with no hand-off and redrives it.
        await self._batch(self._indexed_message(conversation, message))
        return message, True

    async def receive_message(self, inbound: InboundMessage) -> Message:
        fresh = common.inbound_message(common.inbound_conversation(inbound), inbound)
        message = await self.get_message(fresh.id)
        if message is None:
            conversation = await self._latest_conversation(inbound)
            mine = replace(fresh, conversation_id=conversation.id, org_id=conversation.org_id)
            applied, row = await self._lwt(
                "receive_message",
                mine.id,
                mine.conversation_id,
                mine.org_id,
                mine.channel,
                mine.text,
                mine.created_at,
                mine.status.value,
                mine.updated_at,
                mine.provider_message_id,
                mine.direction,
                common.stored_inbound_media(mine.inbound_media),
            )
            message = mine if applied else _message(row)
        # Its place in the list after the row, and again on a redelivery (the same row
        # again): a crash in between leaves no message out of the list for good.
        month = _month(message.created_at)
        written_at = int(message.created_at.timestamp() * 1_000_000)
        await self._batch(
            [
                ("add_month", (message.conversation_id, month)),
                ("list_entry", (message.conversation_id, month, message.created_at, message.id)),
                (
                    "set_inbound_time",
                    (written_at, message.created_at, message.conversation_id),
                ),
            ]
        )
        return message

    async def set_inbound_media(
        self, message_id: str, media: InboundMedia, media_id: str | None
    ) -> None:
        await self._lwt("set_inbound_media", media.to_json(), media_id, message_id)

    async def last_inbound_at(self, conversation_id: str) -> datetime | None:
        rows = await self._run("inbound_time", conversation_id)
        return _time(rows[0]["last_at"]) if rows and rows[0]["last_at"] is not None else None

    async def _latest_conversation(self, inbound: InboundMessage) -> Conversation:
        """The organization's latest conversation with the contact on the channel (of
        those in the contact index), or a new one (`_open_conversation`)."""
        owned = await self._owned_conversations(
            inbound.account_org_id, inbound.channel, inbound.contact
        )
        if owned:
            row = max(owned, key=_made_order)
            return Conversation(
                row["id"],
                row["org_id"],
                row["channel"],
                row["contact"],
                await self._last_seq(row["id"]),
                _time(row["created_at"]),
            )
        return await self._open_conversation(
            inbound.account_org_id, inbound.channel, inbound.contact
        )

    async def _owned_conversations(self, org_id: str, channel: str, contact: str) -> list[Row]:
        """The rows of the organization's conversations with the contact on the channel
        (those in the contact index)."""
        indexed = await self._run("contact_conversations", channel, contact)
        rows = await asyncio.gather(
            *(self._run("conversation", row["conversation_id"]) for row in indexed)
        )
        return [found[0] for found in rows if found and found[0]["org_id"] == org_id]

    async def _open_conversation(self, org_id: str, channel: str, contact: str) -> Conversation:
        """The organization's new conversation with the contact: its id is made from
        them, so it is made once however many callers open it at once."""
        new = common.contact_conversation(org_id, channel, contact)
        new = replace(new, created_at=_ms(new.created_at))
        await self._run("index_contact", new.channel, new.contact, new.id)
        applied, row = await self._lwt(
            "open_conversation",
            new.id,
            new.org_id,
            new.channel,
            new.contact,
            new.created_at,
            _made(),
        )
        return new if applied else replace(new, created_at=_time(row["created_at"]))

    async def get_message(self, message_id: str) -> Message | None:
        rows = await self._run("message", message_id)
        return _message(await self._settled(rows[0])) if rows else None

    async def _settled(self, row: Row) -> Row:
        """The message row, its pending change settled if that change is complete (its
        seq claimed and recorded): the marker stays on the row until the message's next
        change, which clears it (one lightweight transaction fewer per change)."""
        event_id = row["pending_event"]
        if event_id is None:
            return row
        recorded = await self._run("message_changes", row["id"], event_id)
        if not recorded:
            return row
        seq = max(int(change["seq"]) for change in recorded)
        return {**row, "seq": seq, **dict.fromkeys(_PENDING_COLUMNS)}

    async def get_messages(self, message_ids: Sequence[str]) -> list[Message]:
        # One partition per message: concurrent reads are the one round trip here.
        found = await asyncio.gather(*(self.get_message(i) for i in dict.fromkeys(message_ids)))
        return [message for message in found if message is not None]

    async def list_messages(self, org_id: str, conversation_id: str) -> list[Message] | None:
        if await self.get_conversation(org_id, conversation_id) is None:
            return None
        months = sorted(row["month"] for row in await self._run("months", conversation_id))
        ids: list[str] = []
        for month in months:
            ids += [row["id"] for row in await self._run("list", conversation_id, month)]
        return await self.get_messages(ids)

    async def unread_up_to(self, message_id: str) -> list[Message]:
        target = await self.get_message(message_id)
        if target is None:
            return []
        rows = await self._run("unread", target.conversation_id, target.created_at)
        candidates = await self.get_messages([row["id"] for row in rows])
        return [
            message
            for message in candidates
            if (message.created_at, message.id) <= (target.created_at, target.id)
            and message.status is not Status.READ
            and message.provider_message_id is not None
        ]

    async def unread_sent_to(
        self, channel: str, contact: str, up_to: datetime, limit: int
    ) -> list[Message]:
        found: list[Message] = []
        for row in await self._run("contact_conversations", channel, contact):
            # Sent by `up_to` means created by then: the unread index is read up to it.
            unread = await self._run("unread", row["conversation_id"], up_to)
            found += [
                message
                for message in await self.get_messages([entry["id"] for entry in unread])
                if message.status is not Status.READ
                and message.provider_message_id is not None
                and message.state.sent_at is not None
                and message.state.sent_at <= up_to
            ]
        found.sort(key=lambda message: (message.created_at, message.id))
        return found[:limit]

    # -- provider ids and parked statuses -------------------------------------------------

    async def link_provider_id(
        self, channel: str, provider_message_id: str, message_id: str
    ) -> list[ParkedStatus]:
        applied, row = await self._lwt("link", message_id, channel, provider_message_id)
        linked_id = message_id if applied else str(row["message_id"])
        message = await self.get_message(linked_id)
        if message is not None and message.provider_message_id is None:
            await self._set_provider_id(message, provider_message_id)
        rows = await self._run("parked", channel, provider_message_id)
        return [
            ParkedStatus(channel, provider_message_id, bytes(row["payload"]))
            for row in rows
            if row["parked_id"] is not None
        ]

    async def link_answer(
        self, channel: str, provider_message_id: str, message_id: str
    ) -> tuple[list[ParkedStatus], str | None]:
        message = await self.get_message(message_id)
        before = message.provider_message_id if message is not None else None
        if message is None or before in (None, provider_message_id):
            return await self.link_provider_id(channel, provider_message_id, message_id), None
        # The answer's key first: a crash after it leaves the message found by both ids,
        # and the next attempt (the send's retry) finishes the move.
        await self._run("relink", message_id, channel, provider_message_id)
        now = _ms(utcnow())
        moved = replace(message, provider_message_id=provider_message_id, updated_at=now)
        await self._batch(self._stuck_inserts(moved), logged=False)
        applied, _ = await self._lwt(
            "replace_provider_id", provider_message_id, now, message_id, before
        )
        if applied:
            await self._stuck_moved(message, moved)
        await self._lwt("unlink", channel, before, message_id)
        return await self.link_provider_id(channel, provider_message_id, message_id), before

    async def _set_provider_id(self, message: Message, provider_message_id: str) -> None:
        now = _ms(utcnow())
        linked = replace(message, provider_message_id=provider_message_id, updated_at=now)
        await self._batch(self._stuck_inserts(linked), logged=False)
        applied, _ = await self._lwt("set_provider_id", provider_message_id, now, message.id)
        if applied:
            await self._stuck_moved(message, linked)
        if message.status is not Status.READ:
            await self._run("add_unread", message.conversation_id, message.created_at, message.id)

    async def expire_parked(self, before: datetime) -> int:
        expired = 0
        for day_row in await self._run("parked_days", before.date()):
            day = day_row["day"].date()
            for row in await self._run("parked_before", day, before):
                key = (row["channel"], row["provider_message_id"], row["parked_id"])
                if await self._run("parked_row", *key):
                    await self._run("unpark", *key)
                    expired += 1
                await self._run("unindex_parked", day, row["parked_at"], *key)
            if day < before.date():
                await self._run("drop_parked_day", day)
        return expired

    async def find_by_provider_id(self, channel: str, provider_message_id: str) -> Message | None:
        rows = await self._run("linked", channel, provider_message_id)
        if not rows or rows[0]["message_id"] is None:
            return None
        return await self.get_message(rows[0]["message_id"])

    async def park_status(self, parked: ParkedStatus) -> Message | None:
        parked_at = _ms(utcnow())
        parked_id = uuid.uuid1()
        key = (parked.channel, parked.provider_message_id, parked_id)
        # Indexed for expiry first: an index entry without its parked row is skipped.
        day = parked_at.date()
        await self._run("add_parked_day", day)
        await self._run("index_parked", day, parked_at, *key)
        applied, row = await self._lwt("park", parked.payload, parked_at, *key)
        if applied:
            return None
        return await self.get_message(row["message_id"])

    # -- statuses and seqs ----------------------------------------------------------------

    def _bucket(self, seq: int) -> int:
        return seq // self._bucket_size

    async def _last_seq(self, conversation_id: str, *, serial: bool = False) -> int:
        """The conversation's last seq: the highest change row, found from the hint;
        `serial`, after completing a claim whose writer may have died mid-way."""
        hints = await self._run("hint", conversation_id)
        last = int(hints[0]["last_seq"]) if hints and hints[0]["last_seq"] else 0
        bucket = self._bucket(last)
        read = "last_change_serial" if serial else "last_change"
        while True:
            rows = await self._run(read, conversation_id, bucket)
            if not rows:
                return last
            last = max(last, int(rows[0]["seq"]))
            if self._bucket(last + 1) == bucket:
                return last
            bucket += 1

    async def apply_statuses(self, events: Sequence[StatusEvent]) -> list[ApplyResult]:
        """The events of one conversation one after the other, in order; conversations
        side by side (a status is a chain of round trips, and the group commit's events
        are of many conversations). Cassandra has no transaction across partitions: if
        one raises, the events of its conversation after it are not applied, the others
        (and those before it) may be; the caller's retry finds them by event id (a replay
        that changes nothing and gives their frames back)."""
        lanes: dict[str, list[int]] = {}
        for index, event in enumerate(events):
            lanes.setdefault(event.conversation_id, []).append(index)
        results: dict[int, ApplyResult] = {}

        async def lane(indexes: list[int]) -> None:
            for index in indexes:
                results[index] = await self.apply_status(events[index])

        outcomes = await asyncio.gather(
            *(lane(indexes) for indexes in lanes.values()), return_exceptions=True
        )
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        return [results[index] for index in range(len(events))]

    async def apply_status(self, event: StatusEvent) -> ApplyResult:
        result = await self._apply(event)
        if not result.unknown_message:
            # After the change is stored, never before: an entry left by a crash in
            # between is relayed again, found applied (a replay) and completed then.
            await self._complete_outbox([(TOPIC_STATUS, event.event_id)])
        return result

    async def _apply(self, event: StatusEvent) -> ApplyResult:
        observation = common.observation_of(event)
        while True:
            rows = await self._run("message", event.message_id)
            if not rows:
                return common.UNKNOWN_MESSAGE
            row = await self._settled(rows[0])
            message, version = _message(row), int(row["version"])
            campaign_id: str | None = row["campaign_id"]
            if row["pending_event"] is not None:
                if row["pending_event"] == event.event_id or self._lease_over(row):
                    await self._take_over(row)
                else:
                    await asyncio.sleep(0.005)
                continue
            earlier = await self._run("message_changes", message.id, event.event_id)
            if earlier:
                return common.replayed(message, common.frames_of(earlier))
            transition = rules.apply(message.state, observation)
            if transition.effect is Effect.NOOP:
                if campaign_id is not None:
                    await self._repair_campaign_move(campaign_id, message, version)
                return ApplyResult(effect=Effect.NOOP, message=message)
            now = _ms(utcnow())
            updated = replace(message, state=transition.state, updated_at=now)
            # The watchdog entry of the new state first: one left by a failed write is
            # stale, and the watchdog drops it.
            await self._batch(self._stuck_inserts(updated), logged=False)
            if transition.effect is not Effect.CHANGED:
                applied, _ = await self._lwt(
                    "update_state",
                    *_state_values(updated),
                    message.seq,
                    version + 1,
                    message.id,
                    version,
                )
                if applied:
                    if campaign_id is not None and bucket_of(message.state) != bucket_of(
                        updated.state
                    ):
                        # A FAILED message's error replaced by an earlier one. A crash
                        # before this write: the event's redelivery repairs it (NOOP).
                        await self._move_campaign(
                            campaign_id, updated, version + 2, was_pending=False
                        )
                    await self._after_state(updated)
                    await self._stuck_moved(message, updated)
                    return common.applied(message, transition, message.seq, (), now)
                continue
            floor = await self._last_seq(message.conversation_id)
            applied, _ = await self._lwt(
                "begin_change",
                *_state_values(updated),
                message.seq,
                version + 1,
                event.event_id,
                observation.occurred_at,
                floor,
                utcnow(),
                message.id,
                version,
            )
            if not applied:
                continue
            pending = _Pending(event.event_id, observation.occurred_at, floor)
            moved = None if campaign_id is None else (campaign_id, version + 2)
            seq, frame = await self._complete(updated, pending, recovering=False, moved=moved)
            await self._after_state(updated)
            await self._stuck_moved(message, updated)
            return common.applied(message, transition, seq, (frame,), now)

    def _lease_over(self, row: Row) -> bool:
        since = row["pending_since"]
        return since is None or _time(since) + self._lease < utcnow()

    async def _take_over(self, row: Row) -> None:
        """Complete the half-done change of a message whose writer died (or is this very
        event, redelivered): find the seq it claimed, or claim one, then clear it."""
        version = int(row["version"])
        applied, _ = await self._lwt("take_over", version + 1, utcnow(), row["id"], version)
        if applied:
            message = _message(row)
            pending = _Pending(
                row["pending_event"], _time(row["pending_at"]), int(row["pending_floor"])
            )
            # The state was written at the row's version or before it.
            campaign_id = row["campaign_id"]
            moved = None if campaign_id is None else (campaign_id, version + 1)
            await self._complete(message, pending, recovering=True, moved=moved)
            await self._after_state(message)

    async def _complete(
        self,
        message: Message,
        pending: _Pending,
        *,
        recovering: bool,
        moved: tuple[str, int] | None = None,
    ) -> tuple[int, str]:
        """Claim the seq of the pending change (or, `recovering`, find the one claimed
        before a crash) and record it for redeliveries: the record completes the change
        (see `_settled`). The change's outbound webhook deliveries, one per endpoint of
        the message's organization, go in one logged batch with the record: a change is
        complete only with them, and one left incomplete by a crash is completed by the
        redelivery of its event (`_take_over`), which writes them again (the same rows:
        a delivery's key is its endpoint, conversation and seq). A campaign message's
        move, `moved` (its campaign and the move's `moved`), is written before the
        record, so a change is complete only once its campaign's counts have it."""

        async def claim() -> tuple[int, str]:
            claimed = await self._claimed_change(message, pending) if recovering else None
            return claimed if claimed is not None else await self._claim_seq(message, pending)

        (seq, frame), hooks = await asyncio.gather(
            claim(), self._run("org_hook_ids", message.org_id)
        )
        endpoint_ids = [str(row["id"]) for row in hooks if row["id"] is not None]
        if moved is not None:
            campaign_id, at = moved
            await self._move_campaign(campaign_id, message, at, was_pending=True)
        record: Step = ("record_change", (message.id, pending.event_id, seq, frame))
        if endpoint_ids:
            await self._batch(
                [record, *_delivery_inserts(message.conversation_id, seq, frame, endpoint_ids)]
            )
        else:
            await self._run(record[0], *record[1])
        await self._run("set_hint", seq, seq, message.conversation_id)
        return seq, frame

    async def _claimed_change(self, message: Message, pending: _Pending) -> tuple[int, str] | None:
        """The change claimed for `pending` after its floor, if its writer got that far."""
        last = await self._last_seq(message.conversation_id, serial=True)
        floor = pending.floor
        for bucket in range(self._bucket(floor + 1), self._bucket(last) + 1):
            for row in await self._run(
                "changes_after", message.conversation_id, bucket, floor, last
            ):
                if (row["message_id"], row["event_id"]) == (message.id, pending.event_id):
                    return int(row["seq"]), str(row["frame"])
        return None

    async def _claim_seq(self, message: Message, pending: _Pending) -> tuple[int, str]:
        """Insert the change as seq last + 1 if nobody took it, else retry after it:
        the row is the claim, so no seq is ever taken without its change."""
        conversation_id = message.conversation_id
        last = pending.floor
        while True:
            seq = last + 1
            frame = common.change_frame(message, message.state, seq, pending.occurred_at)
            applied, _ = await self._lwt(
                "claim_seq",
                conversation_id,
                self._bucket(seq),
                seq,
                message.id,
                pending.event_id,
                frame,
            )
            if applied:
                return seq, frame
            last = max(seq, await self._last_seq(conversation_id))

    async def _move_campaign(
        self, campaign_id: str, message: Message, moved: int, *, was_pending: bool
    ) -> None:
        """Put the campaign message in the bucket of its state: its row of the campaign's
        counts, written with `moved` (the message's version at that state, plus one) as
        its write time, so that the latest state wins however late an earlier write lands
        and a write made again is the same row. A message that was (or may have been)
        PENDING first leaves its channel's backlog: a crash between the two leaves the
        bucket's row to write, which the event's redelivery does."""
        if was_pending and message.status is not Status.PENDING:
            await self._run(
                "unqueue_campaign",
                moved,
                message.channel,
                self._index_bucket(message.created_at),
                message.id,
            )
        bucket = bucket_of(message.state)
        await self._run("move_campaign", campaign_id, message.id, bucket, moved, moved)

    async def _repair_campaign_move(self, campaign_id: str, message: Message, version: int) -> None:
        """A campaign message's status changed nothing: if its move was lost by a crash
        (after a FILLED change's write), make it now."""
        rows = await self._run("campaign_bucket", campaign_id, message.id)
        if not rows or rows[0]["bucket"] != bucket_of(message.state):
            await self._move_campaign(campaign_id, message, version + 1, was_pending=True)

    async def _after_state(self, message: Message) -> None:
        """Keep the unread index: a READ message leaves it."""
        if message.status is Status.READ and message.provider_message_id is not None:
            await self._run("drop_unread", message.conversation_id, message.created_at, message.id)

    async def changes_since(self, conversation_id: str, since: int, limit: int) -> Changes:
        last_seq = await self._last_seq(conversation_id)
        answer = common.changes_window(last_seq, since, limit)
        if answer is not None:
            return answer
        rows: list[Row] = []
        for bucket in range(self._bucket(since + 1), self._bucket(last_seq) + 1):
            rows += await self._run("changes_after", conversation_id, bucket, since, last_seq)
        return common.changes(last_seq, since, common.frames_of(rows))

    async def subscription_changes(
        self, reads: Sequence[SubscriptionRead], limit: int
    ) -> list[Changes | None]:
        return list(await asyncio.gather(*(self._subscription_read(r, limit) for r in reads)))

    async def _subscription_read(self, read: SubscriptionRead, limit: int) -> Changes | None:
        rows = await self._run("conversation", read.conversation_id)
        if not rows or rows[0]["org_id"] != read.org_id:
            return None
        if read.since is None:
            return Changes((), await self._last_seq(read.conversation_id), True)
        return await self.changes_since(read.conversation_id, read.since, limit)

    async def message_history(self, message_id: str) -> tuple[str, ...]:
        # A message has a handful of changes, all in its one partition.
        rows = await self._run("history", message_id)
        return common.frames_of(sorted(rows, key=lambda row: int(row["seq"])))

    # -- hand-offs (the transactional outbox) ---------------------------------------------

    def _outbox_bucket(self, outbox_id: int) -> int:
        return outbox_id // _NODES // self._index_us

    def _next_outbox_id(self) -> int:
        """Increasing in this writer's insertion order; unique across writers by the
        node number (a random one of a million) unless two share it in one microsecond."""
        now_us = max(time.time_ns() // 1000, self._last_us + 1)
        self._last_us = now_us
        return now_us * _NODES + self._node

    def _outbox_inserts(
        self,
        entries: Sequence[OutboxEntry],
        relayed_run: str | None = None,
        claimed_until: datetime | None = None,
        *,
        ids: Sequence[int] | None = None,
    ) -> list[Step]:
        """The rows of new outbox entries, with fresh ids or, when given, `ids` (one per
        entry: an entry written again with its id is the same row)."""
        steps: list[Step] = []
        for index, entry in enumerate(entries):
            outbox_id = self._next_outbox_id() if ids is None else ids[index]
            bucket = self._outbox_bucket(outbox_id)
            row = (bucket, outbox_id, entry.topic, entry.key, entry.payload, entry.done_key)
            if claimed_until is not None:
                add: Step = ("add_outbox_claimed", (*row, claimed_until))
                self._remember_claims([(outbox_id, (entry.topic, entry.done_key))])
            elif relayed_run is not None:
                add = ("add_outbox_relayed", (*row, relayed_run))
            else:
                add = ("add_outbox", row)
            steps += [
                add,
                ("add_outbox_done", (entry.done_key, entry.topic, outbox_id)),
                ("add_outbox_bucket", (bucket,)),
            ]
        return steps

    def _remember_claims(self, claims: Iterable[tuple[int, tuple[str, str]]]) -> None:
        """Keep what `delete_outbox` needs of claimed entries, so it need not read them.
        Only a cache: one claimed here but deleted by another process (its claim lapsed)
        would stay, so it is emptied past a bound, and a forgotten entry is read again."""
        if len(self._claimed) >= _CLAIMS_KEPT:
            self._claimed.clear()
        self._claimed.update(claims)

    def _outbox_deletes(self, outbox_id: int, topic: str, done_key: str) -> list[Step]:
        return [
            ("delete_outbox", (self._outbox_bucket(outbox_id), outbox_id)),
            ("delete_outbox_done", (done_key, topic, outbox_id)),
        ]

    async def _done_deletes(self, done: Sequence[tuple[str, str]]) -> list[Step]:
        """The deletes of the entries that `done` names as (topic, done_key)."""
        found = await asyncio.gather(
            *(self._run("outbox_done", done_key, topic) for topic, done_key in done)
        )
        steps: list[Step] = []
        for (topic, done_key), rows in zip(done, found, strict=True):
            for row in rows:
                steps += self._outbox_deletes(int(row["id"]), topic, done_key)
        return steps

    async def _complete_outbox(self, done: Sequence[tuple[str, str]]) -> None:
        await self._batch(await self._done_deletes(done))

    async def handoff(
        self,
        entries: Sequence[OutboxEntry] = (),
        *,
        done: Sequence[tuple[str, str]] = (),
        parked: Sequence[tuple[str, str]] = (),
        relayed_run: str | None = None,
        claim_s: float | None = None,
    ) -> list[int]:
        until = None if claim_s is None else _ms(utcnow() + timedelta(seconds=claim_s))
        inserts = self._outbox_inserts(entries, relayed_run, until)
        steps = inserts + await self._done_deletes(done)
        # No status is parked for a provider id once it is linked: these are all of them.
        found = await asyncio.gather(*(self._run("parked", *key) for key in parked))
        for (channel, provider_message_id), rows in zip(parked, found, strict=True):
            steps += [
                ("unpark", (channel, provider_message_id, row["parked_id"]))
                for row in rows
                if row["parked_id"] is not None
            ]
        added = [int(params[1]) for name, params in inserts if name == "add_outbox_claimed"]
        try:
            await self._batch(steps)
        except BaseException:
            for outbox_id in added:
                self._claimed.pop(outbox_id, None)
            raise
        return added

    async def _outbox_rows(self, wanted: Callable[[Row], bool], limit: int) -> list[Row]:
        """Up to `limit` outbox rows that are `wanted`, oldest first. Buckets found empty,
        older than two buckets (beyond any clock skew of a writer), leave the list."""
        found: list[Row] = []
        old = self._index_bucket(utcnow() - self._prune_after)
        for bucket_row in await self._run("outbox_buckets"):
            bucket, after, seen = int(bucket_row["bucket"]), -1, False
            while len(found) < limit:
                rows = await self._run("outbox_page", bucket, after, _OUTBOX_PAGE)
                for row in rows:
                    seen = seen or row["topic"] is not None
                    if row["topic"] is not None and wanted(row) and len(found) < limit:
                        found.append(row)
                if len(rows) < _OUTBOX_PAGE:
                    break
                after = int(rows[-1]["id"])
            if not seen and bucket < old:
                await self._run("drop_outbox_bucket", bucket)
            if len(found) >= limit:
                break
        return found

    async def outbox_batch(self, run: str, limit: int) -> list[OutboxItem]:
        rows = await self._outbox_rows(lambda row: row["relayed_run"] != run, limit)
        return common.outbox_items(rows)

    async def claim_outbox(self, limit: int, lease_s: float) -> list[OutboxItem]:
        now = utcnow()
        until = _ms(now + timedelta(seconds=lease_s))
        won: list[Row] = []
        lost: set[int] = set()

        def free(row: Row) -> bool:
            if int(row["id"]) in lost:
                return False
            return row["claimed_until"] is None or _time(row["claimed_until"]) < now

        while len(won) < limit:
            candidates = await self._outbox_rows(free, limit - len(won))
            by_bucket: dict[int, list[Row]] = {}
            for row in candidates:
                by_bucket.setdefault(self._outbox_bucket(int(row["id"])), []).append(row)
            # A bucket is one partition: its entries are claimed together by one
            # lightweight transaction (a conditional batch), all or none. A batch that
            # lost a race is claimed entry by entry: of relays racing for an entry one
            # wins; the losers look further, as SKIP LOCKED would.
            chunks = [
                rows[start : start + _CLAIM_BATCH]
                for rows in by_bucket.values()
                for start in range(0, len(rows), _CLAIM_BATCH)
            ]
            claimed = await asyncio.gather(*(self._claim_entries(until, rows) for rows in chunks))
            for chunk, outcomes in zip(chunks, claimed, strict=True):
                for row, applied in zip(chunk, outcomes, strict=True):
                    if applied:
                        won.append(row)
                    else:
                        lost.add(int(row["id"]))
            if all(all(outcomes) for outcomes in claimed):
                break
        # What `delete_outbox` needs of them, so that it need not read them again.
        self._remember_claims((int(row["id"]), (row["topic"], row["done_key"])) for row in won)
        return sorted(common.outbox_items(won), key=lambda item: item.id)

    def _claim_step(self, until: datetime, row: Row) -> Step:
        outbox_id = int(row["id"])
        return (
            "claim_outbox",
            (
                until,
                self._outbox_bucket(outbox_id),
                outbox_id,
                row["done_key"],
                row["claimed_until"],
            ),
        )

    async def _claim_entries(self, until: datetime, rows: Sequence[Row]) -> list[bool]:
        """Claim entries of one bucket: whether each was won."""
        if len(rows) > 1:
            batch = BatchStatement(BatchType.UNLOGGED, serial_consistency_level=self._serial)
            for name, params in (self._claim_step(until, row) for row in rows):
                batch.add(self._prepared[name], params)
            answer = await self._execute(self._live().execute_async(batch))
            if answer and answer[0]["[applied]"]:
                return [True] * len(rows)
        steps = [self._claim_step(until, row) for row in rows]
        outcomes = await asyncio.gather(*(self._lwt(name, *params) for name, params in steps))
        return [applied for applied, _ in outcomes]

    async def unclaim_outbox(self, ids: Sequence[int]) -> None:
        for outbox_id in ids:
            self._claimed.pop(outbox_id, None)
        await asyncio.gather(*(self._lwt("unclaim_outbox", self._outbox_bucket(i), i) for i in ids))

    async def mark_relayed(self, ids: Sequence[int], run: str) -> None:
        await asyncio.gather(
            *(self._lwt("mark_relayed", run, self._outbox_bucket(i), i) for i in ids)
        )

    async def delete_outbox(self, ids: Sequence[int]) -> None:
        claimed = {i: self._claimed.pop(i) for i in ids if i in self._claimed}
        unknown = [i for i in ids if i not in claimed]
        found = await asyncio.gather(
            *(self._run("outbox_row", self._outbox_bucket(i), i) for i in unknown)
        )
        for outbox_id, rows in zip(unknown, found, strict=True):
            if rows and rows[0]["topic"] is not None:
                claimed[outbox_id] = (rows[0]["topic"], rows[0]["done_key"])
        steps: list[Step] = []
        for outbox_id in ids:
            if outbox_id in claimed:
                steps += self._outbox_deletes(outbox_id, *claimed[outbox_id])
        # Unlogged: a delete left undone by a failure leaves an entry relayed again (the
        # bus keeps it once; its consumers are idempotent) or an index row to nothing.
        await self._batch(steps, logged=False)

    async def outbox_size(self) -> int:
        buckets = await self._run("outbox_buckets")
        counts = await asyncio.gather(
            *(self._run("outbox_count", row["bucket"]) for row in buckets)
        )
        return sum(int(rows[0]["n"]) for rows in counts if rows)

    # -- provider sends -----------------------------------------------------------------

    async def begin_send(self, message_id: str) -> tuple[SendClaim, Message | None]:
        """The check and the record in one lightweight transaction: of concurrent claims
        exactly one applies; the others read the attempt and answer UNKNOWN. The claim
        carries an id of this call: when its answer is lost (a timeout, the node away) it
        may have applied, and the (serial) read that follows tells ours from another's."""
        claim_id = uuid.uuid4()
        before: Message | None = None  # as read before our claim, once one was sent
        tries = 0
        while True:
            try:
                # After a claim whose answer was lost: a serial read, which completes it
                # first if the node accepted it.
                rows = await (
                    self._appearing(message_id)
                    if before is None
                    else self._run("message_serial", message_id)
                )
                message = _message(await self._settled(rows[0])) if rows else None
                if before is not None and message is not None and rows[0]["send_claim"] == claim_id:
                    # Ours, applied though its answer was lost: judged as it was before it.
                    claim = common.send_claim(replace(message, send_started_at=None))
                    if claim is SendClaim.GO:
                        await self._stuck_moved(before, message)
                    return claim, message
                claim = common.send_claim(message)
                if message is None or claim is not SendClaim.GO:
                    return claim, message
                now = _ms(utcnow())
                started = replace(message, send_started_at=now, updated_at=now)
                await self._batch(self._stuck_inserts(started), logged=False)
                before = message
                applied, _ = await self._lwt("begin_send", now, now, claim_id, message_id)
            except BackendUnavailable:
                tries += 1
                if before is None or tries >= _CLAIM_TRIES:
                    raise  # nothing claimed yet, or the outage outlasts our look-ups
                await asyncio.sleep(min(2.0, 0.1 * 2**tries))
                continue
            if applied:
                await self._stuck_moved(message, started)
                return SendClaim.GO, started

    async def _appearing(self, message_id: str) -> list[Row]:
        """The message's row, waited for up to `missing_wait`. A send hand-off is written
        in one logged batch with its message, but the batch's partitions become readable
        one by one (and, when its coordinator was lost, only once the batch log replays
        it): a relay may hand the entry on before the message can be read, and a message
        read as missing then would fail (`send_failed`) though it was acknowledged."""
        deadline = time.monotonic() + self._missing_wait.total_seconds()
        delay = 0.05
        while True:
            rows = await self._run("message", message_id)
            left = deadline - time.monotonic()
            if rows or left <= 0:
                return rows
            await asyncio.sleep(min(delay, left))
            delay = min(2 * delay, 1.0)

    async def release_send(self, message_id: str) -> None:
        message = await self.get_message(message_id)
        if message is None or message.provider_message_id is not None:
            return
        now = _ms(utcnow())
        released = replace(message, send_started_at=None, updated_at=now)
        await self._batch(self._stuck_inserts(released), logged=False)
        applied, _ = await self._lwt("release_send", now, message_id)
        if applied:
            await self._stuck_moved(message, released)

    # -- the watchdog -------------------------------------------------------------------

    def _index_bucket(self, at: datetime) -> int:
        return int(at.timestamp() * 1_000_000) // self._index_us

    def _stuck_inserts(self, message: Message) -> list[Step]:
        key = _stuck_key(message)
        if key is None:
            return []
        kind, at = key
        bucket = self._index_bucket(at)
        return [
            ("add_stuck_bucket", (kind, bucket)),
            ("add_stuck", (kind, bucket, at, message.id)),
        ]

    async def _stuck_moved(self, before: Message, after: Message) -> None:
        """Drop the watchdog entry of `before` once `after` is stored (a crash in
        between leaves a stale entry, which the watchdog drops when it reads it)."""
        old = _stuck_key(before)
        if old is not None and old != _stuck_key(after):
            kind, at = old
            await self._run("drop_stuck", kind, self._index_bucket(at), at, before.id)

    async def _stuck(self, kind: str, before: datetime, limit: int) -> tuple[Message, ...]:
        found: list[Message] = []
        old = self._index_bucket(utcnow() - self._prune_after)
        for bucket_row in await self._run("stuck_buckets", kind, self._index_bucket(before)):
            bucket = int(bucket_row["bucket"])
            rows = await self._run("stuck_entries", kind, bucket, before)
            # The messages are read a limit's worth at a time, until enough are found.
            for start in range(0, len(rows), max(limit, 1)):
                if len(found) >= limit:
                    break
                chunk = rows[start : start + max(limit, 1)]
                messages = await asyncio.gather(*(self.get_message(r["message_id"]) for r in chunk))
                for row, message in zip(chunk, messages, strict=True):
                    at = _time(row["at"])
                    if message is None or _stuck_key(message) != (kind, at):
                        await self._run("drop_stuck", kind, bucket, at, row["message_id"])
                    elif len(found) < limit:
                        found.append(message)
            if not rows and bucket < min(old, self._index_bucket(before)):
                await self._run("drop_stuck_bucket", kind, bucket)
            if len(found) >= limit:
                break
        return tuple(found)

    async def stuck(
        self,
        pending_before: datetime,
        unknown_before: datetime,
        sent_before: datetime,
        limit: int,
    ) -> Stuck:
        pending, unknown, sent = await asyncio.gather(
            self._stuck("pending", pending_before, limit),
            self._stuck("unknown", unknown_before, limit),
            self._stuck("sent", sent_before, limit),
        )
        return Stuck(pending, unknown, sent)

    async def redrive(self, message_id: str) -> bool:
        message = await self.get_message(message_id)
        if message is None or not common.redrivable(message):
            return False
        rows = await self._run("conversation", message.conversation_id)
        if not rows:
            return False
        now = _ms(utcnow())
        touched = replace(message, updated_at=now)
        await self._batch(self._stuck_inserts(touched), logged=False)
        # Still PENDING with no send under way, checked and touched at once: a send
        # claimed meanwhile wins, and the message is not handed off again.
        applied, _ = await self._lwt("redrive", now, message_id)
        if not applied:
            return False
        await self._stuck_moved(message, touched)
        conversation = common.conversation_of_message(message, rows[0]["contact"])
        await self._batch(
            await self._done_deletes([(TOPIC_MESSAGES, message_id)])
            + self._outbox_inserts([common.outbound_entry(conversation, message)])
        )
        return True

    # -- dead letters -------------------------------------------------------------------

    # -- campaigns ------------------------------------------------------------------------

    async def create_campaign(self, new: NewCampaign) -> tuple[Campaign, bool]:
        """The recipients are written first, under a fresh id; then the key is claimed by
        a lightweight transaction that carries the campaign's definition; then the
        campaign's row and its place among the running ones. A crash before the claim
        leaves recipients nothing names; one after it is completed by the next create with
        the key, from the claim (the same rows again). The losers of a race for the key
        drop their recipients and answer the winner's campaign."""
        found = await self._run("campaign_key", new.org_id, new.client_campaign_id)
        if found:
            return await self._keyed_campaign(found[0]), False
        campaign = common.new_campaign(new)
        chunks = [
            new.contacts[n : n + _RECIPIENTS_BATCH]
            for n in range(0, campaign.total, _RECIPIENTS_BATCH)
        ]
        # One partition: each chunk is a batch applied whole, small enough for the
        # server's batch size limits.
        await asyncio.gather(
            *(
                self._batch(
                    [
                        ("add_recipient", (campaign.id, start * _RECIPIENTS_BATCH + n, contact))
                        for n, contact in enumerate(chunk)
                    ],
                    logged=False,
                )
                for start, chunk in enumerate(chunks)
            )
        )
        applied, row = await self._lwt(
            "claim_campaign_key",
            new.org_id,
            new.client_campaign_id,
            campaign.id,
            new.fingerprint,
            new.channel,
            new.text,
            new.template,
            campaign.total,
            campaign.created_at,
        )
        if not applied:
            await self._run("drop_recipients", campaign.id)
            return await self._keyed_campaign(row), False
        await self._add_campaign(
            {
                "campaign_id": campaign.id,
                "org_id": new.org_id,
                "client_campaign_id": new.client_campaign_id,
                "fingerprint": new.fingerprint,
                "channel": new.channel,
                "text": new.text,
                "template": new.template,
                "total": campaign.total,
                "created_at": campaign.created_at,
            }
        )
        return campaign, True

    async def _keyed_campaign(self, key: Row) -> Campaign:
        """The campaign a key names, its row written first if its writer died before."""
        campaign = await self._campaign_with_counts(key["campaign_id"])
        if campaign is not None:
            return campaign
        await self._add_campaign(key)
        campaign = await self._campaign_with_counts(key["campaign_id"])
        assert campaign is not None  # just written
        return campaign

    async def _add_campaign(self, key: Row) -> None:
        created_at = _time(key["created_at"])
        written_at = int(created_at.timestamp() * 1_000_000) - _INSERT_SKEW_US
        await self._batch(
            [
                (
                    "add_campaign",
                    (
                        key["campaign_id"],
                        key["org_id"],
                        key["client_campaign_id"],
                        key["fingerprint"],
                        key["channel"],
                        key["text"],
                        key["template"],
                        key["total"],
                        created_at,
                        written_at,
                    ),
                ),
                ("run_campaign", (created_at, key["campaign_id"])),
            ]
        )

    async def _campaign_with_counts(self, campaign_id: str) -> Campaign | None:
        """The campaign and its counts, from the buckets of its messages: `created` is
        how many there are, the version the sum of their `moved` (each grows with every
        move of its message, and a new message adds one)."""
        rows, buckets = await asyncio.gather(
            self._run("campaign", campaign_id), self._run("campaign_buckets", campaign_id)
        )
        if not rows:
            return None
        counts: dict[str, int] = {CHANGES: sum(int(b["moved"]) for b in buckets)}
        for b in buckets:
            counts[b["bucket"]] = counts.get(b["bucket"], 0) + 1
        return common.campaign_of({**rows[0], "created": len(buckets)}, _time, counts)

    async def get_campaign(self, org_id: str, campaign_id: str) -> Campaign | None:
        campaign = await self._campaign_with_counts(campaign_id)
        return campaign if campaign is not None and campaign.org_id == org_id else None

    async def campaign_recipients(
        self, org_id: str, campaign_id: str, after: int, limit: int
    ) -> list[CampaignRecipient] | None:
        rows = await self._run("campaign", campaign_id)
        if not rows or rows[0]["org_id"] != org_id:
            return None
        recipients = await self._run("recipients_after", campaign_id, after, limit)
        messages = await self.get_messages(
            [r["message_id"] for r in recipients if r["message_id"] is not None]
        )
        by_id = {message.id: message for message in messages}
        return [
            CampaignRecipient(int(r["position"]), r["contact"], by_id.get(r["message_id"]))
            for r in recipients
        ]

    async def campaigns_to_run(self, limit: int) -> list[Campaign]:
        """The running list, oldest first; a campaign found with every message created
        leaves it. Their counts are not read (the runner needs their ids and channels)."""
        found: list[Campaign] = []
        for entry in await self._run("running_campaigns"):
            if len(found) >= limit:
                break
            rows = await self._run("campaign", entry["id"])
            if rows and int(rows[0]["created"]) < int(rows[0]["total"]):
                found.append(common.campaign_of(rows[0], _time, {}))
            elif rows:
                await self._run("ran_campaign", entry["created_at"], entry["id"])
        return found

    async def campaign_backlog(self, channel: str) -> int:
        """A count of each of the channel's buckets of PENDING campaign messages (a
        message leaves its bucket when it leaves PENDING); buckets found empty, past the
        time a late write could still land in them, leave the list."""
        old = self._index_bucket(utcnow() - self._prune_after)

        async def counted(bucket: int) -> int:
            [count] = await self._run("pending_count", channel, bucket)
            if not count["n"] and bucket < old:
                await self._run("drop_pending_bucket", channel, bucket)
            return int(count["n"])

        # One partition per bucket: counted side by side, one round trip for all.
        buckets = await self._run("pending_buckets", channel)
        return sum(await asyncio.gather(*(counted(int(row["bucket"])) for row in buckets)))

    async def campaign_step(self, campaign_id: str, limit: int) -> int:
        """The next `limit` recipients are claimed together by one conditional batch on
        the campaign's recipients partition (`IF message_id = null` each): of concurrent
        steps one wins, the others do nothing (like SKIP LOCKED). The claim records each
        message's id, conversation and time, so its message, written in one logged batch
        with its hand-off, is the same rows whoever writes it: a claim a crashed step
        left for longer than `pending_lease` is completed by the next step (the messages
        that exist are left alone). Then `created` moves on by a lightweight transaction."""
        rows = await self._run("campaign", campaign_id)
        if not rows:
            return 0
        row = rows[0]
        created, total = int(row["created"]), int(row["total"])
        if created >= total:
            return 0
        recipients = await self._run("recipients_from", campaign_id, created, limit)
        if not recipients:
            return 0
        now = _ms(utcnow())
        left = [r for r in recipients if r["message_id"] is not None]
        if any(_time(r["claimed_at"]) + self._lease > now for r in left):
            return 0  # another step is creating these messages
        free = [r for r in recipients if r["message_id"] is None]
        org_id, channel = row["org_id"], row["channel"]
        opened = await asyncio.gather(
            *(self._campaign_conversation(org_id, channel, r["contact"]) for r in free)
        )
        claims = [
            {**r, "message_id": new_id("msg"), "conversation_id": c, "claimed_at": now}
            for r, c in zip(free, opened, strict=True)
        ]
        if claims and not await self._claim_recipients(campaign_id, claims):
            return 0
        campaign = common.campaign_of(row, _time, {})
        await asyncio.gather(
            *(self._campaign_message(campaign, r, fresh=False) for r in left),
            *(self._campaign_message(campaign, r, fresh=True) for r in claims),
        )
        made = len(recipients)
        applied, _ = await self._lwt("advance_campaign", created + made, campaign_id, created)
        if applied and created + made >= total:
            await self._run("ran_campaign", row["created_at"], campaign_id)
        return made

    async def _campaign_conversation(self, org_id: str, channel: str, contact: str) -> str:
        """The organization's oldest conversation with the contact, or a new one."""
        owned = await self._owned_conversations(org_id, channel, contact)
        if owned:
            return str(min(owned, key=_made_order)["id"])
        return (await self._open_conversation(org_id, channel, contact)).id

    async def _claim_recipients(self, campaign_id: str, claims: Sequence[Row]) -> bool:
        """Claim them all, or none (one partition: one conditional batch)."""
        batch = BatchStatement(BatchType.UNLOGGED, serial_consistency_level=self._serial)
        for r in claims:
            batch.add(
                self._prepared["claim_recipient"],
                (
                    r["message_id"],
                    r["conversation_id"],
                    r["claimed_at"],
                    campaign_id,
                    r["position"],
                ),
            )
        answer = await self._execute(self._live().execute_async(batch))
        return bool(answer and answer[0]["[applied]"])

    async def _campaign_message(self, campaign: Campaign, recipient: Row, *, fresh: bool) -> None:
        """Write a claimed recipient's message with its hand-off, its place in its
        conversation, its watchdog entry, its campaign's count and its channel's backlog,
        in one logged batch made only of what the claim recorded: written again, it is
        the same rows (its outbox id too), each at the same write time or below the
        message's later changes. Not `fresh` (a claim a crashed step left), a message
        that exists is left alone: its batch was written."""
        message_id = str(recipient["message_id"])
        if not fresh and await self._run("message", message_id):
            return
        created_at = _time(recipient["claimed_at"])
        conversation = Conversation(
            recipient["conversation_id"],
            campaign.org_id,
            campaign.channel,
            recipient["contact"],
            0,
            created_at,
        )
        message = replace(
            common.new_message(
                conversation, campaign.text, campaign.id, template=campaign.template
            ),
            id=message_id,
            created_at=created_at,
            updated_at=created_at,
        )
        node = int.from_bytes(hashlib.blake2b(message_id.encode(), digest_size=8).digest()) % _NODES
        outbox_id = int(created_at.timestamp() * 1_000_000) * _NODES + node
        bucket = self._index_bucket(created_at)
        await self._batch(
            [
                (
                    "add_campaign_message",
                    [*self._message_values(message), campaign.id, self._written_at(message)],
                ),
                *self._indexed_message(conversation, message, outbox_id),
                ("move_campaign", (campaign.id, message.id, bucket_of(message.state), 1, 1)),
                ("queue_campaign", (campaign.channel, bucket, message.id)),
                ("add_pending_bucket", (campaign.channel, bucket)),
            ]
        )

    async def record_dead_letter(self, topic: str, payload: bytes, reason: str) -> None:
        day: date = utcnow().date()
        await self._run("dead_letter", day, topic, payload, reason)
        await self._run("count_dead_letter")

    async def dead_letter_count(self) -> int:
        rows = await self._run("dead_letters")
        return int(rows[0]["n"]) if rows else 0

    async def dead_letters(self, limit: int) -> list[DeadLetter]:
        """A scan of the (small: poison events only) table, newest first; at most
        DEAD_LETTER_SCAN rows are read."""
        rows = await self._run("list_dead_letters", DEAD_LETTER_SCAN)
        found = sorted((_dead_letter_of(row) for row in rows), key=lambda d: d.at, reverse=True)
        return found[:limit]

    async def dead_letter(self, dead_letter_id: str) -> DeadLetter | None:
        day, _, given = dead_letter_id.partition("/")
        try:
            key = (date.fromisoformat(day), uuid.UUID(given))
        except ValueError:
            return None
        rows = await self._run("one_dead_letter", *key)
        return _dead_letter_of(rows[0]) if rows else None

    # -- outbound webhooks (WebhookStore) --------------------------------------------------

    async def add_webhook_endpoint(
        self, endpoint: WebhookEndpoint, limit: int
    ) -> WebhookEndpoint | None:
        """Listed for the senders first (an entry whose add then fails or dies is skipped:
        no endpoint answers it), then added by a lightweight transaction on the
        organization's partition, conditional on its `version` as read with the count:
        two adds at once cannot both pass the limit."""
        added = replace(endpoint, created_at=_ms(endpoint.created_at))
        await self._run("list_hook", added.id, added.org_id)
        while True:
            rows = await self._run("org_hooks", added.org_id)
            version = rows[0]["version"] if rows else None
            if sum(row["id"] is not None for row in rows) >= limit:
                await self._run("unlist_hook", added.id)
                return None
            applied, _ = await self._lwt(
                "add_org_hook",
                (version or 0) + 1,
                added.url,
                added.secret,
                added.created_at,
                added.org_id,
                added.id,
                version,
            )
            if applied:
                return added

    async def webhook_endpoints(self, org_id: str) -> list[WebhookEndpoint]:
        rows = await self._run("org_hooks", org_id)
        found = [_endpoint_of(row) for row in rows if row["id"] is not None]
        return sorted(found, key=lambda endpoint: (endpoint.created_at, endpoint.id))

    async def webhook_endpoint(self, org_id: str, endpoint_id: str) -> WebhookEndpoint | None:
        rows = await self._run("org_hook", org_id, endpoint_id)
        return _endpoint_of(rows[0]) if rows else None

    async def delete_webhook_endpoint(self, org_id: str, endpoint_id: str) -> bool:
        """Deleted from its organization (a lightweight transaction: no delivery is
        queued for it after), then its deliveries, its lease and its place in the list.
        A crash in between leaves them unreachable (a listed id whose endpoint is gone is
        never leased, nor measured), not sent."""
        applied, _ = await self._lwt("drop_org_hook", org_id, endpoint_id)
        if not applied:
            return False
        queued, parked = await asyncio.gather(
            self._run("delivery_ids", endpoint_id), self._run("parked_deliveries", endpoint_id)
        )
        await self._batch(
            [
                ("drop_deliveries", (endpoint_id,)),
                ("drop_parked_deliveries", (endpoint_id,)),
                ("unlist_hook", (endpoint_id,)),
            ]
        )
        ids = [int(row["id"]) for row in [*queued, *parked]]
        for start in range(0, len(ids), _CLAIM_BATCH):
            chunk = ids[start : start + _CLAIM_BATCH]
            await self._batch([("unindex_delivery", (i,)) for i in chunk], logged=False)
        await self._lwt("drop_hook_lease", endpoint_id)
        return True

    async def rotate_webhook_secret(
        self, org_id: str, endpoint_id: str, secret: str, previous_until: datetime
    ) -> WebhookEndpoint | None:
        while True:
            endpoint = await self.webhook_endpoint(org_id, endpoint_id)
            if endpoint is None:
                return None
            # Conditional on the secret as read: of two rotations at once, each keeps the
            # secret it replaced as the previous one.
            applied, _ = await self._lwt(
                "rotate_hook",
                secret,
                endpoint.secret,
                previous_until,
                org_id,
                endpoint_id,
                endpoint.secret,
            )
            if applied:
                return replace(
                    endpoint,
                    secret=secret,
                    previous_secret=endpoint.secret,
                    previous_until=previous_until,
                )

    async def claim_webhook_endpoints(
        self, owner: str, limit: int, lease_s: float, now: datetime
    ) -> list[WebhookEndpoint]:
        """Each listed endpoint that is free (or `owner`'s) and has a delivery due is
        leased by a lightweight transaction conditional on its lease as read: of two
        senders one wins it. A scan of the list (at most the endpoints per organization
        times the organizations), a `limit` of them at a time."""
        until = _ms(now + timedelta(seconds=lease_s))
        listed = await self._run("hook_list")
        won: list[WebhookEndpoint] = []

        async def claim(row: Row) -> WebhookEndpoint | None:
            endpoint_id = str(row["id"])
            leases = await self._run("hook_lease", endpoint_id)
            held_until = leases[0]["until"] if leases else None
            if held_until is not None and leases[0]["owner"] != owner and _time(held_until) >= now:
                return None
            heads = await self._run("delivery_heads", endpoint_id)
            if not any(_time(head["next_at"]) <= now for head in heads):
                return None
            endpoint = await self.webhook_endpoint(str(row["org_id"]), endpoint_id)
            if endpoint is None:
                return None
            applied, _ = await self._lwt("take_hook_lease", owner, until, endpoint_id, held_until)
            return endpoint if applied else None

        start = 0
        while start < len(listed) and len(won) < limit:
            chunk = listed[start : start + limit - len(won)]
            start += len(chunk)
            won += [e for e in await asyncio.gather(*(claim(r) for r in chunk)) if e is not None]
        return won

    async def renew_webhook_lease(self, owner: str, endpoint_id: str, lease_s: float) -> bool:
        until = _ms(utcnow() + timedelta(seconds=lease_s))
        applied, _ = await self._lwt("renew_hook_lease", until, endpoint_id, owner)
        return applied

    async def release_webhook_lease(self, owner: str, endpoint_id: str) -> None:
        await self._lwt("release_hook_lease", endpoint_id, owner)

    async def due_webhook_deliveries(
        self, endpoint_id: str, now: datetime, limit: int
    ) -> list[WebhookDelivery]:
        # Parked deliveries are in another table: the first row of each conversation is
        # its oldest unparked one.
        heads = await self._run("delivery_heads", endpoint_id)
        due = [_delivery_of(row) for row in heads if _time(row["next_at"]) <= now]
        due.sort(key=_delivery_order)
        return due[:limit]

    async def _delivery_row(self, delivery_id: int) -> Row | None:
        keys = await self._run("delivery_key", delivery_id)
        if not keys:
            return None
        key = keys[0]
        rows = await self._run("delivery", key["endpoint_id"], key["conversation_id"], key["seq"])
        return rows[0] if rows else None

    async def webhook_delivered(self, delivery_id: int) -> None:
        keys = await self._run("delivery_key", delivery_id)
        if keys:
            key = keys[0]
            # Unlogged: an index row left by a failure names no delivery, and is skipped.
            await self._batch(
                [
                    (
                        "drop_delivery",
                        (key["endpoint_id"], key["conversation_id"], key["seq"]),
                    ),
                    ("unindex_delivery", (delivery_id,)),
                ],
                logged=False,
            )

    async def webhook_failed(
        self, delivery_id: int, next_at: datetime | None, error: str, now: datetime
    ) -> None:
        """Written whole (not updated: an update of a delivery deleted meanwhile would
        leave a partial row). The endpoint's lease holder is its deliveries' only writer."""
        row = await self._delivery_row(delivery_id)
        if row is None:
            return
        failed = {**row, "attempts": int(row["attempts"]) + 1, "last_error": error}
        if next_at is not None:
            await self._run("queue_delivery", *_delivery_values({**failed, "next_at": next_at}))
            return
        key = (row["endpoint_id"], row["conversation_id"], row["seq"])
        await self._batch(
            [("drop_delivery", key), ("park_delivery", (*_delivery_values(failed), _ms(now)))]
        )

    async def parked_webhook_deliveries(
        self, org_id: str, endpoint_id: str, limit: int
    ) -> list[WebhookDelivery] | None:
        if await self.webhook_endpoint(org_id, endpoint_id) is None:
            return None
        rows = await self._run("parked_deliveries", endpoint_id)
        return sorted((_delivery_of(row) for row in rows), key=_delivery_order)[:limit]

    async def oldest_pending_webhook(self) -> datetime | None:
        """A scan: the oldest queued delivery of each listed endpoint that exists."""

        async def oldest(row: Row) -> datetime | None:
            found, endpoint = await asyncio.gather(
                self._run("oldest_delivery", row["id"]),
                self._run("org_hook", row["org_id"], row["id"]),
            )
            at = found[0]["oldest"] if found else None
            return _time(at) if at is not None and endpoint else None

        listed = await self._run("hook_list")
        ages = [at for at in await asyncio.gather(*map(oldest, listed)) if at is not None]
        return min(ages, default=None)

    async def replay_parked_webhooks(
        self, org_id: str, endpoint_id: str, now: datetime
    ) -> int | None:
        """Each parked delivery back in the queue, in logged batches (each moves its
        deliveries, or none: a crash between two leaves the rest parked, to replay)."""
        if await self.webhook_endpoint(org_id, endpoint_id) is None:
            return None
        rows = await self._run("parked_deliveries", endpoint_id)
        again = _ms(now)
        for start in range(0, len(rows), _CLAIM_BATCH):
            steps: list[Step] = []
            for row in rows[start : start + _CLAIM_BATCH]:
                fresh = {**row, "attempts": 0, "created_at": again, "next_at": again}
                key = (row["endpoint_id"], row["conversation_id"], row["seq"])
                steps += [("queue_delivery", _delivery_values(fresh)), ("unpark_delivery", key)]
            await self._batch(steps)
        return len(rows)


def _delivery_id(endpoint_id: str, conversation_id: str, seq: int) -> int:
    """A delivery's id, of its key: a change's deliveries written twice (a change
    completed again after a crash) are the same rows."""
    digest = hashlib.blake2b(
        f"{endpoint_id}\0{conversation_id}\0{seq}".encode(), digest_size=8
    ).digest()
    return int.from_bytes(digest) >> 1


def _delivery_inserts(
    conversation_id: str, seq: int, frame: str, endpoint_ids: Sequence[str]
) -> list[Step]:
    """A change's delivery to each endpoint, and its place in the index by id."""
    now = _ms(utcnow())
    kind = event_type(frame)
    body = event_body(kind, frame, now)
    steps: list[Step] = []
    for endpoint_id in endpoint_ids:
        delivery_id = _delivery_id(endpoint_id, conversation_id, seq)
        steps += [
            (
                "queue_delivery",
                (endpoint_id, conversation_id, seq, delivery_id, kind, body, 0, now, now, ""),
            ),
            ("index_delivery", (delivery_id, endpoint_id, conversation_id, seq)),
        ]
    return steps


def _delivery_values(row: Row) -> tuple[Any, ...]:
    return (
        row["endpoint_id"],
        row["conversation_id"],
        row["seq"],
        row["id"],
        row["event_type"],
        row["body"],
        row["attempts"],
        row["created_at"],
        row["next_at"],
        row["last_error"],
    )


def _delivery_of(row: Row) -> WebhookDelivery:
    parked_at = row.get("parked_at")
    return WebhookDelivery(
        id=int(row["id"]),
        endpoint_id=row["endpoint_id"],
        conversation_id=row["conversation_id"],
        seq=int(row["seq"]),
        event_type=row["event_type"],
        body=bytes(row["body"]),
        attempts=int(row["attempts"]),
        created_at=_time(row["created_at"]),
        next_at=_time(row["next_at"]),
        parked_at=_time(parked_at) if parked_at is not None else None,
        last_error=row["last_error"] or "",
    )


def _delivery_order(delivery: WebhookDelivery) -> tuple[datetime, str, int]:
    """Oldest first (by the time each was queued)."""
    return delivery.created_at, delivery.conversation_id, delivery.seq


def _endpoint_of(row: Row) -> WebhookEndpoint:
    until = row["previous_until"]
    return WebhookEndpoint(
        id=row["id"],
        org_id=row["org_id"],
        url=row["url"],
        secret=row["secret"],
        created_at=_time(row["created_at"]),
        previous_secret=row["previous_secret"],
        previous_until=_time(until) if until is not None else None,
    )


#: The most dead letters `dead_letters` reads (newest first among them).
DEAD_LETTER_SCAN = 10_000


def _dead_letter_of(row: Row) -> DeadLetter:
    """Its id is `<day>/<timeuuid>`, its time the timeuuid's."""
    at = datetime_from_uuid1(row["id"]).replace(tzinfo=UTC)
    return DeadLetter(
        f"{row['day']}/{row['id']}", row["topic"], row["reason"], at, bytes(row["payload"])
    )


__all__ = ["CassandraAddress", "CassandraStore"]
