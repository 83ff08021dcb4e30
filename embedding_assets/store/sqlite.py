"""Embedding store in one SQLite file: WAL mode, float32 BLOB vectors, one transaction per publish."""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import sqlite3
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import numpy as np

from embedding_assets.lib.model_versions import ModelVersion
from embedding_assets.lib.plan import EDITABLE_FIELDS, PublishedTemplates
from embedding_assets.store.base import (
    TEMPLATE_FIELDS,
    VERSION_FIELDS,
    ForeignDatabaseError,
    StoreCorruptError,
    StoreError,
    StoreLockedError,
    StoreNotFoundError,
    StoreReadOnlyError,
    busy_timeout_from_env,
    column_definitions,
    new_store_id,
    settings_json,
)
from embedding_assets.store.publishing import PublishingStore, polled_lock

SCHEMA_VERSION = 3
"""2 added views (template_views) and each version's ranking, 3 the kept earlier generations (kept_*);
an older store is upgraded by its first writer."""
_PARAMS_PER_QUERY = 900
_TEMPLATE_COLUMNS = ", ".join(TEMPLATE_FIELDS)
# Statements built from the declared column names only; values always go in as parameters.
_VERSION_COLUMNS = ", ".join(VERSION_FIELDS)
# A schema-1 store read before its upgrade has no ranking column: every version has the empty ranking.
_SCHEMA_1_VERSION_COLUMNS = _VERSION_COLUMNS.replace("ranking", "'{}' AS ranking")
_SELECT_VERSIONS = (
    f"SELECT {_VERSION_COLUMNS} FROM model_versions ORDER BY key",
    f"SELECT {_VERSION_COLUMNS} FROM model_versions WHERE key = ?",
)
_SELECT_SCHEMA_1_VERSIONS = (
    f"SELECT {_SCHEMA_1_VERSION_COLUMNS} FROM model_versions ORDER BY key",
    f"SELECT {_SCHEMA_1_VERSION_COLUMNS} FROM model_versions WHERE key = ?",
)
_SELECT_TEMPLATES = f"SELECT {_TEMPLATE_COLUMNS} FROM templates WHERE model_version = ?"
_SELECT_HASHES = "SELECT template_id, content_hash FROM templates WHERE model_version = ?"
_SELECT_ID_VECTORS = "SELECT template_id, vector FROM templates WHERE model_version = ? ORDER BY template_id"
_SELECT_SNAPSHOT = f"SELECT {_TEMPLATE_COLUMNS}, vector FROM templates WHERE model_version = ? ORDER BY template_id"
_UPSERT_TEMPLATE = (
    f"INSERT INTO templates (model_version, {_TEMPLATE_COLUMNS}, vector) "
    f"VALUES ({', '.join('?' * (len(TEMPLATE_FIELDS) + 2))}) ON CONFLICT(model_version, template_id) DO UPDATE SET "
    + ", ".join(f"{name} = excluded.{name}" for name in (*TEMPLATE_FIELDS[1:], "vector"))
)
_UPDATE_FIELDS = (
    f"UPDATE templates SET {', '.join(f'{name} = ?' for name in EDITABLE_FIELDS)} "
    "WHERE model_version = ? AND template_id = ?"
)

_VIEWS_TABLE = """
CREATE TABLE IF NOT EXISTS template_views (
    model_version TEXT NOT NULL,
    template_id TEXT NOT NULL,
    view TEXT NOT NULL,
    vector BLOB NOT NULL,
    PRIMARY KEY (model_version, template_id, view),
    FOREIGN KEY (model_version, template_id) REFERENCES templates(model_version, template_id) ON DELETE CASCADE
) WITHOUT ROWID;
"""
_UPGRADE_FROM_1 = (
    "ALTER TABLE model_versions ADD COLUMN ranking TEXT NOT NULL DEFAULT '{}'",
    _VIEWS_TABLE,
)

# What each publish replaced, so that a rollback can put it back: the version's row as it was, the ids the
# publish touched, and the rows (with vectors and views) those ids had; ids it added have no kept row.
_KEPT_TABLES = f"""
CREATE TABLE IF NOT EXISTS kept_versions (
    model_version TEXT NOT NULL,
    provider TEXT NOT NULL,
    model TEXT NOT NULL,
    dimension INTEGER NOT NULL,
    text_template TEXT NOT NULL,
    settings TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    rows INTEGER NOT NULL,
    generation INTEGER NOT NULL,
    created_at TEXT NOT NULL,
    published_at TEXT NOT NULL,
    ranking TEXT NOT NULL,
    PRIMARY KEY (model_version, generation)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS kept_changes (
    model_version TEXT NOT NULL,
    generation INTEGER NOT NULL,
    template_id TEXT NOT NULL,
    PRIMARY KEY (model_version, generation, template_id),
    FOREIGN KEY (model_version, generation) REFERENCES kept_versions(model_version, generation) ON DELETE CASCADE
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS kept_templates (
    model_version TEXT NOT NULL,
    generation INTEGER NOT NULL,
    {column_definitions({"text": "TEXT", "int": "INTEGER"})},
    vector BLOB NOT NULL,
    PRIMARY KEY (model_version, generation, template_id),
    FOREIGN KEY (model_version, generation, template_id)
        REFERENCES kept_changes(model_version, generation, template_id) ON DELETE CASCADE
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS kept_template_views (
    model_version TEXT NOT NULL,
    generation INTEGER NOT NULL,
    template_id TEXT NOT NULL,
    view TEXT NOT NULL,
    vector BLOB NOT NULL,
    PRIMARY KEY (model_version, generation, template_id, view),
    FOREIGN KEY (model_version, generation, template_id)
        REFERENCES kept_templates(model_version, generation, template_id) ON DELETE CASCADE
) WITHOUT ROWID;
"""
_UPGRADE_FROM_2 = tuple(statement for statement in _KEPT_TABLES.split(";") if statement.strip())
_KEEP_VERSION = f"INSERT INTO kept_versions SELECT {_VERSION_COLUMNS} FROM model_versions WHERE key = ?"
_KEEP_TOUCHED = (
    f"INSERT INTO kept_templates SELECT t.model_version, c.generation, "
    f"{', '.join(f't.{name}' for name in TEMPLATE_FIELDS)}, t.vector FROM kept_changes AS c "
    "JOIN templates AS t ON t.model_version = c.model_version AND t.template_id = c.template_id "
    "WHERE c.model_version = ? AND c.generation = ?",
    "INSERT INTO kept_template_views SELECT w.model_version, c.generation, w.template_id, w.view, w.vector "
    "FROM kept_changes AS c JOIN template_views AS w ON w.model_version = c.model_version "
    "AND w.template_id = c.template_id WHERE c.model_version = ? AND c.generation = ?",
)
_DELETE_TOUCHED = (
    "DELETE FROM templates WHERE model_version = ? AND template_id IN "
    "(SELECT template_id FROM kept_changes WHERE model_version = ? AND generation = ?)"
)
_RESTORE_VERSION = (
    "UPDATE model_versions SET "
    + ", ".join(f"{name} = k.{name}" for name in VERSION_FIELDS[1:] if name not in ("generation", "created_at",
                                                                                    "published_at"))
    + ", generation = ?, published_at = ? FROM kept_versions AS k "
    "WHERE model_versions.key = ? AND k.model_version = model_versions.key AND k.generation = ?"
)
_RESTORE_TEMPLATES = (
    f"INSERT INTO templates (model_version, {_TEMPLATE_COLUMNS}, vector) "
    f"SELECT model_version, {_TEMPLATE_COLUMNS}, vector FROM kept_templates WHERE model_version = ? AND generation = ?"
)
_RESTORE_VIEWS = (
    "INSERT INTO template_views (model_version, template_id, view, vector) "
    "SELECT model_version, template_id, view, vector FROM kept_template_views WHERE model_version = ? AND generation = ?"
)
_SELECT_KEPT = (
    "SELECT model_version, generation FROM kept_versions ORDER BY model_version, generation DESC",
    "SELECT model_version, generation FROM kept_versions WHERE model_version = ? ORDER BY generation DESC",
)
_SELECT_KEPT_VERSION = (
    f"SELECT {', '.join(('model_version', *VERSION_FIELDS[1:]))} FROM kept_versions "
    "WHERE model_version = ? AND generation = ?"
)

_SCHEMA = f"""
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
    published_at TEXT NOT NULL,
    ranking TEXT NOT NULL DEFAULT '{{}}'
);
CREATE TABLE IF NOT EXISTS templates (
    model_version TEXT NOT NULL REFERENCES model_versions(key) ON DELETE CASCADE,
    {column_definitions({"text": "TEXT", "int": "INTEGER"})},
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
{_VIEWS_TABLE}
{_KEPT_TABLES}
"""

_LOCKED = (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
_DAMAGED = (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)


def _blob(vector: np.ndarray) -> bytes:
    return np.asarray(vector, dtype="<f4").tobytes()


def _chunks(items: Sequence[str], size: int = _PARAMS_PER_QUERY) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _error_code(exc: sqlite3.Error) -> int | None:
    code = getattr(exc, "sqlite_errorcode", None)
    return None if code is None else code & 0xFF


def proven_damaged(path: Path) -> bool:
    """True only when SQLite itself says the file is damaged or not a database (a lock proves nothing)."""
    wal = Path(f"{path}-wal")
    # Without a WAL to read, immutable=1 checks the file without creating -wal/-shm companions beside it.
    options = "mode=ro" if wal.exists() and wal.stat().st_size else "mode=ro&immutable=1"
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?{options}", uri=True, timeout=1)
    except sqlite3.Error as exc:
        return _error_code(exc) in _DAMAGED
    try:
        return [row[0] for row in conn.execute("PRAGMA quick_check(1)")] != ["ok"]
    except sqlite3.Error as exc:
        return _error_code(exc) in _DAMAGED
    finally:
        conn.close()


def _unwritable_reason(path: Path) -> str | None:
    """Why the store's file or directory cannot be written, or None when both can."""
    directory = path.parent
    try:
        if os.statvfs(directory).f_flag & os.ST_RDONLY:
            return f"{directory} is on a read-only file system"
    except OSError:
        pass
    if not os.access(directory, os.W_OK):
        return f"the directory {directory} is not writable"
    if path.exists() and not os.access(path, os.W_OK):
        return f"the file {path} is not writable"
    return None


class SqliteSession:
    """The SQLite dialect of the store's primitives, inside one transaction."""

    def __init__(self, conn: sqlite3.Connection, location: str, schema_version: int = SCHEMA_VERSION):
        self.conn = conn
        self.location = location
        self.schema_version = schema_version

    def meta(self, key: str) -> str | None:
        row = self.conn.execute("SELECT value FROM store_meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def write_meta(self, key: str, value: str) -> None:
        self.conn.execute(
            "INSERT INTO store_meta VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value", (key, value)
        )

    def delete_meta(self, key: str) -> None:
        self.conn.execute("DELETE FROM store_meta WHERE key = ?", (key,))

    def version_rows(self, key: str | None = None) -> list[tuple]:
        every, one = _SELECT_VERSIONS if self.schema_version >= 2 else _SELECT_SCHEMA_1_VERSIONS
        if key is None:
            return self.conn.execute(every).fetchall()
        return self.conn.execute(one, (key,)).fetchall()

    def upsert_version(self, version: ModelVersion, generation: int, published_at: str) -> None:
        self.conn.execute(
            "INSERT INTO model_versions VALUES (?, ?, ?, ?, ?, ?, ?, 0, ?, ?, ?, ?) "
            "ON CONFLICT(key) DO UPDATE SET provider = excluded.provider, model = excluded.model, "
            "dimension = excluded.dimension, text_template = excluded.text_template, "
            "settings = excluded.settings, fingerprint = excluded.fingerprint, "
            "generation = excluded.generation, published_at = excluded.published_at, ranking = excluded.ranking",
            (version.key, version.provider, version.model, version.dimension, version.text_template,
             settings_json(version.settings), version.fingerprint(), generation, published_at, published_at,
             settings_json(version.ranking())),
        )

    def set_row_count(self, key: str, rows: int) -> None:
        self.conn.execute("UPDATE model_versions SET rows = ? WHERE key = ?", (rows, key))

    def templates(self, key: str) -> PublishedTemplates:
        return PublishedTemplates({r[0]: r for r in self.conn.execute(_SELECT_TEMPLATES, (key,))})

    def template_hashes(self, key: str) -> dict[str, str]:
        return dict(self.conn.execute(_SELECT_HASHES, (key,)))

    def id_vectors(self, key: str, dimension: int) -> tuple[list[str], np.ndarray]:
        size = dimension * 4
        data = bytearray(self.count(key) * size)  # filled row by row: the vectors are held once
        filled = memoryview(data)
        ids = []
        for n, (template_id, blob) in enumerate(self.conn.execute(_SELECT_ID_VECTORS, (key,))):
            if len(blob) != size:
                raise StoreCorruptError(f"{self.location}: vectors of {key!r} do not all have dimension {dimension}")
            filled[n * size : (n + 1) * size] = blob
            ids.append(template_id)
        return ids, np.frombuffer(data, dtype="<f4").reshape(len(ids), dimension)

    def upsert_rows(self, key: str, rows: list[tuple], vectors: list[np.ndarray]) -> None:
        self.conn.executemany(
            _UPSERT_TEMPLATE,
            [(key, *row, _blob(vector)) for row, vector in zip(rows, vectors, strict=True)],
        )

    def update_fields(self, key: str, rows: list[tuple]) -> None:
        self.conn.executemany(_UPDATE_FIELDS, [(*row[1:], key, row[0]) for row in rows])

    def upsert_views(self, key: str, rows: list[tuple[str, str, np.ndarray]]) -> None:
        self.conn.executemany(
            "INSERT OR REPLACE INTO template_views VALUES (?, ?, ?, ?)",
            [(key, tid, view, _blob(vector)) for tid, view, vector in rows],
        )

    def view_data(self, key: str, dimension: int, names: Sequence[str], rows: int) -> dict[str, np.ndarray]:
        if self.schema_version < 2:
            raise StoreCorruptError(f"{self.location}: store schema 1 holds no views for {key!r}")
        matrices = {}
        for name in names:
            found = self.conn.execute(
                "SELECT vector FROM template_views WHERE model_version = ? AND view = ? ORDER BY template_id",
                (key, name),
            ).fetchall()
            blob = b"".join(row[0] for row in found)
            if len(found) != rows or len(blob) != rows * dimension * 4:
                raise StoreCorruptError(
                    f"{self.location}: view {name!r} of {key!r} has {len(found)} vectors for {rows} templates"
                )
            matrices[name] = np.frombuffer(blob, dtype="<f4").reshape(rows, dimension)
        return matrices

    def delete_ids(self, key: str, ids: Sequence[str]) -> None:
        self.conn.executemany(
            "DELETE FROM templates WHERE model_version = ? AND template_id = ?", [(key, tid) for tid in ids]
        )

    def delete_rows(self, key: str) -> int:
        return self.conn.execute("DELETE FROM templates WHERE model_version = ?", (key,)).rowcount

    def delete_version(self, key: str) -> None:
        self.conn.execute("DELETE FROM kept_versions WHERE model_version = ?", (key,))
        self.conn.execute("DELETE FROM embedding_cache WHERE model_version = ?", (key,))
        self.conn.execute("DELETE FROM model_versions WHERE key = ?", (key,))

    def count(self, key: str) -> int:
        return self.conn.execute("SELECT COUNT(*) FROM templates WHERE model_version = ?", (key,)).fetchone()[0]

    def cached(self, key: str, fingerprint: str, hashes: Sequence[str]) -> dict[str, np.ndarray]:
        found = {}
        for chunk in _chunks(hashes):
            marks = ",".join("?" * len(chunk))
            rows = self.conn.execute(
                "SELECT content_hash, vector FROM embedding_cache WHERE model_version = ? AND fingerprint = ? "
                f"AND content_hash IN ({marks})",
                (key, fingerprint, *chunk),
            )
            found.update((h, np.frombuffer(blob, dtype="<f4")) for h, blob in rows)
        return found

    def put_cached(self, key: str, fingerprint: str, vectors: Mapping[str, np.ndarray], created_at: str) -> None:
        self.conn.executemany(
            "INSERT OR REPLACE INTO embedding_cache VALUES (?, ?, ?, ?, ?)",
            [(key, fingerprint, h, _blob(v), created_at) for h, v in vectors.items()],
        )

    def snapshot_data(self, key: str, dimension: int) -> tuple[dict[str, Sequence], np.ndarray]:
        rows = self.conn.execute(_SELECT_SNAPSHOT, (key,)).fetchall()
        values = list(zip(*rows)) if rows else [()] * (len(TEMPLATE_FIELDS) + 1)
        blob = b"".join(values[-1])
        if len(blob) != len(rows) * dimension * 4:
            raise StoreCorruptError(f"{self.location}: vectors of {key!r} do not all have dimension {dimension}")
        matrix = np.frombuffer(blob, dtype="<f4").reshape(len(rows), dimension)
        return dict(zip(TEMPLATE_FIELDS, values[:-1])), matrix

    def before_rows(self, key: str, dimension: int) -> None:
        pass

    def after_rows(self, key: str, dimension: int) -> None:
        pass

    def kept_generations(self, key: str | None = None) -> dict[str, list[int]]:
        if self.schema_version < 3:
            return {}
        every, one = _SELECT_KEPT
        kept: dict[str, list[int]] = {}
        for version, generation in self.conn.execute(every) if key is None else self.conn.execute(one, (key,)):
            kept.setdefault(version, []).append(generation)
        return kept

    def keep_generation(self, key: str, generation: int, touched: Sequence[str]) -> None:
        self.conn.execute(_KEEP_VERSION, (key,))
        self.conn.executemany("INSERT INTO kept_changes VALUES (?, ?, ?)", [(key, generation, t) for t in touched])
        for statement in _KEEP_TOUCHED:
            self.conn.execute(statement, (key, generation))

    def kept_version_row(self, key: str, generation: int) -> tuple:
        return self.conn.execute(_SELECT_KEPT_VERSION, (key, generation)).fetchone()

    def restore_generation(self, key: str, generation: int, new_generation: int, published_at: str) -> None:
        self.conn.execute(_DELETE_TOUCHED, (key, key, generation))
        self.conn.execute(_RESTORE_VERSION, (new_generation, published_at, key, generation))
        self.conn.execute(_RESTORE_TEMPLATES, (key, generation))
        self.conn.execute(_RESTORE_VIEWS, (key, generation))

    def forget_generations(self, key: str, generations: Sequence[int]) -> None:
        self.conn.executemany(
            "DELETE FROM kept_versions WHERE model_version = ? AND generation = ?", [(key, g) for g in generations]
        )


class SqliteStore(PublishingStore):
    """An embedding store in one SQLite file.

    Readers (create=False) open it read-only; where its location cannot be written at all they still
    read it (`read_only_reason` says why) and every write is refused with StoreReadOnlyError.
    """

    def __init__(self, path: str | Path, *, create: bool = True, busy_timeout: float | None = None):
        self.path = Path(path)
        self.location = str(self.path)
        self.busy_timeout = busy_timeout_from_env() if busy_timeout is None else float(busy_timeout)
        self.read_only = not create
        self.read_only_reason: str | None = None
        self._conn: sqlite3.Connection | None = None
        self._schema_version = SCHEMA_VERSION
        try:
            self._open(create)
        except BaseException:
            self.close()
            raise

    def _open(self, create: bool) -> None:
        path = self.path
        if path.is_dir():
            raise StoreError(f"{path} is a directory, not an embedding store file")
        if not path.exists():
            if not create:
                raise StoreNotFoundError(f"no embedding store at {path}{_relative_note(path)}")
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
            except OSError as exc:
                raise StoreError(f"cannot create the embedding store {path}: {exc.strerror}") from None
        try:
            os.close(os.open(path, os.O_RDONLY))
        except OSError as exc:
            raise StoreError(f"cannot open the embedding store {path}: {exc.strerror}") from None
        self.read_only_reason = _unwritable_reason(path)
        if create and self.read_only_reason:
            raise StoreReadOnlyError(
                f"{path} cannot be written: {self.read_only_reason}; readers can still open it read-only"
            )
        try:
            self._conn = self._connect(create)
            self._conn.execute("PRAGMA foreign_keys = ON")
            self._ensure_schema(create)
        except sqlite3.Error as exc:
            raise self._error(exc, opening=True) from exc

    def _connect(self, create: bool) -> sqlite3.Connection:
        options = dict(isolation_level=None, timeout=self.busy_timeout, check_same_thread=False)
        if create:
            return sqlite3.connect(self.path, **options)
        uri = f"{self.path.resolve().as_uri()}?mode=ro"
        wal = Path(f"{self.path}-wal")
        if self.read_only_reason and not (wal.exists() and wal.stat().st_size):
            # Nothing is waiting in a WAL and nobody can write here: SQLite may skip locking and the -shm file.
            uri += "&immutable=1"
        return sqlite3.connect(uri, uri=True, **options)

    def _error(self, exc: sqlite3.Error, *, opening: bool = False) -> StoreError:
        """The store error an SQLite error means, naming the file and the cause."""
        path, code = self.path, _error_code(exc)
        if code in _LOCKED:
            return StoreLockedError(
                f"{path} is locked by another process (waited {self.busy_timeout:g} s; {exc}); "
                "try again when it is done (nothing was changed)"
            )
        if code == sqlite3.SQLITE_FULL:
            return StoreError(f"{path}: the disk is full ({exc}); nothing was written, free space and run again")
        if code == sqlite3.SQLITE_READONLY:
            return StoreReadOnlyError(f"{path} cannot be written ({exc})")
        if code in (sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_PERM, sqlite3.SQLITE_IOERR, sqlite3.SQLITE_AUTH):
            return StoreError(f"{path}: cannot open or read the store file ({exc})")
        if opening:
            return StoreCorruptError(f"{path} is not a readable embedding store ({exc})")
        return StoreCorruptError(f"{path}: cannot read the store ({exc})")

    def _ensure_schema(self, create: bool) -> None:
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
            with self._write() as session:
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        session.conn.execute(statement)
                session.write_meta("schema_version", str(SCHEMA_VERSION))
                session.write_meta("generation", "0")
                session.write_meta("store_id", new_store_id())
            return
        with self._read() as session:
            version = int(session.meta("schema_version") or 0)
            has_id = session.meta("store_id") is not None
        if version not in (1, 2, SCHEMA_VERSION):
            raise StoreError(f"{self.path} has store schema {version}; this software reads schema {SCHEMA_VERSION}")
        self._schema_version = version
        if create and version < SCHEMA_VERSION:
            with self._write() as session:
                found = int(session.meta("schema_version"))
                for statement in (*(_UPGRADE_FROM_1 if found < 2 else ()), *(_UPGRADE_FROM_2 if found < 3 else ())):
                    session.conn.execute(statement)
                session.write_meta("schema_version", str(SCHEMA_VERSION))
            self._schema_version = SCHEMA_VERSION
        if create and not has_id:
            with self._write() as session:
                if session.meta("store_id") is None:
                    session.write_meta("store_id", new_store_id())

    @contextmanager
    def _transaction(self, begin: str) -> Iterator[SqliteSession]:
        conn = self._conn
        try:
            conn.execute(begin)
            try:
                yield SqliteSession(conn, self.location, self._schema_version)
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise self._error(exc) from exc

    def _read(self) -> AbstractContextManager[SqliteSession]:
        return self._transaction("BEGIN")

    def _write(self, *, serialize: bool = True) -> AbstractContextManager[SqliteSession]:
        if self.read_only:
            why = f": {self.read_only_reason}" if self.read_only_reason else " (opened by a reader)"
            raise StoreReadOnlyError(f"{self.path} is open read-only{why}; it cannot be written")
        return self._transaction("BEGIN IMMEDIATE")

    def change_marker(self) -> str:
        """Size and modification time of the database file and of its write-ahead log: any write to the
        store, through this code or not, changes them; reading does not (an empty log is created by the
        first reader, so only its size counts)."""
        marks = []
        for path in (self.path, self.path.with_name(f"{self.path.name}-wal")):
            try:
                found = path.stat()
            except FileNotFoundError:
                marks.append("0")
            else:
                marks.append(f"{found.st_size}:{found.st_mtime_ns}" if found.st_size else "0")
        return "/".join(marks)

    def check_integrity(self) -> None:
        """Raise StoreCorruptError when SQLite's quick_check finds damaged pages (a lock is StoreLockedError)."""
        with self._read() as session:
            problems = [row[0] for row in session.conn.execute("PRAGMA quick_check(5)")]
        if problems != ["ok"]:
            raise StoreCorruptError(f"{self.path} is damaged: {'; '.join(problems)}")

    def lock_path(self, model_version_key: str) -> Path:
        """The file beside the store whose flock is one model version's writer lock."""
        safe = model_version_key if re.fullmatch(r"[A-Za-z0-9._-]{1,64}", model_version_key) else (
            hashlib.sha256(model_version_key.encode()).hexdigest()[:16]
        )
        return self.path.with_name(f"{self.path.name}.{safe}.lock")

    @contextmanager
    def writer_lock(self, model_version_key: str, timeout: float) -> Iterator[None]:
        """Be the only writer of one model version across processes (released when the process dies)."""
        lock_path = self.lock_path(model_version_key)
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise StoreError(f"cannot create the writer lock {lock_path}: {exc.strerror}") from None

        def try_acquire() -> bool:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            return True

        def busy(waited: float) -> str:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            return (
                f"{self.path}: model version {model_version_key!r} is being written by another run"
                f"{f' (pid {holder})' if holder else ''}; waited {waited:.1f} s for its lock {lock_path}"
            )

        def release() -> None:
            fcntl.flock(fd, fcntl.LOCK_UN)

        try:
            with polled_lock(try_acquire, release, timeout, busy):
                yield
        finally:
            os.close(fd)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> SqliteStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _relative_note(path: Path) -> str:
    return "" if path.is_absolute() else f" (relative to {Path.cwd()})"
