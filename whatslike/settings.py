"""One immutable settings object, built once in `main()` from environment variables
(`WHATSLIKE_*`) and command-line flags (flags win), then passed down. Nothing below this
module reads `os.environ`. A bad value stops the start with one line naming the setting.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from whatslike.errors import ConfigError

ROLES = ("api", "router", "connector", "status-worker", "simulator")


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
    bus_url: str = "memory://"
    fanout_url: str = "memory://"

    # Tokens.
    jwt_secret: str = ""  # default (embedded): generated once, kept in data_dir/jwt-secret
    jwt_issuer: str = ""
    jwt_audience: str = ""
    token_ttl_s: int = Field(3600, gt=0)
    allowed_origins: Annotated[tuple[str, ...], NoDecode] = ()

    # Bus (in-process adapter) and consumers.
    bus_partitions: int = Field(4, ge=1, le=256)
    bus_queue_size: int = Field(10_000, ge=1)
    bus_publish_timeout_s: float = Field(5.0, gt=0)
    # About 40 s of retries (worst case ~90 s) before a dead letter: enough to ride out a
    # database failover or a provider blip while holding the partition's order.
    consumer_max_attempts: int = Field(12, ge=1)
    consumer_backoff_base_s: float = Field(0.1, gt=0)
    consumer_backoff_cap_s: float = Field(15.0, gt=0)

    # Kafka bus (bus_url kafka://host:port[,host:port]).
    #: Partitions of each topic the bus creates (at most this many consumers of a group work).
    kafka_partitions: int = Field(8, ge=1, le=1024)
    kafka_replication_factor: int = Field(1, ge=1, le=16)
    #: Put before every topic name (tests use it to keep their topics apart).
    kafka_topic_prefix: str = Field("", pattern=r"^[A-Za-z0-9._-]*$", max_length=100)
    #: Records fetched ahead per partition; a full partition is not fetched until it drains.
    kafka_partition_buffer: int = Field(500, ge=1)
    kafka_commit_interval_s: float = Field(1.0, gt=0)
    #: How long handlers at work may finish when their partitions are revoked or on stop.
    kafka_handler_grace_s: float = Field(10.0, gt=0)

    # Hub.
    heartbeat_s: int = Field(25, ge=1)
    max_frame_bytes: int = Field(4096, ge=256)
    max_subscriptions: int = Field(200, ge=1)
    connection_queue_size: int = Field(256, ge=1)
    bad_frame_tolerance: int = Field(10, ge=1)
    client_frames_per_s: float = Field(20.0, gt=0)
    client_frame_burst: int = Field(40, ge=1)
    rate_limit_strikes: int = Field(10, ge=1)
    replay_limit: int = Field(1000, ge=1)

    # Meta (WhatsApp Cloud API / Instagram Messaging); default: the built-in simulator.
    graph_url: str = ""  # default: <public_url>/simulator
    graph_api_version: str = "v21.0"
    meta_app_secret: str = "whatslike-dev-app-secret"
    meta_verify_token: str = "whatslike-dev-verify-token"
    meta_access_token: str = "whatslike-dev-access-token"
    whatsapp_phone_number_id: str = "109876543210987"
    instagram_account_id: str = "17841400000000001"
    send_timeout_s: float = Field(10.0, gt=0)
    #: How long a status waits for its send answer before it is taken for someone else's.
    parked_ttl_s: int = Field(86_400, gt=0)

    # Simulator.
    sim_delay_ms: int = Field(300, ge=0)
    sim_disorder: bool = False
    sim_failure_rate: float = Field(0.0, ge=0, le=1)
    sim_seed: int | None = None
    sim_queue_size: int = Field(10_000, ge=1)
    #: Where the simulator posts webhooks (the connector's process). Default: this one.
    sim_webhook_url: str = ""

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

    @field_validator("allowed_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("database_url")
    @classmethod
    def _known_database(cls, value: str) -> str:
        if value and not value.startswith(("sqlite:", "postgresql:", "postgres:")):
            raise ValueError("must start with sqlite:, postgresql: or postgres:")
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
    def _known_transport(cls, value: str) -> str:
        if value != "memory://":
            raise ValueError("only memory:// is available in this version")
        return value

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
    def effective_sim_webhook_url(self) -> str:
        return (self.sim_webhook_url or self.base_url).rstrip("/")

    @property
    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'whatslike.db'}"

    @property
    def embedded(self) -> bool:
        """True when nothing outside this process is used: demo conveniences allowed."""
        return (
            self.effective_database_url.startswith("sqlite:")
            and self.bus_url == "memory://"
            and "simulator" in self.roles
        )


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
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        secret = secrets.token_urlsafe(32)
        path.write_text(secret)
        path.chmod(0o600)
    except OSError as exc:
        raise ConfigError(f"invalid setting data_dir (WHATSLIKE_DATA_DIR): {exc}") from exc
    return secret
