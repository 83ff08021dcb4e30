"""An in-memory copy of one store snapshot, ranked with numpy (and optionally BM25)."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np

from embedding_assets.lib.embedders import Embedder, embedder_for
from embedding_assets.lib.plan import StoredTemplate
from embedding_assets.retrieval.index import (
    IndexIdentity,
    SearchHit,
    SearchResult,
    check_facets,
    checked_query,
)
from embedding_assets.retrieval.fusion import fuse_views, lexical_signal, lexical_text
from embedding_assets.retrieval.ranking import LexicalIndex, fuse
from embedding_assets.store import StoreSnapshot, open_store, redact_url


def lexical_documents(snapshot: StoreSnapshot) -> list[str]:
    """The text BM25 sees for each template: subcategory and question."""
    return [f"{s} {q}" for s, q in zip(snapshot.columns["subcategory"], snapshot.columns["question"])]


def _codes(values) -> tuple[dict[str, int], np.ndarray]:
    """Each distinct value's code, and the code of every row (filters compare integers, not strings)."""
    codes = {value: code for code, value in enumerate(dict.fromkeys(values))}
    return codes, np.fromiter((codes[v] for v in values), dtype=np.int32, count=len(values))


class MemoryIndex:
    """An immutable in-memory copy of one snapshot, ready to search."""

    mode = "memory"

    def __init__(self, store_url: str, snapshot: StoreSnapshot, embedder: Embedder, lexical_weight: float = 0.0):
        self.store_url = store_url
        self.snapshot = snapshot
        self.identity = IndexIdentity(snapshot.store_id, snapshot.version.key, snapshot.store_generation)
        self.embedder = embedder
        self.lexical_weight = lexical_weight
        self._category_codes, self._categories = _codes(snapshot.columns["category"])
        self._subcategory_codes, self._subcategories = _codes(snapshot.columns["subcategory"])
        self._lexical = LexicalIndex(lexical_documents(snapshot)) if lexical_weight else None
        self._version = snapshot.version.to_model_version()
        self._view_matrices = snapshot.view_matrices()
        columns = snapshot.columns
        self._signal = lexical_signal(
            self._version, [lexical_text(*row) for row in zip(columns["subcategory"], columns["question"], columns["answer"])]
        )
        self.loaded_at = datetime.now(UTC).isoformat(timespec="milliseconds")

    @classmethod
    def load(
        cls, store_url: str, model_version: str | None, embedder: Embedder | None = None, lexical_weight: float = 0.0
    ) -> MemoryIndex:
        """Copy `model_version` (default: the current one) of the store into memory."""
        with open_store(store_url, create=False) as opened:
            snapshot = opened.snapshot(model_version)
        return cls(store_url, snapshot, embedder or embedder_for(snapshot.version.to_model_version()), lexical_weight)

    def search(
        self,
        text: str,
        top_k: int = 3,
        category: str | None = None,
        subcategory: str | None = None,
        query_vector: np.ndarray | None = None,
    ) -> SearchResult:
        """The top_k templates most similar to text, optionally within a category/subcategory."""
        text = checked_query(text, top_k)
        category, subcategory = check_facets(*self.facets(), category, subcategory)
        mask = np.ones(len(self.snapshot), dtype=bool)
        if category is not None:
            mask &= self._categories == self._category_codes[category]
        if subcategory is not None:
            mask &= self._subcategories == self._subcategory_codes[subcategory]
        candidates = np.flatnonzero(mask)
        if candidates.size == 0:
            return SearchResult((), self.identity)
        query = self.embedder.embed_query(text) if query_vector is None else query_vector
        scores = fuse_views(self._version, [matrix @ query for matrix in self._view_matrices])
        if self._signal is not None:
            scores = scores + self._signal.scores(text)
        lexical = self._lexical.scores(text) if self._lexical is not None else None
        if candidates.size < mask.size:
            scores = scores[candidates]
            lexical = lexical[candidates] if lexical is not None else None
        if lexical is not None:
            scores = fuse(scores, lexical, self.lexical_weight)
        k = min(top_k, candidates.size)
        best = np.argpartition(-scores, k - 1)[:k]
        best = best[np.argsort(-scores[best], kind="stable")]
        hits = tuple(
            SearchHit.of(rank, self.snapshot.template(candidates[position]), scores[position])
            for rank, position in enumerate(best, start=1)
        )
        return SearchResult(hits, self.identity)

    def facets(self) -> tuple[frozenset[str], frozenset[str]]:
        return frozenset(self._category_codes), frozenset(self._subcategory_codes)

    def templates(self) -> list[StoredTemplate]:
        return self.snapshot.templates

    def info(self) -> dict:
        return {
            **self.snapshot.version.as_dict(),
            "store_id": self.identity.store_id,
            "store_generation": self.identity.store_generation,
            "loaded_rows": len(self),
            "loaded_at": self.loaded_at,
            "store": redact_url(self.store_url),
            "search_mode": self.mode,
        }

    def prepare(self) -> None:
        if self._signal is not None:
            self._signal.index()

    def reloaded(self, model_version: str | None) -> MemoryIndex | None:
        with open_store(self.store_url, create=False) as opened:
            state = opened.state()
            if (state.store_id, state.generation) == (self.identity.store_id, self.identity.store_generation):
                return None
            snapshot = opened.snapshot(model_version)
        same_model = snapshot.version.fingerprint == self.snapshot.version.fingerprint
        embedder = self.embedder if same_model else embedder_for(snapshot.version.to_model_version())
        return MemoryIndex(self.store_url, snapshot, embedder, self.lexical_weight)

    def close(self) -> None:
        """Nothing to release: the snapshot is plain memory."""

    def __len__(self) -> int:
        return len(self.snapshot)
