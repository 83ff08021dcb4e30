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
    """A version's lexical signal over one index's templates, built once in the background."""

    def __init__(self, version: ModelVersion, documents: Sequence[str]):
        self.weight = version.lexical.weight if version.lexical else 0.0
        self._index: CharNgramIndex | None = None
        self._built = threading.Event()
        self._error: BaseException | None = None
        threading.Thread(target=self._build, args=(list(documents),), name="lexical-index", daemon=True).start()

    def _build(self, documents: list[str]) -> None:
        try:
            self._index = CharNgramIndex(documents)
        except BaseException as exc:  # handed to the first search that needs the index
            self._error = exc
        finally:
            self._built.set()

    def wait(self) -> CharNgramIndex:
        self._built.wait()
        if self._error is not None:
            raise self._error
        return self._index

    def scores(self, query: str) -> np.ndarray:
        """`weight` times each template's n-gram similarity divided by the query's best."""
        return self.weight * scaled(self.wait().scores(query))


def lexical_signal(version: ModelVersion, documents: Sequence[str]) -> LexicalSignal | None:
    """The version's declared lexical signal over the documents, or None when it declares none."""
    if version.lexical is None or version.lexical.weight == 0.0:
        return None
    return LexicalSignal(version, documents)
