"""What every embedding store offers, and the records it exchanges."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Protocol

import numpy as np

from embedding_assets.lib.embedders import EmbeddingError, VectorCache, check_vectors
from embedding_assets.lib.model_versions import ModelVersion
from embedding_assets.lib.plan import ChangePlan, StoredTemplate


class StoreError(RuntimeError):
    """The embedding store cannot be used as asked."""


class StoreNotFoundError(StoreError):
    """No store exists at the given location."""


class StoreCorruptError(StoreError):
    """The store exists but is not a readable embedding store."""


class ForeignDatabaseError(StoreError):
    """The location holds another application's database; it is never changed or moved."""


class StalePlanError(StoreError):
    """The store changed after the change plan was computed."""


class ModelVersionMismatchError(StoreError):
    """A model version's settings differ from those its published vectors were made with."""


@dataclass(frozen=True)
class VersionInfo:
    """A model version as recorded in the store."""

    key: str
    provider: str
    model: str
    dimension: int
    text_template: str
    settings: dict
    fingerprint: str
    rows: int
    generation: int
    created_at: str
    published_at: str
    is_current: bool

    def to_model_version(self) -> ModelVersion:
        return ModelVersion(
            key=self.key,
            provider=self.provider,
            model=self.model,
            dimension=self.dimension,
            text_template=self.text_template,
            settings=self.settings,
        )

    def as_dict(self) -> dict:
        return {
            "model_version": self.key,
            "provider": self.provider,
            "model": self.model,
            "dimension": self.dimension,
            "rows": self.rows,
            "generation": self.generation,
            "created_at": self.created_at,
            "published_at": self.published_at,
            "current": self.is_current,
        }


@dataclass(frozen=True)
class PublishResult:
    """The outcome of one publish transaction."""

    model_version: str
    generation: int
    rows: int
    changed: bool
    is_current: bool
    seconds: float


TEMPLATE_FIELDS = tuple(StoredTemplate.__dataclass_fields__)


@dataclass(frozen=True)
class StoreSnapshot:
    """One model version's published templates (column-wise) and vectors, read in one transaction."""

    version: VersionInfo
    store_generation: int
    columns: dict[str, Sequence]
    matrix: np.ndarray

    def __len__(self) -> int:
        return self.matrix.shape[0]

    def template(self, position: int) -> StoredTemplate:
        return StoredTemplate(*(self.columns[name][position] for name in TEMPLATE_FIELDS))

    @cached_property
    def templates(self) -> list[StoredTemplate]:
        return [self.template(i) for i in range(len(self))]


def settings_json(settings: dict) -> str:
    return json.dumps(settings, sort_keys=True, ensure_ascii=False)


def mismatch_message(version: ModelVersion, stored: VersionInfo) -> str:
    return (
        f"model version {version.key!r} was published with different settings "
        f"(stored: provider={stored.provider}, model={stored.model}, dimension={stored.dimension}; "
        f"configured: provider={version.provider}, model={version.model}, dimension={version.dimension}). "
        "Declare a new model version key for new settings, or rebuild this one with --force."
    )


def check_publish_vectors(version: ModelVersion, plan: ChangePlan, vectors: Mapping[str, np.ndarray]) -> None:
    """Refuse a publish whose changed texts lack a vector or have a wrong-shaped or unusable one."""
    changed_hashes = {i.content_hash for i in (*plan.new, *plan.modified)}
    missing = sorted(changed_hashes - set(vectors))
    if missing:
        raise StoreError(f"model version {version.key!r}: no vector for {len(missing)} changed text(s)")
    changed = [vectors[h] for h in changed_hashes]
    context = f"model version {version.key!r}, publish"
    wrong = sorted({np.shape(v) for v in changed} - {(version.dimension,)})
    if wrong:
        raise StoreError(f"{context}: expected dimension {version.dimension}, got vectors of shape {wrong}")
    try:
        check_vectors(np.reshape(changed, (len(changed), version.dimension)), len(changed), version.dimension, context)
    except EmbeddingError as exc:
        raise StoreError(str(exc)) from exc


def unpublished_message(key: str, published: Sequence[str]) -> str:
    listed = ", ".join(published) if published else "none yet"
    return f"model version {key!r} has not been published (published: {listed})"


def current_prune_message(key: str) -> str:
    return (
        f"model version {key!r} is the current version and cannot be pruned; "
        "promote another version first (embedding-assets versions promote KEY)"
    )


class EmbeddingStore(Protocol):
    location: str

    def generation(self) -> int: ...

    def current_version(self) -> str | None: ...

    def versions(self) -> list[VersionInfo]: ...

    def version(self, key: str) -> VersionInfo | None: ...

    def published(self, key: str) -> tuple[VersionInfo | None, dict[str, StoredTemplate]]: ...

    def cache(self, version: ModelVersion) -> VectorCache: ...

    def publish(
        self, version: ModelVersion, plan: ChangePlan, vectors: Mapping[str, np.ndarray]
    ) -> PublishResult: ...

    def promote(self, key: str) -> VersionInfo: ...

    def prune(self, key: str) -> int: ...

    def snapshot(self, key: str | None = None) -> StoreSnapshot: ...

    def check_integrity(self) -> None: ...

    def close(self) -> None: ...


class DatabaseSearch(Protocol):
    """A store that ranks templates itself instead of handing every vector to the reader."""

    def facets(self, key: str) -> tuple[set[str], set[str]]: ...

    def search(
        self, key: str, query_vector: np.ndarray, k: int, category: str | None = None, subcategory: str | None = None
    ) -> list[tuple[StoredTemplate, float]]: ...
