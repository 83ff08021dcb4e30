"""What every embedding store offers, and the records it exchanges."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from functools import cached_property
from typing import Protocol

import numpy as np

from embedding_assets.lib.embedders import EmbeddingError, VectorCache, check_vectors
from embedding_assets.lib.hashing import HashedTemplate
from embedding_assets.lib.model_versions import OPENAI_TRANSPORT_SETTINGS, ModelVersion
from embedding_assets.lib.plan import ChangePlan, PublishedTemplates, StoredTemplate, editable_values


BUSY_TIMEOUT_ENV = "EMBEDDING_ASSETS_BUSY_TIMEOUT"
DEFAULT_BUSY_TIMEOUT = 30.0
KEEP_GENERATIONS_ENV = "EMBEDDING_ASSETS_KEEP_GENERATIONS"
DEFAULT_KEEP_GENERATIONS = 2


class StoreError(RuntimeError):
    """The embedding store cannot be used as asked."""


class StoreNotFoundError(StoreError):
    """No store exists at the given location."""


class StoreCorruptError(StoreError):
    """The store exists and is proven damaged or not a database: only this lets a forced rebuild move it aside."""


class ForeignDatabaseError(StoreError):
    """The location holds another application's database; it is never changed or moved."""


class StoreLockedError(StoreError):
    """Another process holds the store (or one model version's writer lock) for longer than we wait."""


class StoreReadOnlyError(StoreError):
    """The store was opened read-only (its location cannot be written) and a write was asked for."""


class StalePlanError(StoreError):
    """The store changed after the change plan was computed, and the plan cannot be rebased."""


class NothingToRollBackError(StoreError):
    """A rollback was asked for a model version that has no earlier generation kept."""


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
    ranking: dict = field(default_factory=dict)
    """Views, fusion and lexical signal the version ranks with (empty: one view, dense score only)."""

    def to_model_version(self) -> ModelVersion:
        return ModelVersion(
            key=self.key,
            provider=self.provider,
            model=self.model,
            dimension=self.dimension,
            text_template=self.text_template,
            settings=self.settings,
        ).with_ranking(self.ranking)

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


@dataclass(frozen=True)
class RollbackResult:
    """The outcome of one rollback transaction."""

    model_version: str
    generation: int
    """The store generation the restored rows were published as (a new one)."""
    restored_generation: int
    """The generation whose rows and vectors were restored."""
    replaced_generation: int
    rows: int
    restorable: list[int]
    """The version's generations still kept for a further rollback, newest first."""
    is_current: bool
    seconds: float

    def as_dict(self) -> dict:
        return {
            "model_version": self.model_version,
            "generation": self.generation,
            "restored_generation": self.restored_generation,
            "replaced_generation": self.replaced_generation,
            "rows": self.rows,
            "restorable": self.restorable,
            "current": self.is_current,
        }


TEMPLATE_FIELDS = tuple(StoredTemplate.__dataclass_fields__)
"""A published template's columns, in table order; the vector column follows them."""
INTEGER_FIELDS = frozenset(name for name, f in StoredTemplate.__dataclass_fields__.items() if f.type == "int")
VERSION_FIELDS = (
    "key", "provider", "model", "dimension", "text_template", "settings", "fingerprint", "rows", "generation",
    "created_at", "published_at", "ranking",
)
"""The model_versions table's columns, in table order."""


def column_definitions(types: Mapping[str, str], names: Sequence[str] = TEMPLATE_FIELDS) -> str:
    """`name TYPE NOT NULL` for each template column, with the dialect's text and integer types."""
    return ",\n    ".join(
        f"{name} {types['int' if name in INTEGER_FIELDS else 'text']} NOT NULL" for name in names
    )


def template_row(item: HashedTemplate) -> tuple:
    """A template's column values in TEMPLATE_FIELDS order."""
    return (item.template_id, item.content_hash, *editable_values(item.template))


def editable_row(item: HashedTemplate) -> tuple:
    """The template id then the EDITABLE_FIELDS values: what a field-only change writes."""
    row = template_row(item)
    return (row[0], *row[2:])


def version_info(row: Sequence, current: str | None) -> VersionInfo:
    """A model_versions row (VERSION_FIELDS order; settings as JSON text or already decoded)."""
    values = dict(zip(VERSION_FIELDS, row, strict=True))
    for name in ("settings", "ranking"):
        if isinstance(values[name], str):
            values[name] = json.loads(values[name])
    return VersionInfo(**values, is_current=values["key"] == current)


@dataclass(frozen=True)
class StoreState:
    """Which store this is and how far it has got: a new store (even at the same path) has a new id."""

    store_id: str
    generation: int


def busy_timeout_from_env() -> float:
    """Seconds to wait for another process's lock on the file (EMBEDDING_ASSETS_BUSY_TIMEOUT, default 30)."""
    raw = os.environ.get(BUSY_TIMEOUT_ENV, "").strip()
    try:
        return float(raw) if raw else DEFAULT_BUSY_TIMEOUT
    except ValueError:
        raise StoreError(f"{BUSY_TIMEOUT_ENV} must be a number of seconds, got {raw!r}") from None


def keep_generations_from_env() -> int:
    """Earlier generations kept restorable per version (EMBEDDING_ASSETS_KEEP_GENERATIONS, default 2; 0 keeps none)."""
    raw = os.environ.get(KEEP_GENERATIONS_ENV, "").strip()
    if not raw:
        return DEFAULT_KEEP_GENERATIONS
    if not raw.isdigit():
        raise StoreError(f"{KEEP_GENERATIONS_ENV} must be a whole number of generations (0 or more), got {raw!r}")
    return int(raw)


def rollback_marker(key: str) -> str:
    """The store_meta key that records the generation a rollback of `key` published."""
    return f"rolled_back.{key}"


def nothing_to_roll_back_message(key: str, generation: int, keep: int) -> str:
    return (
        f"model version {key!r} has no earlier generation to roll back to: none before generation {generation} "
        f"is kept ({KEEP_GENERATIONS_ENV}={keep}); nothing was changed"
    )


def new_store_id() -> str:
    return uuid.uuid4().hex


@dataclass(frozen=True)
class StoreSnapshot:
    """One model version's published templates (column-wise) and vectors, read in one transaction."""

    version: VersionInfo
    store_generation: int
    columns: dict[str, Sequence]
    matrix: np.ndarray
    store_id: str = ""
    views: Mapping[str, np.ndarray] = field(default_factory=dict)
    """The vectors of every view but the first, by view name, in the rows' order."""

    @property
    def state(self) -> StoreState:
        return StoreState(self.store_id, self.store_generation)

    def __len__(self) -> int:
        return self.matrix.shape[0]

    def template(self, position: int) -> StoredTemplate:
        return StoredTemplate(*(self.columns[name][position] for name in TEMPLATE_FIELDS))

    def view_matrices(self) -> list[np.ndarray]:
        """One matrix per view of the version, in its view order (the first is `matrix`)."""
        names = [v.name for v in self.version.to_model_version().text_views]
        return [self.matrix, *(self.views[name] for name in names[1:])]

    def template_vectors(self) -> np.ndarray:
        """(rows, dimension) for a single-view version, (rows, views, dimension) for several views."""
        matrices = self.view_matrices()
        return self.matrix if len(matrices) == 1 else np.stack(matrices, axis=1)

    @cached_property
    def templates(self) -> list[StoredTemplate]:
        return [self.template(i) for i in range(len(self))]


def settings_json(settings: dict) -> str:
    return json.dumps(settings, sort_keys=True, ensure_ascii=False)


def _vector_settings(provider: str, settings: Mapping) -> dict:
    """The settings that enter the fingerprint (the ones that change the vectors)."""
    if provider == "openai":
        return {k: v for k, v in settings.items() if k not in OPENAI_TRANSPORT_SETTINGS}
    return dict(settings)


def drifted_fields(version: ModelVersion, stored: VersionInfo) -> list[tuple[str, object, object]]:
    """(field, stored value, configured value) for every vector-relevant setting that differs."""
    found = [
        (name, getattr(stored, name), getattr(version, name))
        for name in ("provider", "model", "dimension", "text_template")
        if getattr(stored, name) != getattr(version, name)
    ]
    stored_views = [(v.name, v.text_template) for v in stored.to_model_version().views]
    views = [(v.name, v.text_template) for v in version.views]
    if stored_views != views:
        found.append(("views", dict(stored_views) or None, dict(views) or None))
    before = _vector_settings(stored.provider, stored.settings)
    after = _vector_settings(version.provider, version.settings)
    missing = object()
    for name in sorted(set(before) | set(after)):
        old, new = before.get(name, missing), after.get(name, missing)
        if old != new:
            found.append((f"settings.{name}", None if old is missing else old, None if new is missing else new))
    return found


def mismatch_message(version: ModelVersion, stored: VersionInfo) -> str:
    """What drifted between a version's published settings and its configuration, field by field."""
    drifted = drifted_fields(version, stored) or [("fingerprint", stored.fingerprint, version.fingerprint())]
    differences = "; ".join(
        f"{name} differs (stored {'unset' if old is None else repr(old)}, "
        f"configured {'unset' if new is None else repr(new)})"
        for name, old, new in drifted
    )
    return (
        f"model version {version.key!r} was published with different settings: {differences}. "
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
    wrong = sorted({np.shape(v) for v in changed} - {version.vector_shape})
    if wrong:
        expected = f"dimension {version.dimension}" if not version.views else f"shape {version.vector_shape}"
        raise StoreError(f"{context}: expected {expected}, got vectors of shape {wrong}")
    rows = len(changed) * (len(version.views) or 1)
    try:
        check_vectors(np.reshape(changed, (rows, version.dimension)), rows, version.dimension, context)
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
    read_only: bool
    read_only_reason: str | None

    def generation(self) -> int: ...

    def state(self) -> StoreState: ...

    def change_marker(self) -> str | None: ...

    def current_version(self) -> str | None: ...

    def versions(self) -> list[VersionInfo]: ...

    def version(self, key: str) -> VersionInfo | None: ...

    def published(self, key: str) -> tuple[VersionInfo | None, PublishedTemplates]: ...

    def published_hashes(self, key: str) -> tuple[VersionInfo | None, dict[str, str]]: ...

    def published_vectors(self, key: str) -> tuple[VersionInfo | None, dict[str, str], list[str], np.ndarray]: ...

    def cache(self, version: ModelVersion) -> VectorCache: ...

    def publish(
        self, version: ModelVersion, plan: ChangePlan, vectors: Mapping[str, np.ndarray]
    ) -> PublishResult: ...

    def promote(self, key: str) -> VersionInfo: ...

    def prune(self, key: str) -> int: ...

    def restorable(self) -> dict[str, list[int]]: ...

    def rollback(self, key: str) -> RollbackResult: ...

    def rolled_back(self, key: str) -> int | None: ...

    def snapshot(self, key: str | None = None) -> StoreSnapshot: ...

    def check_integrity(self) -> None: ...

    def writer_lock(self, model_version_key: str, timeout: float) -> AbstractContextManager[None]: ...

    def close(self) -> None: ...


class DatabaseSearch(Protocol):
    """A store that ranks templates itself instead of handing every vector to the reader."""

    def facets(self, key: str) -> tuple[set[str], set[str]]: ...

    def search(
        self, key: str, query_vector: np.ndarray, k: int, category: str | None = None, subcategory: str | None = None
    ) -> list[tuple[StoredTemplate, float]]: ...
