"""What every search index offers: one immutable view of one model version of one store."""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, overload

import numpy as np

from embedding_assets.lib.embedders import Embedder
from embedding_assets.lib.plan import StoredTemplate
from embedding_assets.store import StoreError

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

    @classmethod
    def of(cls, rank: int, template: StoredTemplate, score: float) -> SearchHit:
        t = template
        return cls(rank, t.template_id, float(score), t.category, t.subcategory, t.question, t.answer)


@dataclass(frozen=True)
class IndexIdentity:
    """Which store, model version and store generation an index was read from."""

    store_id: str
    model_version: str
    store_generation: int


@dataclass(frozen=True)
class SearchResult(Sequence[SearchHit]):
    """The ranked hits of one query and the identity of the one index that ranked them."""

    hits: tuple[SearchHit, ...]
    identity: IndexIdentity

    @overload
    def __getitem__(self, position: int) -> SearchHit: ...

    @overload
    def __getitem__(self, positions: slice) -> tuple[SearchHit, ...]: ...

    def __getitem__(self, position):
        return self.hits[position]

    def __len__(self) -> int:
        return len(self.hits)


class StaleIndexError(StoreError):
    """The store moved on while a query was ranked against it; the index must be reloaded."""

    def __init__(self, message: str, query_vector: np.ndarray | None = None):
        super().__init__(message)
        self.query_vector = query_vector


class SearchIndex(Protocol):
    """One model version of one store generation, searchable; replaced (never changed) on reload."""

    mode: str
    identity: IndexIdentity
    embedder: Embedder
    loaded_at: str

    def search(
        self,
        text: str,
        top_k: int = 3,
        category: str | None = None,
        subcategory: str | None = None,
        query_vector: np.ndarray | None = None,
    ) -> SearchResult:
        """The ranked hits; `query_vector`, when given, is text's embedding by this index's embedder."""
        ...

    def facets(self) -> tuple[frozenset[str], frozenset[str]]:
        """The categories and subcategories the indexed templates use."""
        ...

    def templates(self) -> list[StoredTemplate]:
        """Every indexed template, ordered by template id."""
        ...

    def info(self) -> dict: ...

    def prepare(self) -> None:
        """Build what the first query would otherwise build (the lexical index), so no query waits for it."""
        ...

    def reloaded(self, model_version: str | None) -> SearchIndex | None:
        """A fresh index when the store's identity or generation differs from this one's, else None."""
        ...

    def close(self) -> None: ...

    def __len__(self) -> int: ...


def checked_query(text: str | None, top_k: int) -> str:
    """The stripped query text; ValueError for an empty query or top_k below 1."""
    text = (text or "").strip()
    if not text:
        raise ValueError("query text is empty")
    if top_k < 1:
        raise ValueError("top_k must be at least 1")
    return text


def check_facets(
    categories: frozenset[str], subcategories: frozenset[str], category: str | None, subcategory: str | None
) -> tuple[str | None, str | None]:
    """The stored category and subcategory names the filters name, in any letter case (None stays None)."""
    return matched_facet("category", category, categories), matched_facet("subcategory", subcategory, subcategories)


def matched_facet(kind: str, value: str | None, known: frozenset[str]) -> str | None:
    """The known name equal to value ignoring letter case; ValueError suggesting the closest name when none is."""
    if value is None or value in known:
        return value
    by_folded = {name.casefold(): name for name in known}
    if value.casefold() in by_folded:
        return by_folded[value.casefold()]
    closest = difflib.get_close_matches(value.casefold(), list(by_folded), n=1)
    suggestion = f"did you mean {by_folded[closest[0]]!r}? " if closest else ""
    raise ValueError(f"unknown {kind} {value!r}; {suggestion}known: {', '.join(sorted(known))}")
