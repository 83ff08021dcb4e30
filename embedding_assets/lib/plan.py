"""Compare the FAQ with what a model version has published: what to embed, update and delete."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from embedding_assets.lib.hashing import HashedTemplate


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

    def same_fields(self, item: HashedTemplate) -> bool:
        """Whether every field but the id and the content hash equals the template's."""
        return all(getattr(self, name) == getattr(item.template, name) for name in EDITABLE_FIELDS)


EDITABLE_FIELDS = tuple(StoredTemplate.__dataclass_fields__)[2:]
"""The fields a template can change without changing its vector's identity (all but id and hash)."""


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
) -> ChangePlan:
    """Classify every template; with rebuild, everything counts as new."""
    if rebuild:
        return ChangePlan(model_version, base_generation, new=list(current), deleted=[], rebuild=True)
    new, modified, unchanged, metadata_updated = [], [], [], []
    for item in current:
        stored = published.get(item.template_id)
        if stored is None:
            new.append(item)
        elif stored.content_hash != item.content_hash:
            modified.append(item)
        else:
            unchanged.append(item)
            if not stored.same_fields(item):
                metadata_updated.append(item)
    current_ids = {item.template_id for item in current}
    deleted = sorted(tid for tid in published if tid not in current_ids)
    return ChangePlan(
        model_version, base_generation, new, modified, unchanged, metadata_updated, deleted, base=published
    )
