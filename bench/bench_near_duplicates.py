"""The near_duplicate_templates check's blocked matrix products against one product per template.

Random unit vectors (ROWS x DIM, a few pairs made near-identical) are searched for pairs at cosine
>= 0.98 two ways in the same run: `near_duplicate_pairs` (blocks of 1024 rows, each against the
rows after it) and the raw baseline of one matrix-vector product per row against the rows after
it. Both must find the same pairs.

Run: `.venv/bin/python bench/bench_near_duplicates.py [--rows 20000] [--dim 384] [--baseline-rows 5000]`;
the baseline runs on its own (smaller) row count when given, the blocked search on both counts.
Prints one table; nothing is asserted.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from embedding_assets.lib.near_duplicates import near_duplicate_pairs  # noqa: E402

THRESHOLD = 0.98


def vectors(rows: int, dim: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    matrix = rng.standard_normal((rows, dim)).astype(np.float32)
    for i in range(0, rows // 2, max(rows // 10, 1)):
        matrix[rows - 1 - i] = matrix[i] + 0.01 * rng.standard_normal(dim).astype(np.float32)
    return matrix / np.linalg.norm(matrix, axis=1, keepdims=True)


def row_by_row(matrix: np.ndarray) -> set[tuple[int, int]]:
    found = set()
    for i in range(matrix.shape[0] - 1):
        similarities = matrix[i + 1:] @ matrix[i]
        found.update((i, i + 1 + int(j)) for j in np.flatnonzero(similarities >= THRESHOLD))
    return found


def timed(function, *args):
    started = time.perf_counter()
    result = function(*args)
    return result, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--baseline-rows", type=int, default=5_000)
    args = parser.parse_args()
    print(f"{'rows':>7}  {'blocked (s)':>11}  {'row by row (s)':>14}  pairs")
    for rows in sorted({args.baseline_rows, args.rows}):
        matrix = vectors(rows, args.dim)
        blocked, blocked_seconds = timed(near_duplicate_pairs, matrix, THRESHOLD, 10_000)
        if rows == args.baseline_rows:
            baseline, baseline_seconds = timed(row_by_row, matrix)
            assert {(i, j) for i, j, _ in blocked.pairs} == baseline
            baseline_cell = f"{baseline_seconds:14.2f}"
        else:
            baseline_cell = f"{'-':>14}"
        print(f"{rows:>7}  {blocked_seconds:11.2f}  {baseline_cell}  {blocked.total}")


if __name__ == "__main__":
    main()
