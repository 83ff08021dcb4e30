"""Embedding stores selected by URL: `sqlite:///path.db`, a plain path, or `postgresql://…`."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from embedding_assets.store.base import (
    EmbeddingStore,
    ForeignDatabaseError,
    ModelVersionMismatchError,
    PublishResult,
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

DEFAULT_STORE_URL = "sqlite:///data/embeddings.db"
POSTGRES_SCHEMES = ("postgresql", "postgres")

__all__ = [
    "DEFAULT_STORE_URL",
    "EmbeddingStore",
    "ForeignDatabaseError",
    "ModelVersionMismatchError",
    "POSTGRES_SCHEMES",
    "PostgresStore",
    "PublishResult",
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
    "open_store",
    "open_store_for_rebuild",
    "redact_url",
    "sqlite_path",
    "store_backend",
]


def sqlite_path(url: str | Path) -> Path | None:
    """The file of an SQLite store URL (`sqlite:///relative`, `sqlite:////absolute`, or a path)."""
    text = str(url)
    if text.startswith("sqlite:///"):
        return Path(text[len("sqlite:///") :])
    if "://" in text:
        return None
    return Path(text)


def store_backend(url: str | Path) -> str:
    """The backend a store URL selects: "postgresql" or "sqlite"."""
    return "postgresql" if str(url).split("://", 1)[0].lower() in POSTGRES_SCHEMES else "sqlite"


def redact_url(url: str | Path) -> str:
    """The URL with any password (in the user part or a `password=` parameter) replaced, safe for logs."""
    text = str(url)
    parts = urlsplit(text)
    query = parse_qsl(parts.query, keep_blank_values=True)
    hidden_query = any(name == "password" for name, _ in query)
    if parts.password is None and not hidden_query:
        return text
    netloc = parts.netloc
    if parts.password is not None:
        netloc = f"{parts.username}:***@" + netloc.rsplit("@", 1)[1]
    if hidden_query:
        parts = parts._replace(
            query=urlencode([(n, "***" if n == "password" else v) for n, v in query], safe="*")
        )
    return urlunsplit(parts._replace(netloc=netloc))


def open_store(url: str | Path, *, create: bool = True, busy_timeout: float | None = None) -> EmbeddingStore:
    """Open the store a URL names; with create=False a missing store is an error and the store is only read.

    busy_timeout is how long an SQLite store waits for another process's lock on its file (default:
    EMBEDDING_ASSETS_BUSY_TIMEOUT or 30 s); PostgreSQL publishers queue on a row lock instead.
    """
    text = str(url)
    if "://" in text and text.split("://", 1)[0].lower() in POSTGRES_SCHEMES:
        return PostgresStore(text, create=create)
    path = sqlite_path(url)
    if path is None:
        scheme = text.split("://", 1)[0]
        raise StoreError(
            f"unsupported store URL scheme {scheme!r} in {redact_url(url)}; "
            "use sqlite:///path.db or postgresql://user:password@host:port/database"
        )
    return SqliteStore(path, create=create, busy_timeout=busy_timeout)


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
