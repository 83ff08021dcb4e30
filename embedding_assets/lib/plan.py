"""Compare the FAQ with what a model version has published: what to embed, update and delete."""

from __future__ import annotations

import math
import operator
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from embedding_assets.lib.batching import approximate_tokens, plan_batches
from embedding_assets.lib.embedding_base import VectorCache
from embedding_assets.lib.hashing import HashedTemplate
from embedding_assets.lib.model_versions import ModelVersion
from embedding_assets.lib.openai_settings import OpenAISettings


@dataclass(frozen=True)
class StoredTemplate:
    """What the store holds for one published template (everything but its vector)."""

    template_id: str
    content_hash: str
    category: str
    subcategory: str
    question: str
    answer: str
    priority: str
    audience: str
    source_row: int


EDITABLE_FIELDS = tuple(StoredTemplate.__dataclass_fields__)[2:]
"""The fields a template can change without changing its vector's identity (all but id and hash)."""
_STORED_FIELDS = operator.attrgetter(*StoredTemplate.__dataclass_fields__)
editable_values = operator.attrgetter(*EDITABLE_FIELDS)
"""A template's (or a stored template's) EDITABLE_FIELDS values, as a tuple in that order."""


class PublishedTemplates(Mapping[str, StoredTemplate]):
    """A version's published templates by id, held as the plain tuples the store reads (StoredTemplate's
    field order), which the cycle collector does not track; a StoredTemplate is built when one is asked for."""

    __slots__ = ("rows",)

    def __init__(self, rows: dict[str, tuple]):
        self.rows = rows

    @classmethod
    def of(cls, templates: Mapping[str, StoredTemplate]) -> PublishedTemplates:
        if isinstance(templates, PublishedTemplates):
            return templates
        return cls({tid: _STORED_FIELDS(stored) for tid, stored in templates.items()})

    def __getitem__(self, template_id: str) -> StoredTemplate:
        return StoredTemplate(*self.rows[template_id])

    def __contains__(self, template_id: object) -> bool:
        return template_id in self.rows

    def __iter__(self) -> Iterator[str]:
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __repr__(self) -> str:
        return f"PublishedTemplates({len(self.rows)} templates)"


@dataclass(frozen=True)
class ChangePlan:
    """The difference between the FAQ and one model version's published templates."""

    model_version: str
    base_generation: int | None
    new: list[HashedTemplate] = field(default_factory=list)
    modified: list[HashedTemplate] = field(default_factory=list)
    unchanged: list[HashedTemplate] = field(default_factory=list)
    metadata_updated: list[HashedTemplate] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    rebuild: bool = False
    base: Mapping[str, StoredTemplate] | None = field(default=None, compare=False, repr=False)
    """The published templates the plan was made against (lets a publish rebase a stale plan safely)."""
    base_store_id: str | None = field(default=None, compare=False)
    """The id of the store the plan was made against: with `base_generation` it names the published rows."""

    @property
    def has_changes(self) -> bool:
        return bool(self.rebuild or self.new or self.modified or self.metadata_updated or self.deleted)

    @property
    def target_rows(self) -> int:
        return len(self.new) + len(self.modified) + len(self.unchanged)

    @property
    def templates(self) -> list[HashedTemplate]:
        """Every template the plan was made from: what the version should hold once published."""
        return [*self.new, *self.modified, *self.unchanged]

    def texts_to_embed(self) -> dict[str, str]:
        """Unique texts of new and modified templates (one per view), by content hash."""
        return {h: text for item in (*self.new, *self.modified) for h, text in item.embedded_texts().items()}

    def counts(self) -> dict[str, int]:
        return {
            "new": len(self.new),
            "modified": len(self.modified),
            "deleted": len(self.deleted),
            "unchanged": len(self.unchanged),
            "metadata_updated": len(self.metadata_updated),
        }


def build_change_plan(
    current: list[HashedTemplate],
    published: Mapping[str, StoredTemplate],
    *,
    model_version: str,
    base_generation: int | None,
    rebuild: bool = False,
    base_store_id: str | None = None,
) -> ChangePlan:
    """Classify every template; with rebuild, everything counts as new."""
    if rebuild:
        return ChangePlan(
            model_version, base_generation, new=list(current), deleted=[], rebuild=True, base_store_id=base_store_id
        )
    published = PublishedTemplates.of(published)
    rows = published.rows
    new, modified, unchanged, metadata_updated = [], [], [], []
    for item in current:
        row = rows.get(item.template_id)
        if row is None:
            new.append(item)
        elif row[1] != item.content_hash:
            modified.append(item)
        else:
            unchanged.append(item)
            if row[2:] != editable_values(item.template):
                metadata_updated.append(item)
    current_ids = {item.template_id for item in current}
    deleted = sorted(tid for tid in rows if tid not in current_ids)
    return ChangePlan(
        model_version, base_generation, new, modified, unchanged, metadata_updated, deleted, base=published,
        base_store_id=base_store_id,
    )


@dataclass(frozen=True)
class PlanEstimate:
    """What embedding a change plan will send, worked out before anything is sent."""

    model_version: str
    published_templates: int
    """Templates the version had published when the plan was made (0: a first build)."""
    texts_needed: int
    """Unique texts of the new and modified templates (one per view)."""
    cache_hits: int
    texts_to_embed: int
    templates_to_embed: int
    """New and modified templates with at least one text missing from the cache."""
    tokens: int
    """Estimated: characters / 3 of every text sent, the estimate the request batching uses."""
    requests: int
    """Embedding requests when none is retried."""
    batch_size: int
    texts_by_view: dict[str, int] = field(default_factory=dict)
    """Texts to embed per view, for a version that declares views."""

    @property
    def first_build(self) -> bool:
        return self.published_templates == 0

    @property
    def share(self) -> float | None:
        """Templates to embed over published templates; None for a first build."""
        return None if self.first_build else self.templates_to_embed / self.published_templates

    def as_dict(self) -> dict:
        return {
            "published_templates": self.published_templates,
            "texts_needed": self.texts_needed,
            "cache_hits": self.cache_hits,
            "texts_to_embed": self.texts_to_embed,
            "templates_to_embed": self.templates_to_embed,
            "reembed_share": None if self.share is None else round(self.share, 4),
            "estimated_tokens": self.tokens,
            "estimated_requests": self.requests,
            "batch_size": self.batch_size,
            "texts_by_view": dict(self.texts_by_view),
        }


def estimate_plan(
    plan: ChangePlan, version: ModelVersion, cache: VectorCache | None, published_templates: int
) -> PlanEstimate:
    """The texts a run of `plan` embeds (what the cache lacks, as embed_with_cache looks it up) and their cost."""
    texts = plan.texts_to_embed()
    hits = cache.get(list(texts)) if texts and cache is not None and not plan.rebuild else {}
    missing = [h for h in texts if h not in hits]
    to_send = set(missing)
    by_view: dict[str, int] = {}
    counted: set[str] = set()
    templates = 0
    for item in (*plan.new, *plan.modified):
        hashes = item.vector_hashes()
        templates += any(h in to_send for h in hashes)
        for view, text_hash in zip(version.text_views, hashes, strict=True):
            if text_hash in to_send and text_hash not in counted:
                counted.add(text_hash)
                by_view[view.name] = by_view.get(view.name, 0) + 1
    sent = [texts[h] for h in missing]
    if version.provider == "openai":
        openai_settings = OpenAISettings.parse(version.settings)
        sent = [openai_settings.passage_prefix + text for text in sent]
        requests = len(plan_batches(sent, version.batch_size, openai_settings.max_batch_tokens))
    else:
        requests = math.ceil(len(sent) / version.batch_size)
    return PlanEstimate(
        model_version=version.key,
        published_templates=published_templates,
        texts_needed=len(texts),
        cache_hits=len(hits),
        texts_to_embed=len(missing),
        templates_to_embed=templates,
        tokens=sum(approximate_tokens(text) for text in sent),
        requests=requests,
        batch_size=version.batch_size,
        texts_by_view={name: by_view.get(name, 0) for name in (v.name for v in version.views)},
    )


DEFAULT_MAX_REEMBED_SHARE = 0.5


@dataclass(frozen=True)
class BudgetLimits:
    """How much one run may embed without approval."""

    max_share: float = DEFAULT_MAX_REEMBED_SHARE
    """Of a published version's templates; a first build is exempt."""
    max_tokens: int | None = None
    """Estimated tokens of one run, first builds included; None: no limit."""

    def __post_init__(self) -> None:
        if isinstance(self.max_share, bool) or not 0 <= self.max_share <= 1:
            raise ValueError(f"max_reembed_share must be a share from 0 to 1 (0.5 is half), not {self.max_share!r}")
        if self.max_tokens is not None and (isinstance(self.max_tokens, bool) or self.max_tokens < 1):
            raise ValueError(f"max_reembed_tokens must be a whole number of tokens, 1 or more, not {self.max_tokens!r}")

    def refusal(self, estimate: PlanEstimate) -> str | None:
        """Why a run of this estimate needs approval, with its numbers; None when it is within the limits."""
        reasons = []
        share = estimate.share
        if share is not None and share > self.max_share:
            reasons.append(
                f"it would embed {estimate.templates_to_embed} of {estimate.published_templates} published "
                f"templates ({share:.1%}; the limit is {_percent(self.max_share)})"
            )
        if self.max_tokens is not None and estimate.tokens > self.max_tokens:
            reasons.append(f"about {estimate.tokens} tokens (the limit is {self.max_tokens})")
        if not reasons:
            return None
        return (
            f"{' and '.join(reasons)}: {estimate.texts_to_embed} text(s), about {estimate.tokens} tokens "
            f"in {estimate.requests} request(s)"
        )


def _percent(share: float) -> str:
    return f"{share * 100:g}%"
