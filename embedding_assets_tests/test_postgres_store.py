"""What only the PostgreSQL backend has: HNSW indexes, in-database search, schemas, extension and connection errors."""

from __future__ import annotations

from dataclasses import replace
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import psycopg2
import pytest
from psycopg2 import sql

from embedding_assets.store import PostgresStore, StoreError, StoreNotFoundError, open_store, redact_url
from embedding_assets.store.postgres import DEFAULT_EF_SEARCH, EF_SEARCH_VAR, connection_settings, hnsw_index_name
from embedding_assets_tests.conftest import make_template
from embedding_assets_tests.postgres import with_database
from embedding_assets_tests.test_store_contract import TEN, TEN_VECTORS, V3, V4, publish, vector_for


def indexes(url: str, schema: str = "embedding_store") -> dict[str, str]:
    with psycopg2.connect(url) as conn, conn.cursor() as cur:
        cur.execute("SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = %s AND indexname LIKE 'templates_hnsw%%'",
                    (schema,))
        found = dict(cur.fetchall())
    conn.close()
    return found


def with_credentials(url: str, user: str, password: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=f"{user}:{password}@{parts.hostname}:{parts.port}"))


def test_one_partial_hnsw_index_per_version_and_dimension(postgres_url: str) -> None:
    with open_store(postgres_url) as store:
        publish(store, V4, TEN, TEN_VECTORS)
        publish(store, V3, TEN[:4], {t.template_id: vector_for(n, 3) for n, t in enumerate(TEN[:4], start=1)})
        found = indexes(postgres_url)
        assert sorted(found) == sorted([hnsw_index_name("mini-v1", 4), hnsw_index_name("tiny-v1", 3)])
        definition = found[hnsw_index_name("mini-v1", 4)]
        assert "USING hnsw (((embedding)::vector(4)) vector_cosine_ops)" in definition
        assert "model_version = 'mini-v1'::text" in definition
        assert "vector_dims(embedding) = 4" in definition

        wider = replace(V4, dimension=6)
        publish(store, wider, TEN, {t.template_id: vector_for(n, 6) for n, t in enumerate(TEN, start=1)}, rebuild=True)
        assert sorted(indexes(postgres_url)) == sorted([hnsw_index_name("mini-v1", 6), hnsw_index_name("tiny-v1", 3)])


def test_database_search_uses_the_version_index(postgres_url: str) -> None:
    with open_store(postgres_url) as store:
        publish(store, V4, TEN, TEN_VECTORS)
        with store._transaction() as cur:
            cur.execute("SET LOCAL enable_seqscan = off")
            cur.execute(
                store._sql(
                    "EXPLAIN SELECT template_id FROM {schema}.templates WHERE model_version = 'mini-v1' "
                    "AND vector_dims(embedding) = 4 ORDER BY embedding::vector(4) <=> %s::vector(4) LIMIT 3"
                ),
                (TEN_VECTORS["T-1"],),
            )
            plan = "\n".join(r[0] for r in cur.fetchall())
    assert f"Index Scan using {hnsw_index_name('mini-v1', 4)}" in plan


def test_database_search_matches_exact_ranking(postgres_url: str) -> None:
    templates = [make_template(n, category=("Карты", "Вклады")[n % 2]) for n in range(1, 401)]
    by_id = {t.template_id: vector_for(n, dimension=16) for n, t in enumerate(templates, start=1)}
    version = replace(V4, key="wide-v1", dimension=16)
    with open_store(postgres_url) as store:
        publish(store, version, templates, by_id)
        snapshot = store.snapshot("wide-v1")
        ids = np.array([t.template_id for t in snapshot.templates])
        cards = np.array([t.category == "Карты" for t in snapshot.templates])
        hits = total = 0
        for q in range(20):
            query = vector_for(10_000 + q, dimension=16)
            scores = snapshot.matrix @ query
            ranked = store.search("wide-v1", query, 10)
            assert len(ranked) == 10
            assert [s for _, s in ranked] == sorted((s for _, s in ranked), reverse=True)
            for template, score in ranked:
                assert score == pytest.approx(float(scores[ids == template.template_id][0]), abs=1e-5)
            hits += len({t.template_id for t, _ in ranked} & set(ids[np.argsort(-scores)[:10]]))
            filtered = store.search("wide-v1", query, 5, category="Карты")
            assert [t.category for t, _ in filtered] == ["Карты"] * 5
            exact = ids[cards][np.argsort(-scores[cards])[:5]]
            assert [t.template_id for t, _ in filtered] == list(exact)
            total += 10
        assert hits / total >= 0.9
        assert store.search("wide-v1", vector_for(1, 16), 3, category="Карты", subcategory="нет такой") == []
        with pytest.raises(StoreError, match="query vector has shape"):
            store.search("wide-v1", vector_for(1, 4), 3)
        with pytest.raises(StoreError, match="model version 'nope' has not been published"):
            store.search("nope", vector_for(1, 16), 3)


class SettingsAtSearch(psycopg2.extensions.cursor):
    """Reads the session's HNSW settings in the search's own transaction, just before its SELECT runs."""

    seen: list[tuple[str, str]] = []

    def execute(self, query, vars=None):
        text = query.as_string(self) if isinstance(query, sql.Composable) else str(query)
        if "ORDER BY" in text and "<=>" in text:
            super().execute("SELECT current_setting('hnsw.ef_search', true), current_setting('hnsw.iterative_scan', true)")
            SettingsAtSearch.seen.append(self.fetchone())
        return super().execute(query, vars)


def test_configured_ef_search_is_applied_to_search_sessions(postgres_url: str, monkeypatch) -> None:
    templates = [make_template(n, category=("Карты", "Вклады")[n % 2]) for n in range(1, 61)]
    version = replace(V4, key="wide-v1", dimension=16)
    with open_store(postgres_url) as store:
        publish(store, version, templates, {t.template_id: vector_for(n, 16) for n, t in enumerate(templates, 1)})
    SettingsAtSearch.seen = []
    monkeypatch.delenv(EF_SEARCH_VAR, raising=False)
    with open_store(postgres_url) as store:
        store._conn.cursor_factory = SettingsAtSearch
        query = vector_for(500, 16)
        assert len(store.search("wide-v1", query, 10)) == 10
        monkeypatch.setenv(EF_SEARCH_VAR, "123")
        assert len(store.search("wide-v1", query, 10)) == 10
        assert len(store.search("wide-v1", query, 5, category="Карты")) == 5
        store.ef_search = 7  # below 2k: the floor of 2 × top-k applies
        assert len(store.search("wide-v1", query, 10)) == 10
        store.ef_search = 300
        assert len(store.search("wide-v1", query, 10)) == 10
        assert [ef for ef, _ in SettingsAtSearch.seen] == [str(DEFAULT_EF_SEARCH), "123", "123", "20", "300"]
        iterative = [scan for _, scan in SettingsAtSearch.seen]
        assert iterative[2] == "strict_order"  # the filtered search
        assert set(iterative[:2] + iterative[3:]) <= {None, "off"}
        with store._transaction() as cur:  # the settings were local to each search's transaction
            cur.execute("SELECT current_setting('hnsw.ef_search')")
            assert cur.fetchone()[0] == "40"
        store.ef_search = None
        monkeypatch.setenv(EF_SEARCH_VAR, "0")
        with pytest.raises(StoreError, match=f"{EF_SEARCH_VAR}='0': expected a whole number from 1 to 1000"):
            store.search("wide-v1", query, 10)


def test_schema_parameter_keeps_stores_apart(postgres_url: str) -> None:
    other = postgres_url + "?schema=faq_store"
    assert connection_settings(other) == (postgres_url, "faq_store")
    with open_store(postgres_url) as first, open_store(other) as second:
        publish(first, V4, TEN, TEN_VECTORS)
        publish(second, V4, TEN[:2], TEN_VECTORS)
        assert (first.snapshot().version.rows, second.snapshot().version.rows) == (10, 2)
        assert (first.schema, second.schema, repr(second)) == (
            "embedding_store", "faq_store", f"PostgresStore({redact_url(other)!r}, schema='faq_store')"
        )
    assert sorted(indexes(postgres_url, "faq_store")) == [hnsw_index_name("mini-v1", 4)]


def test_password_never_shows(postgres_url: str) -> None:
    password = urlsplit(postgres_url).password
    assert password
    with open_store(postgres_url) as store:
        assert password not in store.location + repr(store)
    wrong = with_credentials(postgres_url, "postgres", password + "-wrong")
    with pytest.raises(StoreError) as exc_info:
        open_store(wrong)
    message = str(exc_info.value)
    assert message.startswith(f"cannot connect to {redact_url(wrong)}: ")
    assert "password authentication failed" in message
    assert password not in message


def test_closed_port_is_a_clear_error(postgres_url: str) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"postgresql://u:topsecret@127.0.0.1:{port}/db"
    with pytest.raises(StoreError) as exc_info:
        open_store(url)
    assert str(exc_info.value).startswith(f"cannot connect to postgresql://u:***@127.0.0.1:{port}/db: ")
    assert "topsecret" not in str(exc_info.value)


def test_empty_database_without_create_is_not_found(postgres_url: str) -> None:
    with pytest.raises(StoreNotFoundError) as exc_info:
        open_store(postgres_url, create=False)
    assert str(exc_info.value) == f"no embedding store at {redact_url(postgres_url)} (schema 'embedding_store')"
    with psycopg2.connect(postgres_url) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM pg_namespace WHERE nspname = 'embedding_store'")
        assert cur.fetchone()[0] == 0
    conn.close()


def test_missing_pgvector_extension_is_a_clear_error(postgres_url: str) -> None:
    """A role that may not create the extension gets a message that says what to do; nothing is created."""
    database = urlsplit(postgres_url).path.lstrip("/")
    conn = psycopg2.connect(postgres_url)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("CREATE ROLE plain_user LOGIN PASSWORD 'plain-secret'")
        cur.execute(sql.SQL("GRANT CREATE ON DATABASE {} TO plain_user").format(sql.Identifier(database)))
        cur.execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC")
    plain = with_credentials(postgres_url, "plain_user", "plain-secret")
    try:
        with pytest.raises(StoreError) as exc_info:
            open_store(plain)
        message = str(exc_info.value)
        assert message.startswith(f"{redact_url(plain)}: the pgvector extension is not available (")
        assert "CREATE EXTENSION vector" in message
        assert "plain-secret" not in message
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM pg_namespace WHERE nspname = 'embedding_store'")
            assert cur.fetchone()[0] == 0
            cur.execute("CREATE EXTENSION vector")
            cur.execute("GRANT CREATE ON SCHEMA public TO plain_user")
        with open_store(plain) as store:
            assert publish(store, V4, TEN, TEN_VECTORS).rows == 10
    finally:
        with conn.cursor() as cur:
            cur.execute(sql.SQL("DROP SCHEMA IF EXISTS embedding_store CASCADE"))
            cur.execute("DROP OWNED BY plain_user")
            cur.execute("DROP ROLE plain_user")
        conn.close()


def test_postgres_scheme_alias(postgres_url: str) -> None:
    alias = "postgres://" + postgres_url.split("://", 1)[1]
    with open_store(alias) as store:
        assert isinstance(store, PostgresStore)
        assert store.location == redact_url(alias)
    assert with_database(alias, "x").endswith("/x")
