"""Top-k template search over a published embedding store (no Dagster import)."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import numpy as np

from embedding_assets.lib.embedders import Embedder, embedder_for
from embedding_assets.retrieval.ranking import LexicalIndex, fuse
from embedding_assets.store import StoreError, StoreSnapshot, VersionInfo, open_store, redact_url, store_backend

__all__ = ["DATABASE_SEARCH_MIN_ROWS", "SearchHit", "SearchMode", "TemplateRetriever"]

# Above this many rows of a PostgreSQL store, mode="auto" ranks in the database instead of loading
# every vector (10k 384-d rows are ~15 MB and load in ~0.1 s; 100k 1024-d rows are ~400 MB).
DATABASE_SEARCH_MIN_ROWS = 50_000
SearchMode = Literal["auto", "memory", "database"]


@dataclass(frozen=True)
class SearchHit:
    """One ranked template."""

    rank: int
    template_id: str
    score: float
    category: str
    subcategory: str
    question: str
    answer: str

    def as_dict(self) -> dict:
        return self.__dict__.copy()


class _Index:
    """An immutable in-memory copy of one snapshot, ready to search."""

    def __init__(self, snapshot: StoreSnapshot, embedder: Embedder, lexical_weight: float = 0.0):
        self.snapshot = snapshot
        self.embedder = embedder
        self.matrix = snapshot.matrix
        self.category_codes, self.categories = _codes(snapshot.columns["category"])
        self.subcategory_codes, self.subcategories = _codes(snapshot.columns["subcategory"])
        self.lexical_weight = lexical_weight
        self.lexical = LexicalIndex(lexical_documents(snapshot)) if lexical_weight else None
        self.loaded_at = datetime.now(UTC).isoformat(timespec="milliseconds")


def _codes(values) -> tuple[dict[str, int], np.ndarray]:
    """Each distinct value's code, and the code of every row (filters compare integers, not strings)."""
    codes = {value: code for code, value in enumerate(dict.fromkeys(values))}
    return codes, np.fromiter((codes[v] for v in values), dtype=np.int32, count=len(values))


def lexical_documents(snapshot: StoreSnapshot) -> list[str]:
    """The text BM25 sees for each template: subcategory and question."""
    return [f"{s} {q}" for s, q in zip(snapshot.columns["subcategory"], snapshot.columns["question"])]


def _unknown(kind: str, value: str, known: dict[str, int]) -> ValueError:
    return ValueError(f"unknown {kind} {value!r}; known: {', '.join(sorted(known))}")


class _DatabaseIndex:
    """A PostgreSQL connection that ranks one model version's templates in the database."""

    def __init__(self, store, version: VersionInfo, store_generation: int, embedder: Embedder):
        self.store = store
        self.version = version
        self.store_generation = store_generation
        self.embedder = embedder
        self.categories, self.subcategories = store.facets(version.key)
        self.loaded_at = datetime.now(UTC).isoformat(timespec="milliseconds")
        self.lock = threading.Lock()


class TemplateRetriever:
    """Answers top-k queries over one model version: from an in-memory copy, or ranked in PostgreSQL."""

    def __init__(self, store: str | Path, index: _Index | _DatabaseIndex, model_version: str | None):
        self._store_url = str(store)
        self._index = index
        self._pinned_version = model_version

    @classmethod
    def load(
        cls,
        store: str | Path,
        model_version: str | None = None,
        embedder: Embedder | None = None,
        mode: SearchMode = "auto",
        database_min_rows: int = DATABASE_SEARCH_MIN_ROWS,
        lexical_weight: float = 0.0,
    ) -> TemplateRetriever:
        """Load `model_version` (default: the store's current version) for searching.

        mode="memory" copies the published vectors into memory; mode="database" ranks each query in
        PostgreSQL with the version's HNSW index; mode="auto" picks the database for PostgreSQL
        stores with at least `database_min_rows` rows, memory otherwise. In memory mode,
        `lexical_weight` > 0 adds that fraction of a BM25 score (scaled to the best candidate's) to
        the cosine similarity; 0, the default, ranks by cosine similarity alone.
        """
        if mode not in ("auto", "memory", "database"):
            raise ValueError(f"unknown search mode {mode!r}; use auto, memory or database")
        if mode == "database" and store_backend(store) != "postgresql":
            raise StoreError(f"search mode 'database' needs a PostgreSQL store, not {redact_url(store)}")
        if lexical_weight < 0:
            raise ValueError("lexical_weight must not be negative")
        opened = open_store(store, create=False)
        try:
            if mode != "memory" and store_backend(store) == "postgresql":
                database = cls._database_index(opened, model_version, embedder, mode, database_min_rows)
                if database is not None:
                    opened = None
                    return cls(store, database, model_version)
            snapshot = opened.snapshot(model_version)
        finally:
            if opened is not None:
                opened.close()
        embedder = embedder or embedder_for(snapshot.version.to_model_version())
        return cls(store, _Index(snapshot, embedder, lexical_weight), model_version)

    @staticmethod
    def _database_index(
        opened, model_version: str | None, embedder: Embedder | None, mode: SearchMode, min_rows: int
    ) -> _DatabaseIndex | None:
        """The database index for this load, or None when auto mode prefers memory."""
        generation = opened.generation()
        key = model_version or opened.current_version()
        version = opened.version(key) if key else None
        if version is None:
            opened.snapshot(model_version)  # raises the same "not published" error as memory mode
        if mode == "auto" and version.rows < min_rows:
            return None
        return _DatabaseIndex(opened, version, generation, embedder or embedder_for(version.to_model_version()))

    @property
    def search_mode(self) -> str:
        """Where queries are ranked: "database" (PostgreSQL) or "memory"."""
        return "database" if isinstance(self._index, _DatabaseIndex) else "memory"

    def _search_database(
        self, text: str, top_k: int, category: str | None, subcategory: str | None
    ) -> list[SearchHit]:
        index = self._index
        if category is not None and category not in index.categories:
            raise ValueError(f"unknown category {category!r}")
        if subcategory is not None and subcategory not in index.subcategories:
            raise ValueError(f"unknown subcategory {subcategory!r}")
        query = index.embedder.embed_query(text)
        with index.lock:
            ranked = index.store.search(index.version.key, query, top_k, category, subcategory)
        return [
            SearchHit(rank, t.template_id, score, t.category, t.subcategory, t.question, t.answer)
            for rank, (t, score) in enumerate(ranked, start=1)
        ]

    def _reload_database(self) -> bool:
        index = self._index
        with index.lock:
            if index.store.generation() == index.store_generation:
                return False
            fresh = self._database_index(index.store, self._pinned_version, None, "database", 0)
        same_model = fresh.version.fingerprint == index.version.fingerprint
        fresh.embedder = index.embedder if same_model else fresh.embedder
        fresh.lock = index.lock  # the same connection, so the same lock
        self._index = fresh
        return True

    def close(self) -> None:
        """Release the database connection of database mode (memory mode holds none)."""
        if isinstance(self._index, _DatabaseIndex):
            self._index.store.close()

    def search(
        self, text: str, top_k: int = 3, category: str | None = None, subcategory: str | None = None
    ) -> list[SearchHit]:
        """The top_k templates most similar to text, optionally within a category/subcategory."""
        text = (text or "").strip()
        if not text:
            raise ValueError("query text is empty")
        if top_k < 1:
            raise ValueError("top_k must be at least 1")
        if isinstance(self._index, _DatabaseIndex):
            return self._search_database(text, top_k, category, subcategory)
        index = self._index
        mask = np.ones(len(index.snapshot), dtype=bool)
        if category is not None:
            if category not in index.category_codes:
                raise _unknown("category", category, index.category_codes)
            mask &= index.categories == index.category_codes[category]
        if subcategory is not None:
            if subcategory not in index.subcategory_codes:
                raise _unknown("subcategory", subcategory, index.subcategory_codes)
            mask &= index.subcategories == index.subcategory_codes[subcategory]
        candidates = np.flatnonzero(mask)
        if candidates.size == 0:
            return []
        query = index.embedder.embed_query(text)
        scores = index.matrix @ query
        lexical = index.lexical.scores(text) if index.lexical is not None else None
        if candidates.size < mask.size:
            scores = scores[candidates]
            lexical = lexical[candidates] if lexical is not None else None
        if lexical is not None:
            scores = fuse(scores, lexical, index.lexical_weight)
        k = min(top_k, candidates.size)
        best = np.argpartition(-scores, k - 1)[:k]
        best = best[np.argsort(-scores[best], kind="stable")]
        hits = []
        for rank, position in enumerate(best, start=1):
            t = index.snapshot.template(candidates[position])
            hits.append(
                SearchHit(rank, t.template_id, float(scores[position]), t.category, t.subcategory, t.question, t.answer)
            )
        return hits

    def reload_if_changed(self) -> bool:
        """Reload when the store's generation moved on; True if a new snapshot was loaded."""
        if isinstance(self._index, _DatabaseIndex):
            return self._reload_database()
        opened = open_store(self._store_url, create=False)
        try:
            if opened.generation() == self._index.snapshot.store_generation:
                return False
            snapshot = opened.snapshot(self._pinned_version)
        finally:
            opened.close()
        old = self._index
        same_model = snapshot.version.fingerprint == old.snapshot.version.fingerprint
        embedder = old.embedder if same_model else embedder_for(snapshot.version.to_model_version())
        self._index = _Index(snapshot, embedder, old.lexical_weight)
        return True

    def info(self) -> dict:
        """Model version, generations, row count and load time of the loaded snapshot."""
        if isinstance(self._index, _DatabaseIndex):
            index = self._index
            return {
                **index.version.as_dict(),
                "store_generation": index.store_generation,
                "loaded_rows": index.version.rows,
                "loaded_at": index.loaded_at,
                "store": redact_url(self._store_url),
                "search_mode": "database",
            }
        snapshot = self._index.snapshot
        return {
            **snapshot.version.as_dict(),
            "store_generation": snapshot.store_generation,
            "loaded_rows": len(snapshot),
            "loaded_at": self._index.loaded_at,
            "store": redact_url(self._store_url),
            "search_mode": "memory",
        }

    @property
    def snapshot(self) -> StoreSnapshot:
        """The loaded snapshot (replaced, never changed, by a reload)."""
        return self._index.snapshot

    def __len__(self) -> int:
        if isinstance(self._index, _DatabaseIndex):
            return self._index.version.rows
        return len(self._index.snapshot)

