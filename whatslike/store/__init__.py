"""The store port and its adapters, and `open_store`, which picks the adapter from the
configured database URL (WHATSLIKE_DATABASE_URL)."""

from __future__ import annotations

from pathlib import Path

from whatslike.errors import ConfigError
from whatslike.store.base import Store
from whatslike.store.cassandra import CassandraStore
from whatslike.store.postgres import PostgresStore
from whatslike.store.sqlite import SQLiteStore, SQLiteSynchronous

_SQLITE_PREFIX = "sqlite:///"


def open_store(
    url: str, *, sqlite_synchronous: SQLiteSynchronous = "full", pool_size: int = 10
) -> Store:
    """An unopened store for ``sqlite:///relative.db``, ``sqlite:////abs.db``,
    ``postgresql://…`` (``postgres://…``) or ``cassandra://host:port/keyspace``; call
    `open()` on it before use. `pool_size`: PostgreSQL connections at most."""
    if url.startswith(_SQLITE_PREFIX) and len(url) > len(_SQLITE_PREFIX):
        return SQLiteStore(Path(url[len(_SQLITE_PREFIX) :]), synchronous=sqlite_synchronous)
    if url.startswith(("postgresql://", "postgres://")):
        return PostgresStore(url, max_size=pool_size)
    if url.startswith("cassandra://"):
        return CassandraStore(url)
    # Only the scheme is echoed: the rest of a URL may hold a password.
    scheme = url.split(":", 1)[0] if ":" in url else "(none)"
    raise ConfigError(
        f"WHATSLIKE_DATABASE_URL: unsupported database URL (scheme {scheme!r});"
        " expected sqlite:///path/to/file.db, postgresql://user@host:port/dbname"
        " or cassandra://host:port/keyspace"
    )


__all__ = ["CassandraStore", "PostgresStore", "SQLiteStore", "Store", "open_store"]
