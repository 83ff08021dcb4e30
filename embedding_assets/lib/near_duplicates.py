"""Pairs of different templates whose vectors are nearly identical, by blocked matrix products.

`near_duplicate_pairs` compares every row with every other. `search_near_duplicates` does the same
but, given what an earlier search saw (`SearchState`: each row's id and vector digest, and every pair
it found), keeps the pairs among rows whose vectors are unchanged and compares only the changed and
new rows with all rows.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

BLOCK_ROWS = 1024  # rows per product at most
BLOCK_VALUES = 1 << 24  # similarities per product at most: 64 MB of float32 (820 rows at 20k, 167 at 100k)


def _rows_per_block(block_rows: int, columns: int) -> int:
    return max(1, min(block_rows, max(16, BLOCK_VALUES // max(columns, 1))))
MAX_KEPT_PAIRS = 100_000  # pairs a search state holds; a search that finds more keeps none (the next one is full)
MAX_CHANGED_SHARE = 0.5  # above this share of changed rows, comparing all pairs costs about as much


@dataclass(frozen=True)
class NearDuplicates:
    """The most similar pairs (row positions, cosine; best first, at most the limit) and how many there are."""

    pairs: list[tuple[int, int, float]]
    total: int


@dataclass(frozen=True)
class SearchState:
    """What one search saw and found: each row's id and vector digest, and every pair at or above the threshold
    (positions into `ids`, first < second). `complete` is False when the pairs were too many to keep."""

    ids: np.ndarray
    digests: np.ndarray
    threshold: float
    dimension: int
    firsts: np.ndarray
    seconds: np.ndarray
    cosines: np.ndarray
    complete: bool = True


@dataclass(frozen=True)
class Search:
    """A search's result, the state the next search starts from, and how much was compared."""

    found: NearDuplicates
    state: SearchState
    incremental: bool
    rows_compared: int
    reason: str
    """Why the search was full, or what the incremental one reused."""


def row_digests(vectors: np.ndarray) -> np.ndarray:
    """A 64-bit blake2b digest of each row's little-endian float32 bytes: any change of a vector changes it."""
    matrix = np.ascontiguousarray(vectors, dtype="<f4")
    width = matrix.shape[1] * 4 if matrix.ndim == 2 else 0
    raw = memoryview(matrix).cast("B") if matrix.size else b""
    digests = b"".join(
        hashlib.blake2b(raw[i * width:(i + 1) * width], digest_size=8).digest() for i in range(matrix.shape[0])
    )
    return np.frombuffer(digests, dtype="<u8").copy()


def near_duplicate_pairs(
    vectors: np.ndarray, min_cosine: float, limit: int = 50, block_rows: int = BLOCK_ROWS
) -> NearDuplicates:
    """Every pair i < j of rows whose cosine similarity is at least `min_cosine`; the best `limit` are kept."""
    return _full_search(_unit(vectors), min_cosine, limit, 0, block_rows)[0]


def search_near_duplicates(
    ids: list[str] | np.ndarray,
    vectors: np.ndarray,
    min_cosine: float,
    previous: SearchState | None = None,
    limit: int = 50,
    *,
    max_kept_pairs: int = MAX_KEPT_PAIRS,
    max_changed_share: float = MAX_CHANGED_SHARE,
    block_rows: int = BLOCK_ROWS,
) -> Search:
    """The result `near_duplicate_pairs` would give on `vectors`, comparing only the rows whose id or vector
    is not in `previous` with all rows when `previous` can be reused; a full search otherwise."""
    ids = np.asarray(ids, dtype=str)
    matrix = np.asarray(vectors, dtype=np.float32)
    digests = row_digests(matrix)
    dimension = int(matrix.shape[1]) if matrix.ndim == 2 else 0
    unit = _unit(matrix)
    reason = _unusable(previous, ids, min_cosine, dimension)
    if reason is None:
        unchanged, changed = _compare_rows(previous, ids, digests)
        if changed.size > max_changed_share * ids.size:
            reason = f"{changed.size} of {ids.size} rows changed"
        else:
            kept = _kept_pairs(previous, unchanged)
            fresh = _changed_pairs(unit, changed, min_cosine, block_rows)
            firsts, seconds, cosines = (np.concatenate([k, f]) for k, f in zip(kept, fresh))
            found = _listed(firsts, seconds, cosines, firsts.size, limit)
            state = _state(ids, digests, min_cosine, dimension, (firsts, seconds, cosines), max_kept_pairs)
            reused = f"kept {kept[0].size} pair(s) among {ids.size - changed.size} unchanged rows"
            return Search(found, state, True, int(changed.size), reused)
    found, every = _full_search(unit, min_cosine, limit, max_kept_pairs, block_rows)
    state = _state(ids, digests, min_cosine, dimension, every, max_kept_pairs)
    return Search(found, state, False, int(ids.size), reason)


def _unit(vectors: np.ndarray) -> np.ndarray:
    matrix = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return np.divide(matrix, norms, out=np.zeros_like(matrix), where=norms > 0)


def _full_search(
    unit: np.ndarray, min_cosine: float, limit: int, keep_up_to: int, block_rows: int
) -> tuple[NearDuplicates, tuple[np.ndarray, np.ndarray, np.ndarray] | None]:
    """The best `limit` pairs and the total, and every pair too while there are at most `keep_up_to`."""
    firsts, seconds, cosines, total = [], [], [], 0
    keeping = True
    block_rows = _rows_per_block(block_rows, unit.shape[0])
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
        keeping = keeping and total <= keep_up_to
        if not keeping and sum(c.size for c in cosines) > limit:
            firsts, seconds, cosines = _best(firsts, seconds, cosines, limit)
    every = tuple(_joined(parts) for parts in (firsts, seconds, cosines)) if keeping else None
    first, second, cosine = every if every is not None else (_joined(p) for p in (firsts, seconds, cosines))
    return _listed(first, second, cosine, total, limit), every


def _joined(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts) if parts else np.empty(0)


def _best(firsts: list, seconds: list, cosines: list, limit: int) -> tuple[list, list, list]:
    first, second, cosine = (_joined(parts) for parts in (firsts, seconds, cosines))
    if cosine.size > limit:
        kept = np.argpartition(-cosine, limit - 1)[:limit] if limit > 0 else np.empty(0, dtype=int)
        first, second, cosine = first[kept], second[kept], cosine[kept]
    return [first], [second], [cosine]


def _listed(firsts: np.ndarray, seconds: np.ndarray, cosines: np.ndarray, total: int, limit: int) -> NearDuplicates:
    """The best `limit` pairs, best first (ties by position), and the total."""
    (first,), (second,), (cosine,) = _best([firsts], [seconds], [cosines], limit)
    order = np.lexsort((second, first, -cosine))
    return NearDuplicates([(int(first[i]), int(second[i]), float(cosine[i])) for i in order], int(total))


def _unusable(previous: SearchState | None, ids: np.ndarray, min_cosine: float, dimension: int) -> str | None:
    """Why `previous` cannot be the start of this search, or None when it can."""
    if previous is None:
        return "no earlier search"
    if not previous.complete:
        return "the earlier search found too many pairs to keep"
    if float(previous.threshold) != float(min_cosine):
        return f"the threshold changed from {previous.threshold} to {min_cosine}"
    if previous.dimension != dimension:
        return f"the dimension changed from {previous.dimension} to {dimension}"
    if len(set(ids.tolist())) != ids.size:
        return "template ids repeat"
    return None


def _compare_rows(previous: SearchState, ids: np.ndarray, digests: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each earlier row, its current position if its id and vector are unchanged (else -1);
    and the current positions of the new or changed rows."""
    earlier = dict(zip(previous.ids.tolist(), range(previous.ids.size)))
    matches = np.fromiter((earlier.get(template_id, -1) for template_id in ids.tolist()), np.int64, ids.size)
    same = matches >= 0
    same[same] = previous.digests[matches[same]] == digests[same]
    unchanged = np.full(previous.ids.size, -1, dtype=np.int64)
    unchanged[matches[same]] = np.flatnonzero(same)
    return unchanged, np.flatnonzero(~same)


def _kept_pairs(previous: SearchState, unchanged: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The earlier pairs whose two rows are unchanged, at their current positions (first < second)."""
    firsts, seconds = unchanged[previous.firsts], unchanged[previous.seconds]
    both = (firsts >= 0) & (seconds >= 0)
    firsts, seconds = firsts[both], seconds[both]
    return np.minimum(firsts, seconds), np.maximum(firsts, seconds), previous.cosines[both].astype(np.float32)


def _changed_pairs(
    unit: np.ndarray, changed: np.ndarray, min_cosine: float, block_rows: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair at or above the threshold that involves a changed row, each once (first < second)."""
    firsts, seconds, cosines = [], [], []
    block_rows = _rows_per_block(block_rows, unit.shape[0])
    for start in range(0, changed.size, block_rows):
        rows = changed[start:start + block_rows]
        similarities = unit[rows] @ unit.T
        # a pair of two changed rows is counted from its first row only; a row is not its own pair
        among_changed = similarities[:, changed]
        among_changed[changed[None, :] <= rows[:, None]] = -np.inf
        similarities[:, changed] = among_changed
        hit_rows, hit_columns = np.nonzero(similarities >= min_cosine)
        firsts.append(np.minimum(rows[hit_rows], hit_columns))
        seconds.append(np.maximum(rows[hit_rows], hit_columns))
        cosines.append(similarities[hit_rows, hit_columns])
    empty = (np.empty(0, dtype=np.int64),) * 2 + (np.empty(0, dtype=np.float32),)
    return tuple(np.concatenate(parts) if parts else e for parts, e in zip((firsts, seconds, cosines), empty))


def _state(
    ids: np.ndarray, digests: np.ndarray, min_cosine: float, dimension: int,
    pairs: tuple[np.ndarray, np.ndarray, np.ndarray] | None, max_kept_pairs: int,
) -> SearchState:
    if pairs is None or pairs[0].size > max_kept_pairs:
        none = np.empty(0, dtype=np.int64)
        return SearchState(ids, digests, float(min_cosine), dimension, none, none, none.astype(np.float32), False)
    firsts, seconds, cosines = pairs
    return SearchState(
        ids, digests, float(min_cosine), dimension,
        firsts.astype(np.int64), seconds.astype(np.int64), cosines.astype(np.float32),
    )


# --- the state on disk --------------------------------------------------------------------------------

_FIELDS = ("ids", "digests", "threshold", "dimension", "firsts", "seconds", "cosines", "complete")


def save_search_state(path: Path, state: SearchState) -> None:
    """Write the state as an .npz file, atomically (a temporary file in the same directory, then a rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            np.savez(
                file, ids=state.ids, digests=state.digests, threshold=np.float64(state.threshold),
                dimension=np.int64(state.dimension), firsts=state.firsts.astype(np.int32),
                seconds=state.seconds.astype(np.int32), cosines=state.cosines.astype(np.float32),
                complete=np.bool_(state.complete),
            )
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


class UnreadableSearchState(ValueError):
    """A saved search state that is missing, damaged or inconsistent."""


def load_search_state(path: Path) -> SearchState:
    """The state saved at `path`; UnreadableSearchState when it is missing, damaged or inconsistent."""
    try:
        with np.load(path, allow_pickle=False) as saved:
            values = {name: saved[name] for name in _FIELDS}
    except FileNotFoundError:
        raise UnreadableSearchState(f"{path.name} does not exist") from None
    except Exception as exc:  # noqa: BLE001  (a damaged file fails in numpy or zipfile in many ways)
        raise UnreadableSearchState(f"{path.name} cannot be read ({type(exc).__name__}: {exc})") from None
    ids, digests = values["ids"], values["digests"]
    firsts, seconds, cosines = values["firsts"].astype(np.int64), values["seconds"].astype(np.int64), values["cosines"]
    rows = ids.size
    consistent = (
        ids.ndim == 1 and ids.dtype.kind == "U" and digests.shape == (rows,) and digests.dtype == np.dtype("<u8")
        and firsts.ndim == 1 and firsts.shape == seconds.shape == cosines.shape
        and cosines.dtype.kind == "f" and all(values[name].shape == () for name in ("threshold", "dimension", "complete"))
        and bool(np.all((firsts >= 0) & (firsts < seconds) & (seconds < rows)))
    )
    if not consistent:
        raise UnreadableSearchState(f"{path.name} is inconsistent")
    return SearchState(
        ids, digests, float(values["threshold"]), int(values["dimension"]), firsts, seconds,
        cosines.astype(np.float32), bool(values["complete"]),
    )
