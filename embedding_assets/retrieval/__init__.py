"""Top-k template search over a published embedding store (no Dagster import)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from embedding_assets.lib.embedders import Embedder, embedder_for
from embedding_assets.retrieval.ranking import LexicalIndex, fuse
from embedding_assets.store import StoreSnapshot, open_store, redact_url

__all__ = ["SearchHit", "TemplateRetriever"]


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


class TemplateRetriever:
    """Loads one model version of a store into memory and answers top-k queries."""

    def __init__(self, store: str | Path, index: _Index, model_version: str | None):
        self._store_url = str(store)
        self._index = index
        self._pinned_version = model_version

    @classmethod
    def load(
        cls,
        store: str | Path,
        model_version: str | None = None,
        embedder: Embedder | None = None,
        lexical_weight: float = 0.0,
    ) -> TemplateRetriever:
        """Load the published templates of `model_version` (default: the store's current version).

        `lexical_weight` > 0 adds that fraction of a BM25 score (scaled to the best candidate's) to the
        cosine similarity; 0, the default, ranks by cosine similarity alone.
        """
        if lexical_weight < 0:
            raise ValueError("lexical_weight must not be negative")
        opened = open_store(store, create=False)
        try:
            snapshot = opened.snapshot(model_version)
        finally:
            opened.close()
        embedder = embedder or embedder_for(snapshot.version.to_model_version())
        return cls(store, _Index(snapshot, embedder, lexical_weight), model_version)

    def search(
        self, text: str, top_k: int = 3, category: str | None = None, subcategory: str | None = None
    ) -> list[SearchHit]:
        """The top_k templates most similar to text, optionally within a category/subcategory."""
        text = (text or "").strip()
        if not text:
            raise ValueError("query text is empty")
        if top_k < 1:
            raise ValueError("top_k must be at least 1")
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
        snapshot = self._index.snapshot
        return {
            **snapshot.version.as_dict(),
            "store_generation": snapshot.store_generation,
            "loaded_rows": len(snapshot),
            "loaded_at": self._index.loaded_at,
            "store": redact_url(self._store_url),
        }

    @property
    def snapshot(self) -> StoreSnapshot:
        """The loaded snapshot (replaced, never changed, by a reload)."""
        return self._index.snapshot

    def __len__(self) -> int:
        return len(self._index.snapshot)

