"""Accuracy of a retriever on labelled queries: top-1/3/5, MRR, per category and query kind, and the misses."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from embedding_assets.lib.embedders import Embedder
from embedding_assets.lib.embedding_base import EmbeddingCost
from embedding_assets.lib.model_versions import ModelVersion
from embedding_assets.retrieval import TemplateRetriever
from embedding_assets.store import EmbeddingStore

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
    kind: str | None = None
    labels: tuple[str, ...] = ()
    """Every template that answers the query (`correct_template_ids`); `label` is the first."""

    @property
    def gold(self) -> tuple[str, ...]:
        return self.labels or (self.label,)


@dataclass(frozen=True)
class QueryOutcome:
    """Where the best-ranked gold template landed for one query (rank None: no label names a stored template)."""

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
    kind: str | None = None
    expected_ids: tuple[str, ...] = ()


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

    def _grouped(self, name_of) -> dict[str, dict]:
        groups: dict[str, list[QueryOutcome]] = {}
        for outcome in self.scored:
            groups.setdefault(name_of(outcome) or "", []).append(outcome)
        return {name: self._metrics(group) for name, group in sorted(groups.items())}

    def per_category(self) -> dict[str, dict]:
        return self._grouped(lambda o: o.category)

    def per_kind(self) -> dict[str, dict]:
        """Metrics per query kind (typo, translit, slang, …); empty when the queries name no kind."""
        return self._grouped(lambda o: o.kind) if any(o.kind for o in self.scored) else {}

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
            "per_kind": self.per_kind(),
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
        for title, groups in (("category", self.per_category()), ("query kind", self.per_kind())):
            if not groups:
                continue
            width = max([len(name) for name in groups] + [len(title)])
            lines += ["", f"{title:<{width}}  queries  top-1   top-3   top-5   MRR"]
            for name, c in groups.items():
                lines.append(
                    f"{name:<{width}}  {c['queries']:>7}  {c['top1']:>6.1%}  {c['top3']:>6.1%}  {c['top5']:>6.1%}  "
                    f"{c['mrr']:.3f}"
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
        labels = item.get("correct_template_ids") or []
        if not isinstance(labels, list) or not all(isinstance(x, str) and x.strip() for x in labels):
            raise QueriesFileError(f"{path}: query {position}: correct_template_ids must be a list of template ids")
        first = str(item.get("correct_template_id") or (labels[0] if labels else "")).strip()
        if not str(item.get("query") or "").strip() or not first:
            missing = [k for k, v in (("query", item.get("query")), ("correct_template_id", first)) if not str(v or "").strip()]
            raise QueriesFileError(f"{path}: query {position} has no {' or '.join(missing)}")
        queries.append(
            LabelledQuery(
                query_id=str(item.get("id") or position),
                query=str(item["query"]),
                label=first,
                category=item.get("category"),
                subcategory=item.get("subcategory"),
                kind=item.get("kind"),
                labels=tuple(dict.fromkeys([first, *labels])),
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


class LabelPositions:
    """Where the templates a query's labels name sit in a list of templates (by id, or by sheet row)."""

    def __init__(self, templates: Sequence, label_mode: str):
        self.label_mode = label_mode
        self._by_id = {t.template_id: i for i, t in enumerate(templates)}
        self._by_row = {t.source_row: i for i, t in enumerate(templates)} if label_mode == "row" else {}

    def of(self, query: LabelledQuery) -> list[int]:
        if self.label_mode == "row":
            rows = (_ROW_LABEL.match(label) for label in query.gold)
            return [self._by_row[r] for r in (int(m.group(1)) + FIRST_DATA_ROW for m in rows if m) if r in self._by_row]
        return [self._by_id[label] for label in query.gold if label in self._by_id]


def evaluate(retriever: TemplateRetriever, queries: Sequence[LabelledQuery], *, queries_file: str = "",
             label_mode: str = "auto", query_vectors: Mapping[str, np.ndarray] | None = None) -> Evaluation:
    """Rank every template for every query on one index (one store generation) and record where the label landed.

    `query_vectors` (query text -> its vector by the index's embedder) spares the embedder those queries.
    """
    index = retriever.index
    templates = index.templates()
    ids = [t.template_id for t in templates]
    position_by_id = {tid: i for i, tid in enumerate(ids)}
    if label_mode == "auto":
        label_mode = label_mode_for([q.label for q in queries], set(ids))
    vectors = query_vectors or {}
    labels = LabelPositions(templates, label_mode)
    outcomes = []
    for q in queries:
        positions = labels.of(q)
        hits = index.search(q.query, top_k=len(ids), query_vector=vectors.get(q.query))
        gold = {templates[p].template_id for p in positions}
        rank = next((h.rank for h in hits if h.template_id in gold), None)
        best = next((h.template_id for h in hits if h.template_id in gold), None)
        expected = templates[position_by_id[best]] if best else (templates[positions[0]] if positions else None)
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
                kind=q.kind, expected_ids=tuple(templates[p].template_id for p in positions),
            )
        )
    return Evaluation(
        queries_file=queries_file, label_mode=label_mode, model_version=index.identity.model_version,
        templates=len(ids), outcomes=outcomes,
    )


def query_hash(text: str) -> str:
    """The cache key of a query's vector: apart from passages', which hash the embedded passage text."""
    return hashlib.sha256(f"query\n{text}".encode()).hexdigest()


@dataclass(frozen=True)
class QueryVectors:
    """Query vectors of one model version, and what fetching the missing ones cost."""

    vectors: dict[str, np.ndarray]
    """By query text."""
    requests: int
    embedded: int


def cached_query_vectors(
    store: EmbeddingStore, version: ModelVersion, texts: Sequence[str], embedder: Callable[[], Embedder]
) -> QueryVectors:
    """The version's vectors of `texts` from the store's cache; only the missing ones are embedded (and cached)."""
    hashes = {text: query_hash(text) for text in texts}
    cache = store.cache(version)
    found = cache.get(sorted(set(hashes.values())))
    missing = sorted(text for text, digest in hashes.items() if digest not in found)
    requests = 0
    if missing:
        model = embedder()
        before = replace(model.cost) if isinstance(getattr(model, "cost", None), EmbeddingCost) else None
        fresh = {hashes[text]: np.asarray(model.embed_query(text), dtype=np.float32) for text in missing}
        cache.put(fresh)
        found.update(fresh)
        requests = model.cost.since(before).requests if before is not None else len(missing)
    return QueryVectors({text: found[digest] for text, digest in hashes.items()}, requests, len(missing))


def top_changes(
    before: Mapping[str, Sequence[str]], after: Mapping[str, Sequence[str]], queries: Sequence[LabelledQuery],
    k: int = 3,
) -> list[dict]:
    """The queries whose top-k template ids differ between two rankings, and whether each gained or lost its gold.

    A query missing from either ranking is left out (it was not evaluated on both).
    """
    changes = []
    for q in queries:
        if q.query_id not in before or q.query_id not in after:
            continue
        old, new = list(before[q.query_id])[:k], list(after[q.query_id])[:k]
        if old == new:
            continue
        gold = set(q.gold)
        had, has = bool(gold & set(old)), bool(gold & set(new))
        changes.append({
            "query_id": q.query_id, "query": q.query, "before": old, "after": new,
            "gold": "gained" if has and not had else "lost" if had and not has else "kept" if has else "missed",
        })
    return changes


def compare(before: Evaluation, after: Evaluation) -> dict:
    """Two evaluations on the same queries side by side: overall, per query kind and per category."""
    ranks = {o.query_id: o.rank for o in before.outcomes}
    gained = [o.query_id for o in after.scored if o.rank <= 3 and (ranks.get(o.query_id) or 99) > 3]
    lost = [o.query_id for o in after.outcomes if (o.rank or 99) > 3 and (ranks.get(o.query_id) or 99) <= 3]
    return {
        "model_versions": [before.model_version, after.model_version],
        "overall": [before.metrics(), after.metrics()],
        "per_kind": {k: [before.per_kind().get(k), after.per_kind().get(k)] for k in after.per_kind()},
        "per_category": {k: [before.per_category().get(k), after.per_category().get(k)] for k in after.per_category()},
        "entered_top3": gained,
        "left_top3": lost,
    }


def comparison_report(before: Evaluation, after: Evaluation) -> str:
    """`compare` as a table: each metric of the first version, then the second's."""
    data = compare(before, after)
    a, b = data["model_versions"]
    lines = [f"{after.queries_file}: {a} -> {b} ({len(after.outcomes)} queries, {after.templates} templates)"]

    def row(name: str, pair: list) -> str:
        old, new = (p or {"queries": 0, "top1": 0.0, "top3": 0.0, "top5": 0.0, "mrr": 0.0} for p in pair)
        cells = "  ".join(f"{old[m]:.3f} -> {new[m]:.3f}" for m in ("top1", "top3", "top5", "mrr"))
        return f"{name:<{width}}  {new['queries']:>7}  {cells}"

    names = ["overall", *data["per_kind"], *data["per_category"]]
    width = max(len(n) for n in names + ["category"])
    header = f"{'':<{width}}  queries  " + "  ".join(f"{m:<14}" for m in ("top-1", "top-3", "top-5", "MRR"))
    lines += ["", header, row("overall", data["overall"])]
    for title, groups in (("query kind", data["per_kind"]), ("category", data["per_category"])):
        if groups:
            lines += ["", title]
            lines += [row(name, pair) for name, pair in groups.items()]
    lines += [
        "",
        f"entered the top 3: {len(data['entered_top3'])} ({', '.join(data['entered_top3'][:20])})",
        f"left the top 3: {len(data['left_top3'])} ({', '.join(data['left_top3'][:20])})",
    ]
    return "\n".join(lines)
