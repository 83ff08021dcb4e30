"""The near_duplicate_templates check's blocked matrix products against one product per template.

Random unit vectors (ROWS x DIM, a few pairs made near-identical) are searched for pairs at cosine
>= 0.98 two ways in the same run: `near_duplicate_pairs` (blocks of 1024 rows, each against the
rows after it) and the raw baseline of one matrix-vector product per row against the rows after
it. Both must find the same pairs.

Then the check's case after an edit: CHANGED_SHARE of the ROWS rows get new vectors (some of them near
copies of other rows), and `search_near_duplicates` starts from the state of the search before the edit
(comparing only the changed rows with all), next to the full search of the edited rows in the same run.
Both must find the same pairs. The row digests (part of both) and writing plus reading the state file
are timed on their own.

Run: `.venv/bin/python bench/bench_near_duplicates.py [--rows 20000] [--dim 384] [--baseline-rows 5000]
[--changed-share 0.01]`; the baseline runs on its own (smaller) row count when given, the blocked search on
both counts. Prints two tables; nothing is asserted.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from embedding_assets.lib.near_duplicates import (  # noqa: E402
    load_search_state,
    near_duplicate_pairs,
    row_digests,
    save_search_state,
    search_near_duplicates,
)

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
    parser.add_argument("--changed-share", type=float, default=0.01)
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
    print()
    edit(vectors(args.rows, args.dim), args.changed_share)


def edited(matrix: np.ndarray, share: float) -> tuple[np.ndarray, int]:
    """A copy with `share` of the rows replaced: a fifth by near copies of other rows, the rest by new vectors."""
    rng = np.random.default_rng(1)
    rows, dim = matrix.shape
    changed = rng.choice(rows, size=max(int(rows * share), 1), replace=False)
    result = matrix.copy()
    fresh = rng.standard_normal((changed.size, dim)).astype(np.float32)
    copies = changed.size // 5
    fresh[:copies] = matrix[rng.choice(rows, size=copies)] + 0.01 * rng.standard_normal((copies, dim))
    result[changed] = fresh / np.linalg.norm(fresh, axis=1, keepdims=True)
    return result, int(changed.size)


def edit(matrix: np.ndarray, share: float) -> None:
    ids = [f"T-{n}" for n in range(matrix.shape[0])]
    before = search_near_duplicates(ids, matrix, THRESHOLD)
    after, changed = edited(matrix, share)
    _, digest_seconds = timed(row_digests, after)
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "state.npz"
        started = time.perf_counter()
        save_search_state(path, before.state)
        previous = load_search_state(path)
        state_seconds = time.perf_counter() - started
        size = path.stat().st_size
    full, full_seconds = timed(search_near_duplicates, ids, after, THRESHOLD)
    incremental, incremental_seconds = timed(search_near_duplicates, ids, after, THRESHOLD, previous)
    assert incremental.incremental and incremental.rows_compared == changed
    assert (incremental.found.total, [p[:2] for p in incremental.found.pairs]) == (
        full.found.total, [p[:2] for p in full.found.pairs]
    )
    print(f"{'rows':>7}  {'changed':>7}  {'full (s)':>8}  {'incremental (s)':>15}  {'digests (s)':>11}  "
          f"{'state write+read (s)':>20}  {'state (KB)':>10}  pairs")
    print(f"{len(ids):>7}  {changed:>7}  {full_seconds:8.3f}  {incremental_seconds:15.3f}  {digest_seconds:11.3f}  "
          f"{state_seconds:20.3f}  {size / 1024:10.0f}  {full.found.total}")


if __name__ == "__main__":
    main()
