"""One consistent command line: `--store` everywhere, the default queries file, one top_k limit, clear paths."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from embedding_assets import settings
from embedding_assets.cli import main
from embedding_assets.retrieval import service
from embedding_assets.retrieval.index import matched_facet

CLI = str(Path(sys.executable).parent / "embedding-assets")


@pytest.fixture
def workdir(first_run, tmp_path):
    """A working directory holding a copy of the warm store under another name than the configured one."""
    shutil.copyfile(first_run[2], tmp_path / "other.db")
    env = {**os.environ, "EMBEDDING_ASSETS_STORE": str(tmp_path / "absent.db"),
           "DAGSTER_HOME": str(tmp_path / "dagster_home")}
    return tmp_path, env


def cli(workdir, *args: str) -> subprocess.CompletedProcess:
    cwd, env = workdir
    return subprocess.run([CLI, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def commands(group: click.Group, prefix: str = "") -> dict[str, click.Command]:
    found = {}
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            found |= commands(command, f"{prefix}{name} ")
        else:
            found[f"{prefix}{name}"] = command
    return found


def test_every_command_takes_store():
    without = [name for name, command in commands(main).items()
               if "--store" not in {opt for p in command.params for opt in p.opts}]
    assert without == []
    for name in ("status", "versions list", "search"):
        assert "--store" in CliRunner().invoke(main, [*name.split(), "--help"]).output


def test_store_option_overrides_the_environment_for_reading_commands(workdir):
    status = cli(workdir, "status", "--json", "--store", "other.db")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["versions"][0]["rows"] == 90
    listed = cli(workdir, "versions", "list", "--json", "--store", "sqlite:///other.db")
    assert [v["model_version"] for v in json.loads(listed.stdout)] == ["e5-small-v1"]
    found = cli(workdir, "search", "потерял телефон с приложением банка", "--json", "--store", "other.db",
                "--category", "безопасность и МОШЕННИЧЕСТВО")
    assert found.returncode == 0, found.stderr
    hits = json.loads(found.stdout)["hits"]
    assert hits[0]["template_id"] == "SEC-006"
    assert {h["category"] for h in hits} == {"Безопасность и мошенничество"}


def test_a_missing_relative_store_is_named_relative_to_the_working_directory(workdir):
    cwd, _ = workdir
    done = cli(workdir, "status", "--store", "data/none.db")
    assert done.returncode == 1
    assert f"no embedding store at data/none.db (relative to {cwd})" in done.stderr
    assert not (cwd / "data").exists()


def test_an_unknown_category_suggests_the_closest_name(workdir):
    done = cli(workdir, "search", "кредит", "--store", "other.db", "--category", "Кредитв")
    assert done.returncode == 1
    assert "unknown category 'Кредитв'; did you mean 'Кредиты'? known: " in done.stderr


def test_evaluate_reads_the_documented_default_queries_file(workdir):
    done = cli(workdir, "evaluate", "--json", "--store", "other.db")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["queries_file"] == settings.validation_queries_path()
    assert len(result["outcomes"]) == 36


def test_the_cli_and_the_service_share_one_top_k_limit(workdir):
    assert service.MAX_TOP_K is settings.MAX_TOP_K == 50
    done = cli(workdir, "search", "карта", "--store", "other.db", "--top-k", "51")
    assert done.returncode == 2
    assert "51 is not in the range 1<=x<=50" in done.stderr


def test_matched_facet_folds_case_and_suggests():
    known = frozenset({"Карты", "Кредиты", "Переводы и платежи"})
    assert matched_facet("category", "карты", known) == "Карты"
    assert matched_facet("category", None, known) is None
    with pytest.raises(ValueError, match="did you mean 'Переводы и платежи'"):
        matched_facet("category", "переводы платежи", known)


def test_status_warns_when_the_current_version_is_no_longer_refreshed(workdir):
    status = json.loads(cli(workdir, "status", "--json", "--store", "other.db").stdout)
    warning = (
        "the current version e5-small-v1 is declared inactive in model_versions.toml: runs no longer refresh it, "
        "and searches answer from it until an active version is promoted "
        "(embedding-assets versions promote e5-small-views-v1)"
    )
    assert status["warnings"] == [warning]
    assert f"warning: {warning}" in cli(workdir, "status", "--store", "other.db").stdout
