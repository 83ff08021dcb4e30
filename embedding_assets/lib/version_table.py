"""A model version's slice of the store as one value: every template, its embedded text and its vector."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import numpy as np

from embedding_assets.lib.hashing import HashedTemplate
from embedding_assets.lib.model_versions import ModelVersion
from embedding_assets.lib.plan import ChangePlan, StoredTemplate, build_change_plan


def primary_vector(vectors: np.ndarray) -> np.ndarray:
    """A template's first view's vector (its only one for a single-view version)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    return vectors if vectors.ndim == 1 else vectors[0]


def template_vectors(item: HashedTemplate, vectors_by_hash: Mapping[str, np.ndarray]) -> np.ndarray:
    """A template's vectors from vectors keyed by embedded text: (dimension,) or (views, dimension)."""
    if not item.view_hashes:
        return vectors_by_hash[item.content_hash]
    return np.stack([vectors_by_hash[h] for h in item.view_hashes])


class MissingVectorsError(ValueError):
    """A template whose text the store does not hold yet comes without a vector."""

    def __init__(self, key: str, template_ids: list[str]):
        listed = ", ".join(template_ids[:10]) + (" …" if len(template_ids) > 10 else "")
        super().__init__(f"model version {key!r}: no vector for {len(template_ids)} changed template(s): {listed}")
        self.template_ids = template_ids


@dataclass(frozen=True)
class VersionTable:
    """Every template of one model version and vectors by template id.

    Written to the store, the table replaces the version's slice; `vectors` needs only the rows whose
    text the slice does not hold yet, and every vector given is written. Read from the store, it has all.
    `base_generation` is the version's generation the table was derived from (None: not published then).
    """

    version: ModelVersion
    templates: tuple[HashedTemplate, ...]
    vectors: Mapping[str, np.ndarray] = field(default_factory=dict)
    base_generation: int | None = None
    rebuild: bool = False
    plan: ChangePlan | None = field(default=None, compare=False, repr=False)
    """The change plan the table was made from, against `base_generation` (None: the writer diffs the table
    against the published rows itself). While that generation is still published the writer applies the plan
    as it is, without reading the published rows again."""

    def __len__(self) -> int:
        return len(self.templates)

    @property
    def template_ids(self) -> list[str]:
        return [t.template_id for t in self.templates]

    def matrix(self) -> np.ndarray:
        """One row per template, in table order; every vector must be present."""
        missing = [t.template_id for t in self.templates if t.template_id not in self.vectors]
        if missing:
            raise MissingVectorsError(self.version.key, missing)
        rows = [primary_vector(self.vectors[t.template_id]) for t in self.templates]
        return np.stack(rows) if rows else np.empty((0, self.version.dimension), dtype=np.float32)

    def changes(self, published: Mapping[str, StoredTemplate], *, rewrite_carried: bool = True) -> ChangePlan:
        """What writing this table over a published slice changes; rows carrying a vector are rewritten unless told not."""
        plan = build_change_plan(
            list(self.templates), published, model_version=self.version.key, base_generation=self.base_generation,
            rebuild=self.rebuild,
        )
        rewritten = [i for i in plan.unchanged if i.template_id in self.vectors] if rewrite_carried else []
        if not rewritten:
            return plan
        ids = {i.template_id for i in rewritten}
        return replace(
            plan,
            modified=[*plan.modified, *rewritten],
            unchanged=[i for i in plan.unchanged if i.template_id not in ids],
            metadata_updated=[i for i in plan.metadata_updated if i.template_id not in ids],
        )

    def vectors_by_hash(self, plan: ChangePlan) -> dict[str, np.ndarray]:
        """The vectors a plan writes, keyed by content hash as the store takes them."""
        changed = (*plan.new, *plan.modified)
        missing = sorted(i.template_id for i in changed if i.template_id not in self.vectors)
        if missing:
            raise MissingVectorsError(self.version.key, missing)
        return {i.content_hash: self.vectors[i.template_id] for i in changed}
