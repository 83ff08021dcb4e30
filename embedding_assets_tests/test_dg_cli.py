"""The `dg` CLI works in the project's environment: check, list and launch, and `make ui` runs `dg dev`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from importlib.metadata import version
from pathlib import Path

import dagster as dg
import pytest

from embedding_assets.store import open_store
from embedding_assets_tests.conftest import PROJECT_ROOT, SAMPLE_FAQ, read_rows, write_rows
from embedding_assets_tests.pipeline import KEY

DG = str(Path(sys.executable).parent / "dg")
CHAIN = {"faq_templates", "template_hashes", "change_plan", "template_embeddings", "embedding_store"}


def run_dg(*args: str, home: Path, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    home.mkdir(parents=True, exist_ok=True)
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    return subprocess.run(
        [DG, *args], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "DAGSTER_HOME": str(home), "VIRTUAL_ENV": sys.prefix, **(env or {})},
    )


def test_dg_cli_is_pinned_with_dagster() -> None:
    project = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    pins = dict(dep.split("==") for dep in project["project"]["dependencies"] if "==" in dep)
    assert pins["dagster-dg-cli"] == pins["dagster"] == version("dagster-dg-cli") == version("dagster")
    assert project["tool"]["dg"]["directory_type"] == "project"
    assert project["tool"]["dg"]["project"]["root_module"] == "embedding_assets"


def test_dg_check_defs(tmp_path: Path) -> None:
    done = run_dg("check", "defs", home=tmp_path / "home")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "All definitions loaded successfully." in done.stdout + done.stderr
    assert "does not match" not in done.stdout + done.stderr  # dg runs in the project's own environment


def test_dg_list_defs_json(tmp_path: Path) -> None:
    done = run_dg("list", "defs", "--json", home=tmp_path / "home")
    assert done.returncode == 0, done.stderr
    listed = json.loads(done.stdout)
    assets = {asset["asset_key"]: asset for asset in listed["assets"]}
    assert set(assets) == CHAIN
    assert {asset["group_name"] for asset in assets.values()} == {"faq_embeddings"}
    assert all(asset["kinds"] and asset["description"] for asset in assets.values())
    assert {check["key"] for check in listed["asset_checks"]} == {
        "faq_templates:faq_content", "embedding_store:store_matches_faq", "embedding_store:retrieval_quality",
        "embedding_store:near_duplicate_templates", "change_plan:reembed_budget",
    }
    assert "embed_faq" in {job["name"] for job in listed["jobs"]}
    assert [sensor["name"] for sensor in listed["sensors"]] == ["faq_changed"]
    assert [schedule["name"] for schedule in listed["schedules"]] == ["store_verification"]


def test_dg_launch_materializes_one_model_version(tmp_path: Path) -> None:
    faq = write_rows(tmp_path / "faq.xlsx", read_rows(SAMPLE_FAQ)[:6])
    store = tmp_path / "store.db"
    home = tmp_path / "home"
    done = run_dg(
        "launch", "--assets", "*", "--partition", KEY, home=home,
        env={"EMBEDDING_ASSETS_FAQ_PATH": str(faq), "EMBEDDING_ASSETS_STORE": f"sqlite:///{store}"},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    with open_store(store, create=False) as opened:
        snapshot = opened.snapshot(KEY)
    assert sorted(snapshot.columns["template_id"]) == sorted(row[0] for row in read_rows(SAMPLE_FAQ)[1:6])
    with dg.DagsterInstance.from_config(str(home)) as instance:
        runs = instance.get_runs()
        assert [(run.status, run.tags.get("dagster/partition")) for run in runs] == [(dg.DagsterRunStatus.SUCCESS, KEY)]


@pytest.mark.parametrize("target", ["ui", "check"])
def test_make_targets_use_dg(target: str) -> None:
    done = subprocess.run(["make", "-n", target], cwd=PROJECT_ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    commands = done.stdout.splitlines()
    expected = {"ui": "dg dev -h 127.0.0.1 -p 3000", "check": "dg check defs"}[target]
    venv = PROJECT_ROOT / ".venv"
    assert f"VIRTUAL_ENV={venv} {venv.relative_to(PROJECT_ROOT)}/bin/{expected}" in commands, commands
    assert not any("dagster dev" in command for command in commands)
