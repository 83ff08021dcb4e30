"""Credentials stay secret, SQL is parameterised, identifiers from config are validated, files are private."""

from __future__ import annotations

import ast
import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest

from embedding_assets.lib.hashing import hash_templates
from embedding_assets.lib.model_versions import ModelVersion, ModelVersionError, load_model_versions
from embedding_assets.lib.plan import build_change_plan
from embedding_assets.store import open_store
from embedding_assets_tests.conftest import PROJECT_ROOT, make_template
from embedding_assets_tests.reliability import BACKENDS
from embedding_assets_tests.secrets_scan import no_secrets_in_outputs  # noqa: F401  (autouse)

pytestmark = pytest.mark.reliability

VERSION = ModelVersion(key="mini-v1", provider="local", model="mini", dimension=4)
HOSTILE = [
    "'); DROP TABLE templates; --",
    "\" OR 1=1 --",
    "Robert'); DELETE FROM model_versions WHERE ('1'='1",
    "$1 %s %(x)s ? :name \\x00 \\'",
]


@pytest.fixture(params=BACKENDS)
def store_url(request) -> str:
    return request.getfixturevalue(f"{request.param}_store_url")


def test_hostile_text_round_trips_as_data(store_url: str) -> None:
    templates = [
        make_template(n, category=text, subcategory=text, question=f"{text}?", answer=text, audience=text)
        for n, text in enumerate(HOSTILE, start=1)
    ]
    plan = build_change_plan(hash_templates(templates, VERSION.text_template), {}, model_version=VERSION.key,
                             base_generation=None)
    vectors = {i.content_hash: np.eye(4, dtype=np.float32)[n % 4] for n, i in enumerate(plan.new)}
    with open_store(store_url) as store:
        store.publish(VERSION, plan, vectors)
    with open_store(store_url) as store:
        snapshot = store.snapshot()
        assert [v.key for v in store.versions()] == ["mini-v1"]
    assert sorted(snapshot.columns["answer"]) == sorted(HOSTILE)
    assert sorted(snapshot.columns["category"]) == sorted(HOSTILE)
    assert len(snapshot) == len(HOSTILE)


@pytest.mark.parametrize(
    "key", ["e5'; DROP TABLE templates; --", 'e5"quoted', "e5 small", "E5", "e5;", "e5/../x", "e5\n"]
)
def test_model_version_keys_that_could_reach_sql_identifiers_are_refused(key: str, tmp_path: Path) -> None:
    path = tmp_path / "versions.toml"
    path.write_text(
        f'[[model_version]]\nkey = {json.dumps(key)}\nprovider = "local"\nmodel = "m"\ndimension = 4\n',
        encoding="utf-8",
    )
    with pytest.raises(ModelVersionError, match="key must match"):
        load_model_versions(path)


# SQL text may only be a literal, or an f-string whose parts are these constant fragments.
SQL_FRAGMENTS = {"marks", "where", "_TEMPLATE_COLUMNS"}
SQL_METHODS = {"execute", "executemany", "executescript", "mogrify", "copy_expert"}


def _sql_problems(path: Path) -> list[str]:
    problems = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        if node.func.attr not in SQL_METHODS or not node.args:
            continue
        statement = node.args[0]
        if isinstance(statement, ast.Constant) or _is_composed_sql(statement) or isinstance(statement, ast.Name):
            continue
        if isinstance(statement, ast.JoinedStr):
            parts = [v.value for v in statement.values if isinstance(v, ast.FormattedValue)]
            if all(isinstance(p, ast.Name) and p.id in SQL_FRAGMENTS for p in parts):
                continue
        problems.append(f"{path.name}:{node.lineno}: {ast.unparse(statement)[:80]}")
    return problems


def _is_composed_sql(node: ast.AST) -> bool:
    """psycopg2.sql composition: sql.SQL(...).format(sql.Identifier(...), ...) or sql.SQL(...)."""
    text = ast.unparse(node)
    return text.startswith(("sql.SQL(", "SQL(", "sql.Composed(", "self._sql(", "self._store._sql(", "copy"))


def test_store_sql_is_parameterised() -> None:
    sources = sorted((PROJECT_ROOT / "embedding_assets" / "store").glob("*.py"))
    problems = [problem for path in sources for problem in _sql_problems(path)]
    assert problems == []


def test_sqlite_store_files_are_private(tmp_path: Path) -> None:
    previous = os.umask(0o022)
    try:
        with open_store(tmp_path / "store.db") as store:
            plan = build_change_plan(hash_templates([make_template(1)], VERSION.text_template), {},
                                     model_version=VERSION.key, base_generation=None)
            store.publish(VERSION, plan, {plan.new[0].content_hash: np.eye(4, dtype=np.float32)[0]})
            modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    finally:
        os.umask(previous)
    assert modes == {"store.db": 0o600, "store.db-wal": 0o600, "store.db-shm": 0o600}
