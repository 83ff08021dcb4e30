"""The store contract written once: publish, promote, roll back, prune and reads over a few backend primitives.

A backend supplies a `StoreSession` (its SQL dialect, inside one transaction) and the transactions
themselves: `_read()` is one consistent snapshot, `_write()` holds the store's write lock, so
publishers are serialized while readers never wait.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from datetime import UTC, datetime
from typing import Protocol

import numpy as np

from embedding_assets.lib.model_versions import ModelVersion
from embedding_assets.lib.plan import ChangePlan, PublishedTemplates, StoredTemplate, build_change_plan
from embedding_assets.store.base import (
    ModelVersionMismatchError,
    NothingToRollBackError,
    PublishResult,
    RollbackResult,
    StalePlanError,
    StoreCorruptError,
    StoreError,
    StoreLockedError,
    StoreSnapshot,
    StoreState,
    VersionInfo,
    check_publish_vectors,
    current_prune_message,
    keep_generations_from_env,
    mismatch_message,
    nothing_to_roll_back_message,
    rollback_marker,
    editable_row,
    template_row,
    unpublished_message,
    version_info,
)

LOCK_POLL_SECONDS = 0.05


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


class StoreSession(Protocol):
    """One transaction's primitives; every method speaks the backend's dialect and nothing else."""

    def meta(self, key: str) -> str | None: ...

    def write_meta(self, key: str, value: str) -> None: ...

    def delete_meta(self, key: str) -> None: ...

    def version_rows(self, key: str | None = None) -> list[tuple]: ...

    def upsert_version(self, version: ModelVersion, generation: int, published_at: str) -> None: ...

    def set_row_count(self, key: str, rows: int) -> None: ...

    def templates(self, key: str) -> PublishedTemplates: ...

    def template_hashes(self, key: str) -> dict[str, str]:
        """Each published template id's content hash (no other column is read)."""
        ...

    def id_vectors(self, key: str, dimension: int) -> tuple[list[str], np.ndarray]:
        """The published template ids in id order and their (first view's) vectors, one row each."""
        ...

    def upsert_rows(self, key: str, rows: list[tuple], vectors: list[np.ndarray]) -> None: ...

    def update_fields(self, key: str, rows: list[tuple]) -> None: ...

    def upsert_views(self, key: str, rows: list[tuple[str, str, np.ndarray]]) -> None:
        """(template id, view name, vector) of every view but the first (the templates' rows exist)."""
        ...

    def view_data(self, key: str, dimension: int, names: Sequence[str], rows: int) -> dict[str, np.ndarray]:
        """The vectors of the named views, one matrix per view in template-id order."""
        ...

    def delete_ids(self, key: str, ids: Sequence[str]) -> None: ...

    def delete_rows(self, key: str) -> int: ...

    def delete_version(self, key: str) -> None: ...

    def count(self, key: str) -> int: ...

    def cached(self, key: str, fingerprint: str, hashes: Sequence[str]) -> dict[str, np.ndarray]: ...

    def put_cached(self, key: str, fingerprint: str, vectors: Mapping[str, np.ndarray], created_at: str) -> None: ...

    def snapshot_data(self, key: str, dimension: int) -> tuple[dict[str, Sequence], np.ndarray]: ...

    def before_rows(self, key: str, dimension: int) -> None: ...

    def after_rows(self, key: str, dimension: int) -> None: ...

    def kept_generations(self, key: str | None = None) -> dict[str, list[int]]:
        """The restorable generations of one version (or of every version), newest first."""
        ...

    def keep_generation(self, key: str, generation: int, touched: Sequence[str]) -> None:
        """Keep the version's row and the published rows (vectors, views) of the touched ids, as of `generation`."""
        ...

    def kept_version_row(self, key: str, generation: int) -> tuple:
        """The version's row (VERSION_FIELDS order) as it was published at a kept generation."""
        ...

    def restore_generation(self, key: str, generation: int, new_generation: int, published_at: str) -> None:
        """Undo the publish that replaced a kept generation: its row back, the touched ids' rows as they were."""
        ...

    def forget_generations(self, key: str, generations: Sequence[int]) -> None: ...


class StoreVectorCache:
    """Content-addressed vectors of one model version's exact settings."""

    def __init__(self, store: PublishingStore, version: ModelVersion):
        self._store = store
        self._key = version.key
        self._fingerprint = version.fingerprint()
        self._dimension = version.dimension

    def get(self, content_hashes: Sequence[str]) -> dict[str, np.ndarray]:
        if not content_hashes:
            return {}
        with self._store._read() as session:
            found = session.cached(self._key, self._fingerprint, list(content_hashes))
        return {h: v for h, v in found.items() if v.shape == (self._dimension,)}

    def put(self, vectors: Mapping[str, np.ndarray]) -> None:
        if not vectors:
            return
        with self._store._write(serialize=False) as session:
            session.put_cached(self._key, self._fingerprint, vectors, now())


class PublishingStore:
    """The backend-independent half of an embedding store."""

    location: str
    read_only: bool = False
    keep_generations: int | None = None
    """Earlier generations kept restorable per version; None reads EMBEDDING_ASSETS_KEEP_GENERATIONS."""

    def _read(self) -> AbstractContextManager[StoreSession]:
        raise NotImplementedError

    def _write(self, *, serialize: bool = True) -> AbstractContextManager[StoreSession]:
        raise NotImplementedError

    def _versions(self, session: StoreSession, key: str | None = None) -> list[VersionInfo]:
        current = session.meta("current_version")
        return [version_info(row, current) for row in session.version_rows(key)]

    def _version(self, session: StoreSession, key: str) -> VersionInfo | None:
        found = self._versions(session, key)
        return found[0] if found else None

    def _unpublished(self, session: StoreSession, key: str) -> StoreError:
        return StoreError(f"{self.location}: {unpublished_message(key, [v.key for v in self._versions(session)])}")

    def _bump_generation(self, session: StoreSession) -> int:
        generation = int(session.meta("generation") or 0) + 1
        session.write_meta("generation", str(generation))
        return generation

    def _kept(self) -> int:
        return keep_generations_from_env() if self.keep_generations is None else self.keep_generations

    def _retain(self, session: StoreSession, key: str, keep: int) -> list[int]:
        """Forget the version's kept generations beyond the newest `keep`; the ones still kept."""
        kept = session.kept_generations(key).get(key, [])
        if kept[keep:]:
            session.forget_generations(key, kept[keep:])
        return kept[:keep]

    def generation(self) -> int:
        with self._read() as session:
            return int(session.meta("generation") or 0)

    def state(self) -> StoreState:
        """The store's id and generation, read together (a replaced store has another id)."""
        with self._read() as session:
            return StoreState(session.meta("store_id") or "", int(session.meta("generation") or 0))

    def current_version(self) -> str | None:
        with self._read() as session:
            return session.meta("current_version")

    def versions(self) -> list[VersionInfo]:
        with self._read() as session:
            return self._versions(session)

    def version(self, key: str) -> VersionInfo | None:
        with self._read() as session:
            return self._version(session, key)

    def published(self, key: str) -> tuple[VersionInfo | None, PublishedTemplates]:
        """A version's record and its published templates, read in one transaction."""
        with self._read() as session:
            return self._version(session, key), session.templates(key)

    def published_hashes(self, key: str) -> tuple[VersionInfo | None, dict[str, str]]:
        """A version's record and the content hash of each published template id, read in one transaction."""
        with self._read() as session:
            return self._version(session, key), session.template_hashes(key)

    def published_vectors(self, key: str) -> tuple[VersionInfo | None, dict[str, str], list[str], np.ndarray]:
        """A version's record, its content hashes by id, and its ids (in id order) with their first view's
        vectors, read in one transaction; no other column is read. The other views' vectors are read to prove
        every row has one of the version's dimension (StoreCorruptError otherwise), and are not returned."""
        with self._read() as session:
            info = self._version(session, key)
            if info is None:
                return None, {}, [], np.empty((0, 0), dtype=np.float32)
            ids, matrix = session.id_vectors(key, info.dimension)
            extra = [v.name for v in info.to_model_version().views[1:]]
            if extra:
                session.view_data(key, info.dimension, extra, len(ids))
            return info, session.template_hashes(key), ids, matrix

    def cache(self, version: ModelVersion) -> StoreVectorCache:
        return StoreVectorCache(self, version)

    def publish(self, version: ModelVersion, plan: ChangePlan, vectors: Mapping[str, np.ndarray]) -> PublishResult:
        """Apply a change plan in one transaction and bump the store generation.

        A plan made before another run published this version is rebased onto what is published now
        when that run changed no template differently; otherwise it is stale (StalePlanError).
        What the publish replaces is kept for `rollback` (see `keep_generations`).
        """
        started = time.perf_counter()
        check_publish_vectors(version, plan, vectors)
        key = version.key
        with self._write() as session:
            stored = self._version(session, key)
            if stored and stored.fingerprint != version.fingerprint() and not plan.rebuild:
                raise ModelVersionMismatchError(mismatch_message(version, stored))
            stored_generation = stored.generation if stored else None
            if stored_generation != plan.base_generation and not plan.rebuild:
                plan, vectors = self._rebase(session, version, plan, vectors, stored_generation)
            if stored and not plan.has_changes and stored.ranking == version.ranking():
                return PublishResult(
                    key, stored.generation, stored.rows, False, stored.is_current, time.perf_counter() - started
                )
            keep = self._kept()
            if stored and keep:
                touched = {i.template_id for i in (*plan.new, *plan.modified, *plan.metadata_updated)}
                touched.update(plan.deleted)
                if plan.rebuild:
                    touched.update(session.templates(key))
                session.keep_generation(key, stored.generation, sorted(touched))
            self._retain(session, key, keep)
            generation = self._bump_generation(session)
            session.upsert_version(version, generation, now())
            session.before_rows(key, version.dimension)
            if plan.rebuild:
                session.delete_rows(key)
            changed = [*plan.new, *plan.modified]
            stacked = [np.asarray(vectors[i.content_hash], dtype=np.float32) for i in changed]
            session.upsert_rows(key, [template_row(i) for i in changed], [v if v.ndim == 1 else v[0] for v in stacked])
            session.upsert_views(
                key,
                [(i.template_id, view.name, v[n]) for i, v in zip(changed, stacked, strict=True)
                 for n, view in enumerate(version.views[1:], start=1)],
            )
            session.update_fields(key, [editable_row(i) for i in plan.metadata_updated])
            session.delete_ids(key, plan.deleted)
            rows = session.count(key)
            if rows != plan.target_rows:
                raise StalePlanError(
                    f"model version {key!r}: publish would leave {rows} rows, the plan expects "
                    f"{plan.target_rows}; nothing was written"
                )
            session.set_row_count(key, rows)
            current = session.meta("current_version")
            if current is None:
                session.write_meta("current_version", key)
                current = key
            session.after_rows(key, version.dimension)
        return PublishResult(key, generation, rows, True, current == key, time.perf_counter() - started)

    def _rebase(
        self,
        session: StoreSession,
        version: ModelVersion,
        plan: ChangePlan,
        vectors: Mapping[str, np.ndarray],
        stored_generation: int | None,
    ) -> tuple[ChangePlan, Mapping[str, np.ndarray]]:
        """The plan diffed again against the rows published now, when no template was changed differently meanwhile.

        Per template, with B what the plan was made against, P what is published now and T the plan's target:
        P == T needs nothing, P == B is the plan's own change; anything else means another run published
        other content, and applying the plan would overwrite it.
        """
        published = session.templates(version.key)
        targets = {item.template_id: StoredTemplate(*template_row(item)) for item in plan.templates}
        base = plan.base
        conflicts = sorted(
            tid
            for tid in set(published) | set(targets) | set(base or {})
            if base is None or (published.get(tid) != targets.get(tid) and published.get(tid) != base.get(tid))
        )
        rebased = build_change_plan(
            plan.templates, published, model_version=version.key, base_generation=stored_generation
        )
        missing = set(rebased.texts_to_embed()) - set(vectors)
        if conflicts or missing:
            listed = ", ".join(conflicts[:5]) + (", …" if len(conflicts) > 5 else "")
            if base is None:
                why = "the plan does not record what it was made against"
            elif conflicts:
                why = f"changed {len(conflicts)} template(s) differently ({listed})"
            else:
                why = f"left {len(missing)} text(s) this run has no vector for"
            raise StalePlanError(
                f"model version {version.key!r}: another run published generation {stored_generation} after this "
                f"change plan was made (generation {plan.base_generation}) and {why}; run the pipeline again "
                "(texts already embedded are cached and are not paid for again)"
            )
        return rebased, vectors

    def promote(self, key: str) -> VersionInfo:
        """Make a published version the one readers use, in one transaction."""
        with self._write() as session:
            if self._version(session, key) is None:
                raise self._unpublished(session, key)
            if session.meta("current_version") != key:
                session.write_meta("current_version", key)
                self._bump_generation(session)
            return self._version(session, key)

    def restorable(self) -> dict[str, list[int]]:
        """Every version's earlier generations that `rollback` can restore, newest first."""
        with self._read() as session:
            kept = session.kept_generations()
            return {v.key: kept.get(v.key, []) for v in self._versions(session)}

    def rollback(self, key: str) -> RollbackResult:
        """Publish the version's newest kept generation again, in one transaction, as a new generation.

        The generation it replaces is not kept, so each rollback goes one generation further back;
        NothingToRollBackError when no earlier generation is kept (the store is unchanged).
        """
        started = time.perf_counter()
        with self._write() as session:
            current = self._version(session, key)
            if current is None:
                raise self._unpublished(session, key)
            kept = self._retain(session, key, self._kept())
            if not kept:
                raise NothingToRollBackError(
                    f"{self.location}: {nothing_to_roll_back_message(key, current.generation, self._kept())}"
                )
            restored = kept[0]
            past = version_info(session.kept_version_row(key, restored), None)
            generation = self._bump_generation(session)
            session.before_rows(key, past.dimension)
            session.restore_generation(key, restored, generation, now())
            rows = session.count(key)
            if rows != past.rows:
                raise StoreCorruptError(
                    f"{self.location}: kept generation {restored} of {key!r} holds {rows} templates, "
                    f"its record says {past.rows}; nothing was changed"
                )
            session.forget_generations(key, [restored])
            session.write_meta(rollback_marker(key), str(generation))
            session.after_rows(key, past.dimension)
        return RollbackResult(
            model_version=key,
            generation=generation,
            restored_generation=restored,
            replaced_generation=current.generation,
            rows=rows,
            restorable=kept[1:],
            is_current=current.is_current,
            seconds=time.perf_counter() - started,
        )

    def rolled_back(self, key: str) -> int | None:
        """The version's generation when a rollback published it and nothing was published since, else None."""
        with self._read() as session:
            info = self._version(session, key)
            marker = session.meta(rollback_marker(key))
        return info.generation if info is not None and marker == str(info.generation) else None

    def prune(self, key: str) -> int:
        """Delete a non-current version, its templates, cached vectors and index; the rows removed."""
        with self._write() as session:
            if self._version(session, key) is None:
                raise self._unpublished(session, key)
            if session.meta("current_version") == key:
                raise StoreError(current_prune_message(key))
            rows = session.delete_rows(key)
            session.delete_version(key)
            session.delete_meta(rollback_marker(key))
            self._bump_generation(session)
        return rows

    def snapshot(self, key: str | None = None) -> StoreSnapshot:
        """The published rows and vectors of one version (default: the current one), read in one transaction."""
        with self._read() as session:
            generation = int(session.meta("generation") or 0)
            store_id = session.meta("store_id") or ""
            key = key or session.meta("current_version")
            if key is None:
                raise StoreError(f"{self.location}: no model version has been published yet")
            info = self._version(session, key)
            if info is None:
                raise StoreError(f"{self.location}: model version {key!r} has not been published")
            columns, matrix = session.snapshot_data(key, info.dimension)
            extra = [v.name for v in info.to_model_version().views[1:]]
            views = session.view_data(key, info.dimension, extra, len(matrix)) if extra else {}
        return StoreSnapshot(
            version=info, store_generation=generation, columns=columns, matrix=matrix, store_id=store_id, views=views
        )


@contextmanager
def polled_lock(
    try_acquire: Callable[[], bool], release: Callable[[], None], timeout: float, busy_message: Callable[[float], str]
) -> Iterator[None]:
    """Hold a lock taken by polling try_acquire for at most timeout seconds, else StoreLockedError."""
    started = time.monotonic()
    while not try_acquire():
        waited = time.monotonic() - started
        if waited >= timeout:
            raise StoreLockedError(busy_message(waited))
        time.sleep(min(LOCK_POLL_SECONDS, max(0.0, timeout - waited)))
    try:
        yield
    finally:
        release()

