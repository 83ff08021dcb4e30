"""The quality gate of a promotion: the candidate version's top-3 accuracy next to the current one's."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from embedding_assets.lib.embedders import Embedder
from embedding_assets.lib.model_versions import ModelVersion
from embedding_assets.retrieval import TemplateRetriever
from embedding_assets.retrieval.evaluation import (
    LabelPositions,
    LabelledQuery,
    cached_query_vectors,
    evaluate,
    label_mode_for,
    top_changes,
)
from embedding_assets.store import EmbeddingStore, VersionInfo

GATE_TOP_K = 3


class _QueriesOnly:
    """The index's embedder during a review: every query vector is handed in, nothing is embedded here."""

    def embed_passages(self, texts):
        raise AssertionError("a promotion review embeds no passages")

    def embed_query(self, text):
        raise AssertionError("a promotion review takes its query vectors from the cache")


@dataclass(frozen=True)
class VersionScore:
    """One version's top-3 on the queries the current version can answer."""

    model_version: str
    hits: int
    queries: int

    @property
    def top3(self) -> float:
        return self.hits / self.queries if self.queries else 0.0

    def text(self) -> str:
        return f"{self.top3:.1%} ({self.hits} of {self.queries})"

    def as_dict(self) -> dict:
        return {"model_version": self.model_version, "top3": round(self.top3, 4), "hits": self.hits,
                "queries": self.queries}


@dataclass(frozen=True)
class PromotionReview:
    """What promoting `candidate` over `current` would do to the labelled queries' top-3 answers."""

    candidate: str
    current: str | None
    queries_file: str
    current_score: VersionScore | None = None
    candidate_score: VersionScore | None = None
    changes: list[dict] = field(default_factory=list)
    """Each labelled query whose top-3 ids differ: query_id, query, before, after, gold (gained/lost/kept/missed)."""
    requests: int = 0
    query_vectors_embedded: int = 0
    note: str | None = None
    """Why no comparison was made (first promotion, same version, no labelled query answerable)."""

    @property
    def compared(self) -> bool:
        return self.current_score is not None and self.candidate_score is not None

    @property
    def worse(self) -> bool:
        """The candidate's top-3 is lower than the current version's."""
        return self.compared and self.candidate_score.top3 < self.current_score.top3

    def summary(self) -> str:
        if not self.compared:
            return self.note or "no quality comparison"
        gained = sum(c["gold"] == "gained" for c in self.changes)
        lost = sum(c["gold"] == "lost" for c in self.changes)
        return (
            f"top-3 on {self.queries_file}: {self.candidate} {self.candidate_score.text()}, "
            f"current {self.current} {self.current_score.text()}; {len(self.changes)} quer(ies) changed their "
            f"top-3 answer ({gained} gained the labelled template, {lost} lost it)"
        )

    def refusal(self, override: str = "--force") -> str:
        return (
            f"refused to promote {self.candidate}: its top-3 accuracy {self.candidate_score.text()} is lower than "
            f"the current version {self.current}'s {self.current_score.text()} on the labelled queries of "
            f"{self.queries_file}; promote it anyway with {override}"
        )

    def as_dict(self) -> dict:
        return {
            "candidate": self.candidate,
            "current": self.current,
            "queries_file": self.queries_file,
            "compared": self.compared,
            "worse": self.worse,
            "scores": [s.as_dict() for s in (self.current_score, self.candidate_score) if s is not None],
            "changed_queries": self.changes,
            "requests": self.requests,
            "query_vectors_embedded": self.query_vectors_embedded,
            "note": self.note,
        }


def review_promotion(
    opened: EmbeddingStore,
    url: str,
    candidate: str,
    queries: Sequence[LabelledQuery],
    *,
    queries_file: str,
    model_version: Callable[[VersionInfo], ModelVersion],
    embedder: Callable[[ModelVersion], Embedder],
) -> PromotionReview:
    """Both versions' top-3 on the labelled queries the current version can answer.

    `opened` is the writable store at `url`. Query vectors come from each version's cache in it, as
    the retrieval_quality check's do (a repeated review embeds nothing); `model_version` gives the
    declared version of a stored one and `embedder` its embedder for the queries not yet cached.
    """
    current = opened.current_version()
    stored = {key: opened.version(key) for key in (current, candidate) if key}
    if current is None or current == candidate or stored.get(candidate) is None:
        note = ("no version is current" if current is None
                else f"{candidate} is the current version" if current == candidate
                else f"{candidate} is not published")
        return PromotionReview(candidate, current, queries_file, note=note)
    rankings, scores, requests, embedded = {}, {}, 0, 0
    answerable: list[LabelledQuery] | None = None
    for key in (current, candidate):
        retriever = TemplateRetriever.load(url, key, embedder=_QueriesOnly(), mode="memory")
        try:
            templates = retriever.index.templates()
            labels = LabelPositions(templates, label_mode_for([q.label for q in queries],
                                                              {t.template_id for t in templates}))
            if answerable is None:
                answerable = [q for q in queries if labels.of(q)]
                if not answerable:
                    return PromotionReview(
                        candidate, current, queries_file,
                        note=f"no labelled query of {queries_file} names a template of {current}: "
                             "no quality comparison",
                    )
            version = model_version(stored[key])
            vectors = cached_query_vectors(opened, version, [q.query for q in answerable], lambda: embedder(version))
            requests += vectors.requests
            embedded += vectors.embedded
            evaluation = evaluate(retriever, answerable, queries_file=queries_file,
                                  label_mode=labels.label_mode, query_vectors=vectors.vectors)
        finally:
            retriever.close()
        rankings[key] = {o.query_id: o.top_ids[:GATE_TOP_K] for o in evaluation.outcomes}
        hits = sum(o.rank is not None and o.rank <= GATE_TOP_K for o in evaluation.outcomes)
        scores[key] = VersionScore(key, hits, len(answerable))
    return PromotionReview(
        candidate, current, queries_file,
        current_score=scores[current], candidate_score=scores[candidate],
        changes=top_changes(rankings[current], rankings[candidate], answerable, k=GATE_TOP_K),
        requests=requests, query_vectors_embedded=embedded,
    )


def declared_or_stored(declared: Sequence[ModelVersion]) -> Callable[[VersionInfo], ModelVersion]:
    """The declared version of a stored one when model_versions.toml still declares it, else the stored one."""
    by_key = {version.key: version for version in declared}

    def version_of(info: VersionInfo) -> ModelVersion:
        version = by_key.get(info.key)
        return version if version is not None and version.fingerprint() == info.fingerprint else info.to_model_version()

    return version_of
