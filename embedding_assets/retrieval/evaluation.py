"""Accuracy of a retriever on labelled queries: top-1/3/5, MRR, per category, and the misses."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from embedding_assets.retrieval import TemplateRetriever

FIRST_DATA_ROW = 2  # sheet row of the first template, below the header
_ROW_LABEL = re.compile(r"^[A-Za-z]+_(\d+)$")


class QueriesFileError(ValueError):
    """The labelled-queries file cannot be used."""


@dataclass(frozen=True)
class LabelledQuery:
    query_id: str
    query: str
    label: str
    category: str | None = None
    subcategory: str | None = None


@dataclass(frozen=True)
class QueryOutcome:
    """Where the labelled template ranked for one query (rank None: the label names no stored template)."""

    query_id: str
    query: str
    label: str
    expected_id: str | None
    expected_question: str | None
    category: str | None
    rank: int | None
    top_ids: list[str]
    top_question: str
    note: str | None


@dataclass(frozen=True)
class Evaluation:
    queries_file: str
    label_mode: str
    model_version: str
    templates: int
    outcomes: list[QueryOutcome]

    @property
    def scored(self) -> list[QueryOutcome]:
        return [o for o in self.outcomes if o.rank is not None]

    @property
    def unresolved(self) -> list[QueryOutcome]:
        return [o for o in self.outcomes if o.rank is None]

    @staticmethod
    def _metrics(outcomes: Sequence[QueryOutcome]) -> dict:
        n = len(outcomes)
        if n == 0:
            return {"queries": 0, "top1": 0.0, "top3": 0.0, "top5": 0.0, "mrr": 0.0}
        return {
            "queries": n,
            "top1": sum(o.rank <= 1 for o in outcomes) / n,
            "top3": sum(o.rank <= 3 for o in outcomes) / n,
            "top5": sum(o.rank <= 5 for o in outcomes) / n,
            "mrr": sum(1 / o.rank for o in outcomes) / n,
        }

    def metrics(self) -> dict:
        return self._metrics(self.scored)

    def per_category(self) -> dict[str, dict]:
        groups: dict[str, list[QueryOutcome]] = {}
        for outcome in self.scored:
            groups.setdefault(outcome.category or "", []).append(outcome)
        return {name: self._metrics(group) for name, group in sorted(groups.items())}

    def misses(self, k: int = 3) -> list[QueryOutcome]:
        """Queries whose labelled template is not in the top k."""
        return [o for o in self.scored if o.rank > k]

    def as_dict(self) -> dict:
        return {
            "queries_file": self.queries_file,
            "label_mode": self.label_mode,
            "model_version": self.model_version,
            "templates": self.templates,
            **self.metrics(),
            "unresolved_labels": [o.label for o in self.unresolved],
            "per_category": self.per_category(),
            "misses": [asdict(o) for o in self.misses()],
            "outcomes": [asdict(o) for o in self.outcomes],
        }

    def report(self) -> str:
        m = self.metrics()
        lines = [
            f"{self.queries_file}: {len(self.outcomes)} queries, {m['queries']} scored against {self.templates} "
            f"templates of {self.model_version} (labels as {self.label_mode})",
            f"top-1 {m['top1']:.1%}  top-3 {m['top3']:.1%}  top-5 {m['top5']:.1%}  MRR {m['mrr']:.3f}",
        ]
        for outcome in self.unresolved:
            lines.append(f"label {outcome.label!r} of {outcome.query_id} names no template in the store: not scored")
        width = max([len(name) for name in self.per_category()] + [8])
        lines += ["", f"{'category':<{width}}  queries  top-1   top-3   top-5   MRR"]
        for name, c in self.per_category().items():
            lines.append(
                f"{name:<{width}}  {c['queries']:>7}  {c['top1']:>6.1%}  {c['top3']:>6.1%}  {c['top5']:>6.1%}  {c['mrr']:.3f}"
            )
        misses = self.misses()
        lines += ["", f"misses (labelled template not in the top 3): {len(misses)}"]
        for o in misses:
            lines.append(f"- {o.query_id} {o.query!r}: expected {o.expected_id} (rank {o.rank}) {o.expected_question!r}")
            lines.append(f"  got {o.top_ids[0]} {o.top_question!r}")
            if o.note:
                lines.append(f"  note: {o.note}")
        notes = [o for o in self.scored if o.note and o.rank <= 3]
        for o in notes:
            lines.append(f"note on {o.query_id}: {o.note}")
        return "\n".join(lines)


def load_queries(path: str | Path) -> list[LabelledQuery]:
    """Labelled queries from a JSON file with a `validation_queries` list."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise QueriesFileError(f"no queries file at {path}") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise QueriesFileError(f"{path} is not JSON ({exc})") from exc
    items = data.get("validation_queries") if isinstance(data, dict) else None
    if not isinstance(items, list) or not items:
        raise QueriesFileError(f"{path}: expected an object with a non-empty `validation_queries` list")
    queries = []
    for position, item in enumerate(items, start=1):
        missing = [k for k in ("query", "correct_template_id") if not str(item.get(k) or "").strip()]
        if missing:
            raise QueriesFileError(f"{path}: query {position} has no {' or '.join(missing)}")
        queries.append(
            LabelledQuery(
                query_id=str(item.get("id") or position),
                query=str(item["query"]),
                label=str(item["correct_template_id"]),
                category=item.get("category"),
                subcategory=item.get("subcategory"),
            )
        )
    return queries


def label_mode_for(labels: Sequence[str], template_ids: set[str]) -> str:
    """`id` when labels are template ids; `row` when none is and all look like `name_NNN` (0-based data rows)."""
    if any(label in template_ids for label in labels):
        return "id"
    if all(_ROW_LABEL.match(label) for label in labels):
        return "row"
    return "id"


def evaluate(retriever: TemplateRetriever, queries: Sequence[LabelledQuery], *, queries_file: str = "",
             label_mode: str = "auto") -> Evaluation:
    """Rank every template for every query on one index (one store generation) and record where the label landed."""
    index = retriever.index
    templates = index.templates()
    ids = [t.template_id for t in templates]
    position_by_id = {tid: i for i, tid in enumerate(ids)}
    position_by_row = {t.source_row: i for i, t in enumerate(templates)}
    if label_mode == "auto":
        label_mode = label_mode_for([q.label for q in queries], set(ids))
    outcomes = []
    for q in queries:
        if label_mode == "row":
            match = _ROW_LABEL.match(q.label)
            position = position_by_row.get(int(match.group(1)) + FIRST_DATA_ROW) if match else None
        else:
            position = position_by_id.get(q.label)
        hits = index.search(q.query, top_k=len(ids))
        expected = templates[position] if position is not None else None
        rank = next((h.rank for h in hits if expected and h.template_id == expected.template_id), None)
        note = None
        if expected and q.subcategory and q.subcategory != expected.subcategory:
            note = f"label's subcategory {q.subcategory!r} differs from the template's {expected.subcategory!r}"
        outcomes.append(
            QueryOutcome(
                query_id=q.query_id, query=q.query, label=q.label,
                expected_id=expected.template_id if expected else None,
                expected_question=expected.question if expected else None,
                category=expected.category if expected else q.category,
                rank=rank, top_ids=[h.template_id for h in hits[:5]], top_question=hits[0].question, note=note,
            )
        )
    return Evaluation(
        queries_file=queries_file, label_mode=label_mode, model_version=index.identity.model_version,
        templates=len(ids), outcomes=outcomes,
    )
