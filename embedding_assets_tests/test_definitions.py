"""The code location loads, as the UI and `dagster definitions validate` load it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import dagster as dg

from embedding_assets.definitions import defs
from embedding_assets.defs.jobs import EMBED_FAQ_JOB
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
    assert job.partitions_def.get_partition_keys() == ["e5-small-v1"]
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
        ("embedding_store", "store_matches_faq"),
        ("embedding_store", "retrieval_quality"),
    }
    assert graph.get_check_spec(dg.AssetCheckKey(dg.AssetKey("faq_templates"), "faq_content")).blocking


def test_dagster_validates_the_workspace(tmp_path):
    done = subprocess.run(
        [str(Path(sys.executable).parent / "dagster"), "definitions", "validate", "-w", "workspace.yaml"],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "DAGSTER_HOME": str(tmp_path)},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Validation successful" in done.stdout + done.stderr
