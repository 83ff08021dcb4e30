"""The Dagster instance a new DAGSTER_HOME gets: Dagster's SQLite files, connections kept open."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import dagster as dg
import pytest
from dagster._core.events.log import EventLogEntry
from dagster._core.storage.event_log.sqlite.sqlite_event_log import SqliteEventLogStorage

from embedding_assets import settings
from embedding_assets.instance_storage import PooledSqliteEventLogStorage, PooledSqliteRunStorage, PooledSqliteStorage
from embedding_assets.settings import PROJECT_ROOT

RUNS_SCRIPT = """
import sys
import dagster as dg

@dg.asset
def numbers() -> list[int]:
    return [1, 2, 3]

@dg.asset
def total(numbers: list[int]) -> int:
    return sum(numbers)

# outputs in memory: the processes share the instance, not one pickle file per asset
defs = dg.Definitions(assets=[numbers, total], resources={"io_manager": dg.InMemoryIOManager()})
job = defs.resolve_implicit_global_asset_job_def()
with dg.DagsterInstance.get() as instance:
    for _ in range(int(sys.argv[1])):
        assert job.execute_in_process(instance=instance).success
print(type(instance.event_log_storage).__name__)
"""


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    return settings.dagster_home()


def run_jobs(home: Path, runs: int) -> subprocess.Popen:
    env = {**os.environ, "DAGSTER_HOME": str(home), "PYTHONPATH": str(PROJECT_ROOT)}
    return subprocess.Popen([sys.executable, "-c", RUNS_SCRIPT, str(runs)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_a_new_home_gets_the_pooled_storage_and_dagsters_own_storage_reads_the_same_runs(home):
    assert (home / "dagster.yaml").read_text() == settings.instance_yaml(home)
    process = run_jobs(home, 3)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-3000:]
    assert out.strip() == "PooledSqliteEventLogStorage"
    with dg.DagsterInstance.get() as pooled:
        assert isinstance(pooled.run_storage, PooledSqliteRunStorage)
        runs = pooled.get_runs()
        logs = {run.run_id: [e.dagster_event_type for e in pooled.all_logs(run.run_id)] for run in runs}
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")  # Dagster's default SQLite storage
    with dg.DagsterInstance.get() as plain:
        assert type(plain.event_log_storage).__name__ == "SqliteEventLogStorage"
        assert [r.run_id for r in plain.get_runs()] == [r.run_id for r in runs]
        assert {r.run_id: [e.dagster_event_type for e in plain.all_logs(r.run_id)] for r in runs} == logs
        assert {r.status for r in plain.get_runs()} == {dg.DagsterRunStatus.SUCCESS}
        assert len(plain.fetch_materializations(dg.AssetKey("total"), limit=10).records) == 3
    assert len(runs) == 3 and all(len(events) == len(logs[runs[0].run_id]) for events in logs.values())


def test_two_processes_writing_one_home_at_once_keep_every_run_and_event(home):
    with dg.DagsterInstance.get() as instance:  # two processes creating the files at once race in Dagster's setup
        instance.get_runs(limit=1)
    first, second = run_jobs(home, 6), run_jobs(home, 6)
    for process in (first, second):
        _, err = process.communicate(timeout=300)
        assert process.returncode == 0, err[-3000:]
    with dg.DagsterInstance.get() as instance:
        runs = instance.get_runs()
        assert len(runs) == 12
        assert {r.status for r in runs} == {dg.DagsterRunStatus.SUCCESS}
        counts = {len(instance.all_logs(r.run_id)) for r in runs}
        assert len(counts) == 1  # every run has all of its events
        assert len(instance.fetch_materializations(dg.AssetKey("total"), limit=100).records) == 12


def test_the_earlier_default_instance_file_is_upgraded_and_an_edited_one_is_left_alone(tmp_path, monkeypatch):
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "dagster.yaml").write_text(
        "# Dagster instance of embedding_assets: runs, events and schedules live here.\ntelemetry:\n  enabled: false\n"
    )
    monkeypatch.setenv("DAGSTER_HOME", str(earlier))
    settings.dagster_home()
    assert (earlier / "dagster.yaml").read_text() == settings.instance_yaml(earlier.resolve())

    edited = tmp_path / "edited"
    edited.mkdir()
    (edited / "dagster.yaml").write_text("telemetry:\n  enabled: false\nrun_monitoring:\n  enabled: true\n")
    monkeypatch.setenv("DAGSTER_HOME", str(edited))
    settings.dagster_home()
    assert "run_monitoring" in (edited / "dagster.yaml").read_text()


def test_the_synchronous_setting_is_applied_and_checked(tmp_path):
    storage = PooledSqliteStorage(str(tmp_path), synchronous="full")
    assert isinstance(storage.event_log_storage, PooledSqliteEventLogStorage)
    with storage.event_log_storage.index_connection() as conn:
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
    default = PooledSqliteStorage(str(tmp_path / "default"))
    with default.run_storage.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL
    with pytest.raises(ValueError, match="synchronous must be one of OFF, NORMAL, FULL, EXTRA, not 'sometimes'"):
        PooledSqliteStorage(str(tmp_path / "bad"), synchronous="sometimes")


def test_an_edited_instance_file_keeps_its_edits_and_follows_a_moved_directory(home, tmp_path, monkeypatch):
    written = (home / "dagster.yaml").read_text()
    edited = written.replace("    config:\n", "    config:\n      synchronous: FULL\n")
    (home / "dagster.yaml").write_text(edited)
    settings.dagster_home()
    assert (home / "dagster.yaml").read_text() == edited

    moved = tmp_path / "moved_home"
    home.rename(moved)
    monkeypatch.setenv("DAGSTER_HOME", str(moved))
    settings.dagster_home()
    assert (moved / "dagster.yaml").read_text() == edited.replace(json.dumps(str(home)), json.dumps(str(moved.resolve())))
    with dg.DagsterInstance.get() as instance:
        assert instance.get_runs() == []
        with instance.event_log_storage.index_connection() as conn:
            assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL, the edit
        assert str(moved.resolve()) in instance.event_log_storage._base_dir


def _schema(path: Path) -> tuple:
    with closing(sqlite3.connect(path)) as conn:
        return (
            sorted(conn.execute("SELECT type, name, sql FROM sqlite_master").fetchall()),
            conn.execute("SELECT version_num FROM alembic_version").fetchall(),
            conn.execute("PRAGMA journal_mode").fetchone(),
        )


def test_a_new_runs_file_is_a_copy_of_dagsters_own_empty_run_file_and_an_existing_one_is_kept(tmp_path):
    plain = SqliteEventLogStorage(str(tmp_path / "plain"))
    with plain.run_connection("made-by-dagster"):
        pass
    pooled = PooledSqliteEventLogStorage(str(tmp_path / "pooled"))
    for run_id in ("first-run", "second-run"):
        with pooled.run_connection(run_id):
            pass
    expected = _schema(tmp_path / "plain" / "made-by-dagster.db")
    assert expected[1:] == ([(_alembic_head(),)], ("wal",))
    assert _schema(Path(pooled.template_path())) == expected
    assert _schema(tmp_path / "pooled" / "first-run.db") == _schema(tmp_path / "pooled" / "second-run.db") == expected
    assert sorted(pooled.get_all_run_ids()) == ["first-run", "second-run"]  # the template is not listed as a run

    events = [_event("kept-run", "written by Dagster's own storage"), _event("kept-run", "written by the pooled one")]
    kept = SqliteEventLogStorage(str(tmp_path / "pooled"))
    kept.store_event(events[0])
    reopened = PooledSqliteEventLogStorage(str(tmp_path / "pooled"))
    reopened.store_event(events[1])
    assert [entry.user_message for entry in reopened.get_logs_for_run("kept-run")] == [e.user_message for e in events]


def _alembic_head() -> str:
    from alembic.script import ScriptDirectory
    from dagster._core.storage.event_log.sqlite import sqlite_event_log
    from dagster._core.storage.sql import get_alembic_config

    return ScriptDirectory.from_config(get_alembic_config(sqlite_event_log.__file__)).get_current_head()


def _event(run_id: str, message: str) -> EventLogEntry:
    return EventLogEntry(
        error_info=None, level="INFO", user_message=message, run_id=run_id, timestamp=time.time(),
        step_key=None, job_name="job", dagster_event=None,
    )
