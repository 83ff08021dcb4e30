"""Model versions side by side: build beside the current one, promote in one step, prune, drift guard."""

from __future__ import annotations

import json
import os
import subprocess
import threading
from pathlib import Path

import dagster as dg
import numpy as np
import pytest

from embedding_assets.definitions import defs
from embedding_assets.lib.model_versions import ModelVersion
from embedding_assets.retrieval import TemplateRetriever
from embedding_assets.store import StoreError, open_store
from embedding_assets_tests.pipeline import KEY, failure_message
from embedding_assets_tests.test_cli import CLI
from embedding_assets_tests.test_sqlite_store import BASE, BASE_VECTORS, _publish, _template

V1 = ModelVersion(key="mini-v1", provider="local", model="mini", dimension=4)
WIDE = ModelVersion(key="wide-v2", provider="openai", model="bge-m3", dimension=1024)
QUESTIONS_KEY = "e5-small-questions-v1"
TWO_VERSIONS = f"""
[[model_version]]
key = "{KEY}"
provider = "local"
model = "multilingual-e5-small"
dimension = 384
text_template = "{{subcategory}}: {{question}}\\n{{answer}}"
settings = {{ variant = "original" }}

[[model_version]]
key = "{QUESTIONS_KEY}"
provider = "local"
model = "multilingual-e5-small"
dimension = 384
text_template = "{{question}}"
settings = {{ variant = "original" }}
"""


def _wide_vectors(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {tid: v / np.linalg.norm(v) for tid, v in zip(BASE_VECTORS, rng.normal(size=(3, 1024)).astype(np.float32))}


@pytest.fixture
def store(tmp_path: Path):
    with open_store(tmp_path / "store.db") as opened:
        yield opened


# --- the store ------------------------------------------------------------------------------------


def test_promote_switches_current_version_and_bumps_generation(store) -> None:
    _publish(store, V1, BASE, BASE_VECTORS)
    _publish(store, WIDE, BASE, _wide_vectors(1))
    assert (store.current_version(), store.generation()) == ("mini-v1", 2)

    info = store.promote("wide-v2")

    assert (info.key, info.rows, info.dimension, info.is_current) == ("wide-v2", 3, 1024, True)
    assert (store.current_version(), store.generation()) == ("wide-v2", 3)
    snapshot = store.snapshot()
    assert (snapshot.version.key, snapshot.matrix.shape) == ("wide-v2", (3, 1024))
    assert store.snapshot("mini-v1").matrix.shape == (3, 4)


def test_promoting_the_current_version_changes_nothing(store) -> None:
    _publish(store, V1, BASE, BASE_VECTORS)
    assert store.promote("mini-v1").is_current
    assert store.generation() == 1


def test_promote_refuses_a_version_that_was_never_published(store) -> None:
    _publish(store, V1, BASE, BASE_VECTORS)
    with pytest.raises(StoreError, match=r"model version 'wide-v2' has not been published \(published: mini-v1\)"):
        store.promote("wide-v2")
    assert (store.current_version(), store.generation()) == ("mini-v1", 1)


def test_prune_deletes_a_version_with_its_cache_and_leaves_the_others(store) -> None:
    _publish(store, V1, BASE, BASE_VECTORS)
    _publish(store, WIDE, BASE, _wide_vectors(1))
    store.cache(WIDE).put({"extra-hash": _wide_vectors(2)["T-1"]})
    before = store.snapshot("mini-v1")

    assert store.prune("wide-v2") == 3

    assert [v.key for v in store.versions()] == ["mini-v1"]
    assert store.cache(WIDE).get(["extra-hash"]) == {}
    assert store.generation() == 3
    after = store.snapshot("mini-v1")
    assert after.templates == before.templates
    np.testing.assert_array_equal(after.matrix, before.matrix)
    with pytest.raises(StoreError, match="'wide-v2' has not been published"):
        store.snapshot("wide-v2")


def test_prune_refuses_the_current_version(store) -> None:
    _publish(store, V1, BASE, BASE_VECTORS)
    with pytest.raises(StoreError, match=r"'mini-v1' is the current version and cannot be pruned; promote another"):
        store.prune("mini-v1")
    assert store.snapshot().version.rows == 3


def test_a_version_of_another_dimension_publishes_beside_the_current_one(store) -> None:
    _publish(store, V1, BASE, BASE_VECTORS)
    before = store.snapshot("mini-v1")
    _publish(store, WIDE, [*BASE, _template(4)], {**_wide_vectors(3), "T-4": _wide_vectors(4)["T-1"]})

    assert [(v.key, v.dimension, v.rows, v.is_current) for v in store.versions()] == [
        ("mini-v1", 4, 3, True),
        ("wide-v2", 1024, 4, False),
    ]
    assert store.snapshot().version.key == "mini-v1"
    np.testing.assert_array_equal(store.snapshot("mini-v1").matrix, before.matrix)


# --- the pipeline with the real local model -----------------------------------------------------


@pytest.fixture
def two_versions(warm, tmp_path: Path):
    """The warm sample store (v1 published and current), a config declaring a second version, a CLI env."""
    faq, store = warm
    config = tmp_path / "model_versions.toml"
    config.write_text(TWO_VERSIONS, encoding="utf-8")
    env = {
        **os.environ,
        "EMBEDDING_ASSETS_FAQ_PATH": str(faq),
        "EMBEDDING_ASSETS_STORE": f"sqlite:///{store}",
        "EMBEDDING_ASSETS_MODEL_VERSIONS": str(config),
        "DAGSTER_HOME": str(tmp_path / "dagster_home"),
    }
    return store, config, env


def _materialize(env: dict, *args: str) -> subprocess.CompletedProcess:
    """`embedding-assets materialize` in a new process, so the declared versions become its partitions."""
    return _cli(Path(env["DAGSTER_HOME"]).parent, env, "materialize", "--json", *args)


def test_second_version_builds_beside_the_first_which_stays_current_until_promoted(two_versions) -> None:
    store, _, env = two_versions
    with open_store(store) as opened:
        v1_before = opened.snapshot(KEY)

    built = _materialize(env, "--model", QUESTIONS_KEY)

    assert built.returncode == 0, built.stderr
    summary = json.loads(built.stdout)
    assert {k: summary[k] for k in ("new", "modified", "deleted", "unchanged", "embedded", "embedding_calls")} == {
        "new": 90, "modified": 0, "deleted": 0, "unchanged": 0, "embedded": 90, "embedding_calls": 3,
    }
    assert (summary["rows"], summary["generation"], summary["current"]) == (90, 2, False)
    with open_store(store) as opened:
        v1_after = opened.snapshot(KEY)
        assert opened.current_version() == KEY
        assert opened.snapshot(QUESTIONS_KEY).version.text_template == "{question}"
    assert v1_after.version == v1_before.version
    np.testing.assert_array_equal(v1_after.matrix, v1_before.matrix)

    retriever = TemplateRetriever.load(store)
    assert retriever.info()["model_version"] == KEY
    assert _cli(store.parent, env, "versions", "promote", QUESTIONS_KEY).returncode == 0
    assert retriever.reload_if_changed()
    assert (retriever.info()["model_version"], retriever.info()["store_generation"]) == (QUESTIONS_KEY, 3)
    assert len(retriever.search("Как заблокировать карту?", top_k=3)) == 3

    rerun = json.loads(_materialize(env).stdout.splitlines()[0])
    assert (rerun["model_version"], rerun["embedded"], rerun["generation"]) == (KEY, 0, 1)
    assert _cli(store.parent, env, "versions", "prune", KEY).stdout.strip() == f"pruned {KEY}: 90 rows removed"
    with open_store(store) as opened:
        assert [v.key for v in opened.versions()] == [QUESTIONS_KEY]


def test_a_reader_sees_one_version_at_a_time_while_another_is_built_and_promoted(two_versions) -> None:
    store, _, env = two_versions
    retriever = TemplateRetriever.load(store)
    expected_ids = {t.template_id for t in retriever.index.snapshot.templates}
    seen: list[tuple[str, int, int]] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            try:
                retriever.reload_if_changed()
                snapshot = retriever.index.snapshot
                hits = retriever.search("Как заблокировать карту?", top_k=3)
                assert {t.template_id for t in snapshot.templates} == expected_ids
                assert len(hits) == 3
                seen.append((snapshot.version.key, snapshot.store_generation, len(snapshot)))
            except BaseException as exc:  # recorded and asserted below
                errors.append(exc)
                return

    reader = threading.Thread(target=poll)
    reader.start()
    try:
        assert _materialize(env, "--model", QUESTIONS_KEY).returncode == 0
        assert _cli(store.parent, env, "versions", "promote", QUESTIONS_KEY).returncode == 0
        waited = threading.Event()
        while not errors and seen[-1][0] != QUESTIONS_KEY and not waited.wait(0.05):
            pass
    finally:
        stop.set()
        reader.join(timeout=30)

    assert errors == []
    keys = [key for key, _, _ in seen]
    switch = keys.index(QUESTIONS_KEY)
    assert set(keys[:switch]) == {KEY} and set(keys[switch:]) == {QUESTIONS_KEY}
    assert {rows for _, _, rows in seen} == {90}
    assert {generation for key, generation, _ in seen if key == KEY} <= {1, 2}
    assert {generation for key, generation, _ in seen if key == QUESTIONS_KEY} == {3}


def test_changed_settings_under_an_old_key_stop_the_run_until_forced(two_versions) -> None:
    store, config, env = two_versions
    config.write_text(TWO_VERSIONS.replace('model = "multilingual-e5-small"', 'model = "multilingual-e5-base"', 1))
    before = store.read_bytes()

    stopped = _materialize(env, "--model", KEY)

    assert stopped.returncode == 1
    assert f"model version '{KEY}' was published with different settings" in stopped.stderr
    assert "model differs (stored 'multilingual-e5-small', configured 'multilingual-e5-base')" in stopped.stderr
    assert "Declare a new model version key for new settings, or rebuild this one with --force" in stopped.stderr
    assert store.read_bytes() == before

    rebuilt = _materialize(env, "--model", KEY, "--force")

    assert rebuilt.returncode == 0, rebuilt.stderr
    summary = json.loads(rebuilt.stdout)
    assert (summary["embedded"], summary["embedding_calls"], summary["rows"], summary["generation"]) == (90, 3, 90, 2)
    with open_store(store) as opened:
        info = opened.version(KEY)
    assert (info.model, info.rows, info.generation, info.fingerprint) == (
        "multilingual-e5-base", 90, 2, opened_fingerprint(config, KEY),
    )


def opened_fingerprint(config: Path, key: str) -> str:
    from embedding_assets.lib.model_versions import load_model_versions

    return next(v for v in load_model_versions(config) if v.key == key).fingerprint()


def test_a_provider_returning_another_dimension_than_declared_is_refused(two_versions) -> None:
    store, config, env = two_versions
    config.write_text(TWO_VERSIONS[: TWO_VERSIONS.rindex("dimension = 384")] + "dimension = 1024"
                      + TWO_VERSIONS[TWO_VERSIONS.rindex("dimension = 384") + len("dimension = 384"):])
    before = store.read_bytes()

    failed = _materialize(env, "--model", QUESTIONS_KEY)

    assert failed.returncode == 1
    assert f"model version '{QUESTIONS_KEY}', batch of 32 text(s): expected dimension 1024, got 384" in failed.stderr
    assert store.read_bytes() == before


def test_a_stored_vector_of_the_wrong_dimension_is_refused_on_load(store, tmp_path: Path) -> None:
    _publish(store, V1, BASE, BASE_VECTORS)
    with open_store(tmp_path / "store.db") as opened:
        opened._conn.execute("UPDATE templates SET vector = zeroblob(12) WHERE template_id = 'T-2'")
    with pytest.raises(StoreError, match="vectors of 'mini-v1' do not all have dimension 4"):
        TemplateRetriever.load(tmp_path / "store.db")


# --- the CLI and the Dagster job ------------------------------------------------------------------


def _cli(cwd: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CLI, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_versions_commands_list_promote_and_prune(store, tmp_path: Path) -> None:
    _publish(store, V1, BASE, BASE_VECTORS)
    _publish(store, WIDE, BASE, _wide_vectors(1))
    env = {**os.environ, "EMBEDDING_ASSETS_STORE": f"sqlite:///{tmp_path / 'store.db'}"}

    listed = json.loads(_cli(tmp_path, env, "versions", "list", "--json").stdout)
    assert [(v["model_version"], v["dimension"], v["rows"], v["generation"], v["current"]) for v in listed] == [
        ("mini-v1", 4, 3, 1, True),
        ("wide-v2", 1024, 3, 2, False),
    ]
    assert set(listed[0]) >= {"provider", "model", "created_at", "published_at"}
    table = _cli(tmp_path, env, "versions", "list").stdout.splitlines()
    assert table[0].split() == ["model_version", "provider", "model", "dimension", "rows", "created_at",
                                "published_at", "generation", "restorable", "current"]
    assert table[1].split()[0] == "mini-v1" and table[1].split()[-1] == "*"

    refused = _cli(tmp_path, env, "versions", "prune", "mini-v1")
    assert refused.returncode == 1
    assert "'mini-v1' is the current version and cannot be pruned" in refused.stderr

    unknown = _cli(tmp_path, env, "versions", "promote", "nope")
    assert unknown.returncode == 1
    assert "model version 'nope' has not been published (published: mini-v1, wide-v2)" in unknown.stderr

    promoted = _cli(tmp_path, env, "versions", "promote", "wide-v2")
    assert promoted.stdout.strip() == "wide-v2 is now the current version (3 rows); it was mini-v1"
    pruned = _cli(tmp_path, env, "versions", "prune", "mini-v1")
    assert pruned.stdout.strip() == "pruned mini-v1: 3 rows removed"
    assert [v["model_version"] for v in json.loads(_cli(tmp_path, env, "versions", "list", "--json").stdout)] == [
        "wide-v2"
    ]


def test_promote_job_switches_the_current_version(store, tmp_path: Path, monkeypatch) -> None:
    _publish(store, V1, BASE, BASE_VECTORS)
    _publish(store, WIDE, BASE, _wide_vectors(1))
    monkeypatch.setenv("EMBEDDING_ASSETS_STORE", f"sqlite:///{tmp_path / 'store.db'}")
    job = defs().resolve_job_def("promote_model_version")

    result = job.execute_in_process(
        run_config={"ops": {"promote_version": {"config": {"model_version": "wide-v2"}}}},
        instance=dg.DagsterInstance.ephemeral(),
    )

    assert result.success
    assert result.output_for_node("promote_version") == "wide-v2"
    assert store.current_version() == "wide-v2"
    failed = job.execute_in_process(
        run_config={"ops": {"promote_version": {"config": {"model_version": "nope"}}}},
        instance=dg.DagsterInstance.ephemeral(),
        raise_on_error=False,
    )
    assert not failed.success
    assert failure_message(failed) == (
        "step promote_version failed: "
        f"{tmp_path / 'store.db'}: model version 'nope' has not been published (published: mini-v1, wide-v2)"
    )
