"""Pairs of different templates whose vectors are nearly identical, by blocked matrix products."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BLOCK_ROWS = 1024  # rows per product: a 1024 x 20k block of float32 similarities is 80 MB


@dataclass(frozen=True)
class NearDuplicates:
    """The most similar pairs (row positions, cosine; best first, at most the limit) and how many there are."""

    pairs: list[tuple[int, int, float]]
    total: int


def near_duplicate_pairs(
    vectors: np.ndarray, min_cosine: float, limit: int = 50, block_rows: int = BLOCK_ROWS
) -> NearDuplicates:
    """Every pair i < j of rows whose cosine similarity is at least `min_cosine`; the best `limit` are kept."""
    matrix = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    unit = np.divide(matrix, norms, out=np.zeros_like(matrix), where=norms > 0)
    firsts, seconds, cosines, total = [], [], [], 0
    for start in range(0, unit.shape[0], block_rows):
        stop = min(start + block_rows, unit.shape[0])
        similarities = unit[start:stop] @ unit[start:].T  # only the columns from `start` on: each pair once
        square = similarities[:, : stop - start]
        square[np.tril_indices(stop - start)] = -np.inf  # the diagonal and the pairs already seen
        rows, columns = np.nonzero(similarities >= min_cosine)
        total += rows.size
        firsts.append(rows + start)
        seconds.append(columns + start)
        cosines.append(similarities[rows, columns])
        if sum(c.size for c in cosines) > limit:
            firsts, seconds, cosines = _best(firsts, seconds, cosines, limit)
    firsts, seconds, cosines = _best(firsts, seconds, cosines, limit)
    order = np.lexsort((seconds[0], firsts[0], -cosines[0]))
    return NearDuplicates(
        [(int(firsts[0][i]), int(seconds[0][i]), float(cosines[0][i])) for i in order], total
    )


def _best(firsts: list, seconds: list, cosines: list, limit: int) -> tuple[list, list, list]:
    first, second, cosine = (np.concatenate(parts) if parts else np.empty(0) for parts in (firsts, seconds, cosines))
    if cosine.size > limit:
        kept = np.argpartition(-cosine, limit - 1)[:limit] if limit > 0 else np.empty(0, dtype=int)
        first, second, cosine = first[kept], second[kept], cosine[kept]
    return [first], [second], [cosine]
