"""Embedding stores selected by address: `sqlite:///path.db`, a path, `postgresql://…` or libpq keywords."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from embedding_assets.store.base import (
    EmbeddingStore,
    ForeignDatabaseError,
    ModelVersionMismatchError,
    NothingToRollBackError,
    PublishResult,
    RollbackResult,
    StalePlanError,
    StoreCorruptError,
    StoreError,
    StoreLockedError,
    StoreNotFoundError,
    StoreReadOnlyError,
    StoreSnapshot,
    StoreState,
    VersionInfo,
)
from embedding_assets.store.postgres import PostgresStore
from embedding_assets.store.sqlite import SqliteStore, proven_damaged
from embedding_assets.store.urls import (
    DEFAULT_STORE_URL,
    POSTGRES_SCHEMES,
    PostgresAddress,
    is_postgres,
    parse_store_url,
    redact_url,
    sqlite_path,
    store_backend,
)

__all__ = [
    "DEFAULT_STORE_URL",
    "EmbeddingStore",
    "ForeignDatabaseError",
    "ModelVersionMismatchError",
    "NothingToRollBackError",
    "POSTGRES_SCHEMES",
    "PostgresAddress",
    "PostgresStore",
    "PublishResult",
    "RollbackResult",
    "SqliteStore",
    "StalePlanError",
    "StoreCorruptError",
    "StoreError",
    "StoreLockedError",
    "StoreNotFoundError",
    "StoreReadOnlyError",
    "StoreSnapshot",
    "StoreState",
    "VersionInfo",
    "is_postgres",
    "open_store",
    "open_store_for_rebuild",
    "parse_store_url",
    "redact_url",
    "sqlite_path",
    "store_backend",
]


def open_store(url: str | Path, *, create: bool = True, busy_timeout: float | None = None) -> EmbeddingStore:
    """Open the store a URL names; with create=False a missing store is an error and the store is only read.

    busy_timeout is how long an SQLite store waits for another process's lock on its file (default:
    EMBEDDING_ASSETS_BUSY_TIMEOUT or 30 s); PostgreSQL publishers queue on a row lock instead.
    """
    address = parse_store_url(url)
    if isinstance(address, PostgresAddress):
        return PostgresStore(str(url), create=create)
    return SqliteStore(address, create=create, busy_timeout=busy_timeout)


def open_store_for_rebuild(url: str | Path) -> tuple[EmbeddingStore, Path | None]:
    """Open a store for a forced rebuild; a damaged SQLite file is moved aside (kept) and a new one made.

    Only a file SQLite proves damaged (quick_check reports damage, or it is not a database) is moved;
    a locked, unreadable or read-only store raises its error and stays where it is.
    Returns the store and where the damaged file went (None when nothing was moved).
    """
    store = None
    try:
        store = open_store(url)
        store.check_integrity()
        return store, None
    except StoreCorruptError:
        if store is not None:
            store.close()
        path = sqlite_path(url)
        if path is None or not proven_damaged(path):
            raise
    aside = path.with_name(f"{path.name}.damaged-{datetime.now(UTC):%Y%m%dT%H%M%S%f}")
    path.rename(aside)
    for suffix in ("-wal", "-shm"):
        companion = path.with_name(path.name + suffix)
        if companion.exists():
            companion.rename(aside.with_name(aside.name + suffix))
    return open_store(url), aside
