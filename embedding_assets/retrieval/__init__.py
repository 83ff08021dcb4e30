"""Top-k template search over a published embedding store (no Dagster import)."""

from __future__ import annotations

import threading
from pathlib import Path

from embedding_assets.lib.embedders import Embedder
from embedding_assets.retrieval.database import DEFAULT_CONNECTIONS, DatabaseIndex, StorePool
from embedding_assets.retrieval.index import (
    IndexIdentity,
    SearchHit,
    SearchIndex,
    SearchMode,
    SearchResult,
    StaleIndexError,
)
from embedding_assets.retrieval.memory import MemoryIndex, lexical_documents
from embedding_assets.store import StoreError, open_store, redact_url, store_backend

__all__ = [
    "DATABASE_SEARCH_MIN_ROWS",
    "DatabaseIndex",
    "IndexIdentity",
    "MemoryIndex",
    "SearchHit",
    "SearchIndex",
    "SearchMode",
    "SearchResult",
    "StaleIndexError",
    "TemplateRetriever",
    "lexical_documents",
]

# Above this many rows of a PostgreSQL store, mode="auto" ranks in the database instead of loading
# every vector (10k 384-d rows are ~15 MB and load in ~0.1 s; 100k 1024-d rows are ~400 MB).
DATABASE_SEARCH_MIN_ROWS = 50_000
# A search that finds the store moved on reloads and ranks again, at most this many times.
STALE_RETRIES = 3


class TemplateRetriever:
    """Answers top-k queries over one model version; a reload swaps in a new index, never edits one."""

    def __init__(self, index: SearchIndex, model_version: str | None):
        self._index = index
        self._pinned_version = model_version
        self._reload_lock = threading.Lock()

    @classmethod
    def load(
        cls,
        store: str | Path,
        model_version: str | None = None,
        embedder: Embedder | None = None,
        mode: SearchMode = "auto",
        database_min_rows: int = DATABASE_SEARCH_MIN_ROWS,
        lexical_weight: float = 0.0,
        database_connections: int = DEFAULT_CONNECTIONS,
    ) -> TemplateRetriever:
        """Load `model_version` (default: the store's current version) for searching.

        mode="memory" copies the published vectors into memory; mode="database" ranks each query in
        PostgreSQL with the version's HNSW index over up to `database_connections` connections;
        mode="auto" picks the database for PostgreSQL stores with at least `database_min_rows` rows
        and no lexical weight, memory otherwise. `lexical_weight` > 0 adds that fraction of a BM25
        score (scaled to the best candidate's) to the cosine similarity; it needs memory mode, so
        mode="database" with a lexical weight is refused.
        """
        if mode not in ("auto", "memory", "database"):
            raise ValueError(f"unknown search mode {mode!r}; use auto, memory or database")
        if lexical_weight < 0:
            raise ValueError("lexical_weight must not be negative")
        if mode == "database" and lexical_weight:
            raise ValueError(
                "lexical_weight needs search mode 'memory': database mode ranks by cosine similarity in "
                "PostgreSQL alone; use mode 'memory' (or 'auto') for a lexical weight, or lexical_weight 0"
            )
        url = str(store)
        postgres = store_backend(url) == "postgresql"
        if mode == "database" and not postgres:
            raise StoreError(f"search mode 'database' needs a PostgreSQL store, not {redact_url(url)}")
        if mode == "memory" or not postgres or lexical_weight:
            return cls(MemoryIndex.load(url, model_version, embedder, lexical_weight), model_version)
        opened = open_store(url, create=False)
        try:
            if mode == "auto":
                key = model_version or opened.current_version()
                version = opened.version(key) if key else None
                if version is None or version.rows < database_min_rows:
                    opened.close()
                    opened = None
                    return cls(MemoryIndex.load(url, model_version, embedder), model_version)
            pool = StorePool(url, database_connections, first=opened)
            opened = None
            try:
                return cls(DatabaseIndex.open(pool, model_version, embedder), model_version)
            except BaseException:
                pool.close()
                raise
        finally:
            if opened is not None:
                opened.close()

    @property
    def index(self) -> SearchIndex:
        """The loaded index: immutable; a reload replaces it."""
        return self._index

    @property
    def search_mode(self) -> str:
        """Where queries are ranked: "database" (PostgreSQL) or "memory"."""
        return self._index.mode

    def search(
        self, text: str, top_k: int = 3, category: str | None = None, subcategory: str | None = None
    ) -> SearchResult:
        """The top_k templates most similar to text, with the identity of the index that ranked them."""
        index, query_vector = self._index, None
        for attempt in range(STALE_RETRIES + 1):
            try:
                return index.search(text, top_k, category, subcategory, query_vector=query_vector)
            except StaleIndexError as stale:
                if attempt == STALE_RETRIES:
                    raise
                self.reload_if_changed()
                fresh = self._index
                query_vector = stale.query_vector if fresh.embedder is index.embedder else None
                index = fresh

    def reload_if_changed(self) -> bool:
        """Swap in a fresh, prepared index when the store's identity or generation changed (either way); True if so.

        Queries keep using the old index until the swap, so none waits for the new one's lexical index.
        """
        with self._reload_lock:
            fresh = self._index.reloaded(self._pinned_version)
            if fresh is None:
                return False
            fresh.prepare()
            self._index = fresh
            return True

    def info(self) -> dict:
        """Model version, store identity and generation, row count and load time of the loaded index."""
        return self._index.info()

    def close(self) -> None:
        """Release the database connections of database mode (memory mode holds none)."""
        self._index.close()

    def __len__(self) -> int:
        return len(self._index)
