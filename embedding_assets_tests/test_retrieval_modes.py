"""Memory and database indexes behind one interface: evaluation, lexical weight, the connection pool."""

from __future__ import annotations

import subprocess
import sys
import threading

import psycopg2
import pytest

from embedding_assets.lib.faq import Template
from embedding_assets.lib.hashing import hash_templates
from embedding_assets.lib.plan import build_change_plan
from embedding_assets.retrieval import DatabaseIndex, MemoryIndex, TemplateRetriever
from embedding_assets.retrieval.evaluation import evaluate, load_queries
from embedding_assets.store import open_store
from embedding_assets_tests.conftest import SAMPLE_QUERIES


@pytest.fixture
def postgres_copy(first_run, postgres_store_url: str) -> str:
    """The sample store's published rows and vectors, copied into a PostgreSQL store (no model calls)."""
    with open_store(first_run[2], create=False) as source:
        snapshot = source.snapshot()
    version = snapshot.version.to_model_version()
    templates = [
        Template(t.template_id, t.category, t.subcategory, t.question, t.answer, t.priority, t.audience, t.source_row)
        for t in snapshot.templates
    ]
    hashed = hash_templates(templates, version.text_template)
    vectors = dict(zip(snapshot.columns["content_hash"], snapshot.matrix))
    assert [item.content_hash for item in hashed] == list(snapshot.columns["content_hash"])
    with open_store(postgres_store_url) as target:
        target.publish(version, build_change_plan(hashed, {}, model_version=version.key, base_generation=None), vectors)
    return postgres_store_url


def test_evaluate_on_a_database_mode_retriever_gives_the_memory_mode_ranks(postgres_copy: str) -> None:
    queries = load_queries(SAMPLE_QUERIES)
    memory = TemplateRetriever.load(postgres_copy, mode="memory")
    database = TemplateRetriever.load(postgres_copy, mode="database", embedder=memory.index.embedder)
    try:
        assert isinstance(memory.index, MemoryIndex) and isinstance(database.index, DatabaseIndex)
        in_memory, in_database = evaluate(memory, queries), evaluate(database, queries)
    finally:
        database.close()

    assert in_database.templates == in_memory.templates == 90
    assert in_database.model_version == in_memory.model_version == "e5-small-v1"
    assert [o.rank for o in in_database.outcomes] == [o.rank for o in in_memory.outcomes]
    assert in_database.metrics() == in_memory.metrics()


def test_both_indexes_offer_the_same_templates_facets_and_identity(postgres_copy: str) -> None:
    memory = TemplateRetriever.load(postgres_copy, mode="memory")
    database = TemplateRetriever.load(postgres_copy, mode="database", embedder=memory.index.embedder)
    try:
        assert database.index.templates() == memory.index.templates()
        assert database.index.facets() == memory.index.facets()
        assert database.index.identity == memory.index.identity
        assert len(database) == len(memory) == 90
        with open_store(postgres_copy) as store:
            state = store.state()
        assert (memory.index.identity.store_id, memory.index.identity.store_generation) == (state.store_id, 1)
        result = database.search("заблокировать карту", top_k=2)
        assert (len(result), result.identity) == (2, database.index.identity)
    finally:
        database.close()


def test_a_lexical_weight_is_refused_in_database_mode_and_makes_auto_mode_load_into_memory(postgres_copy) -> None:
    with pytest.raises(ValueError) as refused:
        TemplateRetriever.load(postgres_copy, mode="database", lexical_weight=0.3)
    assert str(refused.value) == (
        "lexical_weight needs search mode 'memory': database mode ranks by cosine similarity in PostgreSQL "
        "alone; use mode 'memory' (or 'auto') for a lexical weight, or lexical_weight 0"
    )
    assert TemplateRetriever.load(postgres_copy, database_min_rows=0).search_mode == "database"
    lexical = TemplateRetriever.load(postgres_copy, database_min_rows=0, lexical_weight=0.3)
    assert (lexical.search_mode, lexical.index.lexical_weight) == ("memory", 0.3)


def _backends(url: str) -> int:
    conn = psycopg2.connect(url)
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND application_name = 'embedding_assets'"
            )
            return cur.fetchone()[0]
    finally:
        conn.close()


def test_database_mode_searches_concurrently_over_at_most_its_pool_of_connections(postgres_copy: str) -> None:
    retriever = TemplateRetriever.load(postgres_copy, mode="database", database_connections=3)
    retriever.search("заблокировать карту")  # loads the query model
    errors: list[BaseException] = []
    results: list[list[str]] = []
    start = threading.Barrier(8)

    def client() -> None:
        start.wait()
        try:
            for _ in range(10):
                result = retriever.search("заблокировать карту", top_k=5)
                results.append([h.template_id for h in result])
        except BaseException as exc:  # recorded and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=client) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    try:
        assert errors == []
        assert len(results) == 80 and len({tuple(r) for r in results}) == 1
        assert 2 <= _backends(postgres_copy) <= 3
    finally:
        retriever.close()
    assert _backends(postgres_copy) == 0


def test_the_retrieval_package_and_service_import_no_dagster() -> None:
    code = (
        "import sys, embedding_assets.retrieval, embedding_assets.retrieval.service, "
        "embedding_assets.retrieval.evaluation; "
        "print(sorted(m for m in sys.modules if m.startswith(('dagster', 'embedding_assets.defs'))))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stdout.strip()) == (0, "[]"), done.stderr


def _terminate_backends(url: str) -> int:
    conn = psycopg2.connect(url)
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = current_database() "
                "AND application_name = 'embedding_assets'"
            )
            return cur.fetchone()[0]
    finally:
        conn.close()


def test_database_mode_recovers_from_connections_the_server_dropped(postgres_copy: str) -> None:
    retriever = TemplateRetriever.load(postgres_copy, mode="database", database_connections=2)
    try:
        expected = [h.template_id for h in retriever.search("заблокировать карту", top_k=3)]
        assert _terminate_backends(postgres_copy) == 1
        found = [[h.template_id for h in retriever.search("заблокировать карту", top_k=3)] for _ in range(3)]
        assert found == [expected] * 3
        assert _backends(postgres_copy) == 1
    finally:
        retriever.close()


@pytest.mark.parametrize("mode", ["memory", "database"])
def test_both_indexes_match_filters_in_any_letter_case_and_suggest_the_closest_name(postgres_copy, mode) -> None:
    memory = TemplateRetriever.load(postgres_copy, mode="memory")
    retriever = TemplateRetriever.load(postgres_copy, mode=mode, embedder=memory.index.embedder)
    try:
        exact = retriever.search("кредит", top_k=50, category="Кредиты", subcategory="Погашение кредита")
        folded = retriever.search("кредит", top_k=50, category="КРЕДИТЫ", subcategory="погашение КРЕДИТА")
        assert [h.template_id for h in folded] == [h.template_id for h in exact] and len(exact) > 0
        assert {(h.category, h.subcategory) for h in folded} == {("Кредиты", "Погашение кредита")}
        with pytest.raises(ValueError, match="^unknown category 'Кредитв'; did you mean 'Кредиты'\\? known: "):
            retriever.search("кредит", category="Кредитв")
        with pytest.raises(ValueError, match="^unknown category 'Ипотека'; known: Безопасность"):
            retriever.search("кредит", category="Ипотека")
    finally:
        retriever.close()
