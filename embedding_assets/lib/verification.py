"""How a model version's published table differs from what the FAQ says it should hold."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from embedding_assets.lib.faq import Template
from embedding_assets.lib.hashing import HashedTemplate, hash_templates_uncached, hashed_if_known
from embedding_assets.lib.model_versions import ModelVersion
from embedding_assets.lib.plan import PublishedTemplates, StoredTemplate

LISTED = 20
_HASHED_AT_ONCE = 1000
REPAIR_MARK = ""


def unhealthy_vector_ids(template_ids: Sequence[str], matrix: np.ndarray) -> list[str]:
    """Ids whose vector holds NaN or infinity, or has zero norm."""
    finite = np.isfinite(matrix).all(axis=1)
    with np.errstate(invalid="ignore", over="ignore"):
        squares = np.einsum("ij,ij->i", matrix, matrix)  # zero exactly when the norm is (NaN rows are not finite)
    bad = ~finite | (squares == 0.0)
    return sorted(template_ids[i] for i in np.flatnonzero(bad))


@dataclass(frozen=True)
class StoreReport:
    """How one model version's published store differs from what the FAQ says it should hold."""

    model_version: str
    expected_rows: int
    stored_rows: int | None = None
    missing_ids: list[str] = field(default_factory=list)
    extra_ids: list[str] = field(default_factory=list)
    hash_mismatch_ids: list[str] = field(default_factory=list)
    unhealthy_ids: list[str] = field(default_factory=list)
    unreadable: str | None = None

    @property
    def healthy(self) -> bool:
        return not self.problems()

    def problems(self) -> list[str]:
        if self.unreadable:
            return [self.unreadable]
        found = []
        if self.stored_rows != self.expected_rows:
            found.append(f"{self.stored_rows} rows stored, the FAQ has {self.expected_rows} templates")
        for label, ids in (
            ("missing from the store", self.missing_ids),
            ("stored but not in the FAQ", self.extra_ids),
            ("stored with a content hash other than the FAQ's", self.hash_mismatch_ids),
            ("stored with a NaN, infinite or zero-norm vector", self.unhealthy_ids),
        ):
            if ids:
                found.append(f"{len(ids)} template(s) {label}: {', '.join(ids[:LISTED])}")
        return found

    def summary(self) -> str:
        if self.healthy:
            return f"{self.model_version}: {self.stored_rows} rows match the FAQ"
        return f"{self.model_version}: " + "; ".join(self.problems())


def compare_store(
    version: ModelVersion,
    templates: Sequence[Template],
    stored_ids: Sequence[str],
    stored_hashes: Sequence[str],
    matrix: np.ndarray,
) -> StoreReport:
    """Compare a version's published rows and vectors with the FAQ's templates."""
    expected = {h.template_id: h.content_hash for h in _hashed_for(version, templates)}
    stored = dict(zip(stored_ids, stored_hashes))
    if matrix.shape != (len(stored_ids), version.dimension):
        return StoreReport(
            version.key, len(expected), len(stored_ids),
            unreadable=f"{version.key}: vectors have shape {matrix.shape}, expected ({len(stored_ids)}, {version.dimension})",
        )
    return StoreReport(
        model_version=version.key,
        expected_rows=len(expected),
        stored_rows=len(stored_ids),
        missing_ids=sorted(set(expected) - set(stored)),
        extra_ids=sorted(set(stored) - set(expected)),
        hash_mismatch_ids=sorted(i for i in set(expected) & set(stored) if expected[i] != stored[i]),
        unhealthy_ids=unhealthy_vector_ids(list(stored_ids), matrix),
    )


def _hashed_for(version: ModelVersion, templates: Sequence[Template]) -> Iterator[HashedTemplate]:
    """The templates hashed as `version` embeds them: the run's hashes when this list was just hashed,
    else a chunk at a time (the rendered texts are not all held at once, and the run's hashes stay cached)."""
    known = hashed_if_known(templates, version)
    if known is not None:
        yield from known
        return
    for start in range(0, len(templates), _HASHED_AT_ONCE):
        yield from hash_templates_uncached(list(templates[start : start + _HASHED_AT_ONCE]), version)


def mark_for_repair(published: Mapping[str, StoredTemplate], ids: Sequence[str]) -> PublishedTemplates:
    """The published templates with the given ids' hashes cleared, so a change plan republishes them."""
    published = PublishedTemplates.of(published)
    marked = set(ids)
    if not marked:
        return published
    return PublishedTemplates(
        {tid: (row[0], REPAIR_MARK, *row[2:]) if tid in marked else row for tid, row in published.rows.items()}
    )


def compare_published(
    version: ModelVersion,
    templates: Sequence[Template],
    stored_dimension: int | None,
    stored_hashes: Mapping[str, str],
    stored_ids: Sequence[str],
    matrix: np.ndarray,
) -> StoreReport:
    """Compare a version's published hashes and vectors (ids in `stored_ids` order) with the FAQ's templates.

    `stored_dimension` is the dimension the store records for the version; None: the version is not published.
    """
    if stored_dimension is None:
        return StoreReport(version.key, len(templates), unreadable=f"{version.key}: not published in the store")
    if stored_dimension != version.dimension:
        return StoreReport(
            version.key, len(templates), len(stored_ids),
            unreadable=f"{version.key}: stored dimension {stored_dimension}, declared {version.dimension}",
        )
    return compare_store(version, templates, stored_ids, [stored_hashes[i] for i in stored_ids], matrix)
