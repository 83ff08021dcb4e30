"""Embedding store in one SQLite file: WAL mode, float32 BLOB vectors, one transaction per publish."""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from embedding_assets.lib.model_versions import ModelVersion
from embedding_assets.lib.plan import ChangePlan, StoredTemplate
from embedding_assets.store.base import (
    ForeignDatabaseError,
    ModelVersionMismatchError,
    PublishResult,
    StalePlanError,
    StoreCorruptError,
    StoreError,
    StoreNotFoundError,
    TEMPLATE_FIELDS,
    StoreSnapshot,
    StoreState,
    VersionInfo,
    check_publish_vectors,
    current_prune_message,
    mismatch_message,
    new_store_id,
    settings_json,
    unpublished_message,
)

SCHEMA_VERSION = 1
_PARAMS_PER_QUERY = 900

_SCHEMA = """
CREATE TABLE IF NOT EXISTS store_meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS model_versions (
    key TEXT PRIMARY KEY,
    provider TEXT NOT NULL,
    model TEXT NOT NULL,
    dimension INTEGER NOT NULL,
    text_template TEXT NOT NULL,
    settings TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    rows INTEGER NOT NULL,
    generation INTEGER NOT NULL,
    created_at TEXT NOT NULL,
    published_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS templates (
    model_version TEXT NOT NULL REFERENCES model_versions(key) ON DELETE CASCADE,
    template_id TEXT NOT NULL,
    content_hash TEXT NOT NULL,
    category TEXT NOT NULL,
    subcategory TEXT NOT NULL,
    question TEXT NOT NULL,
    answer TEXT NOT NULL,
    priority TEXT NOT NULL,
    audience TEXT NOT NULL,
    source_row INTEGER NOT NULL,
    vector BLOB NOT NULL,
    PRIMARY KEY (model_version, template_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS embedding_cache (
    model_version TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    content_hash TEXT NOT NULL,
    vector BLOB NOT NULL,
    created_at TEXT NOT NULL,
    PRIMARY KEY (model_version, fingerprint, content_hash)
) WITHOUT ROWID;
"""

_TEMPLATE_COLUMNS = (
    "template_id, content_hash, category, subcategory, question, answer, priority, audience, source_row"
)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _blob(vector: np.ndarray) -> bytes:
    return np.asarray(vector, dtype="<f4").tobytes()


def _chunks(items: Sequence[str], size: int = _PARAMS_PER_QUERY) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class SqliteVectorCache:
    """Content-addressed vectors of one model version's exact settings."""

    def __init__(self, store: SqliteStore, version: ModelVersion):
        self._store = store
        self._key = version.key
        self._fingerprint = version.fingerprint()
        self._dimension = version.dimension

    def get(self, content_hashes: Sequence[str]) -> dict[str, np.ndarray]:
        found: dict[str, np.ndarray] = {}
        with self._store._reading() as conn:
            for chunk in _chunks(list(content_hashes)):
                marks = ",".join("?" * len(chunk))
                rows = conn.execute(
                    f"SELECT content_hash, vector FROM embedding_cache WHERE model_version = ? "
                    f"AND fingerprint = ? AND content_hash IN ({marks})",
                    (self._key, self._fingerprint, *chunk),
                )
                for content_hash, blob in rows:
                    vector = np.frombuffer(blob, dtype="<f4")
                    if vector.shape == (self._dimension,):
                        found[content_hash] = vector
        return found

    def put(self, vectors: Mapping[str, np.ndarray]) -> None:
        created = _now()
        with self._store._writing() as conn:
            conn.executemany(
                "INSERT OR REPLACE INTO embedding_cache VALUES (?, ?, ?, ?, ?)",
                [(self._key, self._fingerprint, h, _blob(v), created) for h, v in vectors.items()],
            )


class SqliteStore:
    """An embedding store in one SQLite file."""

    def __init__(self, path: str | Path, *, create: bool = True):
        self.path = Path(path)
        self.location = str(self.path)
        if not self.path.exists():
            if not create:
                raise StoreNotFoundError(f"no embedding store at {self.path}")
            self.path.parent.mkdir(parents=True, exist_ok=True)
            os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
        try:
            target = self.path if create else self.path.resolve().as_uri() + "?mode=ro"
            self._conn = sqlite3.connect(
                target, uri=not create, isolation_level=None, timeout=30, check_same_thread=False
            )
            self._conn.execute("PRAGMA foreign_keys = ON")
            self._ensure_schema(create)
        except sqlite3.DatabaseError as exc:
            self._conn.close()
            raise StoreCorruptError(f"{self.path} is not a readable embedding store ({exc})") from exc
        except StoreError:
            self._conn.close()
            raise

    def _ensure_schema(self, create: bool) -> None:
        if not create:
            self._check_schema_version()
            return
        tables = {r[0] for r in self._conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "store_meta" not in tables:
            if not create:
                raise StoreCorruptError(f"{self.path} is not an embedding store (no store_meta table)")
            if tables:
                raise ForeignDatabaseError(
                    f"{self.path} is an SQLite file with other tables ({', '.join(sorted(tables))}), "
                    "not an embedding store"
                )
            if self._conn.execute("PRAGMA journal_mode = WAL").fetchone()[0] != "wal":
                raise StoreError(f"{self.path}: could not switch to WAL mode")
            with self._writing() as conn:
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute("INSERT OR IGNORE INTO store_meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
                conn.execute("INSERT OR IGNORE INTO store_meta VALUES ('generation', '0')")
                conn.execute("INSERT OR IGNORE INTO store_meta VALUES ('store_id', ?)", (new_store_id(),))
            return
        self._check_schema_version()
        if self._meta("store_id") is None:
            with self._writing() as conn:
                conn.execute("INSERT OR IGNORE INTO store_meta VALUES ('store_id', ?)", (new_store_id(),))

    def _check_schema_version(self) -> None:
        try:
            version = int(self._meta("schema_version") or 0)
        except sqlite3.OperationalError as exc:
            raise StoreCorruptError(f"{self.path} is not an embedding store ({exc})") from exc
        if version != SCHEMA_VERSION:
            raise StoreError(f"{self.path} has store schema {version}; this software reads schema {SCHEMA_VERSION}")

    @contextmanager
    def _writing(self) -> Iterator[sqlite3.Connection]:
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    @contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        conn = self._conn
        try:
            conn.execute("BEGIN")
            try:
                yield conn
            finally:
                conn.execute("COMMIT")
        except sqlite3.OperationalError as exc:
            if "locked" in str(exc):
                raise StoreError(f"{self.path}: the store is locked by another process ({exc})") from exc
            raise StoreCorruptError(f"{self.path}: cannot read the store ({exc})") from exc
        except sqlite3.DatabaseError as exc:
            raise StoreCorruptError(f"{self.path}: cannot read the store ({exc})") from exc

    def check_integrity(self) -> None:
        """Raise StoreCorruptError when SQLite's quick_check finds damaged pages."""
        with self._reading() as conn:
            problems = [row[0] for row in conn.execute("PRAGMA quick_check(5)")]
        if problems != ["ok"]:
            raise StoreCorruptError(f"{self.path} is damaged: {'; '.join(problems)}")

    def _meta(self, key: str) -> str | None:
        row = self._conn.execute("SELECT value FROM store_meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def generation(self) -> int:
        return int(self._meta("generation") or 0)

    def state(self) -> StoreState:
        """The store's id and generation, read together."""
        with self._reading() as conn:
            values = dict(conn.execute("SELECT key, value FROM store_meta WHERE key IN ('store_id', 'generation')"))
        return StoreState(values.get("store_id", ""), int(values.get("generation", 0)))

    def current_version(self) -> str | None:
        return self._meta("current_version")

    def _version_rows(self, where: str = "", params: tuple = ()) -> list[VersionInfo]:
        current = self.current_version()
        rows = self._conn.execute(
            "SELECT key, provider, model, dimension, text_template, settings, fingerprint, rows, generation, "
            f"created_at, published_at FROM model_versions {where} ORDER BY key",
            params,
        ).fetchall()
        return [
            VersionInfo(
                key=r[0], provider=r[1], model=r[2], dimension=r[3], text_template=r[4],
                settings=json.loads(r[5]), fingerprint=r[6], rows=r[7], generation=r[8],
                created_at=r[9], published_at=r[10], is_current=r[0] == current,
            )
            for r in rows
        ]

    def versions(self) -> list[VersionInfo]:
        with self._reading():
            return self._version_rows()

    def version(self, key: str) -> VersionInfo | None:
        with self._reading():
            found = self._version_rows("WHERE key = ?", (key,))
        return found[0] if found else None

    def published(self, key: str) -> tuple[VersionInfo | None, dict[str, StoredTemplate]]:
        """A version's record and its published templates, read in one transaction."""
        with self._reading() as conn:
            found = self._version_rows("WHERE key = ?", (key,))
            rows = conn.execute(
                f"SELECT {_TEMPLATE_COLUMNS} FROM templates WHERE model_version = ?", (key,)
            ).fetchall()
        return (found[0] if found else None), {r[0]: StoredTemplate(*r) for r in rows}

    def cache(self, version: ModelVersion) -> SqliteVectorCache:
        return SqliteVectorCache(self, version)

    def publish(
        self, version: ModelVersion, plan: ChangePlan, vectors: Mapping[str, np.ndarray]
    ) -> PublishResult:
        """Apply a change plan in one transaction and bump the store generation."""
        started = time.perf_counter()
        check_publish_vectors(version, plan, vectors)
        with self._writing() as conn:
            stored = self._version_rows("WHERE key = ?", (version.key,))
            stored_info = stored[0] if stored else None
            stored_generation = stored_info.generation if stored_info else None
            if stored_generation != plan.base_generation:
                raise StalePlanError(
                    f"model version {version.key!r} was published (generation {stored_generation}) after this "
                    f"change plan was made (generation {plan.base_generation}); run the pipeline again"
                )
            if stored_info and stored_info.fingerprint != version.fingerprint() and not plan.rebuild:
                raise ModelVersionMismatchError(mismatch_message(version, stored_info))
            if stored_info and not plan.has_changes:
                return PublishResult(
                    version.key, stored_info.generation, stored_info.rows, False, stored_info.is_current,
                    time.perf_counter() - started,
                )
            generation = int(self._meta("generation") or 0) + 1
            now = _now()
            conn.execute(
                "INSERT INTO model_versions VALUES (?, ?, ?, ?, ?, ?, ?, 0, ?, ?, ?) "
                "ON CONFLICT(key) DO UPDATE SET provider = excluded.provider, model = excluded.model, "
                "dimension = excluded.dimension, text_template = excluded.text_template, "
                "settings = excluded.settings, fingerprint = excluded.fingerprint, "
                "generation = excluded.generation, published_at = excluded.published_at",
                (version.key, version.provider, version.model, version.dimension, version.text_template,
                 settings_json(version.settings), version.fingerprint(), generation, now, now),
            )
            if plan.rebuild:
                conn.execute("DELETE FROM templates WHERE model_version = ?", (version.key,))
            conn.executemany(
                f"INSERT INTO templates (model_version, {_TEMPLATE_COLUMNS}, vector) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(model_version, template_id) DO UPDATE SET "
                "content_hash = excluded.content_hash, category = excluded.category, "
                "subcategory = excluded.subcategory, question = excluded.question, answer = excluded.answer, "
                "priority = excluded.priority, audience = excluded.audience, source_row = excluded.source_row, "
                "vector = excluded.vector",
                [
                    (version.key, i.template_id, i.content_hash, *_fields(i), _blob(vectors[i.content_hash]))
                    for i in (*plan.new, *plan.modified)
                ],
            )
            conn.executemany(
                "UPDATE templates SET category = ?, subcategory = ?, question = ?, answer = ?, priority = ?, "
                "audience = ?, source_row = ? WHERE model_version = ? AND template_id = ?",
                [(*_fields(i), version.key, i.template_id) for i in plan.metadata_updated],
            )
            conn.executemany(
                "DELETE FROM templates WHERE model_version = ? AND template_id = ?",
                [(version.key, tid) for tid in plan.deleted],
            )
            rows = conn.execute("SELECT COUNT(*) FROM templates WHERE model_version = ?", (version.key,)).fetchone()[0]
            if rows != plan.target_rows:
                raise StalePlanError(
                    f"model version {version.key!r}: publish would leave {rows} rows, the plan expects "
                    f"{plan.target_rows}; nothing was written"
                )
            conn.execute("UPDATE model_versions SET rows = ? WHERE key = ?", (rows, version.key))
            conn.execute("UPDATE store_meta SET value = ? WHERE key = 'generation'", (str(generation),))
            current = self._meta("current_version")
            if current is None:
                conn.execute("INSERT INTO store_meta VALUES ('current_version', ?)", (version.key,))
                current = version.key
        return PublishResult(version.key, generation, rows, True, current == version.key, time.perf_counter() - started)

    def promote(self, key: str) -> VersionInfo:
        """Make a published version the one readers use, in one transaction."""
        with self._writing() as conn:
            found = self._version_rows("WHERE key = ?", (key,))
            if not found:
                raise StoreError(f"{self.path}: {unpublished_message(key, [v.key for v in self._version_rows()])}")
            if self._meta("current_version") != key:
                generation = int(self._meta("generation") or 0) + 1
                conn.execute(
                    "INSERT INTO store_meta VALUES ('current_version', ?) "
                    "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                    (key,),
                )
                conn.execute("UPDATE store_meta SET value = ? WHERE key = 'generation'", (str(generation),))
            return self._version_rows("WHERE key = ?", (key,))[0]

    def prune(self, key: str) -> int:
        """Delete a non-current version, its templates and its cached vectors; the number of rows removed."""
        with self._writing() as conn:
            found = self._version_rows("WHERE key = ?", (key,))
            if not found:
                raise StoreError(f"{self.path}: {unpublished_message(key, [v.key for v in self._version_rows()])}")
            if self._meta("current_version") == key:
                raise StoreError(current_prune_message(key))
            rows = conn.execute("DELETE FROM templates WHERE model_version = ?", (key,)).rowcount
            conn.execute("DELETE FROM embedding_cache WHERE model_version = ?", (key,))
            conn.execute("DELETE FROM model_versions WHERE key = ?", (key,))
            generation = int(self._meta("generation") or 0) + 1
            conn.execute("UPDATE store_meta SET value = ? WHERE key = 'generation'", (str(generation),))
        return rows

    def snapshot(self, key: str | None = None) -> StoreSnapshot:
        """The published rows and vectors of one version (default: the current one)."""
        try:
            with self._reading() as conn:
                store_generation = int(self._meta("generation") or 0)
                store_id = self._meta("store_id") or ""
                key = key or self._meta("current_version")
                if key is None:
                    raise StoreError(f"{self.path}: no model version has been published yet")
                found = self._version_rows("WHERE key = ?", (key,))
                if not found:
                    raise StoreError(f"{self.path}: model version {key!r} has not been published")
                rows = conn.execute(
                    f"SELECT {_TEMPLATE_COLUMNS}, vector FROM templates WHERE model_version = ? ORDER BY template_id",
                    (key,),
                ).fetchall()
        except sqlite3.DatabaseError as exc:
            raise StoreCorruptError(f"{self.path}: cannot read the store ({exc})") from exc
        info = found[0]
        values = list(zip(*rows)) if rows else [()] * (len(TEMPLATE_FIELDS) + 1)
        blob = b"".join(values[-1])
        if len(blob) != len(rows) * info.dimension * 4:
            raise StoreCorruptError(f"{self.path}: vectors of {key!r} do not all have dimension {info.dimension}")
        matrix = np.frombuffer(blob, dtype="<f4").reshape(len(rows), info.dimension)
        columns = dict(zip(TEMPLATE_FIELDS, values[:-1]))
        return StoreSnapshot(
            version=info, store_generation=store_generation, columns=columns, matrix=matrix, store_id=store_id
        )

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> SqliteStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _fields(item) -> tuple:
    t = item.template
    return (t.category, t.subcategory, t.question, t.answer, t.priority, t.audience, t.source_row)
