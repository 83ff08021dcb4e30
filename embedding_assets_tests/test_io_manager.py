"""The store's IO manager owns each model version's slice: same table out as in, rewrites replace, on both backends."""

from __future__ import annotations

from dataclasses import astuple
from pathlib import Path

import dagster as dg
import numpy as np
import pytest

from embedding_assets.defs.io_managers import (
    EmbeddingStoreIOManager,
    read_version_table,
    unhealthy_published_ids,
    verify_published,
    write_version_table,
)
from embedding_assets.lib.hashing import hash_templates
from embedding_assets.lib.model_versions import ModelVersion
from embedding_assets.lib.plan import StoredTemplate
from embedding_assets.lib.version_table import VersionTable
from embedding_assets.store import StalePlanError, StoreError, open_store
from embedding_assets_tests.conftest import SAMPLE_FAQ, make_template, read_rows, write_rows
from embedding_assets_tests.pipeline import run_pipeline

DIMENSION = 8
VERSIONS = {key: ModelVersion(key=key, provider="local", model="test", dimension=DIMENSION) for key in ("a", "b")}
PARTITIONS = dg.StaticPartitionsDefinition(["a", "b"])


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    return request.getfixturevalue("postgres_url")


def vector(seed: str) -> np.ndarray:
    v = np.random.default_rng(abs(hash(seed)) % 2**32).normal(size=DIMENSION).astype(np.float32)
    return v / np.linalg.norm(v)


def table(
    key: str, count: int, *, edited: int | None = None, embedded: set[int] | None = None, base: int | None = None
) -> VersionTable:
    """`count` templates; `edited` gets another answer; vectors only for the `embedded` ones (default: all)."""
    templates = [make_template(n, answer=f"Другой ответ {n}." if n == edited else f"Ответ номер {n}.")
                 for n in range(1, count + 1)]
    hashed = tuple(hash_templates(templates, VERSIONS[key].text_template))
    chosen = set(range(1, count + 1)) if embedded is None else embedded
    vectors = {h.template_id: vector(h.content_hash) for h in hashed if int(h.template_id.split("-")[1]) in chosen}
    return VersionTable(version=VERSIONS[key], templates=hashed, vectors=vectors, base_generation=base)


def store_asset(value: VersionTable | None) -> dg.AssetsDefinition:
    @dg.asset(name="embedding_store", partitions_def=PARTITIONS, io_manager_key="store_io_manager")
    def embedding_store() -> VersionTable:
        return value

    return embedding_store


def materialize(url: str, key: str, value: VersionTable) -> dict:
    """Write one partition through the IO manager as a run does; the IO manager's metadata."""
    result = dg.materialize(
        [store_asset(value)], partition_key=key, resources={"store_io_manager": EmbeddingStoreIOManager(url=url)}
    )
    [event] = result.get_asset_materialization_events()
    return {k: v.value for k, v in event.event_specific_data.materialization.metadata.items()}


def load(url: str, key: str) -> VersionTable:
    """The partition as a downstream asset receives it."""
    received = {}

    @dg.asset(partitions_def=PARTITIONS)
    def reader(embedding_store: VersionTable) -> None:
        received["table"] = embedding_store

    dg.materialize(
        [store_asset(None), reader], partition_key=key, resources={"store_io_manager": EmbeddingStoreIOManager(url=url)},
        selection=[reader],
    )
    return received["table"]


def rows_by_version(url: str) -> dict[str, int]:
    with open_store(url, create=False) as store:
        return {v.key: len(store.snapshot(v.key)) for v in store.versions()}


def assert_same_table(loaded: VersionTable, written: VersionTable) -> None:
    assert loaded.template_ids == sorted(written.template_ids)
    by_id = {t.template_id: t for t in written.templates}
    assert [(t.content_hash, t.text, t.template) for t in loaded.templates] == [
        (by_id[i].content_hash, by_id[i].text, by_id[i].template) for i in loaded.template_ids
    ]
    for template_id, v in written.vectors.items():
        np.testing.assert_allclose(loaded.vectors[template_id], v, rtol=1e-6)


def test_partition_a_then_b_then_a_again_replaces_a_and_never_duplicates(store_url):
    first = materialize(store_url, "a", table("a", 5))
    assert (first["rows"], first["upserted"], first["published"]) == (5, 5, True)
    materialize(store_url, "b", table("b", 3))
    assert rows_by_version(store_url) == {"a": 5, "b": 3}

    # "a" again: one answer edited, one template dropped; only the edited row carries a vector
    again = materialize(store_url, "a", table("a", 4, edited=2, embedded={2}, base=first["generation"]))
    assert (again["rows"], again["upserted"], again["deleted"], again["metadata_updated"]) == (4, 1, 1, 0)
    assert rows_by_version(store_url) == {"a": 4, "b": 3}

    assert_same_table(load(store_url, "a"), table("a", 4, edited=2))
    assert_same_table(load(store_url, "b"), table("b", 3))


def test_the_loaded_table_written_back_is_a_full_rewrite_with_the_same_rows(store_url):
    materialize(store_url, "a", table("a", 4))
    loaded = load(store_url, "a")
    rewritten = materialize(store_url, "a", loaded)
    assert (rewritten["rows"], rewritten["upserted"], rewritten["deleted"]) == (4, 4, 0)
    assert_same_table(load(store_url, "a"), loaded)
    assert rows_by_version(store_url) == {"a": 4}


def test_an_unchanged_table_is_not_written_at_all(store_url):
    materialize(store_url, "a", table("a", 3))
    with open_store(store_url) as store:
        generation = store.generation()
    same = materialize(store_url, "a", table("a", 3, embedded=set(), base=generation))
    assert (same["published"], same["upserted"], same["generation"]) == (False, 0, generation)
    with open_store(store_url) as store:
        assert store.generation() == generation


def test_a_table_planned_before_another_run_published_the_same_content_writes_nothing(store_url):
    materialize(store_url, "a", table("a", 3))
    edited = table("a", 3, edited=1, embedded={1}, base=1)
    materialize(store_url, "a", edited)  # the first of two runs after the same edit
    with open_store(store_url) as store:
        late = write_version_table(store, edited)  # the second, planned against generation 1 too
        assert (late.result.changed, late.result.generation) == (False, 2)
        assert store.generation() == 2


def test_a_table_planned_before_another_run_published_other_content_is_refused_naming_it(store_url):
    materialize(store_url, "a", table("a", 3))
    materialize(store_url, "a", table("a", 3, edited=1, embedded={1}, base=1))
    older = table("a", 3, edited=2, embedded={2}, base=1)
    with open_store(store_url) as store:
        with pytest.raises(StalePlanError) as refused:
            write_version_table(store, older)
        assert str(refused.value) == (
            "model version 'a': another run published generation 2 after this run planned against generation 1, "
            "with other content (2 template(s) differ: T-1, T-2); run the pipeline again (texts already embedded "
            "are cached and are not paid for again)"
        )
        assert store.generation() == 2
    assert_same_table(load(store_url, "a"), table("a", 3, edited=1))


def test_a_changed_row_without_a_vector_is_refused_before_anything_is_written(store_url):
    materialize(store_url, "a", table("a", 3))
    with open_store(store_url) as store:
        with pytest.raises(StoreError, match=r"^model version 'a': no vector for 1 changed template\(s\): T-2$"):
            write_version_table(store, table("a", 3, edited=2, embedded=set(), base=1))
        assert read_version_table(store, "a").template_ids == ["T-1", "T-2", "T-3"]
        assert store.generation() == 1


def test_the_real_chain_materializes_a_then_b_then_a_with_exact_rows(store_url, tmp_path):
    rows = read_rows(SAMPLE_FAQ)[:9]
    faq = write_rows(tmp_path / "faq.xlsx", rows)
    versions = tmp_path / "model_versions.toml"
    versions.write_text(
        "".join(
            f'[[model_version]]\nkey = "{key}"\nprovider = "local"\nmodel = "multilingual-e5-small"\n'
            f'dimension = 384\ntext_template = "{template}"\n'
            for key, template in (("a", "{question}"), ("b", "{subcategory}: {question}"))
        )
    )
    assert run_pipeline(faq, store_url, key="a", model_versions=versions).store["rows"] == 8
    assert run_pipeline(faq, store_url, key="b", model_versions=versions).store["rows"] == 8
    rows[2][3] += " (уточнение)"
    write_rows(faq, rows)
    again = run_pipeline(faq, store_url, key="a", model_versions=versions)
    assert again.result.success
    assert (len(again.embedded_texts), again.store["upserted"], again.store["rows"]) == (1, 1, 8)
    assert rows_by_version(store_url) == {"a": 8, "b": 8}
    assert load(store_url, "a").template_ids == sorted(str(r[0]) for r in rows[1:])


@pytest.mark.parametrize(
    "written, expected",
    [
        (table("a", 3, embedded=set()), {"new": 0, "modified": 0, "deleted": 0, "unchanged": 3}),
        (table("a", 2, edited=1, embedded={1}), {"new": 0, "modified": 1, "deleted": 1, "unchanged": 1}),
        (table("a", 3, embedded={3}), {"new": 0, "modified": 1, "deleted": 0, "unchanged": 2}),  # a carried vector
        (table("a", 4, embedded={4}), {"new": 1, "modified": 0, "deleted": 0, "unchanged": 3}),
    ],
    ids=["same", "edited-and-dropped", "rewritten", "added"],
)
def test_a_table_changes_only_what_differs_from_the_published_slice(written, expected):
    published = {
        t.template_id: StoredTemplate(t.template_id, t.content_hash, *astuple(t.template)[1:])
        for t in table("a", 3).templates
    }
    counts = written.changes(published).counts()
    assert {k: counts[k] for k in expected} == expected


def test_the_checks_read_ids_hashes_and_vectors_alone_on_both_backends(store_url):
    written = table("a", 4)
    materialize(store_url, "a", written)
    with open_store(store_url) as store:
        info, hashes, ids, matrix = store.published_vectors("a")
        assert (info.key, ids) == ("a", ["T-1", "T-2", "T-3", "T-4"])
        assert hashes == store.published_hashes("a")[1] == {t.template_id: t.content_hash for t in written.templates}
        np.testing.assert_array_equal(matrix, written.matrix())
        assert verify_published(store, VERSIONS["a"], [t.template for t in written.templates]).healthy
        assert unhealthy_published_ids(store, "a") == []
        assert store.published_vectors("b")[0] is None
        assert store.published_hashes("b") == (None, {})
