"""The incremental near-duplicate search gives what the full search gives, and its state survives on disk."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from embedding_assets.lib.near_duplicates import (
    SearchState,
    UnreadableSearchState,
    load_search_state,
    near_duplicate_pairs,
    row_digests,
    save_search_state,
    search_near_duplicates,
)

THRESHOLD = 0.9
DIM = 32
LIMIT = 4  # fewer than the pairs planted: the best pairs must be the same, not just the count


def near(vector: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return (vector + 0.05 * rng.standard_normal(vector.size)).astype(np.float32)


@pytest.fixture
def bank():
    """400 random rows (random 32-d vectors stay below cosine 0.9) with six planted near-duplicate pairs."""
    rng = np.random.default_rng(11)
    matrix = rng.standard_normal((400, DIM)).astype(np.float32)
    for first, second in [(3, 250), (17, 18), (40, 399), (101, 102), (200, 300), (7, 70)]:
        matrix[second] = near(matrix[first], rng)
    return [f"T-{n}" for n in range(400)], matrix, rng


def assert_like_a_full_search(search, ids, matrix) -> None:
    full = near_duplicate_pairs(matrix, THRESHOLD, limit=LIMIT)
    every = near_duplicate_pairs(matrix, THRESHOLD, limit=10**6)
    assert search.found.total == full.total
    assert [(i, j) for i, j, _ in search.found.pairs] == [(i, j) for i, j, _ in full.pairs]
    np.testing.assert_allclose([c for *_, c in search.found.pairs], [c for *_, c in full.pairs], atol=1e-5)
    state = search.state
    assert state.complete and list(state.ids) == list(ids)
    kept = {(state.ids[i], state.ids[j]): c for i, j, c in zip(state.firsts, state.seconds, state.cosines)}
    expected = {(ids[i], ids[j]): c for i, j, c in every.pairs}
    assert kept.keys() == expected.keys()
    np.testing.assert_allclose([kept[k] for k in expected], list(expected.values()), atol=1e-5)


def search(ids, matrix, previous=None, **options):
    found = search_near_duplicates(ids, matrix, THRESHOLD, previous, limit=LIMIT, **options)
    assert_like_a_full_search(found, ids, matrix)
    return found


def test_each_edit_compares_only_the_changed_rows_and_finds_what_the_full_search_finds(bank) -> None:
    ids, matrix, rng = bank
    first = search(ids, matrix)
    assert (first.incremental, first.rows_compared, first.found.total) == (False, 400, 6)

    # an edit of a few rows that creates a pair (a row becomes a copy of another) and changes two unrelated rows
    matrix = matrix.copy()
    matrix[5] = near(matrix[120], rng)
    matrix[[60, 61]] = rng.standard_normal((2, DIM))
    created = search(ids, matrix, first.state)
    assert (created.incremental, created.rows_compared, created.found.total) == (True, 3, 7)

    # an edit that removes a pair: both rows of 17/18 get new vectors, and one row of 3/250
    matrix = matrix.copy()
    matrix[[17, 18, 250]] = rng.standard_normal((3, DIM))
    removed = search(ids, matrix, created.state)
    assert (removed.incremental, removed.rows_compared, removed.found.total) == (True, 3, 5)

    # rows move (the store's order changes): nothing is compared, the pairs follow their rows
    order = rng.permutation(400)
    ids, matrix = [ids[i] for i in order], matrix[order]
    moved = search(ids, matrix, removed.state)
    assert (moved.incremental, moved.rows_compared, moved.found.total) == (True, 0, 5)

    # rows deleted, among them one row of a pair
    gone = {ids.index("T-300"), ids.index("T-9"), ids.index("T-10")}
    ids, matrix = [t for n, t in enumerate(ids) if n not in gone], np.delete(matrix, sorted(gone), axis=0)
    deleted = search(ids, matrix, moved.state)
    assert (deleted.incremental, deleted.rows_compared, deleted.found.total) == (True, 0, 4)

    # rows added in the middle: one a near copy of an existing row, two near copies of each other
    twin = rng.standard_normal(DIM).astype(np.float32)
    added = np.stack([near(matrix[ids.index("T-40")], rng), twin, near(twin, rng)])
    ids = [*ids[:100], "NEW-1", "NEW-2", "NEW-3", *ids[100:]]
    matrix = np.concatenate([matrix[:100], added, matrix[100:]])
    grown = search(ids, matrix, deleted.state)
    assert (grown.incremental, grown.rows_compared, grown.found.total) == (True, 3, 7)
    state = grown.state
    assert {frozenset((state.ids[i], state.ids[j])) for i, j in zip(state.firsts, state.seconds)} >= {
        frozenset(("NEW-1", "T-40")), frozenset(("NEW-2", "NEW-3"))
    }


def test_a_row_whose_vector_bytes_change_under_the_same_id_is_compared_again(bank) -> None:
    ids, matrix, rng = bank
    first = search(ids, matrix)

    # a re-embedding of the same text: the vector moves a little, the pair's cosine with it
    rebuilt = matrix.copy()
    rebuilt[250] = rebuilt[250] + 0.02 * rng.standard_normal(DIM).astype(np.float32)
    again = search(ids, rebuilt, first.state)
    assert (again.incremental, again.rows_compared, again.found.total) == (True, 1, 6)

    # the same id now holds another template's near copy: a new pair that only a changed identity can find
    copied = rebuilt.copy()
    copied[250] = near(copied[333], rng)
    found = search(ids, copied, again.state)
    assert (found.incremental, found.rows_compared, found.found.total) == (True, 1, 6)
    pairs = {frozenset((ids[i], ids[j])) for i, j, _ in near_duplicate_pairs(copied, THRESHOLD, 100).pairs}
    assert frozenset(("T-250", "T-333")) in pairs and frozenset(("T-3", "T-250")) not in pairs


def test_row_digests_change_with_any_byte_of_a_row_and_only_its_own() -> None:
    matrix = np.random.default_rng(1).standard_normal((5, 8)).astype(np.float32)
    digests = row_digests(matrix)
    changed = matrix.copy()
    changed[2, 7] = np.nextafter(changed[2, 7], np.float32(np.inf))
    assert digests.dtype == np.dtype("<u8") and np.unique(digests).size == 5
    assert (row_digests(changed) != digests).tolist() == [False, False, True, False, False]
    assert np.array_equal(row_digests(matrix.astype(np.float64)), digests)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ("threshold", "the threshold changed from 0.9 to 0.91"),
        ("dimension", "the dimension changed from 32 to 31"),
        ("most rows", "201 of 400 rows changed"),
    ],
)
def test_a_search_that_cannot_reuse_its_state_is_full(bank, change, reason) -> None:
    ids, matrix, rng = bank
    first = search(ids, matrix)
    threshold = THRESHOLD
    if change == "threshold":
        threshold = 0.91
    elif change == "dimension":
        matrix = matrix[:, :-1]
    else:
        matrix = matrix.copy()
        matrix[:201] = rng.standard_normal((201, DIM))
    found = search_near_duplicates(ids, matrix, threshold, first.state, limit=LIMIT)
    assert (found.incremental, found.rows_compared, found.reason) == (False, 400, reason)
    full = near_duplicate_pairs(matrix, threshold, limit=LIMIT)
    assert (found.found.total, found.found.pairs) == (full.total, full.pairs)


def test_a_search_with_more_pairs_than_kept_keeps_none_and_the_next_search_is_full(bank) -> None:
    ids, matrix, rng = bank
    crowded = search_near_duplicates(ids, matrix, THRESHOLD, None, limit=LIMIT, max_kept_pairs=5)
    assert crowded.found.total == 6 and not crowded.state.complete and crowded.state.firsts.size == 0
    assert crowded.found.pairs == near_duplicate_pairs(matrix, THRESHOLD, limit=LIMIT).pairs

    matrix = matrix.copy()
    matrix[5] = near(matrix[120], rng)
    after = search_near_duplicates(ids, matrix, THRESHOLD, crowded.state, limit=LIMIT)
    assert (after.incremental, after.rows_compared, after.found.total) == (False, 400, 7)
    assert after.reason == "the earlier search found too many pairs to keep"

    # an incremental search that ends with too many pairs gives the right answer and keeps none
    kept = search_near_duplicates(ids, matrix, THRESHOLD, after.state, limit=LIMIT)
    matrix[6] = near(matrix[121], rng)
    over = search_near_duplicates(ids, matrix, THRESHOLD, kept.state, limit=LIMIT, max_kept_pairs=7)
    assert (over.incremental, over.rows_compared, over.found.total, over.state.complete) == (True, 1, 8, False)


def test_the_state_survives_a_round_trip_and_a_damaged_file_is_refused(bank, tmp_path: Path) -> None:
    ids, matrix, _ = bank
    state = search(ids, matrix).state
    path = tmp_path / "states" / "store-e5.npz"
    save_search_state(path, state)
    loaded = load_search_state(path)
    assert list(path.parent.iterdir()) == [path]  # no temporary file left
    assert (loaded.threshold, loaded.dimension, loaded.complete) == (THRESHOLD, DIM, True)
    for name in ("ids", "digests", "firsts", "seconds", "cosines"):
        assert np.array_equal(getattr(loaded, name), getattr(state, name))
    assert search(ids, matrix, loaded).rows_compared == 0

    with pytest.raises(UnreadableSearchState, match="does not exist"):
        load_search_state(tmp_path / "missing.npz")
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(UnreadableSearchState, match="cannot be read"):
        load_search_state(path)
    path.write_bytes(b"not a state at all")
    with pytest.raises(UnreadableSearchState, match="cannot be read"):
        load_search_state(path)
    out_of_range = SearchState(state.ids, state.digests, THRESHOLD, DIM, state.firsts, state.seconds + 400,
                               state.cosines)
    save_search_state(path, out_of_range)
    with pytest.raises(UnreadableSearchState, match="inconsistent"):
        load_search_state(path)
