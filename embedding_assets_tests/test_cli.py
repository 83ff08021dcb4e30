"""The real `embedding-assets` command and `make run`, as a user runs them."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from embedding_assets_tests.conftest import PROJECT_ROOT, SAMPLE_FAQ, read_rows, write_rows
from embedding_assets_tests.pipeline import DEFAULT_KEY

CLI = str(Path(sys.executable).parent / "embedding-assets")
SUMMARY_KEYS = {"model_version", "new", "modified", "deleted", "unchanged", "embedded", "rows", "generation"}


@pytest.fixture
def workdir(default_run, tmp_path):
    """A working directory with a FAQ copy, a copy of the default version's store and its own DAGSTER_HOME."""
    faq = write_rows(tmp_path / "faq.xlsx", read_rows(SAMPLE_FAQ))
    shutil.copyfile(default_run[1], tmp_path / "store.db")
    env = {
        **os.environ,
        "EMBEDDING_ASSETS_FAQ_PATH": str(faq),
        "EMBEDDING_ASSETS_STORE": "sqlite:///store.db",
        "DAGSTER_HOME": str(tmp_path / "dagster_home"),
    }
    return tmp_path, faq, env


def cli(workdir, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    cwd, _, env = workdir
    done = subprocess.run([CLI, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    if check:
        assert done.returncode == 0, done.stderr
    return done


def test_materialize_status_and_search_through_the_cli(workdir):
    cwd, faq, env = workdir
    first = cli(workdir, "materialize", "--json")
    noop, noop_stderr = json.loads(first.stdout), first.stderr
    assert SUMMARY_KEYS <= noop.keys()
    assert {k: noop[k] for k in SUMMARY_KEYS} == {
        "model_version": DEFAULT_KEY, "new": 0, "modified": 0, "deleted": 0, "unchanged": 90,
        "embedded": 0, "rows": 90, "generation": 1,
    }

    rows = read_rows(faq)
    rows[3][6] += " Уточнение для оператора."
    write_rows(faq, rows)
    edited = json.loads(cli(workdir, "materialize", "--json").stdout)
    # of the two views only `qa` holds the answer: one text embedded
    assert (edited["modified"], edited["embedded"], edited["embedding_calls"]) == (1, 1, 1)
    assert (edited["rows"], edited["generation"]) == (90, 2)
    assert "warning" not in noop_stderr

    status = json.loads(cli(workdir, "status", "--json").stdout)
    assert (status["generation"], status["warnings"]) == (2, [])
    [version] = status["versions"]
    assert {k: version[k] for k in ("model_version", "rows", "generation", "current")} == {
        "model_version": DEFAULT_KEY, "rows": 90, "generation": 2, "current": True,
    }
    assert version["published_at"]

    found = json.loads(cli(workdir, "search", "потерял телефон с приложением банка", "--json", "--top-k", "2").stdout)
    assert found["model_version"] == DEFAULT_KEY
    assert [h["rank"] for h in found["hits"]] == [1, 2]
    assert found["hits"][0]["template_id"] == "SEC-006"
    in_category = json.loads(cli(workdir, "search", "кредит", "--category", "Карты", "--json").stdout)
    assert {h["category"] for h in in_category["hits"]} == {"Карты"}

    os.environ["DAGSTER_HOME"], previous = env["DAGSTER_HOME"], os.environ.get("DAGSTER_HOME")
    try:
        with dg.DagsterInstance.get() as instance:
            runs = instance.get_runs()
    finally:
        if previous is None:
            del os.environ["DAGSTER_HOME"]
        else:
            os.environ["DAGSTER_HOME"] = previous
    assert [r.job_name for r in runs] == ["embed_faq", "embed_faq"]
    assert {r.tags["dagster/partition"] for r in runs} == {DEFAULT_KEY}


def test_a_broken_faq_exits_non_zero_with_the_row_and_column(workdir):
    cwd, faq, _ = workdir
    rows = read_rows(faq)
    rows[4][3] = ""
    write_rows(faq, rows)
    before = (cwd / "store.db").read_bytes()

    done = cli(workdir, "materialize", check=False)

    assert done.returncode == 1
    assert f"FAQ {faq} is not usable" in done.stderr
    assert "row 5, column 'Пример вопроса': empty question" in done.stderr
    assert "the published store is unchanged" in done.stderr
    assert (cwd / "store.db").read_bytes() == before


def test_unknown_model_version_and_missing_store_are_clear_errors(workdir, tmp_path):
    done = cli(workdir, "materialize", "--model", "nope", check=False)
    assert done.returncode == 2
    assert "unknown model version 'nope'; declared: e5-small-v1, e5-small-views-v1" in done.stderr

    cwd, _, env = workdir
    env["EMBEDDING_ASSETS_STORE"] = str(tmp_path / "absent.db")
    done = cli(workdir, "search", "карта", check=False)
    assert done.returncode == 1
    assert f"no embedding store at {tmp_path / 'absent.db'}" in done.stderr
    assert not (tmp_path / "absent.db").exists()


def test_make_run_materializes_and_prints_a_summary_and_a_search(workdir):
    cwd, _, env = workdir
    venv = Path(sys.executable).parent.parent
    done = subprocess.run(
        ["make", "-C", str(PROJECT_ROOT), "run", f"VENV={venv}"],
        cwd=cwd,
        env={**env, "EMBEDDING_ASSETS_STORE": str(cwd / "store.db")},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    assert f"{DEFAULT_KEY}: 0 new, 0 modified, 0 deleted, 90 unchanged" in done.stdout
    assert f"* {DEFAULT_KEY}: 90 rows, generation 1" in done.stdout
    assert "1. [" in done.stdout and "SEC-006" in done.stdout


def test_a_failing_publish_prints_the_store_error_not_dagsters_wrapper(workdir):
    cwd, faq, _ = workdir
    rows = read_rows(faq)
    rows[3][4] = "низкий" if rows[3][4] != "низкий" else "высокий"  # a field update: nothing to embed, one write
    write_rows(faq, rows)
    holder = sqlite3.connect(cwd / "store.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another process holds the store's write lock for the whole run
    workdir[2]["EMBEDDING_ASSETS_BUSY_TIMEOUT"] = "3"
    try:
        done = cli(workdir, "materialize", check=False)
    finally:
        holder.execute("ROLLBACK")
        holder.close()

    assert done.returncode == 1
    assert "Error occurred while handling output" not in done.stderr
    assert f"{DEFAULT_KEY}: step embedding_store failed: " in done.stderr
    assert "locked" in done.stderr.split("step embedding_store failed: ", 1)[1]
    assert f"{DEFAULT_KEY}: the published store is unchanged" in done.stderr
