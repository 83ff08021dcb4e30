"""Embedding stores selected by URL: `sqlite:///path.db` or a plain path."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from embedding_assets.store.base import (
    EmbeddingStore,
    ForeignDatabaseError,
    ModelVersionMismatchError,
    PublishRequest,
    PublishResult,
    StalePlanError,
    StoreCorruptError,
    StoreError,
    StoreNotFoundError,
    StoreSnapshot,
    VersionInfo,
)
from embedding_assets.store.sqlite import SqliteStore

DEFAULT_STORE_URL = "sqlite:///data/embeddings.db"

__all__ = [
    "DEFAULT_STORE_URL",
    "EmbeddingStore",
    "ForeignDatabaseError",
    "ModelVersionMismatchError",
    "PublishRequest",
    "PublishResult",
    "SqliteStore",
    "StalePlanError",
    "StoreCorruptError",
    "StoreError",
    "StoreNotFoundError",
    "StoreSnapshot",
    "VersionInfo",
    "open_store",
    "open_store_for_rebuild",
    "redact_url",
    "sqlite_path",
]


def sqlite_path(url: str | Path) -> Path | None:
    """The file of an SQLite store URL (`sqlite:///relative`, `sqlite:////absolute`, or a path)."""
    text = str(url)
    if text.startswith("sqlite:///"):
        return Path(text[len("sqlite:///") :])
    if "://" in text:
        return None
    return Path(text)


def redact_url(url: str | Path) -> str:
    """The URL with any password replaced, safe for logs and metadata."""
    text = str(url)
    parts = urlsplit(text)
    if parts.password is None:
        return text
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def open_store(url: str | Path, *, create: bool = True) -> EmbeddingStore:
    """Open the store a URL names; with create=False a missing store is an error."""
    path = sqlite_path(url)
    if path is None:
        scheme = str(url).split("://", 1)[0]
        raise StoreError(f"unsupported store URL scheme {scheme!r} in {redact_url(url)}; use sqlite:///path.db")
    return SqliteStore(path, create=create)


def open_store_for_rebuild(url: str | Path) -> tuple[EmbeddingStore, Path | None]:
    """Open a store for a forced rebuild; a damaged SQLite file is moved aside (kept) and a new one made.

    Returns the store and where the damaged file went (None when nothing was moved).
    """
    store = None
    try:
        store = open_store(url)
        store.check_integrity()
        return store, None
    except ForeignDatabaseError:
        raise
    except StoreCorruptError:
        if store is not None:
            store.close()
        path = sqlite_path(url)
        if path is None:
            raise
    aside = path.with_name(f"{path.name}.damaged-{datetime.now(UTC):%Y%m%dT%H%M%S%f}")
    path.rename(aside)
    for suffix in ("-wal", "-shm"):
        companion = path.with_name(path.name + suffix)
        if companion.exists():
            companion.rename(aside.with_name(aside.name + suffix))
    return open_store(url), aside
