"""Rollback: a version's earlier generations stay restorable, exactly, and old ones are pruned by retention."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import dagster as dg
import numpy as np
import pytest

from embedding_assets.definitions import defs
from embedding_assets.defs.io_managers import verify_published
from embedding_assets.defs.jobs import build_embed_faq_job
from embedding_assets.defs.resources import FaqWorkbook, StoreResource
from embedding_assets.defs.schedules import build_store_verification
from embedding_assets.lib.faq import parse_faq
from embedding_assets.lib.embedders import embed_with_cache, embedder_for
from embedding_assets.lib.hashing import hash_version_templates
from embedding_assets.lib.model_versions import ModelVersion, ModelVersionCatalog, View
from embedding_assets.lib.plan import build_change_plan
from embedding_assets.lib.version_table import template_vectors
from embedding_assets.retrieval import TemplateRetriever
from embedding_assets.store import NothingToRollBackError, StalePlanError, StoreError, StoreSnapshot, open_store
from embedding_assets.store.urls import connection_settings
from embedding_assets_tests.conftest import SAMPLE_FAQ, cli_project, make_template, read_rows, write_rows
from embedding_assets_tests.openai_servers import FaultServer
from embedding_assets_tests.test_store_contract import V4, vector_for
from embedding_assets_tests.test_store_contract import publish as contract_publish

CLI = str(Path(sys.executable).parent / "embedding-assets")
DIMENSION = 8
QA = "{subcategory}: {question}\n{answer}"
KEPT_TABLES = ("kept_versions", "kept_changes", "kept_templates", "kept_template_views")


@pytest.fixture(scope="module")
def server():
    api = FaultServer(dimension=DIMENSION).start()
    yield api
    api.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    return request.getfixturevalue("postgres_url")


def versions(server: FaultServer) -> tuple[ModelVersion, ModelVersion]:
    settings = {"base_url": server.base_url, "concurrency": 1, "max_attempts": 2, "backoff_initial": 0.01}
    single = ModelVersion("single", "openai", "fake", DIMENSION, text_template=QA, settings=settings)
    viewed = replace(single, key="viewed", views=(View("qa", QA, 1.0), View("question", "{question}", 0.25)))
    return single, viewed


def publish(store, version: ModelVersion, templates) -> int:
    """Plan, embed through the cache and publish, as the pipeline does; the published generation."""
    stored, published = store.published(version.key)
    plan = build_change_plan(
        hash_version_templates(templates, version), published, model_version=version.key,
        base_generation=stored.generation if stored else None,
    )
    run = embed_with_cache(
        plan.texts_to_embed(), version=version, embedder=embedder_for(version, api_key=""), cache=store.cache(version)
    )
    vectors = {i.content_hash: template_vectors(i, run.vectors) for i in (*plan.new, *plan.modified)}
    return store.publish(version, plan, vectors).generation


def first_templates() -> list:
    return [make_template(n) for n in range(1, 7)]


def edited_templates() -> list:
    """T-2's answer rewritten, T-3's audience changed (no re-embed), T-6 deleted, T-7 added."""
    edited = first_templates()[:5] + [make_template(7)]
    edited[1] = replace(edited[1], answer="Совсем другой ответ про вклады.")
    edited[2] = replace(edited[2], audience="только новые клиенты")
    return edited


def assert_restored(after: StoreSnapshot, before: StoreSnapshot) -> None:
    """The same rows and byte-identical vectors and views; the version's record differs only in its generation."""
    assert after.templates == before.templates
    assert after.matrix.tobytes() == before.matrix.tobytes()
    assert sorted(after.views) == sorted(before.views)
    for name, matrix in before.views.items():
        assert after.views[name].tobytes() == matrix.tobytes()
    assert replace(after.version, generation=before.version.generation, published_at=before.version.published_at) == (
        before.version
    )


def hits(retriever: TemplateRetriever, text: str) -> list[tuple[str, str, float]]:
    return [(h.template_id, h.answer, h.score) for h in retriever.search(text, top_k=3)]


def test_rollback_restores_the_previous_rows_and_vectors_as_a_new_generation(server, store_url: str) -> None:
    for version in versions(server):
        with open_store(store_url) as store:
            first = publish(store, version, first_templates())
            before = store.snapshot(version.key)
        original = TemplateRetriever.load(store_url, version.key, mode="memory")
        answers_before = hits(original, "Ответ номер 2")
        retriever = TemplateRetriever.load(store_url, version.key, mode="memory")
        with open_store(store_url) as store:
            second = publish(store, version, edited_templates())
            assert store.restorable()[version.key] == [first]
        # Only what the publish replaced is kept: T-2, T-3 and T-6 as they were, and T-7's id (it had no row).
        views = 3 if version.views else 0
        assert kept_rows(store_url) == {
            "kept_versions": 1, "kept_changes": 4, "kept_templates": 3, "kept_template_views": views,
        }
        assert retriever.reload_if_changed()
        assert hits(retriever, "Ответ номер 2") != answers_before

        with open_store(store_url) as store:
            result = store.rollback(version.key)
            after = store.snapshot(version.key)
            assert (result.restored_generation, result.replaced_generation) == (first, second)
            assert result.generation == after.store_generation == store.generation() == second + 1
            assert after.version.generation == second + 1
            assert (result.rows, result.restorable, result.is_current) == (6, [], version.key == "single")
            assert store.restorable()[version.key] == []
        assert_restored(after, before)
        assert len(after) == 6 and after.views.keys() == ({"question"} if version.views else set())
        assert retriever.reload_if_changed()
        assert hits(retriever, "Ответ номер 2") == answers_before
        assert retriever.info()["generation"] == second + 1


def test_a_publish_after_a_rollback_diffs_against_the_restored_rows(server, store_url: str) -> None:
    single, _ = versions(server)
    with open_store(store_url) as store:
        publish(store, single, first_templates())
        publish(store, single, edited_templates())
        store.rollback(single.key)
        server.reset()
        publish(store, single, edited_templates())  # the edit again: T-2 and T-7 come from the cache
        assert server.inputs == []
        assert sorted(t.template_id for t in store.snapshot().templates) == ["T-1", "T-2", "T-3", "T-4", "T-5", "T-7"]


def test_each_rollback_goes_one_generation_further_back(server, tmp_path: Path) -> None:
    single, _ = versions(server)
    answers = ["первый", "второй", "третий"]
    with open_store(tmp_path / "store.db") as store:
        store.keep_generations = 3
        snapshots = []
        for answer in answers:
            publish(store, single, [make_template(1, answer=answer), make_template(2)])
            snapshots.append(store.snapshot())
        assert store.restorable() == {"single": [2, 1]}
        second = store.rollback("single")
        assert (second.restored_generation, second.generation, second.restorable) == (2, 4, [1])
        assert_restored(store.snapshot(), snapshots[1])
        first = store.rollback("single")
        assert (first.restored_generation, first.generation, first.restorable) == (1, 5, [])
        assert_restored(store.snapshot(), snapshots[0])
        with pytest.raises(NothingToRollBackError):
            store.rollback("single")


def kept_rows(store_url: str) -> dict[str, int]:
    """Rows in each table of kept generations, read with the backend's own client."""
    counts = {}
    for table in KEPT_TABLES:
        if store_url.startswith("sqlite:"):
            with sqlite3.connect(store_url.removeprefix("sqlite:///")) as conn:
                counts[table] = conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
        else:
            import psycopg2

            dsn, schema = connection_settings(store_url)
            with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
                cur.execute(f'SELECT count(*) FROM "{schema}".{table}')
                counts[table] = cur.fetchone()[0]
    return counts


def test_retention_keeps_exactly_the_newest_generations_and_leaves_the_cache(
    server, store_url: str, monkeypatch
) -> None:
    _, viewed = versions(server)

    def generation(n: int) -> list:
        return [make_template(1, answer=f"Ответ поколения {n}."), make_template(2)]

    with open_store(store_url) as store:
        snapshots = {}
        for n in range(1, 6):
            assert publish(store, viewed, generation(n)) == n
            snapshots[n] = store.snapshot()
        assert store.restorable() == {"viewed": [4, 3]}  # the default keeps two earlier generations
        assert kept_rows(store_url) == dict.fromkeys(KEPT_TABLES, 2)  # T-1 as generations 4 and 3 had it
        texts = [h for n in range(1, 6) for i in hash_version_templates(generation(n), viewed) for h in i.vector_hashes()]
        # T-1's five answers (view qa), its question, and T-2's two views: retention deletes no cache entry
        assert len(store.cache(viewed).get(texts)) == len(set(texts)) == 5 + 1 + 2

        monkeypatch.setenv("EMBEDDING_ASSETS_KEEP_GENERATIONS", "1")
        assert publish(store, viewed, generation(6)) == 6
        assert store.restorable() == {"viewed": [5]}
        assert kept_rows(store_url) == dict.fromkeys(KEPT_TABLES, 1)
        monkeypatch.setenv("EMBEDDING_ASSETS_KEEP_GENERATIONS", "3")
        assert publish(store, viewed, generation(7)) == 7
        assert store.restorable() == {"viewed": [6, 5]}
        assert (store.rollback("viewed").restored_generation, store.rollback("viewed").restored_generation) == (6, 5)
        assert_restored(store.snapshot(), snapshots[5])

        monkeypatch.setenv("EMBEDDING_ASSETS_KEEP_GENERATIONS", "0")
        publish(store, viewed, generation(8))
        assert store.restorable() == {"viewed": []}
        assert kept_rows(store_url) == dict.fromkeys(KEPT_TABLES, 0)

        monkeypatch.setenv("EMBEDDING_ASSETS_KEEP_GENERATIONS", "two")
        with pytest.raises(StoreError) as bad:
            publish(store, viewed, generation(9))
        assert str(bad.value) == (
            "EMBEDDING_ASSETS_KEEP_GENERATIONS must be a whole number of generations (0 or more), got 'two'"
        )


def test_a_forced_rebuild_rolls_back_to_the_exact_vectors_it_replaced(store_url: str) -> None:
    """A rebuild re-embeds the same texts (same content hashes) to new vectors; rollback brings the old bytes back."""
    templates = [make_template(n) for n in range(1, 5)]
    with open_store(store_url) as store:
        contract_publish(store, V4, templates, {t.template_id: vector_for(n) for n, t in enumerate(templates)})
        before = store.snapshot()
        rebuilt = {t.template_id: vector_for(n, salt=1) for n, t in enumerate(templates)}
        contract_publish(store, V4, templates[:3], rebuilt, rebuild=True)
        assert kept_rows(store_url)["kept_templates"] == 4 and len(store.snapshot()) == 3
        store.rollback(V4.key)
        assert_restored(store.snapshot(), before)


def store_fingerprint(store_url: str) -> str:
    """A digest of the whole store: its files' bytes (SQLite), or every row of every table (PostgreSQL)."""
    digest = hashlib.sha256()
    if store_url.startswith("sqlite:"):
        path = Path(store_url.removeprefix("sqlite:///"))
        for file in sorted(path.parent.glob(f"{path.name}*")):
            if not file.name.endswith(".lock"):
                digest.update(file.name.encode() + file.read_bytes())
        return digest.hexdigest()
    import psycopg2

    dsn, schema = connection_settings(store_url)
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT tablename FROM pg_tables WHERE schemaname = %s ORDER BY tablename", (schema,))
        for (table,) in cur.fetchall():
            cur.execute(f'SELECT * FROM "{schema}"."{table}" ORDER BY 1, 2')
            digest.update(table.encode() + repr(cur.fetchall()).encode())
    return digest.hexdigest()


def test_rollback_of_a_version_with_one_generation_refuses_and_changes_nothing(server, store_url: str) -> None:
    single, _ = versions(server)
    with open_store(store_url) as store:
        publish(store, single, first_templates())
    unchanged = store_fingerprint(store_url)
    with open_store(store_url) as store:
        with pytest.raises(NothingToRollBackError) as refused:
            store.rollback("single")
        assert str(refused.value) == (
            f"{store.location}: model version 'single' has no earlier generation to roll back to: none before "
            "generation 1 is kept (EMBEDDING_ASSETS_KEEP_GENERATIONS=2); nothing was changed"
        )
        with pytest.raises(StoreError) as unknown:
            store.rollback("nope")
        assert str(unknown.value) == f"{store.location}: model version 'nope' has not been published (published: single)"
    assert store_fingerprint(store_url) == unchanged


def test_pruning_a_version_deletes_its_kept_generations(server, tmp_path: Path) -> None:
    single, viewed = versions(server)
    url = f"sqlite:///{tmp_path / 'store.db'}"
    with open_store(url) as store:
        publish(store, single, first_templates())
        publish(store, viewed, first_templates())
        publish(store, viewed, edited_templates())
        publish(store, viewed, first_templates())
        store.rollback("viewed")
        assert store.restorable() == {"single": [], "viewed": [2]}
        store.prune("viewed")
        assert store.restorable() == {"single": []}
    assert kept_rows(url) == dict.fromkeys(KEPT_TABLES, 0)
    with sqlite3.connect(url.removeprefix("sqlite:///")) as conn:
        assert conn.execute("SELECT key FROM store_meta ORDER BY key").fetchall() == [
            ("current_version",), ("generation",), ("schema_version",), ("store_id",)
        ]


def downgrade_to_schema_2(store_url: str) -> None:
    """The store as this software wrote it before kept generations: no kept_* tables."""
    drop = "; ".join(f"DROP TABLE {{schema}}{table}" for table in reversed(KEPT_TABLES))
    if store_url.startswith("sqlite:"):
        with sqlite3.connect(store_url.removeprefix("sqlite:///")) as conn:
            conn.executescript(drop.format(schema="") + "; UPDATE store_meta SET value = '2' WHERE key = 'schema_version';")
        return
    import psycopg2

    dsn, schema = connection_settings(store_url)
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute(
            drop.format(schema=f'"{schema}".')
            + f"; UPDATE \"{schema}\".store_meta SET value = '2' WHERE key = 'schema_version'"
        )


def schema_version(store_url: str) -> str:
    with open_store(store_url, create=False) as store, store._read() as session:
        return session.meta("schema_version")


def test_a_schema_2_store_keeps_serving_and_its_first_writer_makes_it_restorable(server, store_url: str) -> None:
    single, _ = versions(server)
    with open_store(store_url) as store:
        publish(store, single, first_templates())
        before = store.snapshot()
    downgrade_to_schema_2(store_url)
    with open_store(store_url, create=False) as reader:  # a reader cannot upgrade, and need not
        assert reader.restorable() == {"single": []}
        assert reader.snapshot().matrix.tobytes() == before.matrix.tobytes()
    assert schema_version(store_url) == "2"

    with open_store(store_url) as store:  # the first writer upgrades in place
        assert schema_version(store_url) == "3"
        with pytest.raises(NothingToRollBackError):
            store.rollback("single")
        publish(store, single, edited_templates())
        assert store.restorable() == {"single": [1]}
        store.rollback("single")
        assert_restored(store.snapshot(), before)


def test_the_rollback_job_restores_the_previous_generation(server, tmp_path: Path, monkeypatch) -> None:
    single, _ = versions(server)
    url = f"sqlite:///{tmp_path / 'store.db'}"
    with open_store(url) as store:
        publish(store, single, first_templates())
        before = store.snapshot()
        publish(store, single, edited_templates())
    monkeypatch.setenv("EMBEDDING_ASSETS_STORE", url)
    job = defs().resolve_job_def("rollback_model_version")

    result = job.execute_in_process(
        run_config={"ops": {"rollback_version": {"config": {"model_version": "single"}}}},
        instance=dg.DagsterInstance.ephemeral(),
    )

    assert result.success and result.output_for_node("rollback_version") == 3
    (materialization,) = [e for e in result.all_node_events if e.event_type_value == "STEP_OUTPUT"]
    metadata = {k: v.value for k, v in materialization.step_output_data.metadata.items()}
    assert metadata == {
        "model_version": "single", "store_generation": 3, "restored_generation": 1, "replaced_generation": 2,
        "rows": 6, "still_restorable": "none",
    }
    with open_store(url, create=False) as store:
        assert_restored(store.snapshot(), before)
    refused = job.execute_in_process(
        run_config={"ops": {"rollback_version": {"config": {"model_version": "single"}}}},
        instance=dg.DagsterInstance.ephemeral(),
        raise_on_error=False,
    )
    assert not refused.success
    assert "'single' has no earlier generation to roll back to" in str(refused.all_events)


@pytest.fixture
def project(tmp_path: Path):
    """The sample FAQ, an `openai` model version on a fault server, a store and a DAGSTER_HOME, for the CLI."""
    api = FaultServer(dimension=DIMENSION).start()
    yield cli_project(
        tmp_path,
        f'[[model_version]]\nkey = "fake-v1"\nprovider = "openai"\nmodel = "fake-embed"\ndimension = {DIMENSION}\n'
        f'batch_size = 50\nsettings = {{ base_url = "{api.base_url}", concurrency = 1, max_attempts = 1 }}\n',
    )
    api.stop()


def cli(project, *args: str) -> subprocess.CompletedProcess:
    cwd, env = project
    return subprocess.run([CLI, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_versions_rollback_after_a_real_materialize(project) -> None:
    cwd, _ = project
    assert cli(project, "materialize").returncode == 0
    with open_store(cwd / "store.db", create=False) as store:
        before = store.snapshot("fake-v1")
    rows = read_rows(cwd / "faq.xlsx")
    header, first = rows[0], rows[1]
    first[header.index("Шаблонный ответ")] = "Ответ, которого раньше не было."
    write_rows(cwd / "faq.xlsx", rows)
    assert cli(project, "materialize").returncode == 0
    listed = json.loads(cli(project, "versions", "list", "--json").stdout)
    assert [(v["model_version"], v["generation"], v["restorable"]) for v in listed] == [("fake-v1", 2, 1)]
    assert cli(project, "versions", "list").stdout.splitlines()[0].split()[-2:] == ["restorable", "current"]

    done = cli(project, "versions", "rollback", "fake-v1", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {
        "model_version": "fake-v1", "generation": 3, "restored_generation": 1, "replaced_generation": 2,
        "rows": len(before), "restorable": [], "current": True, "rolled_back": True,
    }
    with open_store(cwd / "store.db", create=False) as store:
        assert_restored(store.snapshot("fake-v1"), before)

    refused = cli(project, "versions", "rollback", "fake-v1")
    assert refused.returncode == 1 and refused.stdout == ""
    assert refused.stderr.strip() == (
        f"Error: {cwd / 'store.db'}: model version 'fake-v1' has no earlier generation to roll back to: none before "
        "generation 3 is kept (EMBEDDING_ASSETS_KEEP_GENERATIONS=2); nothing was changed"
    )
    as_json = cli(project, "versions", "rollback", "fake-v1", "--json")
    assert as_json.returncode == 1 and json.loads(as_json.stdout)["rolled_back"] is False


def test_versions_rollback_waits_for_the_writer_lock_like_a_publish(server, tmp_path: Path) -> None:
    single, _ = versions(server)
    url = f"sqlite:///{tmp_path / 'store.db'}"
    with open_store(url) as store:
        publish(store, single, first_templates())
        publish(store, single, edited_templates())
        env = {**os.environ, "EMBEDDING_ASSETS_STORE": url}
        with store.writer_lock("single", timeout=1):
            busy = subprocess.run([CLI, "versions", "rollback", "single", "--lock-timeout", "0.2"], env=env,
                                  capture_output=True, text=True, timeout=60)
        assert busy.returncode == 1
        assert "model version 'single' is being written by another run" in busy.stderr
        assert store.restorable() == {"single": [1]} and store.generation() == 2


def test_the_nightly_verification_leaves_a_rollback_as_it_is_until_the_next_publish(server, tmp_path: Path) -> None:
    single, _ = versions(server)
    settings = ", ".join(f"{name} = {json.dumps(value)}" for name, value in single.settings.items())
    catalog_path = tmp_path / "model_versions.toml"
    catalog_path.write_text(
        f'[[model_version]]\nkey = "single"\nprovider = "openai"\nmodel = "fake"\ndimension = {DIMENSION}\n'
        f"text_template = {json.dumps(QA)}\nsettings = {{ {settings} }}\n",
        encoding="utf-8",
    )
    catalog = ModelVersionCatalog.load(str(catalog_path))
    verification = build_store_verification(build_embed_faq_job(catalog), catalog, "0 3 * * *", "UTC")
    rows = read_rows(SAMPLE_FAQ)
    faq = write_rows(tmp_path / "faq.xlsx", rows)
    store_path = tmp_path / "store.db"
    context = dg.build_schedule_context(
        resources={"faq": FaqWorkbook(path=str(faq)), "store": StoreResource(url=str(store_path))}
    )
    with open_store(store_path) as store:
        publish(store, single, parse_faq(faq))
        rows[1][rows[0].index("Шаблонный ответ")] = "Карту можно заказать только в отделении банка."
        write_rows(faq, rows)  # the FAQ edit, then its run
        publish(store, single, parse_faq(faq))
        assert verification(context).skip_message == "store verified: single: 90 rows match the FAQ"

        store.rollback("single")
        assert store.rolled_back("single") == 3
        assert not verify_published(store, single, parse_faq(faq)).healthy  # unlike the FAQ, on purpose
        assert verification(context).skip_message == (
            "store verified: single: generation 3 is a rollback, left as it is until the next publish"
        )

        publish(store, single, parse_faq(faq))  # the next run (say, after the FAQ is fixed) publishes the FAQ again
        assert store.rolled_back("single") is None
        assert verification(context).skip_message == "store verified: single: 90 rows match the FAQ"


def test_a_run_planned_before_a_rollback_does_not_overwrite_it(server, tmp_path: Path) -> None:
    single, _ = versions(server)
    with open_store(tmp_path / "store.db") as store:
        publish(store, single, first_templates())
        publish(store, single, edited_templates())
        stored, published = store.published("single")
        later = [*edited_templates()[:3], make_template(4, answer="Новый ответ."), *edited_templates()[4:]]
        plan = build_change_plan(
            hash_version_templates(later, single), published, model_version="single",
            base_generation=stored.generation,
        )
        run = embed_with_cache(
            plan.texts_to_embed(), version=single, embedder=embedder_for(single, api_key=""), cache=store.cache(single)
        )
        vectors = {i.content_hash: template_vectors(i, run.vectors) for i in (*plan.new, *plan.modified)}
        store.rollback("single")
        restored = store.snapshot()
        with pytest.raises(StalePlanError) as stale:
            store.publish(single, plan, vectors)
        assert "another run published generation 3 after this change plan was made (generation 2)" in str(stale.value)
        assert_restored(store.snapshot(), restored)
        assert store.snapshot().store_generation == 3
