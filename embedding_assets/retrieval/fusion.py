"""How a model version ranks: its views' similarities fused as declared, plus its lexical signal."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np

from embedding_assets.lib.model_versions import ModelVersion
from embedding_assets.retrieval.lexical import CharNgramIndex, scaled


def lexical_text(subcategory: str, question: str, answer: str) -> str:
    """The text the character n-gram signal matches a query against."""
    return f"{subcategory} {question} {answer}"


def fuse_views(version: ModelVersion, similarities: Sequence[np.ndarray]) -> np.ndarray:
    """One score per template from each view's cosine similarity: weighted sum or weighted max."""
    if len(similarities) == 1:
        return similarities[0]
    weighted = [view.weight * s for view, s in zip(version.text_views, similarities, strict=True)]
    if version.fusion == "max":
        return np.max(np.stack(weighted), axis=0)
    return np.sum(np.stack(weighted), axis=0)


class LexicalSignal:
    """A version's lexical signal over one index's templates, built once, by the first query that needs it.

    Building takes far longer than loading the vectors (about 1 s for 201 templates on a busy
    machine), and a background build would hold the interpreter lock while the store loads.
    """

    def __init__(self, version: ModelVersion, documents: Sequence[str]):
        self.weight = version.lexical.weight if version.lexical else 0.0
        self._documents = list(documents)
        self._index: CharNgramIndex | None = None
        self._lock = threading.Lock()

    @property
    def built(self) -> bool:
        return self._index is not None

    def index(self) -> CharNgramIndex:
        """The n-gram index, built on first use (concurrent first queries build it once)."""
        if self._index is None:
            with self._lock:
                if self._index is None:
                    self._index = CharNgramIndex(self._documents)
        return self._index

    def scores(self, query: str) -> np.ndarray:
        """`weight` times each template's n-gram similarity divided by the query's best."""
        return self.weight * scaled(self.index().scores(query))


def lexical_signal(version: ModelVersion, documents: Sequence[str]) -> LexicalSignal | None:
    """The version's declared lexical signal over the documents, or None when it declares none."""
    if version.lexical is None or version.lexical.weight == 0.0:
        return None
    return LexicalSignal(version, documents)
