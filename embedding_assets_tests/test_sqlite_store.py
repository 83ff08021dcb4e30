from __future__ import annotations

import os
import sqlite3
import stat
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from embedding_assets.lib.faq import Template
from embedding_assets_tests.conftest import make_template
from embedding_assets.lib.hashing import hash_templates
from embedding_assets.lib.model_versions import DEFAULT_TEXT_TEMPLATE, ModelVersion
from embedding_assets.lib.plan import ChangePlan, StoredTemplate, build_change_plan
from embedding_assets.store import (
    ModelVersionMismatchError,
    SqliteStore,
    StalePlanError,
    StoreCorruptError,
    StoreError,
    StoreNotFoundError,
    open_store,
    redact_url,
    sqlite_path,
)
from embedding_assets.store.base import ForeignDatabaseError, StoreSnapshot, mismatch_message

V4 = ModelVersion(key="mini-v1", provider="local", model="mini", dimension=4, settings={"variant": "test"})
V3 = ModelVersion(key="tiny-v1", provider="local", model="tiny", dimension=3, text_template="{question}")


def _unit(*values: float) -> np.ndarray:
    vector = np.asarray(values, dtype=np.float32)
    return vector / np.linalg.norm(vector)


E = [_unit(*row) for row in np.eye(4)]
MIX = _unit(1, 1, 0, 0)
MIX2 = _unit(0, 0, 1, 1)
MIX3 = _unit(1, -1, 1, -1)
E3 = [_unit(*row) for row in np.eye(3)]


_template = make_template


BASE = [_template(1), _template(2), _template(3)]
BASE_VECTORS = {"T-1": E[0], "T-2": E[1], "T-3": E[2]}


def _plan(store: SqliteStore, version: ModelVersion, templates: list[Template], *, rebuild: bool = False) -> ChangePlan:
    info, published = store.published(version.key)
    return build_change_plan(
        hash_templates(templates, version.text_template),
        published,
        model_version=version.key,
        base_generation=info.generation if info else None,
        rebuild=rebuild,
    )


def _vectors(plan: ChangePlan, by_id: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {item.content_hash: by_id[item.template_id] for item in (*plan.new, *plan.modified)}


def _publish(store: SqliteStore, version: ModelVersion, templates: list[Template], by_id: dict[str, np.ndarray],
             *, rebuild: bool = False):
    plan = _plan(store, version, templates, rebuild=rebuild)
    return store.publish(version, plan, _vectors(plan, by_id))


def _stored(template: Template, version: ModelVersion = V4) -> StoredTemplate:
    (hashed,) = hash_templates([template], version.text_template)
    t = template
    return StoredTemplate(t.template_id, hashed.content_hash, t.category, t.subcategory, t.question, t.answer,
                          t.priority, t.audience, t.source_row)


def _assert_same_snapshot(a: StoreSnapshot, b: StoreSnapshot) -> None:
    assert a.version == b.version
    assert a.store_generation == b.store_generation
    assert a.templates == b.templates
    np.testing.assert_array_equal(a.matrix, b.matrix)


def _row_count(path: Path, key: str | None = None) -> int:
    with sqlite3.connect(path) as conn:
        if key is None:
            return conn.execute("SELECT COUNT(*) FROM templates").fetchone()[0]
        return conn.execute("SELECT COUNT(*) FROM templates WHERE model_version = ?", (key,)).fetchone()[0]


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "store" / "embeddings.db"


@pytest.fixture
def store(db: Path):
    with open_store(db) as opened:
        yield opened


# --- publishing -----------------------------------------------------------------------------------


def test_new_store_is_empty(store: SqliteStore, db: Path) -> None:
    assert db.is_file()
    assert store.location == str(db)
    assert store.generation() == 0
    assert store.current_version() is None
    assert store.versions() == []
    assert store.version(V4.key) is None
    assert store.published(V4.key) == (None, {})
    with pytest.raises(StoreError) as exc_info:
        store.snapshot()
    assert str(exc_info.value) == f"{db}: no model version has been published yet"
    with pytest.raises(StoreError) as exc_info:
        store.snapshot("nope")
    assert str(exc_info.value) == f"{db}: model version 'nope' has not been published"


def test_first_publish(store: SqliteStore) -> None:
    plan = _plan(store, V4, BASE)
    assert plan.base_generation is None
    assert plan.counts()["new"] == 3
    result = store.publish(V4, plan, _vectors(plan, BASE_VECTORS))
    assert (result.model_version, result.generation, result.rows, result.changed, result.is_current) == (
        "mini-v1", 1, 3, True, True,
    )
    assert store.generation() == 1
    assert store.current_version() == "mini-v1"
    info = store.version("mini-v1")
    assert info is not None
    assert (info.key, info.provider, info.model, info.dimension, info.text_template, info.settings) == (
        "mini-v1", "local", "mini", 4, DEFAULT_TEXT_TEMPLATE, {"variant": "test"},
    )
    assert (info.fingerprint, info.rows, info.generation, info.is_current) == (V4.fingerprint(), 3, 1, True)
    assert info.created_at == info.published_at
    assert info.to_model_version().fingerprint() == V4.fingerprint()
    assert store.versions() == [info]
    stored_info, published = store.published("mini-v1")
    assert stored_info == info
    assert published == {t.template_id: _stored(t) for t in BASE}


def test_snapshot_returns_exact_rows_and_vectors(store: SqliteStore) -> None:
    _publish(store, V4, [_template(3), _template(1), _template(2)], BASE_VECTORS)
    snapshot = store.snapshot()
    assert snapshot.store_generation == 1
    assert snapshot.version == store.version("mini-v1")
    assert snapshot.templates == [_stored(_template(1)), _stored(_template(2)), _stored(_template(3))]
    assert snapshot.matrix.dtype == np.float32
    assert snapshot.matrix.shape == (3, 4)
    np.testing.assert_array_equal(snapshot.matrix, np.stack([E[0], E[1], E[2]]))
    _assert_same_snapshot(store.snapshot("mini-v1"), snapshot)


def test_second_publish_applies_modified_deleted_new(store: SqliteStore) -> None:
    _publish(store, V4, BASE, BASE_VECTORS)
    current = [_template(1, priority="низкий"), _template(2, answer="Новый ответ."), _template(4)]
    plan = _plan(store, V4, current)
    assert plan.base_generation == 1
    assert plan.counts() == {"new": 1, "modified": 1, "deleted": 1, "unchanged": 1, "metadata_updated": 1}
    result = store.publish(V4, plan, _vectors(plan, {"T-2": MIX, "T-4": E[3]}))
    assert (result.generation, result.rows, result.changed, result.is_current) == (2, 3, True, True)
    assert store.generation() == 2
    snapshot = store.snapshot()
    assert snapshot.store_generation == 2
    assert snapshot.version.generation == 2
    assert snapshot.version.rows == 3
    assert [t.template_id for t in snapshot.templates] == ["T-1", "T-2", "T-4"]
    assert snapshot.templates == [_stored(t) for t in current]
    assert snapshot.templates[0].priority == "низкий"
    np.testing.assert_array_equal(snapshot.matrix, np.stack([E[0], MIX, E[3]]))


def test_row_moved_updates_metadata_without_vectors(store: SqliteStore) -> None:
    _publish(store, V4, BASE, BASE_VECTORS)
    moved = [_template(3, source_row=2), _template(1, source_row=3), _template(2, source_row=4)]
    plan = _plan(store, V4, moved)
    assert plan.texts_to_embed() == {}
    result = store.publish(V4, plan, {})
    assert (result.generation, result.changed) == (2, True)
    snapshot = store.snapshot()
    assert [(t.template_id, t.source_row) for t in snapshot.templates] == [("T-1", 3), ("T-2", 4), ("T-3", 2)]
    np.testing.assert_array_equal(snapshot.matrix, np.stack([E[0], E[1], E[2]]))


def test_no_op_plan_changes_nothing(store: SqliteStore) -> None:
    _publish(store, V4, BASE, BASE_VECTORS)
    before = store.snapshot()
    plan = _plan(store, V4, BASE)
    assert plan.has_changes is False
    result = store.publish(V4, plan, {})
    assert (result.model_version, result.generation, result.rows, result.changed, result.is_current) == (
        "mini-v1", 1, 3, False, True,
    )
    assert store.generation() == 1
    after = store.snapshot()
    _assert_same_snapshot(before, after)
    assert after.version.published_at == before.version.published_at


def test_rebuild_replaces_rows(store: SqliteStore, db: Path) -> None:
    _publish(store, V4, BASE, BASE_VECTORS)
    plan = _plan(store, V4, BASE, rebuild=True)
    assert plan.counts()["new"] == 3
    result = store.publish(V4, plan, _vectors(plan, {"T-1": MIX, "T-2": MIX2, "T-3": MIX3}))
    assert (result.generation, result.rows, result.changed) == (2, 3, True)
    assert _row_count(db) == 3
    snapshot = store.snapshot()
    assert snapshot.version.rows == 3
    assert snapshot.templates == [_stored(t) for t in BASE]
    np.testing.assert_array_equal(snapshot.matrix, np.stack([MIX, MIX2, MIX3]))

    again = _plan(store, V4, BASE, rebuild=True)
    assert store.publish(V4, again, _vectors(again, BASE_VECTORS)).generation == 3
    assert _row_count(db) == 3


def test_rebuild_with_fewer_templates_drops_the_rest(store: SqliteStore, db: Path) -> None:
    _publish(store, V4, BASE, BASE_VECTORS)
    result = _publish(store, V4, [_template(2)], {"T-2": MIX}, rebuild=True)
    assert result.rows == 1
    assert _row_count(db, "mini-v1") == 1
    assert [t.template_id for t in store.snapshot().templates] == ["T-2"]


def test_two_model_versions_are_independent(store: SqliteStore) -> None:
    first = _publish(store, V4, BASE, BASE_VECTORS)
    second = _publish(store, V3, BASE[:2], {"T-1": E3[0], "T-2": E3[2]})
    assert (first.generation, first.is_current) == (1, True)
    assert (second.generation, second.rows, second.is_current) == (2, 2, False)
    assert store.current_version() == "mini-v1"
    assert [(v.key, v.dimension, v.rows, v.generation, v.is_current) for v in store.versions()] == [
        ("mini-v1", 4, 3, 1, True),
        ("tiny-v1", 3, 2, 2, False),
    ]

    four = store.snapshot()
    assert four.version.key == "mini-v1"
    np.testing.assert_array_equal(four.matrix, np.stack([E[0], E[1], E[2]]))
    three = store.snapshot("tiny-v1")
    assert three.matrix.shape == (2, 3)
    assert three.templates == [_stored(_template(1), V3), _stored(_template(2), V3)]
    np.testing.assert_array_equal(three.matrix, np.stack([E3[0], E3[2]]))

    changed = _publish(store, V3, [_template(2, question="Другой?")], {"T-2": E3[1]})
    assert (changed.generation, changed.rows) == (3, 1)
    np.testing.assert_array_equal(store.snapshot("tiny-v1").matrix, np.stack([E3[1]]))
    after = store.snapshot("mini-v1")
    assert after.templates == four.templates
    assert after.version.generation == 1
    np.testing.assert_array_equal(after.matrix, four.matrix)


def test_stale_plan_is_refused_and_store_unchanged(store: SqliteStore) -> None:
    _publish(store, V4, BASE, BASE_VECTORS)
    stale = _plan(store, V4, [*BASE, _template(4)])
    _publish(store, V4, [_template(1)], {})
    before = store.snapshot()
    assert before.version.generation == 2
    with pytest.raises(StalePlanError) as exc_info:
        store.publish(V4, stale, _vectors(stale, {"T-4": E[3]}))
    assert str(exc_info.value) == (
        "model version 'mini-v1': another run published generation 2 after this change plan was made "
        "(generation 1) and changed 2 template(s) differently (T-2, T-3); run the pipeline again "
        "(texts already embedded are cached and are not paid for again)"
    )
    _assert_same_snapshot(before, store.snapshot())
    assert store.generation() == 2


def test_plan_made_before_another_run_published_the_same_content_is_rebased_to_nothing(store: SqliteStore) -> None:
    early = _plan(store, V4, BASE)
    _publish(store, V4, BASE, BASE_VECTORS)
    before = store.snapshot()
    result = store.publish(V4, early, _vectors(early, BASE_VECTORS))
    assert (result.generation, result.rows, result.changed) == (1, len(BASE), False)
    _assert_same_snapshot(before, store.snapshot())


def test_missing_vector_writes_nothing(store: SqliteStore, db: Path) -> None:
    plan = _plan(store, V4, BASE)
    vectors = _vectors(plan, BASE_VECTORS)
    del vectors[plan.new[1].content_hash]
    with pytest.raises(StoreError) as exc_info:
        store.publish(V4, plan, vectors)
    assert type(exc_info.value) is StoreError
    assert str(exc_info.value) == "model version 'mini-v1': no vector for 1 changed text(s)"
    assert store.generation() == 0
    assert store.version("mini-v1") is None
    assert store.current_version() is None
    assert _row_count(db) == 0


@pytest.mark.parametrize(
    ("bad_vector", "expected"),
    [
        (np.ones(3, dtype=np.float32), "expected dimension 4, got vectors of shape [(3,)]"),
        (np.array([np.nan, 0, 0, 1], dtype=np.float32), "vectors contain NaN or infinite values"),
        (np.zeros(4, dtype=np.float32), "a vector has zero length"),
    ],
)
def test_a_vector_of_the_wrong_shape_or_value_writes_nothing(
    store: SqliteStore, db: Path, bad_vector: np.ndarray, expected: str
) -> None:
    plan = _plan(store, V4, BASE)
    vectors = _vectors(plan, BASE_VECTORS)
    vectors[plan.new[0].content_hash] = bad_vector
    with pytest.raises(StoreError) as exc_info:
        store.publish(V4, plan, vectors)
    assert str(exc_info.value).startswith("model version 'mini-v1', publish")
    assert expected in str(exc_info.value)
    assert store.generation() == 0
    assert _row_count(db) == 0


def test_missing_vector_on_existing_version_writes_nothing(store: SqliteStore) -> None:
    _publish(store, V4, BASE, BASE_VECTORS)
    before = store.snapshot()
    plan = _plan(store, V4, [_template(1, answer="x"), _template(2, answer="y"), _template(3)])
    with pytest.raises(StoreError) as exc_info:
        store.publish(V4, plan, {})
    assert str(exc_info.value) == "model version 'mini-v1': no vector for 2 changed text(s)"
    _assert_same_snapshot(before, store.snapshot())


@pytest.mark.parametrize(
    "changes",
    [{"model": "mini-2"}, {"dimension": 5}, {"text_template": "{question}"}, {"settings": {"variant": "other"}}],
)
def test_different_fingerprint_under_same_key_is_refused(store: SqliteStore, changes: dict) -> None:
    _publish(store, V4, BASE, BASE_VECTORS)
    before = store.snapshot()
    changed = replace(V4, **changes)
    plan = _plan(store, changed, BASE)
    with pytest.raises(ModelVersionMismatchError) as exc_info:
        store.publish(changed, plan, _vectors(plan, BASE_VECTORS))
    assert str(exc_info.value) == mismatch_message(changed, store.version("mini-v1"))
    assert "was published with different settings" in str(exc_info.value)
    _assert_same_snapshot(before, store.snapshot())


def test_different_fingerprint_with_rebuild_is_allowed(store: SqliteStore) -> None:
    _publish(store, V4, BASE, BASE_VECTORS)
    changed = replace(V4, model="mini-2")
    result = _publish(store, changed, BASE, {"T-1": MIX, "T-2": MIX2, "T-3": MIX3}, rebuild=True)
    assert (result.generation, result.rows) == (2, 3)
    info = store.version("mini-v1")
    assert (info.model, info.fingerprint) == ("mini-2", changed.fingerprint())
    np.testing.assert_array_equal(store.snapshot().matrix, np.stack([MIX, MIX2, MIX3]))


def test_batch_size_and_active_do_not_cause_mismatch(store: SqliteStore) -> None:
    _publish(store, V4, BASE, BASE_VECTORS)
    relaxed = replace(V4, batch_size=1, active=False)
    result = _publish(store, relaxed, [*BASE, _template(4)], {"T-4": E[3]})
    assert (result.generation, result.rows, result.changed) == (2, 4, True)


def test_store_persists_across_reopen(db: Path) -> None:
    with open_store(db) as store:
        _publish(store, V4, BASE, BASE_VECTORS)
        before = store.snapshot()
    with open_store(db, create=False) as reopened:
        _assert_same_snapshot(before, reopened.snapshot())
        assert reopened.current_version() == "mini-v1"


# --- the vector cache -----------------------------------------------------------------------------


def test_cache_round_trip(store: SqliteStore) -> None:
    cache = store.cache(V4)
    assert cache.get(["a" * 64]) == {}
    assert cache.get([]) == {}
    cache.put({"h1": E[0], "h2": MIX})
    found = cache.get(["h1", "h2", "unknown"])
    assert sorted(found) == ["h1", "h2"]
    np.testing.assert_array_equal(found["h1"], E[0])
    np.testing.assert_array_equal(found["h2"], MIX)
    assert found["h1"].dtype == np.float32
    assert store.cache(V4).get(["unknown", "other"]) == {}
    cache.put({"h1": MIX2})
    np.testing.assert_array_equal(store.cache(V4).get(["h1"])["h1"], MIX2)


def test_cache_is_scoped_by_fingerprint_and_key(store: SqliteStore) -> None:
    store.cache(V4).put({"h1": E[0]})
    assert store.cache(replace(V4, model="mini-2")).get(["h1"]) == {}
    assert store.cache(replace(V4, settings={"variant": "other"})).get(["h1"]) == {}
    assert store.cache(replace(V4, key="other-v1")).get(["h1"]) == {}
    np.testing.assert_array_equal(store.cache(replace(V4, batch_size=2)).get(["h1"])["h1"], E[0])
    store.cache(replace(V4, model="mini-2")).put({"h1": MIX})
    np.testing.assert_array_equal(store.cache(V4).get(["h1"])["h1"], E[0])


def test_cache_many_hashes(store: SqliteStore) -> None:
    vectors = {f"h{i:04d}": _unit(i + 1, 1, 0, 0) for i in range(2000)}
    store.cache(V4).put(vectors)
    found = store.cache(V4).get(list(vectors))
    assert len(found) == 2000
    np.testing.assert_array_equal(found["h1999"], vectors["h1999"])


def test_cache_survives_publish_and_is_not_published(store: SqliteStore) -> None:
    store.cache(V4).put({"h1": E[0]})
    _publish(store, V4, BASE, BASE_VECTORS)
    assert store.snapshot().version.rows == 3
    np.testing.assert_array_equal(store.cache(V4).get(["h1"])["h1"], E[0])


# --- opening stores -------------------------------------------------------------------------------


def test_new_store_file_is_private(db: Path) -> None:
    open_store(db).close()
    assert stat.S_IMODE(os.stat(db).st_mode) == 0o600


def test_journal_mode_is_wal(db: Path) -> None:
    open_store(db).close()
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_open_missing_store_without_create(tmp_path: Path) -> None:
    path = tmp_path / "missing.db"
    with pytest.raises(StoreNotFoundError) as exc_info:
        open_store(path, create=False)
    assert str(exc_info.value) == f"no embedding store at {path}"
    assert not path.exists()


@pytest.mark.parametrize("create", [True, False])
def test_garbage_file_is_corrupt_and_untouched(tmp_path: Path, create: bool) -> None:
    path = tmp_path / "garbage.db"
    content = b"NOT SQLITE" + np.random.default_rng(7).bytes(8182)
    path.write_bytes(content)
    with pytest.raises(StoreCorruptError) as exc_info:
        open_store(path, create=create)
    assert str(path) in str(exc_info.value)
    assert str(exc_info.value).startswith(f"{path} is not a readable embedding store (")
    assert path.read_bytes() == content
    assert sorted(p.name for p in tmp_path.iterdir()) == ["garbage.db"]


def test_text_file_is_corrupt_and_untouched(tmp_path: Path) -> None:
    path = tmp_path / "notes.db"
    content = ("это не база данных\n" * 200).encode("utf-8")
    path.write_bytes(content)
    with pytest.raises(StoreCorruptError) as exc_info:
        open_store(path)
    assert str(path) in str(exc_info.value)
    assert path.read_bytes() == content


@pytest.mark.parametrize(
    ("create", "prefix", "mentions"),
    [
        (True, "{path} is an SQLite file with other tables (users), not an embedding store", "users"),
        (False, "{path} is not an embedding store (", "store_meta"),
    ],
)
def test_sqlite_file_with_other_tables_is_refused(tmp_path: Path, create: bool, prefix: str, mentions: str) -> None:
    path = tmp_path / "other.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)")
        conn.execute("INSERT INTO users (name) VALUES ('alice')")
    conn.close()
    content = path.read_bytes()
    with pytest.raises(ForeignDatabaseError if create else StoreCorruptError) as exc_info:
        open_store(path, create=create)
    message = str(exc_info.value)
    assert message.startswith(prefix.format(path=path))
    assert mentions in message
    assert path.read_bytes() == content
    with sqlite3.connect(path) as check:
        assert [r[0] for r in check.execute("SELECT name FROM sqlite_master WHERE type = 'table'")] == ["users"]
    check.close()


def test_sqlite_url_forms(tmp_path: Path) -> None:
    absolute = tmp_path / "url.db"
    assert sqlite_path(f"sqlite:///{absolute}") == absolute
    assert sqlite_path("sqlite:///data/embeddings.db") == Path("data/embeddings.db")
    assert sqlite_path(absolute) == absolute
    assert sqlite_path("postgresql://h/db") is None
    with open_store(f"sqlite:///{absolute}") as store:
        assert isinstance(store, SqliteStore)
        assert store.location == str(absolute)
    assert absolute.is_file()


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql://u:secret@h:5432/db", "postgresql://u:***@h:5432/db"),
        ("postgresql://u:secret@h/db", "postgresql://u:***@h/db"),
        ("postgresql://u@h/db", "postgresql://u@h/db"),
        ("postgres://u:secret@h:5432/db?schema=faq", "postgres://u:***@h:5432/db?schema=faq"),
        ("postgresql://u@h/db?password=secret&sslmode=require", "postgresql://u@h/db?password=***&sslmode=require"),
        ("postgresql://u:p%40ss%3Asecret@h/db", "postgresql://u:***@h/db"),
        ("sqlite:///data/embeddings.db", "sqlite:///data/embeddings.db"),
        ("data/embeddings.db", "data/embeddings.db"),
    ],
)
def test_redact_url(url: str, expected: str) -> None:
    assert redact_url(url) == expected
    assert "secret" not in redact_url(url)


def test_unsupported_scheme_names_scheme_without_password() -> None:
    with pytest.raises(StoreError) as exc_info:
        open_store("mysql://u:secret@h:3306/db")
    message = str(exc_info.value)
    assert "secret" not in message
    assert message == (
        "unsupported store URL scheme 'mysql' in mysql://u:***@h:3306/db; "
        "use sqlite:///path.db or postgresql://user:password@host:port/database"
    )
