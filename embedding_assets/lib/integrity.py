"""Health of the FAQ's content, of a published store against the FAQ, and of retrieval quality."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from embedding_assets.lib.faq import Template
from embedding_assets.lib.hashing import hash_templates
from embedding_assets.lib.model_versions import ModelVersion
from embedding_assets.lib.plan import StoredTemplate
from embedding_assets.store import EmbeddingStore, StoreCorruptError, StoreError

SPREADSHEET_ERRORS = frozenset(
    {"#REF!", "#N/A", "#VALUE!", "#DIV/0!", "#NAME?", "#NULL!", "#NUM!", "#SPILL!", "#CALC!", "#GETTING_DATA"}
)
LISTED = 20
REPAIR_MARK = ""


def faq_content_problems(
    templates: Sequence[Template],
    published_ids: Mapping[str, set[str]] | None = None,
    max_removed_share: float = 0.5,
) -> list[str]:
    """Content that parses but must not be published: spreadsheet error text, conflicting duplicates,
    or a sheet that lost more than `max_removed_share` of a version's published templates."""
    problems = []
    for t in templates:
        for name, value in t.fields().items():
            if value.upper() in SPREADSHEET_ERRORS:
                problems.append(f"row {t.source_row}, {name}: spreadsheet error value {value!r}")
    answers: dict[tuple[str, str, str], Template] = {}
    for t in templates:
        key = (t.category.casefold(), t.subcategory.casefold(), t.question.casefold())
        first = answers.setdefault(key, t)
        if first is not t and first.answer != t.answer:
            problems.append(
                f"row {t.source_row}: question {t.question!r} repeats row {first.source_row} "
                "in the same subcategory with a different answer"
            )
    current = {t.template_id for t in templates}
    for key, ids in sorted((published_ids or {}).items()):
        removed = len(ids - current)
        if ids and removed / len(ids) > max_removed_share:
            problems.append(
                f"the sheet drops {removed} of the {len(ids)} templates published for {key} "
                f"(more than {max_removed_share:.0%}); raise max_removed_share to publish it"
            )
    return problems


def unhealthy_vector_ids(template_ids: Sequence[str], matrix: np.ndarray) -> list[str]:
    """Ids whose vector holds NaN or infinity, or has zero norm."""
    finite = np.isfinite(matrix).all(axis=1)
    norms = np.linalg.norm(np.where(np.isfinite(matrix), matrix, 0.0), axis=1)
    bad = ~finite | (norms == 0.0)
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
    expected = {h.template_id: h.content_hash for h in hash_templates(list(templates), version.text_template)}
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


def mark_for_repair(published: Mapping[str, StoredTemplate], ids: Sequence[str]) -> dict[str, StoredTemplate]:
    """The published templates with the given ids' hashes cleared, so a change plan republishes them."""
    marked = set(ids)
    return {
        tid: replace(stored, content_hash=REPAIR_MARK) if tid in marked else stored
        for tid, stored in published.items()
    }


@dataclass(frozen=True)
class ValidationQuery:
    """A labelled customer query and the template that should answer it."""

    query_id: str
    query: str
    template_id: str


def load_validation_queries(path: str | Path) -> list[ValidationQuery]:
    """Labelled queries from a JSON file with a `validation_queries` list."""
    document = json.loads(Path(path).read_text(encoding="utf-8"))
    return [
        ValidationQuery(str(q.get("id", i)), q["query"], str(q["correct_template_id"]))
        for i, q in enumerate(document["validation_queries"], start=1)
    ]


@dataclass(frozen=True)
class QualityReport:
    """Top-k accuracy of a retriever on labelled queries whose template is published."""

    top_k: int
    evaluated: int
    hits: int
    without_template: list[str]
    misses: list[str]

    @property
    def accuracy(self) -> float | None:
        return self.hits / self.evaluated if self.evaluated else None


def top_k_accuracy(
    search: Callable[[str, int], Sequence[str]],
    queries: Sequence[ValidationQuery],
    published_ids: set[str],
    top_k: int = 3,
) -> QualityReport:
    """Share of queries whose labelled template is among `search`'s top k ids."""
    answerable = [q for q in queries if q.template_id in published_ids]
    misses = [q.query_id for q in answerable if q.template_id not in search(q.query, top_k)]
    return QualityReport(
        top_k=top_k,
        evaluated=len(answerable),
        hits=len(answerable) - len(misses),
        without_template=[q.query_id for q in queries if q.template_id not in published_ids],
        misses=misses,
    )


def verify_store(store: EmbeddingStore, version: ModelVersion, templates: Sequence[Template]) -> StoreReport:
    """Read a version's published rows and vectors and compare them with the FAQ's templates."""
    expected_rows = len(templates)
    if store.version(version.key) is None:
        return StoreReport(version.key, expected_rows, unreadable=f"{version.key}: not published in the store")
    try:
        snapshot = store.snapshot(version.key)
    except StoreError as exc:
        return StoreReport(version.key, expected_rows, unreadable=f"{version.key}: {exc}")
    if snapshot.version.dimension != version.dimension:
        return StoreReport(
            version.key, expected_rows, len(snapshot),
            unreadable=f"{version.key}: stored dimension {snapshot.version.dimension}, declared {version.dimension}",
        )
    columns = snapshot.columns
    return compare_store(version, templates, columns["template_id"], columns["content_hash"], snapshot.matrix)


def unhealthy_published_ids(store: EmbeddingStore, key: str) -> list[str]:
    """Published ids whose vector must be republished; all of them when the vectors cannot be read."""
    try:
        snapshot = store.snapshot(key)
    except StoreCorruptError:
        return sorted(store.published(key)[1])
    return unhealthy_vector_ids(snapshot.columns["template_id"], snapshot.matrix)
