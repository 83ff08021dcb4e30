"""The real asset chain and the retriever against a real PostgreSQL + pgvector server, with the real local model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import dagster as dg
import numpy as np
import pytest

from embedding_assets.lib.embedders import LocalE5Embedder
from embedding_assets.retrieval import TemplateRetriever
from embedding_assets.store import StoreError, open_store, redact_url
from embedding_assets_tests.conftest import SAMPLE_FAQ, SAMPLE_QUERIES, read_rows, write_rows
from embedding_assets_tests.pipeline import KEY, run_pipeline
from embedding_assets_tests.postgres import database_name, new_database

SAMPLE_ROWS = 90
CLI = str(Path(sys.executable).parent / "embedding-assets")
ID, QUESTION, ANSWER = 0, 3, 6


class MemoizedQueries:
    """The local model, embedding each distinct query once (both retrievers share it)."""

    def __init__(self) -> None:
        self.inner = LocalE5Embedder()
        self.dimension = self.inner.dimension
        self.vectors: dict[str, np.ndarray] = {}

    def embed_passages(self, texts):
        return self.inner.embed_passages(texts)

    def embed_query(self, text: str) -> np.ndarray:
        if text not in self.vectors:
            self.vectors[text] = self.inner.embed_query(text)
        return self.vectors[text]


@pytest.fixture(scope="module")
def queries() -> list[dict]:
    return json.loads(SAMPLE_QUERIES.read_text(encoding="utf-8"))["validation_queries"]


@pytest.fixture(scope="module")
def published_database(postgres_server: str, tmp_path_factory):
    """One cold run and one rerun of the sample FAQ into a PostgreSQL database that tests copy."""
    faq = write_rows(tmp_path_factory.mktemp("pg-faq") / "faq.xlsx", read_rows(SAMPLE_FAQ))
    with new_database(postgres_server) as url:
        instance = dg.DagsterInstance.ephemeral()
        cold = run_pipeline(faq, url, instance=instance)
        rerun = run_pipeline(faq, url, instance=instance)
        yield url, cold, rerun


@pytest.fixture
def postgres_pipeline(postgres_server: str, published_database, tmp_path):
    """A copy of the published database for one test: (faq copy, store URL, cold run, rerun)."""
    template, cold, rerun = published_database
    faq = write_rows(tmp_path / "faq.xlsx", read_rows(SAMPLE_FAQ))
    with new_database(postgres_server, template=database_name(template)) as url:
        yield faq, url, cold, rerun


def test_pipeline_publishes_to_postgres_and_a_rerun_embeds_nothing(published_database, first_run) -> None:
    url, cold, rerun = published_database
    assert cold.result.success
    assert len(cold.embedded_texts) == SAMPLE_ROWS == len(set(cold.embedded_texts))
    assert len(cold.calls) == 3
    assert cold.plan == {"new": 90, "modified": 0, "deleted": 0, "unchanged": 0, "metadata_updated": 0}
    assert (cold.store["rows"], cold.store["generation"], cold.store["published"], cold.store["current_version"]) == (
        90, 1, True, True,
    )
    assert cold.store["store"] == redact_url(url)
    assert cold.store["backend"] == "postgresql"
    assert urlsplit(url).password not in json.dumps(cold.metadata, default=str)

    assert rerun.result.success
    assert rerun.calls == []
    assert rerun.plan == {"new": 0, "modified": 0, "deleted": 0, "unchanged": 90, "metadata_updated": 0}
    assert (rerun.store["rows"], rerun.store["generation"], rerun.store["published"]) == (90, 1, False)
    # the FAQ's parse and hashes are recalled; a PostgreSQL store has no cheap mark of a write, so it is read
    assert (rerun.metadata["faq_templates"]["reused_parse"], rerun.metadata["template_hashes"]["reused_hashes"],
            rerun.metadata["change_plan"]["reused_plan"]) == (True, True, False)

    with open_store(url, create=False) as pg, open_store(first_run[2], create=False) as lite:
        pg_snapshot, lite_snapshot = pg.snapshot(KEY), lite.snapshot(KEY)
        assert pg.cache(pg_snapshot.version.to_model_version()).get(
            list(pg_snapshot.columns["content_hash"])).keys() == set(pg_snapshot.columns["content_hash"])
    assert pg_snapshot.templates == lite_snapshot.templates
    assert pg_snapshot.version.fingerprint == lite_snapshot.version.fingerprint
    np.testing.assert_allclose(pg_snapshot.matrix, lite_snapshot.matrix, atol=1e-6)


def test_add_five_modify_two_delete_one_on_postgres_embeds_exactly_seven(postgres_pipeline) -> None:
    faq, url, _, _ = postgres_pipeline
    rows = read_rows(faq)
    header, body = rows[0], rows[1:]
    deleted_id = body[10][ID]
    modified = {body[0][ID], body[40][ID]}
    for row in body:
        if row[ID] in modified:
            row[ANSWER] += " Подробнее — в разделе «Помощь» приложения."
    body = [row for row in body if row[ID] != deleted_id]
    added = [
        [f"NEW-{i:03d}", "Карты", "Кешбэк", f"Начисляется ли кешбэк за покупку номер {i} в месяце?", "низкий",
         "держатели карт", f"Да, кешбэк начисляется и за {i}-ю покупку, если она сделана картой «Путь»."]
        for i in range(1, 6)
    ]
    write_rows(faq, [header, *added[:2], *body, *added[2:]])

    outcome = run_pipeline(faq, url)

    assert outcome.result.success
    assert outcome.plan == {"new": 5, "modified": 2, "deleted": 1, "unchanged": 87, "metadata_updated": 87}
    assert len(outcome.embedded_texts) == 7
    assert (outcome.store["rows"], outcome.store["generation"]) == (94, 2)
    with open_store(url, create=False) as store:
        snapshot = store.snapshot()
    ids = [t.template_id for t in snapshot.templates]
    assert len(ids) == len(set(ids)) == 94
    assert deleted_id not in ids
    assert {f"NEW-{i:03d}" for i in range(1, 6)} <= set(ids)


def test_memory_and_database_search_give_the_same_top_k(postgres_pipeline, queries) -> None:
    _, url, _, _ = postgres_pipeline
    embedder = MemoizedQueries()
    memory = TemplateRetriever.load(url, mode="memory", embedder=embedder)
    database = TemplateRetriever.load(url, mode="database", embedder=embedder)
    try:
        assert (memory.search_mode, database.search_mode) == ("memory", "database")
        assert len(memory) == len(database) == SAMPLE_ROWS
        for item in queries:
            expected = memory.search(item["query"], top_k=5)
            found = database.search(item["query"], top_k=5)
            assert [h.template_id for h in found] == [h.template_id for h in expected]
            assert [h.score for h in found] == pytest.approx([h.score for h in expected], abs=1e-5)
            in_category = database.search(item["query"], top_k=3, category=item["category"])
            assert [h.template_id for h in in_category] == [
                h.template_id for h in memory.search(item["query"], top_k=3, category=item["category"])
            ]
            assert {h.category for h in in_category} == {item["category"]}
        with pytest.raises(ValueError, match="unknown category 'Нет такой'"):
            database.search("карта", category="Нет такой")
        info = database.info()
        assert {k: info[k] for k in ("model_version", "rows", "generation", "loaded_rows", "search_mode")} == {
            "model_version": KEY, "rows": 90, "generation": 1, "loaded_rows": 90, "search_mode": "database",
        }
        assert info["store"] == redact_url(url)
        assert memory.info()["search_mode"] == "memory"
    finally:
        database.close()


def test_auto_mode_picks_the_database_above_the_row_threshold(postgres_pipeline, first_run) -> None:
    faq, url, _, _ = postgres_pipeline
    assert TemplateRetriever.load(url).search_mode == "memory"
    assert TemplateRetriever.load(url, database_min_rows=91).search_mode == "memory"
    large = TemplateRetriever.load(url, database_min_rows=90)
    assert large.search_mode == "database"
    assert TemplateRetriever.load(first_run[2], database_min_rows=0).search_mode == "memory"
    with pytest.raises(StoreError, match="search mode 'database' needs a PostgreSQL store"):
        TemplateRetriever.load(first_run[2], mode="database")
    with pytest.raises(ValueError, match="unknown search mode 'fast'"):
        TemplateRetriever.load(url, mode="fast")

    question = "Начисляется ли кешбэк за покупку номер 1 в месяце?"
    assert large.reload_if_changed() is False
    rows = read_rows(faq)
    write_rows(faq, [*rows, ["NEW-001", "Карты", "Кешбэк", question, "низкий", "все", "Да, начисляется."]])
    assert run_pipeline(faq, url).store["generation"] == 2
    assert large.reload_if_changed() is True
    assert (large.info()["store_generation"], len(large)) == (2, 91)
    assert large.search(question, top_k=1)[0].template_id == "NEW-001"
    assert large.reload_if_changed() is False
    large.close()


def test_cli_status_and_search_on_postgres(postgres_pipeline, tmp_path) -> None:
    _, url, _, _ = postgres_pipeline
    env = {**os.environ, "EMBEDDING_ASSETS_STORE": url, "DAGSTER_HOME": str(tmp_path / "dagster_home")}

    def cli(*args: str) -> dict:
        done = subprocess.run([CLI, *args, "--json"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        assert urlsplit(url).password not in done.stdout + done.stderr
        return json.loads(done.stdout)

    status = cli("status")
    assert (status["store"], status["generation"]) == (redact_url(url), 1)
    assert [(v["model_version"], v["rows"], v["current"]) for v in status["versions"]] == [(KEY, 90, True)]
    found = cli("search", "Хочу оформить депозит «Мои условия» — что для этого нужно?", "--top-k", "2")
    expected = TemplateRetriever.load(url).search("Хочу оформить депозит «Мои условия» — что для этого нужно?", top_k=2)
    assert [h["template_id"] for h in found["hits"]] == [h.template_id for h in expected]
