"""The IO manager that owns each model version's slice of the store, and how that slice is read and written."""

from __future__ import annotations

import hashlib
import os
import pickle
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, closing, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import dagster as dg
import numpy as np
from pydantic import Field

from embedding_assets.lib import intermediates
from embedding_assets.lib.faq import Template
from embedding_assets.lib.hashing import hash_version_templates
from embedding_assets.lib.model_versions import ModelVersion
from embedding_assets.lib.plan import ChangePlan
from embedding_assets.lib.verification import StoreReport, compare_published, unhealthy_vector_ids
from embedding_assets.lib.version_table import MissingVectorsError, VersionTable
from embedding_assets.store import (
    EmbeddingStore,
    ModelVersionMismatchError,
    PublishResult,
    StalePlanError,
    StoreCorruptError,
    StoreError,
    StoreLockedError,
    StoreNotFoundError,
    StoreSnapshot,
    VersionInfo,
    open_store,
    redact_url,
    store_backend,
)
from embedding_assets.store.base import mismatch_message

STORE_URL_DESCRIPTION = (
    "Store URL: sqlite:///path.db, a file path, or postgresql://user:password@host:port/database "
    "(pass it as EnvVar('EMBEDDING_ASSETS_STORE') so the password stays out of the run config)."
)


def read_version_table(store: EmbeddingStore, key: str) -> VersionTable | None:
    """A model version's published slice with every vector; None when the version is not published."""
    if store.version(key) is None:
        return None
    snapshot = store.snapshot(key)
    version = snapshot.version.to_model_version()
    stored_templates = snapshot.templates
    hashed = hash_version_templates(
        [
            Template(
                template_id=stored.template_id, category=stored.category, subcategory=stored.subcategory,
                question=stored.question, answer=stored.answer, priority=stored.priority, audience=stored.audience,
                source_row=stored.source_row,
            )
            for stored in stored_templates
        ],
        version,
    )
    templates = [replace(item, content_hash=stored.content_hash) for item, stored in zip(hashed, stored_templates)]
    vectors = dict(zip(snapshot.columns["template_id"], snapshot.template_vectors()))
    return VersionTable(
        version=version, templates=tuple(templates), vectors=vectors, base_generation=snapshot.version.generation
    )


@dataclass(frozen=True)
class TableWrite:
    """What writing a table changed: the applied plan and the publish outcome."""

    plan: ChangePlan
    result: PublishResult


def write_version_table(store: EmbeddingStore, table: VersionTable) -> TableWrite:
    """Publish only the table's difference from the stored slice, in one transaction.

    A table derived from an older generation of the slice is written only when it equals the slice
    (another run published the same content: nothing to do); otherwise it would undo that run's publish.
    """
    version = table.version
    stored, plan = _current_plan(store, table)
    if stored is not None and stored.fingerprint != version.fingerprint() and not table.rebuild:
        raise ModelVersionMismatchError(mismatch_message(version, stored))
    generation = stored.generation if stored else None
    stale = generation != table.base_generation and not table.rebuild
    if stored is not None and not plan.has_changes and stored.ranking == version.ranking():
        return TableWrite(plan, PublishResult(version.key, stored.generation, stored.rows, False, stored.is_current, 0.0))
    if stale:
        raise StalePlanError(
            f"model version {version.key!r}: another run published generation {generation} after this run planned "
            f"against generation {table.base_generation}, with other content ({_listed_changes(plan)}); run the "
            "pipeline again (texts already embedded are cached and are not paid for again)"
        )
    try:
        vectors = table.vectors_by_hash(plan)
    except MissingVectorsError as exc:
        raise StoreError(str(exc)) from exc
    return TableWrite(plan, store.publish(version, plan, vectors))


def _current_plan(store: EmbeddingStore, table: VersionTable) -> tuple[VersionInfo | None, ChangePlan]:
    """The version's record and what writing the table changes: the table's own plan while the store and
    generation it was made against are still published (the rows are not read again), else the table
    diffed against them. A plan read back from disk names its store by id only (its `base` rows are not
    kept), which is enough: every publish of a version bumps its generation."""
    planned = table.plan
    if planned is not None and not table.rebuild and (planned.base is not None or planned.base_store_id):
        stored = store.version(table.version.key)
        same_store = planned.base_store_id is None or planned.base_store_id == store.state().store_id
        if (stored.generation if stored else None) == table.base_generation and same_store:
            return stored, planned
    stored, published = store.published(table.version.key)
    stale = (stored.generation if stored else None) != table.base_generation and not table.rebuild
    return stored, table.changes(published, rewrite_carried=not stale)


def _listed_changes(plan: ChangePlan) -> str:
    ids = [i.template_id for i in (*plan.new, *plan.modified, *plan.metadata_updated)] + plan.deleted
    return f"{len(ids)} template(s) differ: {', '.join(sorted(ids)[:5])}{', …' if len(ids) > 5 else ''}"


def verify_published(store: EmbeddingStore, version: ModelVersion, templates: Sequence[Template]) -> StoreReport:
    """A version's published ids, content hashes and vectors compared with the FAQ's templates.

    Reads the ids, hashes and vectors only (no other column), in one transaction.
    """
    try:
        stored, hashes, ids, matrix = store.published_vectors(version.key)
    except StoreError as exc:
        return StoreReport(version.key, len(templates), unreadable=f"{version.key}: {exc}")
    return compare_published(version, templates, stored.dimension if stored else None, hashes, ids, matrix)


def verify_snapshot(
    version: ModelVersion, templates: Sequence[Template], snapshot: StoreSnapshot | None
) -> StoreReport:
    """verify_published from a snapshot already read (None: the version is not published)."""
    if snapshot is None:
        return compare_published(version, templates, None, {}, [], np.empty((0, 0), dtype=np.float32))
    ids = snapshot.columns["template_id"]
    hashes = dict(zip(ids, snapshot.columns["content_hash"], strict=True))
    return compare_published(version, templates, snapshot.version.dimension, hashes, ids, snapshot.matrix)


def unhealthy_published_ids(store: EmbeddingStore, key: str) -> list[str]:
    """Published ids whose vector must be republished; all of them when the vectors cannot be read."""
    try:
        _, _, ids, matrix = store.published_vectors(key)
    except StoreCorruptError:
        return sorted(store.published_hashes(key)[1])
    return unhealthy_vector_ids(ids, matrix)


@contextmanager
def writer_lock(store: EmbeddingStore, key: str, timeout: float, log) -> Iterator[None]:
    """Hold the store's writer lock for one model version, waiting (at most `timeout` s) for another run's."""
    with ExitStack() as held:
        try:
            held.enter_context(store.writer_lock(key, timeout=0))
        except StoreLockedError:
            log.info(
                f"waiting up to {timeout:g} s for another run that is writing model version {key!r} "
                f"to {redact_url(store.location)}"
            )
            held.enter_context(store.writer_lock(key, timeout=timeout))
        yield


class EmbeddingStoreIOManager(dg.ConfigurableIOManager):
    """Owns one slice of the store per model version: writes a VersionTable's changes, reads the table back."""

    url: str = Field(description=STORE_URL_DESCRIPTION)

    def handle_output(self, context: dg.OutputContext, obj: VersionTable) -> None:
        if context.has_asset_partitions and context.asset_partition_key != obj.version.key:
            raise StoreError(
                f"partition {context.asset_partition_key!r} got the table of model version {obj.version.key!r}"
            )
        with closing(open_store(self.url)) as store:
            written = write_version_table(store, obj)
        plan, result = written.plan, written.result
        context.add_output_metadata(
            {
                "model_version": dg.MetadataValue.text(obj.version.key),
                "upserted": dg.MetadataValue.int(len(plan.new) + len(plan.modified) if result.changed else 0),
                "metadata_updated": dg.MetadataValue.int(len(plan.metadata_updated) if result.changed else 0),
                "deleted": dg.MetadataValue.int(len(plan.deleted) if result.changed else 0),
                "rows": dg.MetadataValue.int(result.rows),
                "generation": dg.MetadataValue.int(result.generation),
                "published": dg.MetadataValue.bool(result.changed),
                "current_version": dg.MetadataValue.bool(result.is_current),
                "publish_ms": dg.MetadataValue.float(round(result.seconds * 1000, 2)),
                "store": dg.MetadataValue.text(redact_url(self.url)),
                "backend": dg.MetadataValue.text(store_backend(self.url)),
            }
        )

    def load_input(self, context: dg.InputContext) -> VersionTable:
        if not context.has_asset_partitions:
            raise StoreError("the embedding store is read one model version (partition) at a time")
        key = context.asset_partition_key
        with closing(open_store(self.url, create=False)) as store:
            table = read_version_table(store, key)
        if table is None:
            raise StoreNotFoundError(f"model version {key!r} has not been published to {redact_url(self.url)}")
        return table


_RUN_OUTPUTS: dict[tuple[str, str], object] = {}  # (run id, output path) -> value, for the latest run of this process
_RUN_SOURCES: dict[str, list[intermediates.Source]] = {}  # run id -> its stored list outputs, for the latest run
_RUN_MEMO_KEYS: dict[tuple[str, str], str] = {}  # (run id, pointer) -> the inputs key its output is made from
_RUN_RECALLED: dict[tuple[str, str], tuple[object, str, tuple[str, ...]]] = {}  # -> (value, blob, blobs it names)
_INPUTS_KEYS: dict[int, tuple[object, str]] = {}  # id(value) -> (value, the inputs key it was made from)


class IntermediateIOManager(dg.ConfigurableIOManager):
    """Hands intermediate outputs to the next step in memory; a step in a new process reads them from disk.

    Each output is also kept as a pickle named by the SHA-256 of its bytes under the instance's storage
    directory, plus a small pointer per asset (and partition) naming that blob and the blobs it refers to
    (see lib/intermediates.py: records already stored by an earlier output of the run are named by position,
    not stored again). A run whose outputs equal the previous run's writes nothing, and a blob no pointer
    names any more is deleted. An asset that computes a key of everything its output depends on can
    `recall` its latest output made from the same key instead of computing it again.
    """

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        if context.run is not None:  # a run starts: an earlier run's outputs are no longer kept in memory
            _forget_other_runs(context.run.run_id)

    def _pointer(self, context: dg.OutputContext | dg.InputContext, storage: Path) -> Path:
        return storage / "intermediates" / "pointers" / f"{_output_name(context)}.ref"

    def handle_output(self, context: dg.OutputContext, obj: object) -> None:
        root = Path(context.step_context.instance.storage_directory()) / "intermediates"
        pointer = self._pointer(context, root.parent)
        slot = (context.run_id, str(pointer))
        _forget_other_runs(context.run_id)
        _RUN_OUTPUTS[slot] = obj
        recalled = _RUN_RECALLED.get(slot)
        stored_bytes = _stored_size(root, recalled[1]) if recalled is not None and recalled[0] is obj else None
        if stored_bytes is not None:  # the stored output itself, still there: nothing to write
            digest, refs = recalled[1], recalled[2]
        else:
            data, refs = intermediates.dumps(_persisted(obj), _RUN_SOURCES[context.run_id])
            digest, stored_bytes = hashlib.sha256(data).hexdigest(), len(data)
            blob = _blob(root, digest)
            if not blob.exists():
                _write_atomically(blob, data)
        memo_key = _RUN_MEMO_KEYS.get(slot)
        named = [digest, *refs]
        written = [*named, *([f"{_KEY_PREFIX}{memo_key}"] if memo_key is not None else [])]
        replaced = _pointer_lines(pointer)
        if replaced != written:  # one atomic write: the blobs and the key they were made from go together
            _write_atomically(pointer, "\n".join(written).encode())
            for old in set(_blob_names(replaced)) - set(named):
                _drop_unreferenced(root, old)
        if memo_key is not None:
            _INPUTS_KEYS[id(obj)] = (obj, memo_key)
        if intermediates.is_source(obj):
            _RUN_SOURCES[context.run_id].append(intermediates.Source(digest, refs, obj))
        context.add_output_metadata({"stored_bytes": dg.MetadataValue.int(stored_bytes)})

    def load_input(self, context: dg.InputContext) -> object:
        root = Path(context.instance.storage_directory()) / "intermediates"
        pointer = self._pointer(context, root.parent)
        run_id = context.step_context.run_id
        kept = _RUN_OUTPUTS.get((run_id, str(pointer)), _MISSING)
        if kept is not _MISSING:
            return kept
        try:
            digest, *refs = _named_blobs(pointer) or [""]
            value = intermediates.loads(_blob(root, digest).read_bytes(), lambda d: _blob(root, d).read_bytes())
        except FileNotFoundError as exc:
            raise dg.Failure(
                f"no stored output of {_output_name(context)}: materialize it first"
            ) from exc
        _forget_other_runs(run_id)
        if intermediates.is_source(value):
            _RUN_SOURCES[run_id].append(intermediates.Source(digest, refs, value))
        return value


def recall(context: dg.AssetExecutionContext, inputs_key: str | None) -> object:
    """The asset's (partition's) latest stored output when it was made from inputs of the same key, else
    MISSING; either way the output this step returns is recorded as made from `inputs_key`.

    `inputs_key` must change whenever anything the output depends on changes (None: do not recall).
    A recalled output is not stored again, and records it shares with this run's earlier outputs are
    the same objects.
    """
    root = Path(context.instance.storage_directory()) / "intermediates"
    pointer = root / "pointers" / f"{_asset_output_name(context)}.ref"
    run_id = context.run.run_id
    _forget_other_runs(run_id)
    slot = (run_id, str(pointer))
    if inputs_key is None:
        _RUN_MEMO_KEYS.pop(slot, None)
        return MISSING
    inputs_key = hashlib.sha256(inputs_key.encode("utf-8", "surrogatepass")).hexdigest()
    _RUN_MEMO_KEYS[slot] = inputs_key
    lines = _pointer_lines(pointer)
    if f"{_KEY_PREFIX}{inputs_key}" not in lines:
        return MISSING
    in_run = {source.digest: source.items for source in _RUN_SOURCES[run_id]}
    try:
        digest, *refs = _blob_names(lines)
        value = intermediates.loads(_blob(root, digest).read_bytes(), lambda d: _blob(root, d).read_bytes(), in_run)
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError):
        return MISSING  # a blob lost or unreadable: the step computes its output again
    _RUN_RECALLED[slot] = (value, digest, tuple(refs))
    _INPUTS_KEYS[id(value)] = (value, inputs_key)
    return value


def forget_inputs_key(context: dg.AssetExecutionContext) -> None:
    """Record this step's output as made from no known inputs key (what it read changed while it ran)."""
    recall(context, None)


def inputs_key_of(value: object) -> str | None:
    """The inputs key an output of this run was recalled or recorded with; None when not known."""
    found = _INPUTS_KEYS.get(id(value))
    return found[1] if found is not None and found[0] is value else None


_MISSING = object()
MISSING = _MISSING


def _forget_other_runs(run_id: str) -> None:
    for kept in (_RUN_OUTPUTS, _RUN_MEMO_KEYS, _RUN_RECALLED):
        for key in [k for k in kept if k[0] != run_id]:
            del kept[key]
    if any(r != run_id for r in _RUN_SOURCES):
        _INPUTS_KEYS.clear()
    for other in [r for r in _RUN_SOURCES if r != run_id]:
        del _RUN_SOURCES[other]
    _RUN_SOURCES.setdefault(run_id, [])


_KEY_PREFIX = "inputs-key "


def _pointer_lines(pointer: Path) -> list[str]:
    try:
        return pointer.read_text().splitlines()
    except FileNotFoundError:
        return []


def _blob_names(lines: list[str]) -> list[str]:
    return [line for line in lines if line and not line.startswith(_KEY_PREFIX)]


def _asset_output_name(context: dg.AssetExecutionContext) -> str:
    """What _output_name says of the asset's output, from the step's own context."""
    name = "/".join(context.asset_key.path)
    partitioned = context.assets_def.partitions_def is not None and context.has_partition_key
    return f"{name}/{context.partition_key}" if partitioned else name


def _persisted(obj: object) -> object:
    """What is kept on disk of an output: a change plan without the published rows it was made against.

    A plan read back in another process is applied as it is only while the store (by id) and the
    generation it was made against are published; otherwise writing it diffs the table against the
    published rows again (see write_version_table).
    """
    if isinstance(obj, ChangePlan) and obj.base is not None:
        return replace(obj, base=None)
    return obj


def _stored_size(root: Path, digest: str) -> int | None:
    """The size of a stored blob; None when another run has deleted it since."""
    try:
        return _blob(root, digest).stat().st_size
    except FileNotFoundError:
        return None


def _blob(root: Path, digest: str) -> Path:
    return root / "blobs" / f"{digest}.pickle"


def _named_blobs(pointer: Path) -> list[str]:
    """The blob a pointer names, then the blobs that blob refers to; [] when there is no pointer."""
    return _blob_names(_pointer_lines(pointer))


def _output_name(context: dg.OutputContext | dg.InputContext) -> str:
    """An asset's key (and partition), or an op's step and output name."""
    if context.has_asset_key:
        name = "/".join(context.asset_key.path)
        return f"{name}/{context.asset_partition_key}" if context.has_asset_partitions else name
    output = context if isinstance(context, dg.OutputContext) else context.upstream_output
    return f"ops/{output.step_key}/{output.name}"


def _drop_unreferenced(root: Path, digest: str) -> None:
    """Delete a blob no pointer names any more (the latest output of each asset and partition is kept)."""
    if any(digest in _named_blobs(p) for p in (root / "pointers").rglob("*.ref")):
        return
    _blob(root, digest).unlink(missing_ok=True)


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    partial.write_bytes(data)
    os.replace(partial, path)
