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
import struct
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import numpy as np
import psycopg2
import psycopg2.extensions
from pgvector import Vector
from pgvector.psycopg2 import register_vector
from psycopg2 import sql
from psycopg2.extras import execute_values

from embedding_assets.lib.model_versions import ModelVersion
from embedding_assets.lib.plan import ChangePlan, StoredTemplate
from embedding_assets.store.base import (
    TEMPLATE_FIELDS,
    ModelVersionMismatchError,
    PublishResult,
    StalePlanError,
    StoreCorruptError,
    StoreError,
    StoreNotFoundError,
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
DEFAULT_SCHEMA = "embedding_store"
PAGE_SIZE = 500
COPY_ROWS = 10_000
MAX_EF_SEARCH = 1000
_SCHEMA_LOCK = "embedding_assets.schema"
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
    published_at text NOT NULL
);
CREATE TABLE IF NOT EXISTS {schema}.templates (
    model_version text NOT NULL REFERENCES {schema}.model_versions(key) ON DELETE CASCADE,
    template_id text NOT NULL,
    content_hash text NOT NULL,
    category text NOT NULL,
    subcategory text NOT NULL,
    question text NOT NULL,
    answer text NOT NULL,
    priority text NOT NULL,
    audience text NOT NULL,
    source_row integer NOT NULL,
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
INSERT INTO {schema}.store_meta VALUES ('schema_version', {schema_version}), ('generation', '0')
    ON CONFLICT (key) DO NOTHING;
"""

_COLUMNS = sql.SQL(", ").join(map(sql.Identifier, TEMPLATE_FIELDS))
_TEMPLATE_KINDS = ("text",) * 9 + ("int", "vector")  # model_version, TEMPLATE_FIELDS, embedding
_CACHE_KINDS = ("text", "text", "text", "vector", "text")
_INT4 = struct.Struct(">i")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def connection_settings(url: str) -> tuple[str, str]:
    """The libpq connection URL and the schema a store URL names (`?schema=` is ours, not libpq's)."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    schema = next((value for name, value in query if name == "schema"), DEFAULT_SCHEMA)
    if not schema:
        raise StoreError("the store URL's schema parameter is empty")
    rest = urlencode([(name, value) for name, value in query if name != "schema"])
    return urlunsplit(parts._replace(scheme="postgresql", query=rest)), schema


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


class PostgresVectorCache:
    """Content-addressed vectors of one model version's exact settings."""

    def __init__(self, store: PostgresStore, version: ModelVersion):
        self._store = store
        self._key = version.key
        self._fingerprint = version.fingerprint()
        self._dimension = version.dimension

    def get(self, content_hashes: Sequence[str]) -> dict[str, np.ndarray]:
        if not content_hashes:
            return {}
        with self._store._transaction() as cur:
            cur.execute(
                self._store._sql(
                    "SELECT content_hash, embedding FROM {schema}.embedding_cache "
                    "WHERE model_version = %s AND fingerprint = %s AND content_hash = ANY(%s)"
                ),
                (self._key, self._fingerprint, list(content_hashes)),
            )
            rows = cur.fetchall()
        found = {}
        for content_hash, vector in rows:
            array = vector.to_numpy()
            if array.shape == (self._dimension,):
                found[content_hash] = array
        return found

    def put(self, vectors: Mapping[str, np.ndarray]) -> None:
        created = _now()
        with self._store._transaction() as cur:
            self._store._upsert(
                cur,
                "embedding_cache",
                [(self._key, self._fingerprint, h, v, created) for h, v in vectors.items()],
                _CACHE_KINDS,
                "(model_version, fingerprint, content_hash) DO UPDATE SET embedding = EXCLUDED.embedding, "
                "created_at = EXCLUDED.created_at",
            )


class PostgresStore:
    """An embedding store in a PostgreSQL database with the pgvector extension."""

    def __init__(self, url: str, *, create: bool = True):
        from embedding_assets.store import redact_url

        self.location = redact_url(url)
        dsn, self.schema = connection_settings(str(url))
        self._password = urlsplit(dsn).password
        try:
            self._conn = psycopg2.connect(
                dsn, connect_timeout=10, application_name="embedding_assets", client_encoding="UTF8"
            )
        except psycopg2.Error as exc:
            raise StoreError(f"cannot connect to {self.location}: {self._clean(exc)}") from None
        try:
            self._ensure_schema(create)
            register_vector(self._conn)
            self._conn.commit()
            self._extension_version = self._scalar("SELECT extversion FROM pg_extension WHERE extname = 'vector'")
        except BaseException:
            self._conn.close()
            raise

    def __repr__(self) -> str:
        return f"PostgresStore({self.location!r}, schema={self.schema!r})"

    def _clean(self, exc: BaseException) -> str:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return message.replace(self._password, "***") if self._password else message

    def _sql(self, text: str, **parts: sql.Composable) -> sql.Composed:
        return sql.SQL(text).format(schema=sql.Identifier(self.schema), columns=_COLUMNS, **parts)

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
            raise StoreError(f"{self.location}: {self._clean(exc)}") from None
        except BaseException:
            self._rollback()
            raise
        try:
            conn.commit()
        except psycopg2.Error as exc:
            raise StoreError(f"{self.location}: {self._clean(exc)}") from None

    def _rollback(self) -> None:
        if not self._conn.closed:
            try:
                self._conn.rollback()
            except psycopg2.Error:
                pass

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
                            schema=sql.Identifier(self.schema), schema_version=sql.Literal(str(SCHEMA_VERSION))
                        )
                    )
            cur.execute(self._sql("SELECT value FROM {schema}.store_meta WHERE key = 'schema_version'"))
            row = cur.fetchone()
            if create and self._meta(cur, "store_id") is None:
                cur.execute(
                    self._sql("INSERT INTO {schema}.store_meta VALUES ('store_id', %s) ON CONFLICT (key) DO NOTHING"),
                    (new_store_id(),),
                )
        version = int(row[0]) if row else 0
        if version != SCHEMA_VERSION:
            raise StoreError(
                f"{self.location} has store schema {version}; this software reads schema {SCHEMA_VERSION}"
            )

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

    def _meta(self, cur, key: str, *, lock: bool = False) -> str | None:
        query = "SELECT value FROM {schema}.store_meta WHERE key = %s" + (" FOR UPDATE" if lock else "")
        cur.execute(self._sql(query), (key,))
        row = cur.fetchone()
        return row[0] if row else None

    def generation(self) -> int:
        with self._transaction() as cur:
            return int(self._meta(cur, "generation") or 0)

    def state(self) -> StoreState:
        """The store's id and generation, read together."""
        with self._transaction(snapshot=True) as cur:
            cur.execute(
                self._sql("SELECT key, value FROM {schema}.store_meta WHERE key IN ('store_id', 'generation')")
            )
            values = dict(cur.fetchall())
        return StoreState(values.get("store_id", ""), int(values.get("generation", 0)))

    def current_version(self) -> str | None:
        with self._transaction() as cur:
            return self._meta(cur, "current_version")

    def _version_rows(self, cur, key: str | None = None) -> list[VersionInfo]:
        current = self._meta(cur, "current_version")
        query = (
            "SELECT key, provider, model, dimension, text_template, settings, fingerprint, rows, generation, "
            "created_at, published_at FROM {schema}.model_versions"
        )
        if key is None:
            cur.execute(self._sql(query + " ORDER BY key"))
        else:
            cur.execute(self._sql(query + " WHERE key = %s"), (key,))
        return [
            VersionInfo(
                key=r[0], provider=r[1], model=r[2], dimension=r[3], text_template=r[4], settings=r[5],
                fingerprint=r[6], rows=r[7], generation=r[8], created_at=r[9], published_at=r[10],
                is_current=r[0] == current,
            )
            for r in cur.fetchall()
        ]

    def versions(self) -> list[VersionInfo]:
        with self._transaction(snapshot=True) as cur:
            return self._version_rows(cur)

    def version(self, key: str) -> VersionInfo | None:
        with self._transaction(snapshot=True) as cur:
            found = self._version_rows(cur, key)
        return found[0] if found else None

    def published(self, key: str) -> tuple[VersionInfo | None, dict[str, StoredTemplate]]:
        """A version's record and its published templates, read in one transaction."""
        with self._transaction(snapshot=True) as cur:
            found = self._version_rows(cur, key)
            cur.execute(self._sql("SELECT {columns} FROM {schema}.templates WHERE model_version = %s"), (key,))
            rows = cur.fetchall()
        return (found[0] if found else None), {r[0]: StoredTemplate(*r) for r in rows}

    def cache(self, version: ModelVersion) -> PostgresVectorCache:
        return PostgresVectorCache(self, version)

    def publish(
        self, version: ModelVersion, plan: ChangePlan, vectors: Mapping[str, np.ndarray]
    ) -> PublishResult:
        """Apply a change plan in one transaction and bump the store generation."""
        started = time.perf_counter()
        check_publish_vectors(version, plan, vectors)
        key = version.key
        with self._transaction() as cur:
            # Locking the generation row serializes publishers; readers are never blocked.
            generation = int(self._meta(cur, "generation", lock=True) or 0)
            stored = self._version_rows(cur, key)
            stored_info = stored[0] if stored else None
            stored_generation = stored_info.generation if stored_info else None
            if stored_generation != plan.base_generation:
                raise StalePlanError(
                    f"model version {key!r} was published (generation {stored_generation}) after this "
                    f"change plan was made (generation {plan.base_generation}); run the pipeline again"
                )
            if stored_info and stored_info.fingerprint != version.fingerprint() and not plan.rebuild:
                raise ModelVersionMismatchError(mismatch_message(version, stored_info))
            if stored_info and not plan.has_changes:
                return PublishResult(
                    key, stored_info.generation, stored_info.rows, False, stored_info.is_current,
                    time.perf_counter() - started,
                )
            generation += 1
            now = _now()
            cur.execute(
                self._sql(
                    "INSERT INTO {schema}.model_versions VALUES (%s, %s, %s, %s, %s, %s::jsonb, %s, 0, %s, %s, %s) "
                    "ON CONFLICT (key) DO UPDATE SET provider = EXCLUDED.provider, model = EXCLUDED.model, "
                    "dimension = EXCLUDED.dimension, text_template = EXCLUDED.text_template, "
                    "settings = EXCLUDED.settings, fingerprint = EXCLUDED.fingerprint, "
                    "generation = EXCLUDED.generation, published_at = EXCLUDED.published_at"
                ),
                (key, version.provider, version.model, version.dimension, version.text_template,
                 settings_json(version.settings), version.fingerprint(), generation, now, now),
            )
            self._drop_other_indexes(cur, key, version.dimension)
            if plan.rebuild:
                cur.execute(self._sql("DELETE FROM {schema}.templates WHERE model_version = %s"), (key,))
            self._upsert(
                cur,
                "templates",
                [(key, i.template_id, i.content_hash, *_fields(i), vectors[i.content_hash])
                 for i in (*plan.new, *plan.modified)],
                _TEMPLATE_KINDS,
                "(model_version, template_id) DO UPDATE SET content_hash = EXCLUDED.content_hash, "
                "category = EXCLUDED.category, subcategory = EXCLUDED.subcategory, "
                "question = EXCLUDED.question, answer = EXCLUDED.answer, priority = EXCLUDED.priority, "
                "audience = EXCLUDED.audience, source_row = EXCLUDED.source_row, embedding = EXCLUDED.embedding",
            )
            execute_values(
                cur,
                self._sql(
                    "UPDATE {schema}.templates AS t SET category = v.category, subcategory = v.subcategory, "
                    "question = v.question, answer = v.answer, priority = v.priority, audience = v.audience, "
                    "source_row = v.source_row FROM (VALUES %s) AS v(model_version, template_id, category, "
                    "subcategory, question, answer, priority, audience, source_row) "
                    "WHERE t.model_version = v.model_version AND t.template_id = v.template_id"
                ),
                [(key, i.template_id, *_fields(i)) for i in plan.metadata_updated],
                page_size=PAGE_SIZE,
            )
            if plan.deleted:
                cur.execute(
                    self._sql("DELETE FROM {schema}.templates WHERE model_version = %s AND template_id = ANY(%s)"),
                    (key, list(plan.deleted)),
                )
            cur.execute(self._sql("SELECT count(*) FROM {schema}.templates WHERE model_version = %s"), (key,))
            rows = cur.fetchone()[0]
            if rows != plan.target_rows:
                raise StalePlanError(
                    f"model version {key!r}: publish would leave {rows} rows, the plan expects "
                    f"{plan.target_rows}; nothing was written"
                )
            cur.execute(self._sql("UPDATE {schema}.model_versions SET rows = %s WHERE key = %s"), (rows, key))
            cur.execute(
                self._sql("UPDATE {schema}.store_meta SET value = %s WHERE key = 'generation'"), (str(generation),)
            )
            current = self._meta(cur, "current_version")
            if current is None:
                cur.execute(self._sql("INSERT INTO {schema}.store_meta VALUES ('current_version', %s)"), (key,))
                current = key
            self._create_index(cur, key, version.dimension)
        return PublishResult(key, generation, rows, True, current == key, time.perf_counter() - started)

    def promote(self, key: str) -> VersionInfo:
        """Make a published version the one readers use, in one transaction."""
        with self._transaction() as cur:
            generation = int(self._meta(cur, "generation", lock=True) or 0)
            found = self._version_rows(cur, key)
            if not found:
                raise StoreError(unpublished_message(key, [v.key for v in self._version_rows(cur)]))
            if self._meta(cur, "current_version") != key:
                cur.execute(
                    self._sql(
                        "INSERT INTO {schema}.store_meta VALUES ('current_version', %s) "
                        "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value"
                    ),
                    (key,),
                )
                cur.execute(
                    self._sql("UPDATE {schema}.store_meta SET value = %s WHERE key = 'generation'"),
                    (str(generation + 1),),
                )
            return self._version_rows(cur, key)[0]

    def prune(self, key: str) -> int:
        """Delete a non-current version, its templates, cached vectors and index; the rows removed."""
        with self._transaction() as cur:
            generation = int(self._meta(cur, "generation", lock=True) or 0)
            found = self._version_rows(cur, key)
            if not found:
                raise StoreError(unpublished_message(key, [v.key for v in self._version_rows(cur)]))
            if self._meta(cur, "current_version") == key:
                raise StoreError(current_prune_message(key))
            cur.execute(self._sql("DELETE FROM {schema}.templates WHERE model_version = %s"), (key,))
            rows = cur.rowcount
            cur.execute(self._sql("DELETE FROM {schema}.embedding_cache WHERE model_version = %s"), (key,))
            cur.execute(self._sql("DELETE FROM {schema}.model_versions WHERE key = %s"), (key,))
            self._drop_other_indexes(cur, key, 0)
            cur.execute(
                self._sql("UPDATE {schema}.store_meta SET value = %s WHERE key = 'generation'"),
                (str(generation + 1),),
            )
        return rows

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

    def snapshot(self, key: str | None = None) -> StoreSnapshot:
        """The published rows and vectors of one version (default: the current one), from one MVCC snapshot."""
        with self._transaction(snapshot=True) as cur:
            store_generation = int(self._meta(cur, "generation") or 0)
            store_id = self._meta(cur, "store_id") or ""
            key = key or self._meta(cur, "current_version")
            if key is None:
                raise StoreError(f"{self.location}: no model version has been published yet")
            found = self._version_rows(cur, key)
            if not found:
                raise StoreError(f"{self.location}: model version {key!r} has not been published")
            cur.execute(
                self._sql("SELECT {columns} FROM {schema}.templates WHERE model_version = %s ORDER BY template_id"),
                (key,),
            )
            rows = cur.fetchall()
            copied = io.BytesIO()
            cur.copy_expert(
                self._sql(
                    "COPY (SELECT embedding FROM {schema}.templates WHERE model_version = {key} "
                    "ORDER BY template_id) TO STDOUT WITH (FORMAT binary)",
                    key=sql.Literal(key),
                ).as_string(self._conn),
                copied,
            )
        info = found[0]
        matrix = _parse_vectors(copied.getvalue(), len(rows), info.dimension, f"{self.location}: {key!r}")
        values = list(zip(*rows)) if rows else [()] * len(TEMPLATE_FIELDS)
        return StoreSnapshot(
            version=info,
            store_generation=store_generation,
            columns=dict(zip(TEMPLATE_FIELDS, values)),
            matrix=matrix,
            store_id=store_id,
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
            cur.execute(self._sql("SELECT dimension FROM {schema}.model_versions WHERE key = %s"), (key,))
            row = cur.fetchone()
            if row is None:
                raise StoreError(f"{self.location}: model version {key!r} has not been published")
            dimension = row[0]
            query = np.asarray(query_vector, dtype=np.float32).reshape(-1)
            if query.shape != (dimension,):
                raise StoreError(f"model version {key!r}: query vector has shape {query.shape}, expected ({dimension},)")
            cur.execute("SELECT set_config('hnsw.ef_search', %s, true)", (str(min(max(40, 2 * k), MAX_EF_SEARCH)),))
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
