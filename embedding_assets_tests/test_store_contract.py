"""The store contract, run against both backends: a real SQLite file and a real PostgreSQL + pgvector server."""

from __future__ import annotations

import gc
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from embedding_assets.lib.faq import Template
from embedding_assets.lib.hashing import hash_templates
from embedding_assets.lib.model_versions import ModelVersion
from embedding_assets.lib.plan import ChangePlan, PublishedTemplates, StoredTemplate, build_change_plan
from embedding_assets.store import (
    ModelVersionMismatchError,
    PostgresStore,
    SqliteStore,
    StalePlanError,
    StoreError,
    StoreNotFoundError,
    StoreSnapshot,
    StoreState,
    open_store,
    redact_url,
    sqlite_path,
)
from embedding_assets.store.base import mismatch_message
from embedding_assets_tests.conftest import make_template

V4 = ModelVersion(key="mini-v1", provider="local", model="mini", dimension=4, settings={"variant": "test"})
V3 = ModelVersion(key="tiny-v1", provider="local", model="tiny", dimension=3, text_template="{question}")
BACKENDS = {"sqlite": SqliteStore, "postgresql": PostgresStore}


def unit(*values: float) -> np.ndarray:
    vector = np.asarray(values, dtype=np.float32)
    return vector / np.linalg.norm(vector)


def vector_for(n: int, dimension: int = 4, salt: int = 0) -> np.ndarray:
    """A distinct unit vector per (n, salt)."""
    return unit(*np.random.default_rng(n * 7919 + salt).normal(size=dimension))


def plan_for(store, version: ModelVersion, templates: list[Template], *, rebuild: bool = False) -> ChangePlan:
    info, published = store.published(version.key)
    return build_change_plan(
        hash_templates(templates, version.text_template),
        published,
        model_version=version.key,
        base_generation=info.generation if info else None,
        rebuild=rebuild,
    )


def vectors_for(plan: ChangePlan, by_id: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {item.content_hash: by_id[item.template_id] for item in (*plan.new, *plan.modified)}


def publish(store, version: ModelVersion, templates: list[Template], by_id: dict[str, np.ndarray], *, rebuild=False):
    plan = plan_for(store, version, templates, rebuild=rebuild)
    return store.publish(version, plan, vectors_for(plan, by_id))


def stored(template: Template, version: ModelVersion = V4) -> StoredTemplate:
    (hashed,) = hash_templates([template], version.text_template)
    t = template
    return StoredTemplate(t.template_id, hashed.content_hash, t.category, t.subcategory, t.question, t.answer,
                          t.priority, t.audience, t.source_row)


def assert_same_snapshot(a: StoreSnapshot, b: StoreSnapshot) -> None:
    assert a.version == b.version
    assert a.store_generation == b.store_generation
    assert a.templates == b.templates
    np.testing.assert_array_equal(a.matrix, b.matrix)


def raw_row_count(store, key: str) -> int:
    """Rows of a version counted straight from the backend's table, not through the store API."""
    if isinstance(store, SqliteStore):
        return store._conn.execute("SELECT COUNT(*) FROM templates WHERE model_version = ?", (key,)).fetchone()[0]
    with store._transaction() as cur:
        cur.execute(store._sql("SELECT count(*) FROM {schema}.templates WHERE model_version = %s"), (key,))
        return cur.fetchone()[0]


TEN = [make_template(n) for n in range(1, 11)]
TEN_VECTORS = {t.template_id: vector_for(n) for n, t in enumerate(TEN, start=1)}


@pytest.fixture(params=list(BACKENDS))
def store_url(request, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def store(store_url: str):
    with open_store(store_url) as opened:
        yield opened


def test_published_templates_are_untracked_rows_that_plan_as_their_stored_templates_do(store) -> None:
    templates = [make_template(n) for n in range(1, 6)]
    publish(store, V4, templates, {t.template_id: vector_for(n) for n, t in enumerate(templates, start=1)})
    _, published = store.published(V4.key)
    gc.collect()
    assert isinstance(published, PublishedTemplates)
    assert [gc.is_tracked(row) for row in published.rows.values()] == [False] * 5
    assert {tid: published[tid] for tid in published} == {t.template_id: stored(t) for t in templates}
    assert "T-9" not in published and len(published) == 5
    edited = [
        replace(templates[0], answer="Новый ответ."),  # modified
        replace(templates[1], priority="низкий"),  # a field outside the text: metadata only
        *templates[2:4],  # T-5 deleted
        make_template(6),  # new
    ]
    hashed = hash_templates(edited, V4.text_template)
    from_rows = build_change_plan(hashed, published, model_version=V4.key, base_generation=1)
    as_objects = {tid: published[tid] for tid in published}
    assert from_rows == build_change_plan(hashed, as_objects, model_version=V4.key, base_generation=1)
    assert [[i.template_id for i in items] for items in (from_rows.new, from_rows.modified, from_rows.unchanged,
                                                         from_rows.metadata_updated)] + [from_rows.deleted] == [
        ["T-6"], ["T-1"], ["T-2", "T-3", "T-4"], ["T-2"], ["T-5"]]


def test_url_selects_backend_and_new_store_is_empty(store_url: str, store) -> None:
    backend = store_url.split("://", 1)[0]
    assert type(store) is BACKENDS[backend]
    assert (store.generation(), store.current_version(), store.versions()) == (0, None, [])
    assert store.published(V4.key) == (None, {})
    with pytest.raises(StoreError) as exc_info:
        store.snapshot()
    assert str(exc_info.value) == f"{store.location}: no model version has been published yet"
    with pytest.raises(StoreError) as exc_info:
        store.snapshot("nope")
    assert str(exc_info.value) == f"{store.location}: model version 'nope' has not been published"
    if backend == "postgresql":
        assert store.location == redact_url(store_url)
        assert ":***@" in store.location


def test_add_five_modify_two_delete_one(store) -> None:
    first = publish(store, V4, TEN, TEN_VECTORS)
    assert (first.generation, first.rows, first.changed, first.is_current) == (1, 10, True, True)

    modified = {"T-2": "Новый ответ два.", "T-7": "Новый ответ семь."}
    current = [replace(t, answer=modified.get(t.template_id, t.answer)) for t in TEN if t.template_id != "T-4"]
    added = [make_template(n) for n in range(11, 16)]
    current = [*added[:2], *current, *added[2:]]
    plan = plan_for(store, V4, current)
    assert plan.counts() == {"new": 5, "modified": 2, "deleted": 1, "unchanged": 7, "metadata_updated": 0}
    assert plan.deleted == ["T-4"]
    new_vectors = {"T-2": vector_for(2, salt=1), "T-7": vector_for(7, salt=1)}
    new_vectors.update({t.template_id: vector_for(int(t.template_id[2:])) for t in added})
    result = store.publish(V4, plan, vectors_for(plan, new_vectors))

    assert (result.generation, result.rows, result.changed, result.is_current) == (2, 14, True, True)
    assert raw_row_count(store, V4.key) == 14
    snapshot = store.snapshot()
    expected = sorted(current, key=lambda t: t.template_id)
    assert snapshot.templates == [stored(t) for t in expected]
    assert (snapshot.store_generation, snapshot.version.generation, snapshot.version.rows) == (2, 2, 14)
    by_id = {**TEN_VECTORS, **new_vectors}
    np.testing.assert_array_equal(snapshot.matrix, np.stack([by_id[t.template_id] for t in expected]))
    assert snapshot.matrix.dtype == np.float32
    info, published = store.published(V4.key)
    assert info == snapshot.version
    assert published == {t.template_id: stored(t) for t in current}


def test_rematerialization_replaces_and_never_duplicates(store) -> None:
    publish(store, V4, TEN, TEN_VECTORS)
    again = publish(store, V4, TEN, TEN_VECTORS)
    assert (again.generation, again.rows, again.changed) == (1, 10, False)

    rebuilt_vectors = {tid: -v for tid, v in TEN_VECTORS.items()}
    for generation in (2, 3):
        result = publish(store, V4, TEN, rebuilt_vectors, rebuild=True)
        assert (result.generation, result.rows, result.changed) == (generation, 10, True)
        assert raw_row_count(store, V4.key) == 10
    snapshot = store.snapshot()
    assert snapshot.templates == [stored(t) for t in sorted(TEN, key=lambda t: t.template_id)]
    np.testing.assert_array_equal(snapshot.matrix, np.stack([rebuilt_vectors[t.template_id] for t in snapshot.templates]))

    shrunk = publish(store, V4, TEN[:3], rebuilt_vectors, rebuild=True)
    assert shrunk.rows == 3
    assert raw_row_count(store, V4.key) == 3


def test_two_versions_with_different_dimensions_side_by_side(store) -> None:
    four = publish(store, V4, TEN, TEN_VECTORS)
    three_vectors = {t.template_id: vector_for(n, dimension=3) for n, t in enumerate(TEN[:6], start=1)}
    three = publish(store, V3, TEN[:6], three_vectors)
    assert (four.generation, four.is_current, three.generation, three.rows, three.is_current) == (1, True, 2, 6, False)
    assert [(v.key, v.dimension, v.rows, v.generation, v.is_current) for v in store.versions()] == [
        ("mini-v1", 4, 10, 1, True),
        ("tiny-v1", 3, 6, 2, False),
    ]
    small = store.snapshot("tiny-v1")
    assert small.matrix.shape == (6, 3)
    assert small.templates == [stored(t, V3) for t in sorted(TEN[:6], key=lambda t: t.template_id)]
    np.testing.assert_array_equal(small.matrix, np.stack([three_vectors[t.template_id] for t in small.templates]))
    big = store.snapshot()
    assert (big.version.key, big.matrix.shape, big.store_generation) == ("mini-v1", (10, 4), 2)

    changed = publish(store, V3, [replace(TEN[0], question="Другой вопрос?")], {"T-1": unit(1, 2, 3)})
    assert (changed.generation, changed.rows) == (3, 1)
    after = store.snapshot("mini-v1")
    assert after.templates == big.templates
    assert after.version.generation == 1
    np.testing.assert_array_equal(after.matrix, big.matrix)


def test_deletes_propagate(store) -> None:
    publish(store, V4, TEN, TEN_VECTORS)
    kept = [TEN[4]]
    plan = plan_for(store, V4, kept)
    assert plan.deleted == sorted(t.template_id for t in TEN if t is not TEN[4])
    result = store.publish(V4, plan, {})
    assert (result.generation, result.rows) == (2, 1)
    assert raw_row_count(store, V4.key) == 1
    assert [t.template_id for t in store.snapshot().templates] == ["T-5"]
    emptied = publish(store, V4, [], {})
    assert (emptied.generation, emptied.rows) == (3, 0)
    empty = store.snapshot()
    assert (len(empty), empty.matrix.shape) == (0, (0, 4))


def test_field_only_changes_keep_vectors(store) -> None:
    publish(store, V4, TEN, TEN_VECTORS)
    moved = [replace(t, source_row=100 - n, priority="низкий") for n, t in enumerate(TEN)]
    plan = plan_for(store, V4, moved)
    assert (plan.texts_to_embed(), len(plan.metadata_updated)) == ({}, 10)
    assert store.publish(V4, plan, {}).generation == 2
    snapshot = store.snapshot()
    assert snapshot.templates == [stored(t) for t in sorted(moved, key=lambda t: t.template_id)]
    np.testing.assert_array_equal(snapshot.matrix, np.stack([TEN_VECTORS[t.template_id] for t in snapshot.templates]))


def test_cache_is_content_addressed_by_key_and_fingerprint(store) -> None:
    cache = store.cache(V4)
    assert cache.get([]) == {}
    assert cache.get(["a" * 64]) == {}
    cache.put({"h1": TEN_VECTORS["T-1"], "h2": TEN_VECTORS["T-2"]})
    found = store.cache(V4).get(["h1", "h2", "unknown"])
    assert sorted(found) == ["h1", "h2"]
    np.testing.assert_array_equal(found["h1"], TEN_VECTORS["T-1"])
    assert found["h1"].dtype == np.float32
    cache.put({"h1": TEN_VECTORS["T-3"]})
    np.testing.assert_array_equal(store.cache(V4).get(["h1"])["h1"], TEN_VECTORS["T-3"])
    assert store.cache(replace(V4, model="mini-2")).get(["h1"]) == {}
    assert store.cache(replace(V4, settings={"variant": "other"})).get(["h1"]) == {}
    assert store.cache(replace(V4, key="other-v1")).get(["h1"]) == {}
    assert sorted(store.cache(replace(V4, batch_size=2)).get(["h1", "h2"])) == ["h1", "h2"]
    many = {f"h{i:05d}": vector_for(i) for i in range(1500)}
    store.cache(V4).put(many)
    assert len(store.cache(V4).get(list(many))) == 1500
    publish(store, V4, TEN, TEN_VECTORS)
    assert len(store.cache(V4).get(list(many))) == 1500
    assert store.snapshot().version.rows == 10


def test_stale_plan_is_refused_and_nothing_changes(store) -> None:
    publish(store, V4, TEN, TEN_VECTORS)
    stale = plan_for(store, V4, [*TEN, make_template(11)])
    publish(store, V4, TEN[:9], {})
    before = store.snapshot()
    with pytest.raises(StalePlanError) as exc_info:
        store.publish(V4, stale, vectors_for(stale, {"T-11": vector_for(11)}))
    assert str(exc_info.value) == (
        "model version 'mini-v1': another run published generation 2 after this change plan was made "
        "(generation 1) and changed 1 template(s) differently (T-10); run the pipeline again "
        "(texts already embedded are cached and are not paid for again)"
    )
    assert_same_snapshot(before, store.snapshot())
    assert store.generation() == 2


def test_fingerprint_mismatch_is_refused_unless_rebuilt(store) -> None:
    publish(store, V4, TEN, TEN_VECTORS)
    before = store.snapshot()
    changed = replace(V4, model="mini-2")
    plan = plan_for(store, changed, TEN)
    with pytest.raises(ModelVersionMismatchError) as exc_info:
        store.publish(changed, plan, vectors_for(plan, TEN_VECTORS))
    assert str(exc_info.value) == mismatch_message(changed, store.version(V4.key))
    assert_same_snapshot(before, store.snapshot())
    wider = replace(V4, dimension=6)
    wide_vectors = {t.template_id: vector_for(n, dimension=6) for n, t in enumerate(TEN, start=1)}
    result = publish(store, wider, TEN, wide_vectors, rebuild=True)
    assert (result.generation, result.rows) == (2, 10)
    snapshot = store.snapshot()
    assert (snapshot.version.dimension, snapshot.matrix.shape) == (6, (10, 6))


def test_bad_vectors_write_nothing(store) -> None:
    plan = plan_for(store, V4, TEN)
    vectors = vectors_for(plan, TEN_VECTORS)
    del vectors[plan.new[3].content_hash]
    with pytest.raises(StoreError) as exc_info:
        store.publish(V4, plan, vectors)
    assert str(exc_info.value) == "model version 'mini-v1': no vector for 1 changed text(s)"
    vectors = vectors_for(plan, TEN_VECTORS)
    vectors[plan.new[0].content_hash] = np.array([np.nan, 0, 0, 1], dtype=np.float32)
    with pytest.raises(StoreError, match="vectors contain NaN or infinite values"):
        store.publish(V4, plan, vectors)
    assert (store.generation(), store.current_version(), store.version(V4.key)) == (0, None, None)
    assert raw_row_count(store, V4.key) == 0


def test_reopened_store_keeps_everything(store_url: str) -> None:
    with open_store(store_url) as store:
        publish(store, V4, TEN, TEN_VECTORS)
        before = store.snapshot()
    with open_store(store_url, create=False) as reopened:
        assert_same_snapshot(before, reopened.snapshot())
        assert reopened.current_version() == "mini-v1"


def test_missing_store_without_create(store_url: str) -> None:
    """create=False never creates a store: no file, no schema."""
    if store_url.startswith("sqlite"):
        store_url = store_url.replace("store.db", "missing.db")
    with pytest.raises(StoreNotFoundError) as exc_info:
        open_store(store_url, create=False)
    assert str(exc_info.value).startswith("no embedding store at ")
    with open_store(store_url) as created:
        assert created.generation() == 0


def test_readers_never_see_a_mixed_generation(store_url: str) -> None:
    """A reader thread takes snapshots in a loop while every template is rewritten, generation after generation."""
    templates = [make_template(n) for n in range(1, 301)]

    def generation_of(g: int) -> tuple[list[Template], dict[str, np.ndarray]]:
        tagged = [replace(t, answer=f"{t.answer} [поколение {g}]") for t in templates]
        return tagged, {t.template_id: vector_for(n, salt=g) for n, t in enumerate(tagged, start=1)}

    with open_store(store_url) as writer:
        publish(writer, V4, *generation_of(1))
    generations = 8
    seen: list[int] = []
    problems: list[str] = []
    done = threading.Event()

    def read_loop() -> None:
        with open_store(store_url, create=False) as reader:
            while not done.is_set() or not seen:
                snapshot = reader.snapshot()
                g = snapshot.store_generation
                tags = {t.answer.rsplit("[поколение ", 1)[1].rstrip("]") for t in snapshot.templates}
                expected = [vector_for(int(t.template_id[2:]), salt=g) for t in snapshot.templates]
                if len(snapshot) != 300 or tags != {str(g)} or snapshot.version.generation != g:
                    problems.append(f"generation {g}: {len(snapshot)} rows, tags {sorted(tags)}")
                elif not np.array_equal(snapshot.matrix, np.stack(expected)):
                    problems.append(f"generation {g}: vectors of another generation")
                seen.append(g)

    reader = threading.Thread(target=read_loop)
    reader.start()
    try:
        with open_store(store_url) as writer:
            for g in range(2, generations + 1):
                result = publish(writer, V4, *generation_of(g))
                assert (result.generation, result.rows) == (g, 300)
    finally:
        done.set()
        reader.join(timeout=120)
    assert not reader.is_alive()
    assert problems == []
    assert seen == sorted(seen)
    assert len(seen) >= 2


def test_concurrent_publishers_from_one_base_one_wins(store_url: str) -> None:
    with open_store(store_url) as store:
        publish(store, V4, TEN, TEN_VECTORS)
    barrier = threading.Barrier(2)
    outcomes: dict[int, object] = {}

    def publisher(n: int) -> None:
        with open_store(store_url) as store:
            current = [*TEN, make_template(20 + n)]
            plan = plan_for(store, V4, current)
            barrier.wait()
            try:
                outcomes[n] = store.publish(V4, plan, vectors_for(plan, {f"T-{20 + n}": vector_for(20 + n)}))
            except StalePlanError as exc:
                outcomes[n] = exc

    threads = [threading.Thread(target=publisher, args=(n,)) for n in (1, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    errors = [o for o in outcomes.values() if isinstance(o, StalePlanError)]
    results = [o for o in outcomes.values() if not isinstance(o, StalePlanError)]
    assert (len(errors), len(results)) == (1, 1)
    assert (results[0].generation, results[0].rows) == (2, 11)
    with open_store(store_url) as store:
        assert store.generation() == 2
        assert len(store.snapshot()) == 11


def test_store_identity_is_created_with_the_store_and_kept(store_url: str) -> None:
    with open_store(store_url) as store:
        created = store.state()
        assert len(created.store_id) == 32 and int(created.store_id, 16) >= 0
        assert created == StoreState(created.store_id, 0)
        publish(store, V4, TEN, TEN_VECTORS)
        assert store.state() == StoreState(created.store_id, 1)
        snapshot = store.snapshot()
        assert (snapshot.store_id, snapshot.state) == (created.store_id, StoreState(created.store_id, 1))
    with open_store(store_url, create=False) as reopened:
        assert reopened.state() == StoreState(created.store_id, 1)


def test_a_replaced_store_at_the_same_generation_has_another_identity(store_url: str) -> None:
    with open_store(store_url) as store:
        publish(store, V4, TEN, TEN_VECTORS)
        before = store.snapshot().state
    drop_store(store_url)
    with open_store(store_url) as rebuilt:
        publish(rebuilt, V4, TEN[:3], TEN_VECTORS)
        after = rebuilt.snapshot().state
    assert after.generation == before.generation == 1
    assert after.store_id != before.store_id


def test_a_store_made_before_identities_gets_one_on_its_first_write_open(store_url: str) -> None:
    with open_store(store_url) as store:
        publish(store, V4, TEN, TEN_VECTORS)
        execute(store, "DELETE FROM {meta} WHERE key = 'store_id'")
    with open_store(store_url, create=False) as reader:
        assert reader.state() == StoreState("", 1)
    with open_store(store_url) as writer:
        first = writer.state()
    with open_store(store_url) as writer:
        assert writer.state() == first
    assert len(first.store_id) == 32 and first.generation == 1


def execute(store, statement: str) -> None:
    """Run one statement straight on the backend ({meta} names the store_meta table)."""
    if isinstance(store, SqliteStore):
        store._conn.execute(statement.format(meta="store_meta"))
        return
    with store._transaction() as cur:
        cur.execute(store._sql(statement.replace("{meta}", "{schema}.store_meta")))


def drop_store(store_url: str) -> None:
    """Delete the store entirely (the file and its companions, or the schema)."""
    path = sqlite_path(store_url) if store_url.startswith("sqlite") else None
    if path is not None:
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        return
    with open_store(store_url) as store:
        with store._transaction() as cur:
            cur.execute(store._sql("DROP SCHEMA {schema} CASCADE"))


def edited(templates: list[Template], ids: set[str], tag: str = "правка") -> list[Template]:
    return [replace(t, answer=f"{t.answer} [{tag}]") if t.template_id in ids else t for t in templates]


def test_a_stale_plan_of_the_same_edit_is_rebased_to_a_no_op(store) -> None:
    publish(store, V4, TEN, TEN_VECTORS)
    faq = edited(TEN, {"T-2", "T-5", "T-9"})
    first, second = plan_for(store, V4, faq), plan_for(store, V4, faq)
    new_vectors = {f"T-{n}": vector_for(n, salt=5) for n in (2, 5, 9)}
    assert store.publish(V4, first, vectors_for(first, new_vectors)).generation == 2
    before = store.snapshot()

    again = store.publish(V4, second, vectors_for(second, new_vectors))

    assert (again.generation, again.rows, again.changed) == (2, 10, False)
    assert_same_snapshot(before, store.snapshot())
    assert raw_row_count(store, V4.key) == 10


def test_a_stale_plan_that_contains_the_other_runs_changes_is_rebased_and_applies_the_rest(store) -> None:
    publish(store, V4, TEN, TEN_VECTORS)
    older_faq = edited(TEN, {"T-2"})
    newer_faq = [*edited(TEN, {"T-2", "T-3"}), make_template(11)]
    older, newer = plan_for(store, V4, older_faq), plan_for(store, V4, newer_faq)
    by_id = {"T-2": vector_for(2, salt=5), "T-3": vector_for(3, salt=5), "T-11": vector_for(11)}
    store.publish(V4, older, vectors_for(older, by_id))

    result = store.publish(V4, newer, vectors_for(newer, by_id))

    assert (result.generation, result.rows, result.changed) == (3, 11, True)
    snapshot = store.snapshot()
    assert snapshot.templates == [stored(t) for t in sorted(newer_faq, key=lambda t: t.template_id)]
    expected = {**TEN_VECTORS, **by_id}
    np.testing.assert_array_equal(snapshot.matrix, np.stack([expected[t.template_id] for t in snapshot.templates]))


def test_a_stale_plan_that_would_undo_another_runs_edit_is_refused(store) -> None:
    publish(store, V4, TEN, TEN_VECTORS)
    older_faq, newer_faq = edited(TEN, {"T-4"}), edited(TEN, {"T-4"}, tag="вторая правка")
    older, newer = plan_for(store, V4, older_faq), plan_for(store, V4, newer_faq)
    store.publish(V4, newer, vectors_for(newer, {"T-4": vector_for(4, salt=9)}))
    before = store.snapshot()

    with pytest.raises(StalePlanError) as exc_info:
        store.publish(V4, older, vectors_for(older, {"T-4": vector_for(4, salt=8)}))

    assert str(exc_info.value) == (
        "model version 'mini-v1': another run published generation 2 after this change plan was made "
        "(generation 1) and changed 1 template(s) differently (T-4); run the pipeline again "
        "(texts already embedded are cached and are not paid for again)"
    )
    assert_same_snapshot(before, store.snapshot())
