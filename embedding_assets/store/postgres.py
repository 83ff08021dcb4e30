"""Embedding store in PostgreSQL with pgvector: one schema, one transaction per publish, HNSW per version.

Every model version's vectors share one `vector` column (dimensions may differ between versions).
Each version gets its own partial HNSW index over `embedding::vector(<dimension>)` restricted to
`model_version = '<key>' AND vector_dims(embedding) = <dimension>`; the in-database search uses
the same expression and predicate. (The dimension in the predicate keeps a rebuild at a new
dimension from casting the old rows it deleted in the same transaction.)
"""

from __future__ import annotations

import hashlib
import io
import os
import struct
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import numpy as np
import psycopg2
import psycopg2.errors
import psycopg2.extensions
from pgvector import Vector
from pgvector.psycopg2 import register_vector
from psycopg2 import sql
from psycopg2.extras import execute_values

from embedding_assets.lib.model_versions import ModelVersion
from embedding_assets.lib.plan import EDITABLE_FIELDS, PublishedTemplates, StoredTemplate
from embedding_assets.store.base import (
    INTEGER_FIELDS,
    TEMPLATE_FIELDS,
    VERSION_FIELDS,
    StoreCorruptError,
    StoreError,
    StoreLockedError,
    StoreNotFoundError,
    StoreReadOnlyError,
    column_definitions,
    new_store_id,
    settings_json,
)
from embedding_assets.store.urls import DEFAULT_SCHEMA, connection_settings, redact_url
from embedding_assets.store.publishing import PublishingStore, polled_lock

SCHEMA_VERSION = 3
"""2 added views (template_views) and each version's ranking, 3 the kept earlier generations (kept_*);
an older store is upgraded by its first writer."""
PAGE_SIZE = 500
COPY_ROWS = 10_000
MAX_EF_SEARCH = 1000
# hnsw.ef_search of every database search (at least 2k for top-k): the candidate list the HNSW
# graph walk keeps. At 100k rows pgvector's default of 40 found 0.86-0.89 of the exact top 10
# (bench/bench_pgvector.py); 150 is the smallest setting measured that finds >= 0.965, plain or
# within a category, at 384 and 1024 dimensions; the walk's cost grows with it.
DEFAULT_EF_SEARCH = 150
EF_SEARCH_VAR = "EMBEDDING_ASSETS_PG_EF_SEARCH"
_SCHEMA_LOCK = "embedding_assets.schema"
_WRITER_LOCK = "embedding_assets.writer"
_COPY_SIGNATURE = b"PGCOPY\n\xff\r\n\x00"

_DDL = """
CREATE SCHEMA IF NOT EXISTS {schema};
CREATE TABLE IF NOT EXISTS {schema}.store_meta (
    key text PRIMARY KEY,
    value text NOT NULL
);
CREATE TABLE IF NOT EXISTS {schema}.model_versions (
    key text PRIMARY KEY,
    provider text NOT NULL,
    model text NOT NULL,
    dimension integer NOT NULL CHECK (dimension > 0),
    text_template text NOT NULL,
    settings jsonb NOT NULL,
    fingerprint text NOT NULL,
    rows integer NOT NULL,
    generation bigint NOT NULL,
    created_at text NOT NULL,
    published_at text NOT NULL,
    ranking jsonb NOT NULL DEFAULT '{{}}'
);
CREATE TABLE IF NOT EXISTS {schema}.templates (
    model_version text NOT NULL REFERENCES {schema}.model_versions(key) ON DELETE CASCADE,
    {template_columns},
    embedding vector NOT NULL,
    PRIMARY KEY (model_version, template_id)
);
CREATE TABLE IF NOT EXISTS {schema}.embedding_cache (
    model_version text NOT NULL,
    fingerprint text NOT NULL,
    content_hash text NOT NULL,
    embedding vector NOT NULL,
    created_at text NOT NULL,
    PRIMARY KEY (model_version, fingerprint, content_hash)
);
{views_table}
{kept_tables}
INSERT INTO {schema}.store_meta VALUES ('schema_version', {schema_version}), ('generation', '0'),
    ('store_id', {store_id}) ON CONFLICT (key) DO NOTHING;
"""

_VIEWS_TABLE = """
CREATE TABLE IF NOT EXISTS {schema}.template_views (
    model_version text NOT NULL,
    template_id text NOT NULL,
    view text NOT NULL,
    embedding vector NOT NULL,
    PRIMARY KEY (model_version, template_id, view),
    FOREIGN KEY (model_version, template_id) REFERENCES {schema}.templates(model_version, template_id)
        ON DELETE CASCADE
);
"""
_UPGRADE_FROM_1 = (
    "ALTER TABLE {schema}.model_versions ADD COLUMN IF NOT EXISTS ranking jsonb NOT NULL DEFAULT '{{}}';"
    + _VIEWS_TABLE
)
# What each publish replaced, so that a rollback can put it back: the version's row as it was, the ids the
# publish touched, and the rows (with vectors and views) those ids had; ids it added have no kept row.
_KEPT_TABLES = """
CREATE TABLE IF NOT EXISTS {schema}.kept_versions (
    model_version text NOT NULL,
    provider text NOT NULL,
    model text NOT NULL,
    dimension integer NOT NULL,
    text_template text NOT NULL,
    settings jsonb NOT NULL,
    fingerprint text NOT NULL,
    rows integer NOT NULL,
    generation bigint NOT NULL,
    created_at text NOT NULL,
    published_at text NOT NULL,
    ranking jsonb NOT NULL,
    PRIMARY KEY (model_version, generation)
);
CREATE TABLE IF NOT EXISTS {schema}.kept_changes (
    model_version text NOT NULL,
    generation bigint NOT NULL,
    template_id text NOT NULL,
    PRIMARY KEY (model_version, generation, template_id),
    FOREIGN KEY (model_version, generation) REFERENCES {schema}.kept_versions(model_version, generation)
        ON DELETE CASCADE
);
CREATE TABLE IF NOT EXISTS {schema}.kept_templates (
    model_version text NOT NULL,
    generation bigint NOT NULL,
    {template_columns},
    embedding vector NOT NULL,
    PRIMARY KEY (model_version, generation, template_id),
    FOREIGN KEY (model_version, generation, template_id)
        REFERENCES {schema}.kept_changes(model_version, generation, template_id) ON DELETE CASCADE
);
CREATE TABLE IF NOT EXISTS {schema}.kept_template_views (
    model_version text NOT NULL,
    generation bigint NOT NULL,
    template_id text NOT NULL,
    view text NOT NULL,
    embedding vector NOT NULL,
    PRIMARY KEY (model_version, generation, template_id, view),
    FOREIGN KEY (model_version, generation, template_id)
        REFERENCES {schema}.kept_templates(model_version, generation, template_id) ON DELETE CASCADE
);
"""
_SET_SCHEMA_VERSION = "UPDATE {schema}.store_meta SET value = {schema_version} WHERE key = 'schema_version';"
_TEMPLATE_COLUMN_TYPES = sql.SQL(column_definitions({"text": "text", "int": "integer"}))
_VERSION_COLUMNS = sql.SQL(", ").join(map(sql.Identifier, VERSION_FIELDS))
_KEPT_VERSION_COLUMNS = sql.SQL(", ").join(map(sql.Identifier, ("model_version", *VERSION_FIELDS[1:])))
_RESTORED_VERSION_FIELDS = sql.SQL(", ").join(
    sql.SQL("{0} = k.{0}").format(sql.Identifier(name))
    for name in VERSION_FIELDS[1:]
    if name not in ("generation", "created_at", "published_at")
)
_VIEW_KINDS = ("text", "text", "text", "vector")

_COLUMNS = sql.SQL(", ").join(map(sql.Identifier, TEMPLATE_FIELDS))
_TEMPLATE_KINDS = ("text", *("int" if f in INTEGER_FIELDS else "text" for f in TEMPLATE_FIELDS), "vector")
_CACHE_KINDS = ("text", "text", "text", "vector", "text")
_INT4 = struct.Struct(">i")




def configured_ef_search() -> int:
    """hnsw.ef_search from EMBEDDING_ASSETS_PG_EF_SEARCH (1 to MAX_EF_SEARCH), else DEFAULT_EF_SEARCH."""
    raw = os.environ.get(EF_SEARCH_VAR, "").strip()
    if not raw:
        return DEFAULT_EF_SEARCH
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_EF_SEARCH:
        raise StoreError(f"{EF_SEARCH_VAR}={raw!r}: expected a whole number from 1 to {MAX_EF_SEARCH}")
    return int(raw)


def hnsw_index_name(key: str, dimension: int) -> str:
    """The partial HNSW index of one model version at one dimension (always under 63 bytes)."""
    return f"{_hnsw_prefix(key)}{dimension}"


def _hnsw_prefix(key: str) -> str:
    return f"templates_hnsw_{hashlib.sha256(key.encode()).hexdigest()[:16]}_"


def _copy_binary(rows: Iterable[tuple], kinds: Sequence[str]) -> io.BytesIO:
    """Rows in PostgreSQL's binary COPY format; kinds are "text", "int" (int4) or "vector" (pgvector)."""
    out = io.BytesIO()
    out.write(_COPY_SIGNATURE + bytes(8))
    field_count = struct.pack(">h", len(kinds))
    for row in rows:
        out.write(field_count)
        for kind, value in zip(kinds, row, strict=True):
            if kind == "text":
                data = value.encode("utf-8")
            elif kind == "int":
                data = _INT4.pack(value)
            else:
                data = Vector(np.asarray(value, dtype=np.float32)).to_binary()
            out.write(_INT4.pack(len(data)))
            out.write(data)
    out.write(b"\xff\xff")
    out.seek(0)
    return out


def _parse_vectors(data: bytes, rows: int, dimension: int, where: str) -> np.ndarray:
    """The vectors of a binary COPY of one `vector` column, as a float32 matrix."""
    row = np.dtype([("fields", ">i2"), ("length", ">i4"), ("dim", ">u2"), ("unused", ">u2"), ("values", ">f4", (dimension,))])
    header = len(_COPY_SIGNATURE) + 8
    if not data.startswith(_COPY_SIGNATURE) or len(data) != header + rows * row.itemsize + 2:
        raise StoreCorruptError(f"{where}: vectors do not all have dimension {dimension}")
    parsed = np.frombuffer(data, dtype=row, count=rows, offset=header)
    if rows and ((parsed["fields"] != 1).any() or (parsed["dim"] != dimension).any()):
        raise StoreCorruptError(f"{where}: vectors do not all have dimension {dimension}")
    return parsed["values"].astype("<f4")


class PostgresSession:
    """The PostgreSQL dialect of the store's primitives, inside one transaction."""

    def __init__(self, store: PostgresStore, cur: psycopg2.extensions.cursor):
        self._store = store
        self.cur = cur
        self.schema_version = store._schema_version

    def _run(self, text: str, params: Sequence | None = None, **parts: sql.Composable) -> None:
        self.cur.execute(self._store._sql(text, **parts), params)

    def meta(self, key: str) -> str | None:
        self._run("SELECT value FROM {schema}.store_meta WHERE key = %s", (key,))
        row = self.cur.fetchone()
        return row[0] if row else None

    def lock_generation(self) -> None:
        """Lock the generation row: publishers queue behind each other, readers never wait."""
        self._run("SELECT value FROM {schema}.store_meta WHERE key = 'generation' FOR UPDATE")

    def write_meta(self, key: str, value: str) -> None:
        self._run(
            "INSERT INTO {schema}.store_meta VALUES (%s, %s) ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
            (key, value),
        )

    def delete_meta(self, key: str) -> None:
        self._run("DELETE FROM {schema}.store_meta WHERE key = %s", (key,))

    def version_rows(self, key: str | None = None) -> list[tuple]:
        columns = sql.SQL(", ").join(
            sql.SQL("'{}'::jsonb AS ranking") if name == "ranking" and self.schema_version < 2 else sql.Identifier(name)
            for name in VERSION_FIELDS
        )
        if key is None:
            self._run("SELECT {fields} FROM {schema}.model_versions ORDER BY key", fields=columns)
        else:
            self._run("SELECT {fields} FROM {schema}.model_versions WHERE key = %s", (key,), fields=columns)
        return self.cur.fetchall()

    def upsert_version(self, version: ModelVersion, generation: int, published_at: str) -> None:
        self._run(
            "INSERT INTO {schema}.model_versions VALUES (%s, %s, %s, %s, %s, %s::jsonb, %s, 0, %s, %s, %s, %s::jsonb) "
            "ON CONFLICT (key) DO UPDATE SET provider = EXCLUDED.provider, model = EXCLUDED.model, "
            "dimension = EXCLUDED.dimension, text_template = EXCLUDED.text_template, "
            "settings = EXCLUDED.settings, fingerprint = EXCLUDED.fingerprint, "
            "generation = EXCLUDED.generation, published_at = EXCLUDED.published_at, ranking = EXCLUDED.ranking",
            (version.key, version.provider, version.model, version.dimension, version.text_template,
             settings_json(version.settings), version.fingerprint(), generation, published_at, published_at,
             settings_json(version.ranking())),
        )

    def set_row_count(self, key: str, rows: int) -> None:
        self._run("UPDATE {schema}.model_versions SET rows = %s WHERE key = %s", (rows, key))

    def templates(self, key: str) -> PublishedTemplates:
        self._run("SELECT {columns} FROM {schema}.templates WHERE model_version = %s", (key,))
        return PublishedTemplates({r[0]: r for r in self.cur.fetchall()})

    def template_hashes(self, key: str) -> dict[str, str]:
        self._run("SELECT template_id, content_hash FROM {schema}.templates WHERE model_version = %s", (key,))
        return dict(self.cur.fetchall())

    def id_vectors(self, key: str, dimension: int) -> tuple[list[str], np.ndarray]:
        self._run("SELECT template_id FROM {schema}.templates WHERE model_version = %s ORDER BY template_id", (key,))
        ids = [row[0] for row in self.cur.fetchall()]
        return ids, self._copied_vectors(key, len(ids), dimension)

    def _copied_vectors(self, key: str, rows: int, dimension: int) -> np.ndarray:
        copied = io.BytesIO()
        self.cur.copy_expert(
            self._store._sql(
                "COPY (SELECT embedding FROM {schema}.templates WHERE model_version = {key} "
                "ORDER BY template_id) TO STDOUT WITH (FORMAT binary)",
                key=sql.Literal(key),
            ).as_string(self.cur.connection),
            copied,
        )
        return _parse_vectors(copied.getvalue(), rows, dimension, f"{self._store.location}: {key!r}")

    def upsert_rows(self, key: str, rows: list[tuple], vectors: list[np.ndarray]) -> None:
        updates = ", ".join(f"{name} = EXCLUDED.{name}" for name in (*TEMPLATE_FIELDS[1:], "embedding"))
        self._store._upsert(
            self.cur,
            "templates",
            [(key, *row, vector) for row, vector in zip(rows, vectors, strict=True)],
            _TEMPLATE_KINDS,
            f"(model_version, template_id) DO UPDATE SET {updates}",
        )

    def update_fields(self, key: str, rows: list[tuple]) -> None:
        if not rows:
            return
        execute_values(
            self.cur,
            self._store._sql(
                "UPDATE {schema}.templates AS t SET {assignments} FROM (VALUES %s) AS v(template_id, {fields}) "
                "WHERE t.model_version = {key} AND t.template_id = v.template_id",
                assignments=sql.SQL(", ").join(
                    sql.SQL("{0} = v.{0}").format(sql.Identifier(name)) for name in EDITABLE_FIELDS
                ),
                fields=sql.SQL(", ").join(map(sql.Identifier, EDITABLE_FIELDS)),
                key=sql.Literal(key),
            ),
            rows,
            page_size=PAGE_SIZE,
        )

    def upsert_views(self, key: str, rows: list[tuple[str, str, np.ndarray]]) -> None:
        self._store._upsert(
            self.cur,
            "template_views",
            [(key, tid, view, vector) for tid, view, vector in rows],
            _VIEW_KINDS,
            "(model_version, template_id, view) DO UPDATE SET embedding = EXCLUDED.embedding",
        )

    def view_data(self, key: str, dimension: int, names: Sequence[str], rows: int) -> dict[str, np.ndarray]:
        if self.schema_version < 2:
            raise StoreCorruptError(f"{self._store.location}: store schema 1 holds no views for {key!r}")
        matrices = {}
        for name in names:
            copied = io.BytesIO()
            self.cur.copy_expert(
                self._store._sql(
                    "COPY (SELECT embedding FROM {schema}.template_views WHERE model_version = {key} "
                    "AND view = {view} ORDER BY template_id) TO STDOUT WITH (FORMAT binary)",
                    key=sql.Literal(key),
                    view=sql.Literal(name),
                ).as_string(self.cur.connection),
                copied,
            )
            where = f"{self._store.location}: view {name!r} of {key!r}"
            matrices[name] = _parse_vectors(copied.getvalue(), rows, dimension, where)
        return matrices

    def delete_ids(self, key: str, ids: Sequence[str]) -> None:
        if ids:
            self._run(
                "DELETE FROM {schema}.templates WHERE model_version = %s AND template_id = ANY(%s)", (key, list(ids))
            )

    def delete_rows(self, key: str) -> int:
        self._run("DELETE FROM {schema}.templates WHERE model_version = %s", (key,))
        return self.cur.rowcount

    def delete_version(self, key: str) -> None:
        self._run("DELETE FROM {schema}.kept_versions WHERE model_version = %s", (key,))
        self._run("DELETE FROM {schema}.embedding_cache WHERE model_version = %s", (key,))
        self._run("DELETE FROM {schema}.model_versions WHERE key = %s", (key,))
        self._store._drop_other_indexes(self.cur, key, 0)

    def count(self, key: str) -> int:
        self._run("SELECT count(*) FROM {schema}.templates WHERE model_version = %s", (key,))
        return self.cur.fetchone()[0]

    def cached(self, key: str, fingerprint: str, hashes: Sequence[str]) -> dict[str, np.ndarray]:
        self._run(
            "SELECT content_hash, embedding FROM {schema}.embedding_cache "
            "WHERE model_version = %s AND fingerprint = %s AND content_hash = ANY(%s)",
            (key, fingerprint, list(hashes)),
        )
        return {h: vector.to_numpy() for h, vector in self.cur.fetchall()}

    def put_cached(self, key: str, fingerprint: str, vectors: Mapping[str, np.ndarray], created_at: str) -> None:
        self._store._upsert(
            self.cur,
            "embedding_cache",
            [(key, fingerprint, h, v, created_at) for h, v in vectors.items()],
            _CACHE_KINDS,
            "(model_version, fingerprint, content_hash) DO UPDATE SET embedding = EXCLUDED.embedding, "
            "created_at = EXCLUDED.created_at",
        )

    def snapshot_data(self, key: str, dimension: int) -> tuple[dict[str, Sequence], np.ndarray]:
        self._run("SELECT {columns} FROM {schema}.templates WHERE model_version = %s ORDER BY template_id", (key,))
        rows = self.cur.fetchall()
        matrix = self._copied_vectors(key, len(rows), dimension)
        values = list(zip(*rows)) if rows else [()] * len(TEMPLATE_FIELDS)
        return dict(zip(TEMPLATE_FIELDS, values)), matrix

    def before_rows(self, key: str, dimension: int) -> None:
        self._store._drop_other_indexes(self.cur, key, dimension)

    def after_rows(self, key: str, dimension: int) -> None:
        self._store._create_index(self.cur, key, dimension)

    def kept_generations(self, key: str | None = None) -> dict[str, list[int]]:
        if self.schema_version < 3:
            return {}
        if key is None:
            self._run("SELECT model_version, generation FROM {schema}.kept_versions "
                      "ORDER BY model_version, generation DESC")
        else:
            self._run("SELECT model_version, generation FROM {schema}.kept_versions WHERE model_version = %s "
                      "ORDER BY generation DESC", (key,))
        kept: dict[str, list[int]] = {}
        for version, generation in self.cur.fetchall():
            kept.setdefault(version, []).append(int(generation))
        return kept

    def keep_generation(self, key: str, generation: int, touched: Sequence[str]) -> None:
        self._run(
            "INSERT INTO {schema}.kept_versions SELECT {fields} FROM {schema}.model_versions WHERE key = %s",
            (key,),
            fields=_VERSION_COLUMNS,
        )
        self._run(
            "INSERT INTO {schema}.kept_changes SELECT %s, %s, unnest(%s::text[])", (key, generation, list(touched))
        )
        self._run(
            "INSERT INTO {schema}.kept_templates SELECT t.model_version, c.generation, {template_columns}, "
            "t.embedding FROM {schema}.kept_changes AS c JOIN {schema}.templates AS t "
            "ON t.model_version = c.model_version AND t.template_id = c.template_id "
            "WHERE c.model_version = %s AND c.generation = %s",
            (key, generation),
            template_columns=sql.SQL(", ").join(sql.Identifier("t", name) for name in TEMPLATE_FIELDS),
        )
        self._run(
            "INSERT INTO {schema}.kept_template_views SELECT w.model_version, c.generation, w.template_id, w.view, "
            "w.embedding FROM {schema}.kept_changes AS c JOIN {schema}.template_views AS w "
            "ON w.model_version = c.model_version AND w.template_id = c.template_id "
            "WHERE c.model_version = %s AND c.generation = %s",
            (key, generation),
        )

    def kept_version_row(self, key: str, generation: int) -> tuple:
        self._run(
            "SELECT {fields} FROM {schema}.kept_versions WHERE model_version = %s AND generation = %s",
            (key, generation),
            fields=_KEPT_VERSION_COLUMNS,
        )
        return self.cur.fetchone()

    def restore_generation(self, key: str, generation: int, new_generation: int, published_at: str) -> None:
        self._run(
            "DELETE FROM {schema}.templates WHERE model_version = %s AND template_id IN "
            "(SELECT template_id FROM {schema}.kept_changes WHERE model_version = %s AND generation = %s)",
            (key, key, generation),
        )
        self._run(
            "UPDATE {schema}.model_versions AS m SET {fields}, generation = %s, published_at = %s "
            "FROM {schema}.kept_versions AS k WHERE m.key = %s AND k.model_version = m.key AND k.generation = %s",
            (new_generation, published_at, key, generation),
            fields=_RESTORED_VERSION_FIELDS,
        )
        self._run(
            "INSERT INTO {schema}.templates (model_version, {columns}, embedding) "
            "SELECT model_version, {columns}, embedding FROM {schema}.kept_templates "
            "WHERE model_version = %s AND generation = %s",
            (key, generation),
        )
        self._run(
            "INSERT INTO {schema}.template_views (model_version, template_id, view, embedding) "
            "SELECT model_version, template_id, view, embedding FROM {schema}.kept_template_views "
            "WHERE model_version = %s AND generation = %s",
            (key, generation),
        )

    def forget_generations(self, key: str, generations: Sequence[int]) -> None:
        if generations:
            self._run(
                "DELETE FROM {schema}.kept_versions WHERE model_version = %s AND generation = ANY(%s)",
                (key, list(generations)),
            )


class PostgresStore(PublishingStore):
    """An embedding store in a PostgreSQL database with the pgvector extension."""

    def __init__(self, url: str, *, create: bool = True):
        self.location = redact_url(url)
        self.read_only = False
        self.read_only_reason: str | None = None
        self._schema_version = SCHEMA_VERSION
        self._dsn, self.schema = connection_settings(str(url))
        self._password = psycopg2.extensions.parse_dsn(self._dsn).get("password") if self._dsn else None
        self._conn = self._connect()
        try:
            self._ensure_schema(create)
            register_vector(self._conn)
            self._conn.commit()
            self._extension_version = self._scalar("SELECT extversion FROM pg_extension WHERE extname = 'vector'")
        except BaseException:
            self._conn.close()
            raise

    def _connect(self) -> psycopg2.extensions.connection:
        try:
            return psycopg2.connect(
                self._dsn, connect_timeout=10, application_name="embedding_assets", client_encoding="UTF8"
            )
        except psycopg2.Error as exc:
            raise StoreError(f"cannot connect to {self.location}: {self._clean(exc)}") from None

    def __repr__(self) -> str:
        return f"PostgresStore({self.location!r}, schema={self.schema!r})"

    def _clean(self, exc: BaseException) -> str:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return message.replace(self._password, "***") if self._password else message

    def _sql(self, text: str, **parts: sql.Composable) -> sql.Composed:
        return sql.SQL(text).format(schema=sql.Identifier(self.schema), columns=_COLUMNS, **parts)

    def _error(self, exc: psycopg2.Error) -> StoreError:
        if isinstance(exc, psycopg2.errors.LockNotAvailable):
            return StoreLockedError(f"{self.location} is locked by another session ({self._clean(exc)})")
        if isinstance(exc, psycopg2.errors.ReadOnlySqlTransaction):
            return StoreReadOnlyError(f"{self.location} cannot be written ({self._clean(exc)})")
        if isinstance(exc, psycopg2.errors.DiskFull):
            return StoreError(f"{self.location}: the server's disk is full ({self._clean(exc)}); nothing was written")
        return StoreError(f"{self.location}: {self._clean(exc)}")

    @contextmanager
    def _transaction(self, *, snapshot: bool = False) -> Iterator[psycopg2.extensions.cursor]:
        """One transaction: READ COMMITTED for writes, REPEATABLE READ READ ONLY for a consistent read."""
        conn = self._conn
        conn.set_session(
            isolation_level="REPEATABLE READ" if snapshot else "READ COMMITTED", readonly=snapshot
        )
        try:
            with conn.cursor() as cur:
                yield cur
        except psycopg2.Error as exc:
            self._rollback()
            raise self._error(exc) from None
        except BaseException:
            self._rollback()
            raise
        try:
            conn.commit()
        except psycopg2.Error as exc:
            raise self._error(exc) from None

    def _rollback(self) -> None:
        if not self._conn.closed:
            try:
                self._conn.rollback()
            except psycopg2.Error:
                pass

    @contextmanager
    def _read(self) -> Iterator[PostgresSession]:
        with self._transaction(snapshot=True) as cur:
            yield PostgresSession(self, cur)

    @contextmanager
    def _write(self, *, serialize: bool = True) -> Iterator[PostgresSession]:
        with self._transaction() as cur:
            session = PostgresSession(self, cur)
            if serialize:
                session.lock_generation()
            yield session

    def _scalar(self, query: str | sql.Composable, params: tuple = ()) -> object:
        with self._transaction() as cur:
            cur.execute(query, params)
            row = cur.fetchone()
        return row[0] if row else None

    def _ensure_schema(self, create: bool) -> None:
        with self._transaction() as cur:
            if not self._has_store_tables(cur):
                if not create:
                    raise StoreNotFoundError(f"no embedding store at {self.location} (schema {self.schema!r})")
                cur.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (_SCHEMA_LOCK,))
                if not self._has_store_tables(cur):
                    self._create_extension(cur)
                    cur.execute(
                        sql.SQL(_DDL).format(
                            schema=sql.Identifier(self.schema),
                            schema_version=sql.Literal(str(SCHEMA_VERSION)),
                            store_id=sql.Literal(new_store_id()),
                            template_columns=_TEMPLATE_COLUMN_TYPES,
                            views_table=sql.SQL(_VIEWS_TABLE).format(schema=sql.Identifier(self.schema)),
                            kept_tables=sql.SQL(_KEPT_TABLES).format(
                                schema=sql.Identifier(self.schema), template_columns=_TEMPLATE_COLUMN_TYPES
                            ),
                        )
                    )
            cur.execute(self._sql("SELECT value FROM {schema}.store_meta WHERE key = 'schema_version'"))
            row = cur.fetchone()
            if create and PostgresSession(self, cur).meta("store_id") is None:
                cur.execute(
                    self._sql("INSERT INTO {schema}.store_meta VALUES ('store_id', %s) ON CONFLICT (key) DO NOTHING"),
                    (new_store_id(),),
                )
        version = int(row[0]) if row else 0
        if version not in (1, 2, SCHEMA_VERSION):
            raise StoreError(
                f"{self.location} has store schema {version}; this software reads schema {SCHEMA_VERSION}"
            )
        self._schema_version = version
        if create and version < SCHEMA_VERSION:
            schema = sql.Identifier(self.schema)
            with self._transaction() as cur:
                cur.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (_SCHEMA_LOCK,))
                if version < 2:
                    cur.execute(sql.SQL(_UPGRADE_FROM_1).format(schema=schema))
                cur.execute(sql.SQL(_KEPT_TABLES).format(schema=schema, template_columns=_TEMPLATE_COLUMN_TYPES))
                cur.execute(
                    sql.SQL(_SET_SCHEMA_VERSION).format(schema=schema, schema_version=sql.Literal(str(SCHEMA_VERSION)))
                )
            self._schema_version = SCHEMA_VERSION



    def _has_store_tables(self, cur) -> bool:
        cur.execute(
            "SELECT count(*) FROM pg_catalog.pg_tables WHERE schemaname = %s AND tablename = ANY(%s)",
            (self.schema, ["store_meta", "model_versions", "templates", "embedding_cache"]),
        )
        found = cur.fetchone()[0]
        if found not in (0, 4):
            raise StoreCorruptError(
                f"{self.location}: schema {self.schema!r} holds only {found} of the 4 embedding store tables"
            )
        return found == 4

    def _create_extension(self, cur) -> None:
        cur.execute("SELECT 1 FROM pg_extension WHERE extname = 'vector'")
        if cur.fetchone():
            return
        cur.execute("SAVEPOINT create_extension")
        try:
            cur.execute("CREATE EXTENSION IF NOT EXISTS vector")
        except psycopg2.Error as exc:
            raise StoreError(
                f"{self.location}: the pgvector extension is not available ({self._clean(exc)}). "
                "Install pgvector on the server (or use the pgvector/pgvector image), or have an administrator "
                "run CREATE EXTENSION vector in this database"
            ) from None

    @contextmanager
    def writer_lock(self, model_version_key: str, timeout: float) -> Iterator[None]:
        """Be the only writer of one model version: a session advisory lock on its own connection.

        The server releases it when that connection ends, also when the process dies.
        """
        conn = self._connect()
        conn.autocommit = True
        keys = (f"{_WRITER_LOCK}:{self.schema}", model_version_key)
        cur = conn.cursor()

        def try_acquire() -> bool:
            cur.execute("SELECT pg_try_advisory_lock(hashtext(%s), hashtext(%s))", keys)
            return bool(cur.fetchone()[0])

        def busy(waited: float) -> str:
            return (
                f"{self.location}: model version {model_version_key!r} is being written by another run; "
                f"waited {waited:.1f} s for its writer lock"
            )

        def release() -> None:
            cur.execute("SELECT pg_advisory_unlock(hashtext(%s), hashtext(%s))", keys)

        try:
            with polled_lock(try_acquire, release, timeout, busy):
                yield
        except psycopg2.Error as exc:
            raise self._error(exc) from None
        finally:
            conn.close()

    def change_marker(self) -> str | None:
        """None: a PostgreSQL store has no cheap mark of every write (each publish bumps its generation)."""
        return None

    def check_integrity(self) -> None:
        """The server guards page integrity; this checks that the store's tables are all there."""
        with self._transaction(snapshot=True) as cur:
            if not self._has_store_tables(cur):
                raise StoreCorruptError(f"{self.location}: the embedding store tables are missing")

    def _upsert(self, cur, table: str, rows: list[tuple], kinds: Sequence[str], on_conflict: str) -> None:
        """Binary COPY into a transaction-local staging table, then one INSERT … ON CONFLICT into `table`."""
        if not rows:
            return
        staging = sql.Identifier(f"incoming_{table}")
        cur.execute(
            sql.SQL("CREATE TEMP TABLE IF NOT EXISTS {staging} (LIKE {schema}.{table}) ON COMMIT DROP").format(
                staging=staging, schema=sql.Identifier(self.schema), table=sql.Identifier(table)
            )
        )
        cur.execute(sql.SQL("TRUNCATE {}").format(staging))
        copy = sql.SQL("COPY {} FROM STDIN WITH (FORMAT binary)").format(staging).as_string(self._conn)
        for start in range(0, len(rows), COPY_ROWS):
            cur.copy_expert(copy, _copy_binary(rows[start : start + COPY_ROWS], kinds))
        cur.execute(
            sql.SQL("INSERT INTO {schema}.{table} SELECT * FROM {staging} ON CONFLICT " + on_conflict).format(
                schema=sql.Identifier(self.schema), table=sql.Identifier(table), staging=staging
            )
        )

    def _drop_other_indexes(self, cur, key: str, dimension: int) -> None:
        """Drop this version's HNSW index built for another dimension (it could not index the new vectors)."""
        cur.execute(
            "SELECT indexname FROM pg_catalog.pg_indexes WHERE schemaname = %s AND tablename = 'templates' "
            "AND starts_with(indexname, %s) AND indexname <> %s",
            (self.schema, _hnsw_prefix(key), hnsw_index_name(key, dimension)),
        )
        for (name,) in cur.fetchall():
            cur.execute(sql.SQL("DROP INDEX {}").format(sql.Identifier(self.schema, name)))

    def _create_index(self, cur, key: str, dimension: int) -> None:
        cur.execute(
            sql.SQL(
                "CREATE INDEX IF NOT EXISTS {name} ON {schema}.templates "
                "USING hnsw ((embedding::vector({dimension})) vector_cosine_ops) "
                "WHERE model_version = {key} AND vector_dims(embedding) = {dimension}"
            ).format(
                name=sql.Identifier(hnsw_index_name(key, dimension)),
                schema=sql.Identifier(self.schema),
                dimension=sql.Literal(int(dimension)),
                key=sql.Literal(key),
            )
        )

    def facets(self, key: str) -> tuple[set[str], set[str]]:
        """The categories and subcategories a version's published templates use."""
        with self._transaction(snapshot=True) as cur:
            cur.execute(
                self._sql("SELECT DISTINCT category, subcategory FROM {schema}.templates WHERE model_version = %s"),
                (key,),
            )
            pairs = cur.fetchall()
        return {c for c, _ in pairs}, {s for _, s in pairs}

    ef_search: int | None = None  # None: EMBEDDING_ASSETS_PG_EF_SEARCH, else DEFAULT_EF_SEARCH

    def search_ef(self, k: int) -> int:
        """The hnsw.ef_search a top-k database search runs with."""
        configured = self.ef_search if self.ef_search is not None else configured_ef_search()
        return min(max(configured, 2 * k), MAX_EF_SEARCH)

    def search(
        self,
        key: str,
        query_vector: np.ndarray,
        k: int,
        category: str | None = None,
        subcategory: str | None = None,
    ) -> list[tuple[StoredTemplate, float]]:
        """The k published templates of a version nearest to query_vector (cosine), ranked in the database."""
        with self._transaction() as cur:
            ranking = sql.SQL("ranking" if self._schema_version >= 2 else "'{}'::jsonb")
            cur.execute(
                self._sql("SELECT dimension, {ranking} FROM {schema}.model_versions WHERE key = %s", ranking=ranking),
                (key,),
            )
            row = cur.fetchone()
            if row is None:
                raise StoreError(f"{self.location}: model version {key!r} has not been published")
            dimension, ranking = row
            if ranking.get("views"):
                query = np.asarray(query_vector, dtype=np.float32).reshape(-1)
                if query.shape != (dimension,):
                    raise StoreError(
                        f"model version {key!r}: query vector has shape {query.shape}, expected ({dimension},)"
                    )
                found = self._fused_search(cur, key, dimension, ranking, query, k, category, subcategory)
                return [(StoredTemplate(*r[:-1]), float(r[-1])) for r in found]
            query = np.asarray(query_vector, dtype=np.float32).reshape(-1)
            if query.shape != (dimension,):
                raise StoreError(f"model version {key!r}: query vector has shape {query.shape}, expected ({dimension},)")
            cur.execute("SELECT set_config('hnsw.ef_search', %s, true)", (str(self.search_ef(k)),))
            if (category or subcategory) and self._extension_version and _at_least(self._extension_version, (0, 8)):
                cur.execute("SELECT set_config('hnsw.iterative_scan', 'strict_order', true)")
            # The same predicate as the version's partial HNSW index, so the planner can use it.
            filters = [sql.SQL("model_version = {} AND vector_dims(embedding) = {}").format(
                sql.Literal(key), sql.Literal(int(dimension)))]
            params: list = []
            for column, value in (("category", category), ("subcategory", subcategory)):
                if value is not None:
                    filters.append(sql.SQL("{} = %s").format(sql.Identifier(column)))
                    params.append(value)
            distance = sql.SQL("embedding::vector({d}) <=> %s::vector({d})").format(d=sql.Literal(int(dimension)))
            cur.execute(
                sql.SQL("SELECT {columns}, {distance} AS distance FROM {schema}.templates WHERE {filters} "
                        "ORDER BY {order} LIMIT %s").format(
                    columns=_COLUMNS,
                    distance=distance,
                    schema=sql.Identifier(self.schema),
                    filters=sql.SQL(" AND ").join(filters),
                    order=distance,
                ),
                [query, *params, query, int(k)],
            )
            found = cur.fetchall()
        ranked = [(StoredTemplate(*r[:-1]), 1.0 - float(r[-1])) for r in found]
        ranked.sort(key=lambda pair: (-pair[1], pair[0].template_id))
        return ranked

    def _fused_search(
        self, cur, key: str, dimension: int, ranking: dict, query: np.ndarray, k: int,
        category: str | None, subcategory: str | None,
    ) -> list[tuple]:
        """Every view's cosine similarity fused as the version declares (an exact scan, not the HNSW index)."""
        vector = sql.SQL("%(query)s::vector({})").format(sql.Literal(int(dimension)))
        views = ranking["views"]
        joins, terms = [], []
        for position, (name, _, weight) in enumerate(views):
            alias = sql.Identifier(f"v{position}")
            column = sql.SQL("t.embedding") if position == 0 else sql.SQL("{}.embedding").format(alias)
            if position:
                joins.append(sql.SQL(
                    "JOIN {schema}.template_views AS {alias} ON {alias}.model_version = t.model_version "
                    "AND {alias}.template_id = t.template_id AND {alias}.view = {name}"
                ).format(schema=sql.Identifier(self.schema), alias=alias, name=sql.Literal(name)))
            terms.append(sql.SQL("{weight} * (1 - ({column}::vector({d}) <=> {vector}))").format(
                weight=sql.Literal(float(weight)), column=column, d=sql.Literal(int(dimension)), vector=vector))
        score = (sql.SQL("GREATEST({})") if ranking.get("fusion") == "max" else sql.SQL("({})")).format(
            sql.SQL(", " if ranking.get("fusion") == "max" else " + ").join(terms)
        )
        filters = [sql.SQL("t.model_version = %(key)s")]
        params: dict = {"query": query, "key": key, "k": int(k)}
        for column, value in (("category", category), ("subcategory", subcategory)):
            if value is not None:
                filters.append(sql.SQL("t.{} = %({})s").format(sql.Identifier(column), sql.SQL(column)))
                params[column] = value
        cur.execute(
            sql.SQL(
                "SELECT {columns}, {score} AS score FROM {schema}.templates AS t {joins} WHERE {filters} "
                "ORDER BY score DESC, t.template_id LIMIT %(k)s"
            ).format(
                columns=sql.SQL(", ").join(sql.Identifier("t", name) for name in TEMPLATE_FIELDS),
                score=score,
                schema=sql.Identifier(self.schema),
                joins=sql.SQL(" ").join(joins),
                filters=sql.SQL(" AND ").join(filters),
            ),
            params,
        )
        return cur.fetchall()

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> PostgresStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _at_least(version: str, minimum: tuple[int, ...]) -> bool:
    numbers = tuple(int(part) for part in version.split(".")[:len(minimum)] if part.isdigit())
    return numbers >= minimum


def _fields(item) -> tuple:
    t = item.template
    return (t.category, t.subcategory, t.question, t.answer, t.priority, t.audience, t.source_row)
