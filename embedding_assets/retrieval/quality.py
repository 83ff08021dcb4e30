"""Top-k accuracy of a search function on labelled validation queries."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

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
    top_ids: dict[str, list[str]] = field(default_factory=dict)
    """Each evaluated query's top-k template ids, by query id."""

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
    top_ids = {q.query_id: list(search(q.query, top_k)) for q in answerable}
    misses = [q.query_id for q in answerable if q.template_id not in top_ids[q.query_id]]
    return QualityReport(
        top_k=top_k,
        evaluated=len(answerable),
        hits=len(answerable) - len(misses),
        without_template=[q.query_id for q in queries if q.template_id not in published_ids],
        misses=misses,
        top_ids=top_ids,
    )
