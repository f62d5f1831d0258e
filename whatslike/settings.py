"""One immutable settings object, built once in `main()` from environment variables
(`WHATSLIKE_*`) and command-line flags (flags win), then passed down. Nothing below this
module reads `os.environ`. A bad value stops the start with one line naming the setting.
"""

from __future__ import annotations

import difflib
import os
import re
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from whatslike.errors import ConfigError
from whatslike.templates import LANGUAGE_CODE, TEMPLATE_NAME

ROLES = ("api", "router", "connector", "status-worker", "webhook-sender", "simulator")
#: Meta's own Graph API: what `CUSTOMER_WINDOW=auto` enforces the window against.
META_GRAPH_HOST = "graph.facebook.com"

#: The Meta credentials a fresh checkout runs with: fine for the embedded simulator,
#: refused anywhere else (anyone who reads this file could forge webhooks with them).
DEV_SECRETS = {
    "meta_app_secret": "whatslike-dev-app-secret",
    "meta_verify_token": "whatslike-dev-verify-token",
    "meta_access_token": "whatslike-dev-access-token",
}


#: The shortest secret accepted outside the development mode. 16 characters of `openssl
#: rand -hex 8` are 64 random bits, far past online guessing (each guess is one request
#: to a webhook, /metrics or the simulator's control); the examples use twice as many.
MIN_SECRET_CHARS = 16
#: JWT_SECRET signs every token: one token seen lets anyone guess it offline, at any
#: speed, so it gets the 256 bits RFC 7518 §3.2 asks of an HS256 key (32 bytes).
MIN_JWT_SECRET_CHARS = 32


class Settings(BaseSettings):
    """Every setting of every role. Environment: ``WHATSLIKE_<NAME>`` (upper case)."""

    model_config = SettingsConfigDict(env_prefix="WHATSLIKE_", frozen=True, extra="forbid")

    roles: Annotated[tuple[str, ...], NoDecode] = ROLES
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    data_dir: Path = Path("./data")
    #: Public base URL of this process (webhook targets, demo links). Default: from host/port.
    public_url: str = ""

    # Backends, selected by URL.
    database_url: str = ""  # default: sqlite file under data_dir
    #: SQLite's `synchronous` under WAL: "normal" survives a crash of the process (or of
    #: many), and a power loss may drop the last commits; "full" syncs every commit.
    sqlite_synchronous: Literal["normal", "full"] = "full"
    #: PostgreSQL connections per process at most: the sends and statuses at work (many
    #: conversations at once, see bus_concurrency) share them.
    database_pool_size: int = Field(10, ge=1, le=1000)
    bus_url: str = "memory://"
    fanout_url: str = "memory://"

    # Tokens.
    jwt_secret: str = ""  # default (embedded): generated once, kept in data_dir/jwt-secret
    jwt_issuer: str = ""
    jwt_audience: str = ""
    token_ttl_s: int = Field(3600, gt=0)
    #: Tokens living longer than this (exp - now) are refused, whoever signed them.
    token_max_ttl_s: int = Field(86_400, gt=0)
    #: Clock skew allowed on exp/nbf/iat (RFC 8725 keeps it small).
    jwt_leeway_s: int = Field(30, ge=0, le=60)
    #: Empty: the served origin in the embedded mode, any origin otherwise.
    allowed_origins: Annotated[tuple[str, ...], NoDecode] = ()
    #: When set, GET /metrics needs `Authorization: Bearer <metrics_token>`.
    metrics_token: str = ""
    #: The embedded mode's `POST /demo/token` answers loopback clients only, unless this
    #: is set: then anyone who reaches the port gets a working token of the demo org.
    demo_tokens_remote: bool = False

    # HTTP server limits.
    max_header_bytes: int = Field(8192, ge=1024)
    header_timeout_s: float = Field(10.0, gt=0)
    #: A request body not received whole this long after its head → 408, closed.
    body_timeout_s: float = Field(10.0, gt=0)
    max_body_bytes: int = Field(65_536, ge=1024)
    # An organization may post as fast as Meta sends for a number after its upgrade
    # (1,000/s), a campaign's burst of two seconds of that at once.
    org_requests_per_s: float = Field(1000.0, gt=0)
    org_request_burst: int = Field(2000, ge=1)

    # Bus (in-process adapter) and consumers.
    bus_partitions: int = Field(4, ge=1, le=256)
    bus_queue_size: int = Field(10_000, ge=1)
    #: Events handled at once per partition and consumer group (in-process and Kafka),
    #: each key's (conversation's) in order.
    bus_concurrency: int = Field(64, ge=1, le=10_000)
    bus_publish_timeout_s: float = Field(5.0, gt=0)
    # About 40 s of retries (worst case ~90 s) before a dead letter: enough to ride out a
    # database failover or a provider blip while holding the partition's order.
    consumer_max_attempts: int = Field(12, ge=1)
    consumer_backoff_base_s: float = Field(0.1, gt=0)
    consumer_backoff_cap_s: float = Field(15.0, gt=0)

    # Durability: the outbox relay, the stuck-message watchdog, outages.
    #: How often the relay looks for hand-offs made by other processes.
    relay_poll_s: float = Field(1.0, gt=0)
    watchdog_interval_s: float = Field(10.0, gt=0)
    #: PENDING with no send under way for this long: listed, counted and handed off again.
    stuck_pending_s: float = Field(60.0, gt=0)
    #: SENT with no provider news for this long: listed and counted.
    stuck_sent_s: float = Field(3600.0, gt=0)
    #: A send whose outcome is unknown (crash or timeout between the provider call and
    #: its answer) becomes FAILED `send_outcome_unknown` when no webhook settled it.
    send_unknown_fail_s: float = Field(600.0, gt=0)
    #: The Retry-After of a 503 answered while the store is out of reach or on shutdown.
    retry_after_s: int = Field(5, ge=1)

    # Outbound webhooks (whatslike/webhooks): delivered by the webhook-sender role.
    #: Allow targets on private, loopback and link-local addresses (and plain http to
    #: loopback): for development and tests, never where anyone with a token may reach
    #: the internal network.
    webhook_allow_private: bool = False
    webhook_endpoints_per_org: int = Field(5, ge=1, le=100)
    #: One POST at most this long (connecting and resolving included).
    webhook_timeout_s: float = Field(10.0, gt=0, le=60)
    #: Retries wait 1 s, 2 s, 4 s, … at most `webhook_retry_max_s`, for
    #: `webhook_retry_for_s` after the event; then the delivery is parked.
    webhook_retry_first_s: float = Field(1.0, gt=0)
    webhook_retry_max_s: float = Field(600.0, gt=0)
    webhook_retry_for_s: float = Field(86_400.0, gt=0)
    #: How often a sender looks for due deliveries.
    webhook_poll_s: float = Field(0.5, gt=0)
    #: Deliveries read per endpoint at once; conversations of one endpoint in flight at
    #: once; endpoints one sender delivers at once.
    webhook_batch: int = Field(100, ge=1, le=10_000)
    webhook_in_flight: int = Field(4, ge=1, le=100)
    webhook_endpoints_at_once: int = Field(64, ge=1, le=10_000)
    #: A sender's lease of an endpoint; another sender takes it over after this. A
    #: sender killed while delivering (kill -9, a lost machine) holds its endpoints off
    #: for what is left of it, even from its own restart (a new sender: nothing can tell
    #: a dead holder from a slow one), so it is kept short and renewed while delivering;
    #: 20 s above a POST's timeout leaves room for a slow store.
    webhook_lease_s: float = Field(30.0, gt=0)

    # Kafka bus (bus_url kafka://host:port[,host:port]).
    #: Partitions of each topic the bus creates (at most this many consumers of a group work).
    kafka_partitions: int = Field(8, ge=1, le=1024)
    kafka_replication_factor: int = Field(1, ge=1, le=16)
    #: The topics' `min.insync.replicas`: with the producer's `acks=all`, a record is
    #: acknowledged once this many replicas have it. Default: a majority of the replicas
    #: (1 of 1, 2 of 2 or 3, 3 of 5), so a broker lost loses nothing acknowledged.
    kafka_min_insync_replicas: int | None = Field(None, ge=1, le=16)
    #: Put before every topic name (tests use it to keep their topics apart).
    kafka_topic_prefix: str = Field("", pattern=r"^[A-Za-z0-9._-]*$", max_length=100)
    #: Records fetched ahead per partition; a full partition is not fetched until it drains.
    kafka_partition_buffer: int = Field(500, ge=1)
    kafka_commit_interval_s: float = Field(1.0, gt=0)
    #: How long the broker holds a fetch that finds nothing. aiokafka has one fetch in
    #: flight per broker, so a partition whose records were just taken waits for the
    #: fetch of the idle others to return: this bounds that wait (Kafka's 500 ms default
    #: was most of the status path's latency); lower costs more empty fetches when idle.
    kafka_fetch_max_wait_ms: int = Field(20, ge=1, le=500)
    #: What a fetch waits for (up to `kafka_fetch_max_wait_ms`) before the broker answers.
    #: Under load, one byte (Kafka's default) answers every fetch with the few records
    #: that came since the last one, and each fetch costs the same Python CPU in aiokafka
    #: however few records it brings; more lets records come in bigger batches, at up to
    #: the wait's latency per hop at low load.
    kafka_fetch_min_bytes: int = Field(1, ge=1, le=1_048_576)
    #: How long handlers at work may finish when their partitions are revoked or on stop.
    kafka_handler_grace_s: float = Field(10.0, gt=0)

    # Hub.
    heartbeat_s: int = Field(25, ge=1)
    max_frame_bytes: int = Field(4096, ge=256)
    max_subscriptions: int = Field(200, ge=1)
    connection_queue_size: int = Field(256, ge=1)
    #: Bytes waiting per socket (queued frames and the socket's own write buffer).
    connection_queue_bytes: int = Field(1024 * 1024, ge=65_536)
    bad_frame_tolerance: int = Field(10, ge=1)
    client_frames_per_s: float = Field(20.0, gt=0)
    client_frame_burst: int = Field(40, ge=1)
    rate_limit_strikes: int = Field(10, ge=1)
    rate_limit_window_s: float = Field(10.0, gt=0)
    replay_limit: int = Field(1000, ge=1)
    max_connections: int = Field(10_000, ge=1)
    max_connections_per_user: int = Field(50, ge=1)
    max_connections_per_ip: int = Field(500, ge=1)
    #: A send to a client that does not read for this long closes it with 4009.
    write_timeout_s: float = Field(10.0, gt=0)

    # Meta (WhatsApp Cloud API / Instagram Messaging); default: the built-in simulator.
    graph_url: str = ""  # default: <public_url>/simulator
    graph_api_version: str = "v21.0"
    meta_app_secret: str = DEV_SECRETS["meta_app_secret"]
    #: Earlier app secrets still accepted on webhooks while Meta switches (rotation).
    meta_previous_app_secrets: Annotated[tuple[str, ...], NoDecode] = ()
    meta_verify_token: str = DEV_SECRETS["meta_verify_token"]
    meta_access_token: str = DEV_SECRETS["meta_access_token"]
    whatsapp_phone_number_id: str = "109876543210987"
    instagram_account_id: str = "17841400000000001"
    #: The organizations that own the phone number and the Instagram account: customers'
    #: messages to them go into these organizations' conversations.
    whatsapp_org_id: str = "demo"
    instagram_org_id: str = "demo"
    #: The customer service window (24 h after the customer's last message): `enforce`
    #: refuses a free-form send outside it (422 `outside_window`) rather than have Meta
    #: refuse it (131047) after the send; `off` never does; `auto` enforces it only
    #: against Meta's real Graph API, so the simulator, the demo and the benchmarks,
    #: whose customers never write first, send as they always did.
    customer_window: Literal["auto", "enforce", "off"] = "auto"
    send_timeout_s: float = Field(10.0, gt=0)
    #: Sends per second we allow ourselves per WhatsApp business number (Meta's default
    #: tier is 80/s, 1,000/s after its upgrade) and per Instagram account (Meta: 100
    #: text sends/s); more would earn 130429.
    whatsapp_sends_per_s: float = Field(80.0, gt=0)
    instagram_sends_per_s: float = Field(100.0, gt=0)
    #: Campaign messages enter a channel's send queue only while less than this many
    #: seconds of its rate wait there (agents' messages wait behind that much at most);
    #: the campaign part creates at most `campaign_batch` messages per transaction.
    campaign_queue_s: float = Field(1.25, gt=0)
    campaign_batch: int = Field(200, ge=1, le=10_000)
    #: After a 130429 the account's sends pause this long (times the throttles in a
    #: row, up to 60 s); after a 131056 (pair rate) that customer's next try waits this.
    throttle_hold_s: float = Field(1.0, gt=0)
    pair_retry_s: float = Field(6.0, gt=0)
    #: Outbound HTTP (Graph API sends, simulator webhooks): connections at once, and how
    #: long an idle one is kept (below the server's idle timeout: see http_client.py).
    http_connections: int = Field(256, ge=1, le=10_000)
    http_keepalive_s: float = Field(4.0, gt=0)
    #: How long a status waits for its send answer before it is taken for someone else's.
    parked_ttl_s: int = Field(86_400, gt=0)

    # Media (whatslike/media): "local" keeps files under <data_dir>/media and serves them
    # at signed, expiring /media/ URLs of this process; "s3" keeps them in a bucket of an
    # S3-compatible server (S3Proxy in `make test`, AWS S3, …), handed out as pre-signed
    # URLs. The credentials are never logged.
    media_store: Literal["local", "s3"] = "local"
    media_s3_endpoint: str = ""  # e.g. http://127.0.0.1:9000; empty: AWS S3 itself
    #: The endpoint as browsers and Meta reach it, when it differs from media_s3_endpoint
    #: (pre-signed URLs are signed for this host).
    media_s3_public_endpoint: str = ""
    media_s3_bucket: str = ""
    media_s3_region: str = "us-east-1"
    media_s3_access_key: str = Field("", repr=False)
    media_s3_secret_key: str = Field("", repr=False)
    #: How long a handed-out media URL works (Meta fetches a link when it sends it).
    media_url_ttl_s: int = Field(900, ge=10, le=7 * 86_400)
    #: Uploads at work at once per process (each holds up to one 8 MiB part in memory on
    #: S3); beyond it an upload answers 503 with Retry-After.
    media_max_uploads: int = Field(8, ge=1, le=1000)
    #: Customers' media downloaded from Meta at once per connector (its connections; more
    #: wait for one), each holding up to one 8 MiB part in memory on S3.
    media_fetch_concurrency: int = Field(4, ge=1, le=100)
    #: Tries of one customer's medium while Meta answers 5xx/429 or is out of reach, with
    #: back-off from `media_fetch_backoff_s` (doubling, capped at 30 s); then it is given
    #: up (`failed`) and its message announced without it.
    media_fetch_attempts: int = Field(5, ge=1, le=20)
    media_fetch_backoff_s: float = Field(1.0, gt=0, le=30)
    #: How long one download may take, from its request to its last byte.
    media_fetch_timeout_s: float = Field(60.0, gt=0, le=600)

    # Simulator.
    sim_delay_ms: int = Field(300, ge=0)
    sim_disorder: bool = False
    sim_failure_rate: float = Field(0.0, ge=0, le=1)
    #: Simulator: Meta's rate limits, off when 0. Sends per second per WhatsApp number
    #: beyond which it answers 130429; sends to one customer in a burst beyond which it
    #: answers 131056, one more allowed per `sim_pair_interval_s` after that.
    sim_sends_per_s: float = Field(0.0, ge=0)
    sim_pair_burst: int = Field(0, ge=0)
    sim_pair_interval_s: float = Field(6.0, gt=0)
    sim_seed: int | None = None
    sim_queue_size: int = Field(10_000, ge=1)
    #: Most notifications the simulator puts in one webhook (those due together).
    sim_webhook_batch: int = Field(100, ge=1, le=1000)
    #: Multiplies the webhook retry schedule (back-off from 0.5 s doubling up to 60 s, for
    #: up to 7 days, like Meta): below 1 for tests.
    sim_time_scale: float = Field(1.0, gt=0, allow_inf_nan=False)
    #: Where the simulator posts webhooks (the connector's process). Default: this one.
    sim_webhook_url: str = ""
    #: Needed as `Authorization: Bearer …` by /simulator/control; unset, the control is
    #: open in the embedded mode and closed otherwise.
    sim_control_token: str = ""
    #: The simulator enforces the customer service window like Meta: a free-form send to
    #: a customer who has not written (to it: `POST /simulator/reply`, auto-replies) in
    #: 24 h fails with 131047 on WhatsApp, is refused with code 10 on Instagram (7 days
    #: with the HUMAN_AGENT tag). Off by default: the benchmarks' customers never write.
    sim_customer_window: bool = False
    #: The templates the simulator knows, `name:language` comma-separated; a template
    #: send of any other is refused with 132001.
    sim_templates: str = "hello_world:en_US,order_update:pt_BR"

    @field_validator("sim_templates")
    @classmethod
    def _templates_named(cls, value: str) -> str:
        for item in value.split(","):
            name, _, language = item.strip().partition(":")
            if not (re.fullmatch(TEMPLATE_NAME, name) and re.fullmatch(LANGUAGE_CODE, language)):
                raise ValueError(f"{item.strip()!r} is not name:language (e.g. hello_world:en_US)")
        return value

    @field_validator("roles", mode="before")
    @classmethod
    def _split_roles(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        unknown = [role for role in value if role not in ROLES]
        if unknown:
            raise ValueError(f"unknown role {unknown[0]!r}; choose from {', '.join(ROLES)}")
        if not value:
            raise ValueError("at least one role is needed")
        return tuple(value)

    @field_validator("allowed_origins", "meta_previous_app_secrets", mode="before")
    @classmethod
    def _split_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("database_url")
    @classmethod
    def _known_database(cls, value: str) -> str:
        if value and not value.startswith(("sqlite:", "postgresql:", "postgres:", "cassandra:")):
            raise ValueError("must start with sqlite:, postgresql:, postgres: or cassandra:")
        return value

    @field_validator("bus_url")
    @classmethod
    def _known_bus(cls, value: str) -> str:
        if value == "memory://":
            return value
        if not value.startswith("kafka://"):
            raise ValueError("must be memory:// or kafka://host:port[,host:port]")
        servers = value.removeprefix("kafka://").split(",")
        for server in servers:
            host, _, port = server.strip().rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"kafka:// needs host:port[,host:port], not {server!r}")
        return value

    @field_validator("fanout_url")
    @classmethod
    def _known_fanout(cls, value: str) -> str:
        if value != "memory://" and not value.startswith(("redis://", "rediss://")):
            raise ValueError("must be memory:// or redis://host:port/db (rediss:// for TLS)")
        return value

    @field_validator("kafka_min_insync_replicas")
    @classmethod
    def _insync_within_replicas(cls, value: int | None, info: ValidationInfo) -> int | None:
        replicas = info.data.get("kafka_replication_factor")
        if value is not None and replicas is not None and value > replicas:
            raise ValueError(
                f"must not exceed KAFKA_REPLICATION_FACTOR ({replicas}): no record could be "
                "acknowledged"
            )
        return value

    @field_validator("webhook_lease_s")
    @classmethod
    def _lease_outlasts_a_post(cls, value: float, info: ValidationInfo) -> float:
        timeout_s = info.data.get("webhook_timeout_s")
        if timeout_s is not None and value <= timeout_s:
            raise ValueError(
                f"must exceed WEBHOOK_TIMEOUT_S ({timeout_s}): a lease must outlast a POST, "
                "or another sender could deliver the same endpoint meanwhile"
            )
        return value

    @property
    def effective_min_insync_replicas(self) -> int:
        if self.kafka_min_insync_replicas is not None:
            return self.kafka_min_insync_replicas
        return self.kafka_replication_factor // 2 + 1

    @property
    def base_url(self) -> str:
        if self.public_url:
            return self.public_url.rstrip("/")
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"http://{host}:{self.port}"

    @property
    def effective_graph_url(self) -> str:
        return (self.graph_url or f"{self.base_url}/simulator").rstrip("/")

    @property
    def enforces_customer_window(self) -> bool:
        if self.customer_window == "auto":
            return urlsplit(self.effective_graph_url).hostname == META_GRAPH_HOST
        return self.customer_window == "enforce"

    @property
    def sim_template_set(self) -> frozenset[tuple[str, str]]:
        """The simulator's templates as (name, language code)."""
        pairs = (item.strip().partition(":") for item in self.sim_templates.split(","))
        return frozenset((name, language) for name, _, language in pairs)

    @property
    def sim_webhook_urls(self) -> tuple[str, ...]:
        """Where the simulator posts webhooks: one base URL, or several (comma-separated)
        taken in turn, as a load balancer in front of several connectors would."""
        given = [url.strip().rstrip("/") for url in self.sim_webhook_url.split(",")]
        return tuple(url for url in given if url) or (self.base_url.rstrip("/"),)

    @property
    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'whatslike.db'}"

    @property
    def meta_app_secrets(self) -> tuple[str, ...]:
        """Every app secret a webhook signature may use: the current one first."""
        return (self.meta_app_secret, *self.meta_previous_app_secrets)

    @property
    def effective_allowed_origins(self) -> tuple[str, ...]:
        """The WebSocket Origin allow-list; empty means any origin."""
        if self.allowed_origins or not self.embedded:
            return self.allowed_origins
        origins = [self.base_url]
        if self.host in ("127.0.0.1", "localhost"):
            origins += [f"http://127.0.0.1:{self.port}", f"http://localhost:{self.port}"]
        return tuple(dict.fromkeys(origins))

    @property
    def development(self) -> bool:
        """The embedded mode listening on a loopback address only: where the published
        development credentials may be used, since nothing else can reach them."""
        loopback = self.host in ("localhost", "::1") or self.host.startswith("127.")
        return self.embedded and loopback

    @property
    def embedded(self) -> bool:
        """True when nothing outside this process is used: demo conveniences allowed."""
        return (
            self.effective_database_url.startswith("sqlite:")
            and self.bus_url == "memory://"
            and "simulator" in self.roles
        )


def check_safety(settings: Settings) -> None:
    """Outside the embedded mode, refuse the development secrets and a simulator nobody
    asked for by name; in it, refuse the development secrets on an address other
    machines can reach (ConfigError, one line)."""
    if settings.development:
        return
    if (
        not settings.embedded
        and "simulator" in settings.roles
        and "roles" not in settings.model_fields_set
    ):
        raise ConfigError(
            "invalid setting roles (WHATSLIKE_ROLES): outside the embedded mode the "
            "simulator (a stand-in for Meta open to its callers) runs only when named; "
            "list the roles to run"
        )
    # Empty ones mean "none": a JWT secret generated in the data directory, /metrics
    # open, the simulator's control closed.
    _strong_enough(settings, "jwt_secret", MIN_JWT_SECRET_CHARS, required=False)
    _strong_enough(settings, "metrics_token", MIN_SECRET_CHARS, required=False)
    _strong_enough(settings, "sim_control_token", MIN_SECRET_CHARS, required=False)
    if not {"connector", "simulator"} & set(settings.roles):
        return  # no role of this process holds a Meta credential
    for name, dev_value in DEV_SECRETS.items():
        if dev_value in (getattr(settings, name), *settings.meta_previous_app_secrets):
            raise ConfigError(
                f"invalid setting {name} (WHATSLIKE_{name.upper()}): the development value "
                "is accepted only in the embedded mode on a loopback address; set a secret "
                "of your own"
            )
    for name in (*DEV_SECRETS, "meta_previous_app_secrets"):
        # An empty verify token would let anyone complete Meta's handshake.
        _strong_enough(settings, name, MIN_SECRET_CHARS, required=name in DEV_SECRETS)


def _strong_enough(settings: Settings, name: str, minimum: int, *, required: bool) -> None:
    """ConfigError (one line, never the value) for a secret shorter than `minimum`."""
    value = getattr(settings, name)
    for secret in value if isinstance(value, tuple) else (value,):
        if len(secret) < minimum and (secret or required):
            raise ConfigError(
                f"invalid setting {name} (WHATSLIKE_{name.upper()}): a secret of at least "
                f"{minimum} characters is needed, not {len(secret)} "
                "(e.g. openssl rand -hex 32)"
            )


def unknown_variables(environ: Mapping[str, str] | None = None) -> list[str]:
    """One warning per `WHATSLIKE_*` variable that names no setting (a typo is otherwise
    silently ignored), with the closest setting when there is one."""
    names = [f"WHATSLIKE_{name.upper()}" for name in Settings.model_fields]
    warnings = []
    for variable in sorted(os.environ if environ is None else environ):
        if not variable.startswith("WHATSLIKE_") or variable in names:
            continue
        if variable.startswith("WHATSLIKE_TEST_"):  # the test suite's own variables
            continue
        close = difflib.get_close_matches(variable, names, n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        warnings.append(f"unknown setting {variable} is ignored{hint}")
    return warnings


def load_settings(**overrides: Any) -> Settings:
    """Build the settings from the environment and the given overrides (flags).
    Overrides that are None are ignored. Raises ConfigError with one line."""
    given = {name: value for name, value in overrides.items() if value is not None}
    try:
        return Settings(**given)
    except ValidationError as exc:
        first = exc.errors()[0]
        name = ".".join(str(part) for part in first["loc"]) or "settings"
        env = f"WHATSLIKE_{name.upper()}"
        raise ConfigError(f"invalid setting {name} ({env}): {first['msg']}") from exc


def resolve_jwt_secret(settings: Settings) -> str:
    """The configured secret, or one generated once and kept in the data directory so
    that `whatslike token` and `whatslike serve` agree without any configuration."""
    if settings.jwt_secret:
        return settings.jwt_secret
    path = settings.data_dir / "jwt-secret"
    try:
        if path.exists():
            return path.read_text().strip()
        _private_dir(settings.data_dir)
        secret = secrets.token_urlsafe(32)
        # Created 0600 from the start: no moment where another user could read it.
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as file:
            file.write(secret)
    except OSError as exc:
        raise ConfigError(f"invalid setting data_dir (WHATSLIKE_DATA_DIR): {exc}") from exc
    return secret


def _private_dir(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.chmod(0o700)


SQLITE_PREFIX = "sqlite:///"


def simulator_database(settings: Settings) -> Path:
    """Where the simulator keeps its webhook schedule and send counts."""
    return settings.data_dir / "simulator.db"


def secure_data_dir(settings: Settings) -> None:
    """The data directory 0700 and the SQLite files (with their -wal and -shm, which SQLite
    creates with the file's mode) 0600, created so before SQLite opens them."""
    url = settings.effective_database_url
    databases = []
    if url.startswith(SQLITE_PREFIX) and len(url) > len(SQLITE_PREFIX):
        databases.append(Path(url[len(SQLITE_PREFIX) :]))
    if "simulator" in settings.roles:
        databases.append(simulator_database(settings))
    try:
        _private_dir(settings.data_dir)
        for database in databases:
            database.parent.mkdir(parents=True, exist_ok=True)
            os.close(os.open(database, os.O_WRONLY | os.O_CREAT, 0o600))
            for path in (database, Path(f"{database}-wal"), Path(f"{database}-shm")):
                if path.exists():
                    path.chmod(0o600)
    except OSError as exc:
        raise ConfigError(f"invalid setting data_dir (WHATSLIKE_DATA_DIR): {exc}") from exc
