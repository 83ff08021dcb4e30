"""Lexical (BM25) scoring of templates and its fusion with the dense similarity."""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

_WORD = re.compile(r"\w\w+", re.UNICODE)


class LexicalIndex:
    """BM25 over lowercased, stemmed Russian words (other scripts pass through the stemmer unchanged)."""

    def __init__(self, documents: Sequence[str]):
        import bm25s  # imported here: only a retriever with a lexical weight pays its import time
        import Stemmer
        from bm25s.stopwords import STOPWORDS_RUSSIAN

        self._stopwords = frozenset(STOPWORDS_RUSSIAN)
        self._stemmer = Stemmer.Stemmer("russian")
        self._size = len(documents)
        self._bm25 = bm25s.BM25()
        tokens = [self.tokens(d) for d in documents]
        if any(tokens):
            self._bm25.index(tokens, show_progress=False)
        else:
            self._bm25 = None

    def tokens(self, text: str) -> list[str]:
        words = [w for w in _WORD.findall(text.lower().replace("ё", "е")) if w not in self._stopwords]
        return self._stemmer.stemWords(words)

    def scores(self, query: str) -> np.ndarray:
        """BM25 score of every document for the query (zeros when no query word is in the vocabulary)."""
        if self._bm25 is None:
            return np.zeros(self._size, dtype=np.float32)
        ids = self._bm25.get_tokens_ids(self.tokens(query))
        if not ids:
            return np.zeros(self._size, dtype=np.float32)
        return np.asarray(self._bm25.get_scores_from_ids(ids), dtype=np.float32)


def fuse(dense: np.ndarray, lexical: np.ndarray, weight: float) -> np.ndarray:
    """Dense similarity plus `weight` times the BM25 score scaled to [0, 1] by the best candidate's."""
    top = float(lexical.max(initial=0.0))
    if weight == 0.0 or top <= 0.0:
        return dense
    return dense + weight * (lexical / top)


def reciprocal_rank_fusion(*scores: np.ndarray, k: float = 60.0) -> np.ndarray:
    """Sum over rankings of 1 / (k + rank); higher is better."""
    fused = np.zeros(len(scores[0]), dtype=np.float64)
    for values in scores:
        order = np.argsort(-values, kind="stable")
        ranks = np.empty(len(values), dtype=np.float64)
        ranks[order] = np.arange(1, len(values) + 1)
        fused += 1.0 / (k + ranks)
    return fused
