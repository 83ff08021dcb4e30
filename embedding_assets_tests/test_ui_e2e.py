"""End to end: the daemon's sensor notices a FAQ edit, its run publishes, the UI draws the asset graph."""

from __future__ import annotations

import os
import time

import pytest

from embedding_assets.lib.faq_watch import file_sha256
from embedding_assets.store import open_store
from embedding_assets_tests.conftest import read_rows, write_rows
from embedding_assets_tests.dagster_ui import CHAIN, asset_graph, dagster_server, launch_chromium
from embedding_assets_tests.pipeline import DEFAULT_KEY as KEY

pytestmark = pytest.mark.e2e

RUN_TIMEOUT = 240
NEW_ROW = ["E2E-001", "Карты", "Кешбэк", "Начисляется ли кешбэк за оплату телефоном?", "низкий", "все клиенты",
           "Да, кешбэк начисляется за оплату телефоном так же, как за оплату картой."]


def open_browser(playwright):
    """Headless Chromium; outside CI a machine without it skips, in CI that is a failure."""
    try:
        return launch_chromium(playwright)
    except Exception as exc:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"Chromium cannot start in CI: {exc}")
        pytest.skip(f"Chromium cannot start: {exc}")


def test_a_faq_edit_is_published_by_the_sensor_and_the_ui_draws_the_chain(default_warm, tmp_path):
    from playwright.sync_api import sync_playwright

    faq, store = default_warm
    env = {
        "EMBEDDING_ASSETS_FAQ_PATH": str(faq),
        "EMBEDDING_ASSETS_STORE": f"sqlite:///{store}",
        "EMBEDDING_ASSETS_SENSOR_INTERVAL": "3",
    }
    with dagster_server(tmp_path / "dagster_home", env) as server:
        deadline = time.monotonic() + RUN_TIMEOUT
        sensor = {"dagster/sensor_name": "faq_changed"}
        first = server.wait_for_run(sensor, deadline)  # the first look at the file: nothing to embed
        assert first["status"] == "SUCCESS", server.tail("daemon.log")
        assert first["tags"]["dagster/partition"] == KEY

        edited_copy = write_rows(tmp_path / "edited.xlsx", [*read_rows(faq), NEW_ROW])
        os.replace(edited_copy, faq)  # saved in one step, so the sensor never sees half a file
        edit_key = f"faq-{file_sha256(faq)[:16]}-edit-1-{KEY}"
        edited = server.wait_for_run({**sensor, "dagster/run_key": edit_key}, deadline)
        assert edited["status"] == "SUCCESS", server.tail("daemon.log")
        assert len(server.runs(sensor)) == 2

        with open_store(store, create=False) as opened:
            snapshot = opened.snapshot(KEY)
        assert len(snapshot) == 91
        assert "E2E-001" in snapshot.columns["template_id"]

        with sync_playwright() as playwright:
            browser = open_browser(playwright)
            try:
                screenshot = tmp_path / "asset-graph.png"
                drawn = asset_graph(browser, server.url, screenshot)
            finally:
                browser.close()
        assert sorted(drawn) == sorted(CHAIN)
        assert screenshot.stat().st_size > 10_000


EXECUTE_CHECKS = """
mutation Launch($params: ExecutionParams!) {
  launchPipelineExecution(executionParams: $params) {
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on PythonError { message }
    ... on InvalidSubsetError { message }
    ... on RunConfigValidationInvalid { errors { message } }
  }
}
"""

CHECK_EVALUATIONS = """
query Logs($runId: ID!) {
  logsForRun(runId: $runId) {
    ... on EventConnection {
      events { __typename ... on AssetCheckEvaluationEvent { evaluation { checkName success } } }
    }
  }
}
"""


def test_execute_all_on_the_store_checks_tab_runs_every_check_without_a_partition(default_warm, tmp_path):
    faq, store = default_warm
    env = {
        "EMBEDDING_ASSETS_FAQ_PATH": str(faq),
        "EMBEDDING_ASSETS_STORE": f"sqlite:///{store}",
        "EMBEDDING_ASSETS_SENSOR_INTERVAL": "3",
    }
    with dagster_server(tmp_path / "dagster_home", env) as server:
        deadline = time.monotonic() + RUN_TIMEOUT
        first = server.wait_for_run({"dagster/sensor_name": "faq_changed"}, deadline)  # materializes faq_templates
        assert first["status"] == "SUCCESS", server.tail("daemon.log")

        checks = ["store_matches_faq", "retrieval_quality"]
        launched = server.graphql(
            EXECUTE_CHECKS,
            {
                "params": {
                    # what the asset's Checks tab "Execute all" launches: the checks alone, no partition
                    "selector": {
                        "repositoryLocationName": "embedding_assets",
                        "repositoryName": "__repository__",
                        "pipelineName": "__ASSET_JOB",
                        "assetSelection": [],
                        "assetCheckSelection": [
                            {"assetKey": {"path": ["embedding_store"]}, "name": name} for name in checks
                        ],
                    },
                    "mode": "default",
                    "executionMetadata": {"tags": [{"key": "e2e", "value": "execute-all-checks"}]},
                }
            },
        )["launchPipelineExecution"]
        assert launched["__typename"] == "LaunchRunSuccess", launched
        run = server.wait_for_run({"e2e": "execute-all-checks"}, deadline)
        assert run["status"] == "SUCCESS", server.tail("daemon.log")
        events = server.graphql(CHECK_EVALUATIONS, {"runId": run["runId"]})["logsForRun"]["events"]
        results = {e["evaluation"]["checkName"]: e["evaluation"]["success"] for e in events if "evaluation" in e}
        assert results == {"store_matches_faq": True, "retrieval_quality": True}
