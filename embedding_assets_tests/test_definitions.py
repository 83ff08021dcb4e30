"""The code location loads, as the UI and `dagster definitions validate` load it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from embedding_assets.definitions import defs
from embedding_assets.defs.jobs import EMBED_FAQ_JOB
from embedding_assets.lib.model_versions import ModelVersionError
from embedding_assets.settings import MODEL_VERSIONS_VAR
from embedding_assets_tests.conftest import PROJECT_ROOT

CHAIN = ["faq_templates", "template_hashes", "change_plan", "template_embeddings", "embedding_store"]


def test_every_asset_of_the_chain_is_described_grouped_and_kinded():
    graph = defs().resolve_asset_graph()
    assert sorted(k.to_user_string() for k in graph.get_all_asset_keys()) == sorted(CHAIN)
    for name in CHAIN:
        node = graph.get(dg.AssetKey(name))
        assert node.group_name == "faq_embeddings"
        assert node.kinds, name
        assert node.description and "\n" not in node.description.strip(), name
    for upstream, downstream in zip(CHAIN, CHAIN[1:]):
        assert dg.AssetKey(upstream) in graph.get(dg.AssetKey(downstream)).parent_keys


def test_the_job_is_partitioned_by_the_declared_model_versions():
    job = defs().resolve_job_def(EMBED_FAQ_JOB)
    assert job.partitions_def.get_partition_keys() == ["e5-small-v1", "e5-small-views-v1"]
    assert set(defs().resources) >= {"faq", "models", "store", "store_io_manager"}


def test_the_sensor_and_the_schedule_start_running_and_the_checks_cover_the_chain():
    definitions = defs()
    sensor = definitions.resolve_sensor_def("faq_changed")
    schedule = definitions.resolve_schedule_def("store_verification")
    assert sensor.default_status == dg.DefaultSensorStatus.RUNNING
    assert sensor.minimum_interval_seconds == 30
    assert schedule.default_status == dg.DefaultScheduleStatus.RUNNING
    assert (schedule.cron_schedule, schedule.execution_timezone) == ("0 3 * * *", "UTC")
    assert sensor.job_name == schedule.job_name == EMBED_FAQ_JOB
    graph = definitions.resolve_asset_graph()
    checks = {(key.asset_key.to_user_string(), key.name) for key in graph.asset_check_keys}
    assert checks == {
        ("faq_templates", "faq_content"),
        ("change_plan", "reembed_budget"),
        ("embedding_store", "store_matches_faq"),
        ("embedding_store", "retrieval_quality"),
        ("embedding_store", "near_duplicate_templates"),
    }
    assert graph.get_check_spec(dg.AssetCheckKey(dg.AssetKey("faq_templates"), "faq_content")).blocking
    assert graph.get_check_spec(dg.AssetCheckKey(dg.AssetKey("change_plan"), "reembed_budget")).blocking


def test_every_run_the_ui_sensor_or_schedule_launches_executes_in_one_process():
    definitions = defs()
    assert definitions.executor is dg.in_process_executor
    assert definitions.resolve_implicit_global_asset_job_def().executor_def is dg.in_process_executor
    for name in (EMBED_FAQ_JOB, "promote_model_version", "rollback_model_version"):
        assert definitions.resolve_job_def(name).executor_def is dg.in_process_executor


def test_the_ui_says_that_a_partition_is_a_model_version():
    definitions = defs()
    assert "Each partition is a model version of model_versions.toml (e5-small-v1, e5-small-views-v1)" in (
        definitions.resolve_job_def(EMBED_FAQ_JOB).description
    )
    graph = definitions.resolve_asset_graph()
    for name in CHAIN[1:]:
        assert "model version" in graph.get(dg.AssetKey(name)).description, name


def test_importing_the_definitions_reads_no_environment_until_the_entry_point_runs(tmp_path, monkeypatch):
    missing = tmp_path / "absent.toml"
    code = (
        "import importlib, pkgutil, embedding_assets.defs as package\n"
        "for module in pkgutil.iter_modules(package.__path__):\n"
        "    importlib.import_module(f'embedding_assets.defs.{module.name}')\n"
        "import embedding_assets.definitions\n"
        "print('imported')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
        env={**os.environ, MODEL_VERSIONS_VAR: str(missing), "EMBEDDING_ASSETS_SENSOR_INTERVAL": "not-a-number"},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "imported"
    monkeypatch.setenv(MODEL_VERSIONS_VAR, str(missing))
    with pytest.raises(ModelVersionError, match=f"^model versions file {missing} not found$"):
        defs()


def test_dagster_validates_the_workspace(tmp_path):
    done = subprocess.run(
        [str(Path(sys.executable).parent / "dagster"), "definitions", "validate", "-w", "workspace.yaml"],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "DAGSTER_HOME": str(tmp_path)},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Validation successful" in done.stdout + done.stderr
