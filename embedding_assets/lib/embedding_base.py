"""What every embedding provider shares: the interface, its errors, its cost record, vector checks."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np


class EmbeddingError(RuntimeError):
    """The embedding provider failed or returned unusable vectors."""


class Embedder(Protocol):
    dimension: int

    def embed_passages(self, texts: Sequence[str]) -> np.ndarray: ...

    def embed_query(self, text: str) -> np.ndarray: ...


def check_vectors(vectors: np.ndarray, expected_rows: int, dimension: int, context: str) -> np.ndarray:
    """Reject a wrong shape, NaN/inf or all-zero vector; return L2-normalised float32 rows."""
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or vectors.shape[0] != expected_rows:
        raise EmbeddingError(f"{context}: expected {expected_rows} vectors, got array of shape {vectors.shape}")
    if vectors.shape[1] != dimension:
        raise EmbeddingError(f"{context}: expected dimension {dimension}, got {vectors.shape[1]}")
    if not np.isfinite(vectors).all():
        raise EmbeddingError(f"{context}: vectors contain NaN or infinite values")
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    if (norms == 0).any():
        raise EmbeddingError(f"{context}: a vector has zero length")
    return vectors / norms


class VectorCache(Protocol):
    def get(self, content_hashes: Sequence[str]) -> dict[str, np.ndarray]: ...

    def put(self, vectors: Mapping[str, np.ndarray]) -> None: ...


@dataclass
class EmbeddingCost:
    """What reaching the model cost: requests sent (retries included), texts sent, tokens billed."""

    requests: int = 0
    inputs: int = 0
    tokens: int | None = None
    retries: int = 0

    def since(self, earlier: EmbeddingCost) -> EmbeddingCost:
        tokens = None if self.tokens is None else self.tokens - (earlier.tokens or 0)
        return EmbeddingCost(
            self.requests - earlier.requests, self.inputs - earlier.inputs, tokens, self.retries - earlier.retries
        )
