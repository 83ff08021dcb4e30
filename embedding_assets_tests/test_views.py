"""Views: one vector per (template, view), each view text embedded once, fused as the version declares."""

from __future__ import annotations

import sqlite3
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from embedding_assets.lib.embedders import embed_with_cache, embedder_for
from embedding_assets.lib.hashing import hash_templates, hash_version_templates
from embedding_assets.lib.model_versions import LexicalSignal, ModelVersion, View, load_model_versions
from embedding_assets.lib.plan import build_change_plan
from embedding_assets.lib.version_table import template_vectors
from embedding_assets.retrieval import TemplateRetriever
from embedding_assets.retrieval.lexical import CharNgramIndex, scaled
from embedding_assets.store import SqliteStore, open_store
from embedding_assets_tests.conftest import make_template
from embedding_assets_tests.openai_servers import FaultServer

DIMENSION = 8
QA = "{subcategory}: {question}\n{answer}"
VIEWS = (View("qa", QA, 1.0), View("question", "{question}", 0.25))
QUERIES = ["Вопрос номер 3", "ответ номер 7", "Подкатегория 1", "номер 12?", "вопрос 5 ответ"]


@pytest.fixture(scope="module")
def server():
    api = FaultServer(dimension=DIMENSION).start()
    yield api
    api.stop()


def versions(server: FaultServer) -> tuple[ModelVersion, ModelVersion]:
    settings = {"base_url": server.base_url, "concurrency": 1, "max_attempts": 2, "backoff_initial": 0.01}
    single = ModelVersion("single", "openai", "fake", DIMENSION, text_template=QA, settings=settings)
    viewed = replace(single, key="viewed", views=VIEWS, fusion="sum")
    return single, viewed


def publish(store, version: ModelVersion, templates, rebuild: bool = False):
    """Hash, plan, embed (through the cache) and publish, as the pipeline does; the embedding run."""
    stored, published = store.published(version.key)
    plan = build_change_plan(
        hash_version_templates(templates, version), published, model_version=version.key,
        base_generation=stored.generation if stored else None, rebuild=rebuild,
    )
    run = embed_with_cache(
        plan.texts_to_embed(), version=version, embedder=embedder_for(version, api_key=""), cache=store.cache(version)
    )
    vectors = {i.content_hash: template_vectors(i, run.vectors) for i in (*plan.new, *plan.modified)}
    store.publish(version, plan, vectors)
    return run, plan


def test_views_are_declared_in_the_toml_and_a_version_without_views_keeps_its_fingerprint(tmp_path: Path) -> None:
    path = tmp_path / "versions.toml"
    path.write_text(
        '[[model_version]]\nkey = "e5-small-v1"\nprovider = "local"\nmodel = "multilingual-e5-small"\n'
        'dimension = 384\ntext_template = "{subcategory}: {question}\\n{answer}"\nsettings = { variant = "original" }\n'
        '[[model_version]]\nkey = "e5-views"\nprovider = "local"\nmodel = "multilingual-e5-small"\ndimension = 384\n'
        'views = {qa = {text_template = "{subcategory}: {question}\\n{answer}", weight = 1.0}, '
        'question = {text_template = "{question}", weight = 0.25}}\nfusion = "max"\n'
        'lexical = {kind = "char_ngrams", weight = 0.03}\nsettings = { variant = "original" }\n',
        encoding="utf-8",
    )
    plain, viewed = load_model_versions(path)
    # The fingerprint the version had before views existed: its published stores stay valid.
    assert plain.fingerprint() == "1d8965f579c9a85d35c27b281ae491885eff979348cf7fab563e6b5c4f7036db"
    assert [v.name for v in plain.text_views] == ["text"] and plain.ranking() == {}
    assert viewed.views == VIEWS and viewed.fusion == "max"
    assert viewed.lexical == LexicalSignal("char_ngrams", 0.03)
    assert viewed.text_template == QA and viewed.vector_shape == (2, 384)
    # Weights, fusion and the lexical signal rank; only the view texts change vectors.
    assert replace(viewed, fusion="sum", lexical=None).fingerprint() == viewed.fingerprint()
    assert replace(viewed, views=VIEWS[:1]).fingerprint() != viewed.fingerprint()
    assert hash_version_templates([make_template(1)], plain) == hash_templates([make_template(1)], QA)


def test_each_view_text_is_paid_once_and_an_answer_edit_re_embeds_only_the_views_with_the_answer(
    server: FaultServer, tmp_path: Path
) -> None:
    _, viewed = versions(server)
    templates = [make_template(n) for n in range(1, 6)]
    with SqliteStore(tmp_path / "store.db") as store:
        server.reset()
        run, _ = publish(store, viewed, templates)
        assert (run.embedded, len(server.inputs)) == (10, 10)  # 5 templates x 2 views
        assert sorted(server.inputs)[:5] == sorted(f"Вопрос номер {n}?" for n in range(1, 6))

        server.reset()
        edited = [replace(t, answer="Новый ответ.") if t.template_id == "T-2" else t for t in templates]
        run, plan = publish(store, viewed, edited)
        assert [i.template_id for i in plan.modified] == ["T-2"]
        assert server.inputs == ["Подкатегория 2: Вопрос номер 2?\nНовый ответ."]
        assert (run.requested, run.cache_hits, run.embedded) == (2, 1, 1)

        server.reset()
        asked = [replace(t, question="Другой вопрос?") if t.template_id == "T-3" else t for t in edited]
        run, _ = publish(store, viewed, asked)
        assert sorted(server.inputs) == ["Другой вопрос?", "Подкатегория 3: Другой вопрос?\nОтвет номер 3."]

        snapshot = store.snapshot("viewed")
        assert list(snapshot.views) == ["question"]
        question = dict(zip(snapshot.columns["template_id"], snapshot.views["question"]))
        from embedding_assets_tests.openai_servers import fake_vector

        assert np.allclose(question["T-3"], fake_vector("Другой вопрос?", DIMENSION))
        assert np.allclose(snapshot.matrix[1], fake_vector("Подкатегория 2: Вопрос номер 2?\nНовый ответ.", DIMENSION))
        rows = sqlite3.connect(tmp_path / "store.db").execute(
            "SELECT model_version, view, count(*) FROM template_views GROUP BY 1, 2").fetchall()
        assert rows == [("viewed", "question", 5)]

        server.reset()
        publish(store, viewed, asked[1:])  # a deleted template takes its views with it
        assert store.snapshot("viewed").views["question"].shape == (4, DIMENSION) and server.inputs == []

        generation = store.version("viewed").generation
        reweighted = replace(viewed, views=(VIEWS[0], replace(VIEWS[1], weight=0.5)), fusion="max")
        run, plan = publish(store, reweighted, asked[1:])  # ranking settings change: no vector is rewritten
        assert (plan.has_changes, run.requested, server.inputs) == (False, 0, [])
        stored = store.version("viewed")
        assert stored.generation == generation + 1 and stored.to_model_version() == replace(reweighted, settings=stored.settings)
        assert stored.ranking == {"fusion": "max", "views": [["qa", QA, 1.0], ["question", "{question}", 0.5]]}


def test_memory_ranking_fuses_views_as_declared(server: FaultServer, tmp_path: Path) -> None:
    _, viewed = versions(server)
    templates = [make_template(n) for n in range(1, 13)]
    url = str(tmp_path / "store.db")
    for fusion, lexical in (("sum", None), ("max", None), ("sum", LexicalSignal("char_ngrams", 0.5))):
        version = replace(viewed, key=f"viewed-{fusion}{'-chars' if lexical else ''}", fusion=fusion, lexical=lexical)
        with open_store(url) as store:
            publish(store, version, templates)
            snapshot = store.snapshot(version.key)
        retriever = TemplateRetriever.load(url, version.key, mode="memory")
        embedder = retriever.index.embedder
        chars = CharNgramIndex([f"{t.subcategory} {t.question} {t.answer}" for t in snapshot.templates])
        for text in QUERIES:
            query = embedder.embed_query(text)
            qa, question = snapshot.matrix @ query, snapshot.views["question"] @ query
            expected = qa + 0.25 * question if fusion == "sum" else np.maximum(qa, 0.25 * question)
            if lexical:
                expected = expected + 0.5 * scaled(chars.scores(text))
            order = sorted(range(len(expected)), key=lambda i: (-expected[i], i))[:3]
            hits = retriever.search(text, top_k=3)
            assert [h.template_id for h in hits] == [snapshot.columns["template_id"][i] for i in order]
            assert [h.score for h in hits] == pytest.approx([float(expected[i]) for i in order], abs=1e-6)


@pytest.mark.parametrize("mode", ["memory", "database"])
def test_a_reload_swaps_in_an_index_whose_lexical_signal_is_built(server: FaultServer, mode: str, request) -> None:
    _, viewed = versions(server)
    version = replace(viewed, key="viewed-chars", lexical=LexicalSignal("char_ngrams", 0.5))
    url = request.getfixturevalue("postgres_store_url" if mode == "database" else "sqlite_store_url")
    templates = [make_template(n) for n in range(1, 13)]
    with open_store(url) as store:
        publish(store, version, templates)
    retriever = TemplateRetriever.load(url, version.key, mode=mode)
    try:
        def signal():
            index = retriever.index
            return index._signal if mode == "memory" else index._signal[1]

        assert not signal().built  # loading stays as fast as reading the rows
        with open_store(url) as store:
            publish(store, version, [*templates[:-1], replace(templates[-1], answer="Новый ответ.")])
        assert retriever.reload_if_changed()
        assert signal().built  # built before the swap: no query waits for it
        assert [h.template_id for h in retriever.search("Новый ответ", top_k=1)] == ["T-12"]
    finally:
        retriever.close()


def downgrade_to_schema_1(path: Path) -> None:
    """The store as this software wrote it before views: no template_views table, no ranking column."""
    conn = sqlite3.connect(path)
    conn.executescript(
        "DROP TABLE template_views; ALTER TABLE model_versions DROP COLUMN ranking; "
        "UPDATE store_meta SET value = '1' WHERE key = 'schema_version';"
    )
    conn.close()


def test_a_schema_1_store_keeps_serving_and_its_first_writer_upgrades_it_without_re_embedding(
    server: FaultServer, tmp_path: Path
) -> None:
    single, _ = versions(server)
    templates = [make_template(n) for n in range(1, 6)]
    path = tmp_path / "store.db"
    with SqliteStore(path) as store:
        publish(store, single, templates)
        before = store.snapshot("single")
    served = TemplateRetriever.load(str(path), mode="memory").search("Вопрос номер 3", top_k=3)
    downgrade_to_schema_1(path)

    with open_store(path, create=False) as reader:  # a reader cannot upgrade, and need not
        old = reader.snapshot("single")
        assert (old.version.ranking, old.views) == ({}, {})
        assert np.array_equal(old.matrix, before.matrix) and old.columns == before.columns
    retriever = TemplateRetriever.load(str(path), mode="memory")
    assert retriever.search("Вопрос номер 3", top_k=3).hits == served.hits

    server.reset()
    with SqliteStore(path) as store:  # the first writer upgrades in place
        run, plan = publish(store, single, templates)
        assert (plan.has_changes, run.embedded, server.inputs) == (False, 0, [])
        after = store.snapshot("single")
    assert np.array_equal(after.matrix, before.matrix) and after.columns == before.columns
    assert after.version.fingerprint == before.version.fingerprint == single.fingerprint()
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT value FROM store_meta WHERE key = 'schema_version'").fetchone() == ("3",)
    assert conn.execute("SELECT count(*) FROM template_views").fetchone() == (0,)


def test_memory_and_database_modes_rank_a_multi_view_store_alike(server: FaultServer, postgres_store_url: str) -> None:
    _, viewed = versions(server)
    templates = [make_template(n) for n in range(1, 13)]
    for fusion, lexical in (("sum", None), ("max", None), ("sum", LexicalSignal("char_ngrams", 0.5))):
        version = replace(viewed, key=f"viewed-{fusion}{'-chars' if lexical else ''}", fusion=fusion, lexical=lexical)
        with open_store(postgres_store_url) as store:
            publish(store, version, templates)
        memory = TemplateRetriever.load(postgres_store_url, version.key, mode="memory")
        database = TemplateRetriever.load(
            postgres_store_url, version.key, mode="database", embedder=memory.index.embedder
        )
        try:
            for text in QUERIES:
                in_memory, in_database = memory.search(text, top_k=5), database.search(text, top_k=5)
                assert [h.template_id for h in in_database] == [h.template_id for h in in_memory]
                assert [h.score for h in in_database] == pytest.approx([h.score for h in in_memory], abs=1e-5)
            filtered = database.search("номер", top_k=2, subcategory="Подкатегория 4")
            assert [h.template_id for h in filtered] == ["T-4"]
        finally:
            database.close()


def test_a_schema_1_postgres_store_keeps_serving_and_is_upgraded_in_place(
    server: FaultServer, postgres_store_url: str
) -> None:
    import psycopg2

    from embedding_assets.store.urls import connection_settings

    single, _ = versions(server)
    templates = [make_template(n) for n in range(1, 6)]
    with open_store(postgres_store_url) as store:
        publish(store, single, templates)
        before = store.snapshot("single")
    dsn, schema = connection_settings(postgres_store_url)
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute(
            f'DROP TABLE "{schema}".template_views; ALTER TABLE "{schema}".model_versions DROP COLUMN ranking; '
            f"UPDATE \"{schema}\".store_meta SET value = '1' WHERE key = 'schema_version'"
        )
    with open_store(postgres_store_url, create=False) as reader:
        old = reader.snapshot("single")
        assert np.array_equal(old.matrix, before.matrix) and old.columns == before.columns
        assert [t.template_id for t, _ in reader.search("single", old.matrix[2], 1)] == ["T-3"]

    server.reset()
    with open_store(postgres_store_url) as store:
        run, plan = publish(store, single, templates)
        assert (plan.has_changes, run.embedded, server.inputs) == (False, 0, [])
        assert np.array_equal(store.snapshot("single").matrix, before.matrix)
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute(f"SELECT value FROM \"{schema}\".store_meta WHERE key = 'schema_version'")
        assert cur.fetchone() == ("3",)
        cur.execute(f'SELECT count(*) FROM "{schema}".template_views')
        assert cur.fetchone() == (0,)
