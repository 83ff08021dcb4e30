"""docker-compose.yml, the Dockerfile and deploy/dagster.yaml agree with the code (no Docker engine needed)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import dagster as dg
import pytest
import yaml
from click.testing import CliRunner

from embedding_assets import settings
from embedding_assets.cli import main as cli
from embedding_assets.store import store_backend
from embedding_assets_tests.conftest import PROJECT_ROOT

COMPOSE = PROJECT_ROOT / "docker-compose.yml"
DOCKERFILE = PROJECT_ROOT / "Dockerfile"
INSTANCE_YAML = PROJECT_ROOT / "deploy" / "dagster.yaml"
APP_SERVICES = {"dagster-webserver", "dagster-daemon"}
SETTINGS_VARS = {settings.FAQ_PATH_VAR, settings.STORE_VAR, settings.MODEL_VERSIONS_VAR}
CONTAINER_ROOT = "/app"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))


def interpolate(value: str, environment: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?message} substitution."""

    def substitute(match: re.Match) -> str:
        name, op, rest = match.group(1), match.group(2), match.group(3)
        if name in environment:
            return environment[name]
        if op == ":-":
            return rest
        raise KeyError(f"{name}: {rest}")

    return re.sub(r"\$\{(\w+)(?:(:-|:\?)([^}]*))?\}", substitute, value)


def instance_env_vars() -> set[str]:
    found: set[str] = set()

    def walk(node: object) -> None:
        if isinstance(node, dict):
            if set(node) == {"env"}:
                found.add(node["env"])
            for value in node.values():
                walk(value)

    walk(yaml.safe_load(INSTANCE_YAML.read_text(encoding="utf-8")))
    return found


def cli_commands() -> set[str]:
    return set(cli.commands)


def test_services_and_images(compose: dict) -> None:
    services = compose["services"]
    expected = {"postgres", *APP_SERVICES} | ({"retrieval"} if "serve" in cli_commands() else set())
    assert set(services) <= expected | {"retrieval"}
    assert set(services) >= {"postgres", *APP_SERVICES}
    if "retrieval" in services:
        assert "serve" in cli_commands(), "the retrieval service runs `embedding-assets serve`, which the CLI lacks"

    postgres = services["postgres"]
    assert postgres["image"].startswith("pgvector/pgvector:pg")
    assert any(v.endswith(":/var/lib/postgresql/data") for v in postgres["volumes"])
    assert postgres["volumes"][0].split(":")[0] in compose["volumes"]
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])

    for name in APP_SERVICES:
        service = services[name]
        assert service["build"] == "."
        assert service["depends_on"]["postgres"]["condition"] == "service_healthy"
        for mount in service["volumes"]:
            host, container = mount.split(":")[:2]
            assert (PROJECT_ROOT / host).exists(), mount
            assert container.startswith(CONTAINER_ROOT + "/")
    assert services["dagster-webserver"]["command"][:1] == ["dagster-webserver"]
    assert services["dagster-daemon"]["command"][:2] == ["dagster-daemon", "run"]


def test_commands_exist_and_load_the_workspace(compose: dict) -> None:
    bin_dir = Path(sys.executable).parent
    for name, service in compose["services"].items():
        command = service.get("command")
        if not command:
            continue
        assert (bin_dir / command[0]).is_file() or shutil.which(command[0]), f"{name}: no {command[0]} installed"
        if "-w" in command:
            workspace = PROJECT_ROOT / command[command.index("-w") + 1]
            entries = yaml.safe_load(workspace.read_text(encoding="utf-8"))["load_from"]
            modules = [entry["python_module"]["module_name"] for entry in entries]
            assert modules == ["embedding_assets.definitions"]
            assert all(importlib.util.find_spec(module) for module in modules)
        if command[0] == "embedding-assets":
            assert command[1] in cli_commands()
    help_text = CliRunner().invoke(cli, ["--help"]).output
    assert "materialize" in help_text


def test_environment_matches_settings_and_instance(compose: dict) -> None:
    env = {"POSTGRES_PASSWORD": "pw-from-env"}
    for name in APP_SERVICES:
        environment = {k: interpolate(str(v), env) for k, v in compose["services"][name]["environment"].items()}
        assert {k for k in environment if k.startswith("EMBEDDING_ASSETS_")} == SETTINGS_VARS
        assert {k for k in environment if k.startswith("DAGSTER_POSTGRES_")} == instance_env_vars()
        store = urlsplit(environment[settings.STORE_VAR])
        assert store_backend(environment[settings.STORE_VAR]) == "postgresql"
        assert (store.hostname, store.port, store.password) == ("postgres", 5432, "pw-from-env")
        assert (store.username, store.path) == (environment["DAGSTER_POSTGRES_USER"], "/" + environment["DAGSTER_POSTGRES_DB"])
        assert environment["DAGSTER_POSTGRES_HOST"] == "postgres"
        assert (PROJECT_ROOT / environment[settings.FAQ_PATH_VAR]).is_file()
        assert (PROJECT_ROOT / environment[settings.MODEL_VERSIONS_VAR]).is_file()
    postgres = {k: interpolate(str(v), env) for k, v in compose["services"]["postgres"]["environment"].items()}
    assert (postgres["POSTGRES_USER"], postgres["POSTGRES_DB"]) == ("embedding", "embedding_assets")
    with pytest.raises(KeyError, match="POSTGRES_PASSWORD: set POSTGRES_PASSWORD"):
        interpolate(compose["services"]["postgres"]["environment"]["POSTGRES_PASSWORD"], {})


def test_every_compose_variable_is_documented(compose: dict) -> None:
    readme = (PROJECT_ROOT / "README.md").read_text(encoding="utf-8")
    active = re.sub(r"^\s*#.*$", "", COMPOSE.read_text(encoding="utf-8"), flags=re.M)
    variables = set(re.findall(r"\$\{(\w+)", active))
    assert {"POSTGRES_PASSWORD", "POSTGRES_USER", "POSTGRES_DB", "DAGSTER_PORT"} <= variables
    assert [v for v in sorted(variables | instance_env_vars()) if f"`{v}`" not in readme] == []


def test_dockerfile_installs_the_project_and_the_instance_config() -> None:
    text = DOCKERFILE.read_text(encoding="utf-8")
    assert re.search(r"^FROM python:3\.11", text, re.M)
    assert 'pip install --no-cache-dir -e ".[deploy]"' in text
    assert f"WORKDIR {CONTAINER_ROOT}" in text
    assert "COPY deploy/dagster.yaml ${DAGSTER_HOME}/dagster.yaml" in text
    for line in re.findall(r"^COPY (.+)$", text, re.M):
        for source in line.split()[:-1]:
            assert (PROJECT_ROOT / source).exists(), source
    pyproject = (PROJECT_ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert re.search(r'deploy = \[\s*"dagster-postgres==', pyproject)


def test_instance_config_runs_on_postgres(postgres_url: str, tmp_path: Path, monkeypatch) -> None:
    """deploy/dagster.yaml, fed the compose variables, gives a working Dagster instance on a real PostgreSQL."""
    config = yaml.safe_load(INSTANCE_YAML.read_text(encoding="utf-8"))
    assert set(config["storage"]) == {"postgres"}
    url = urlsplit(postgres_url)
    for name, value in {
        "DAGSTER_POSTGRES_HOST": url.hostname, "DAGSTER_POSTGRES_PORT": str(url.port),
        "DAGSTER_POSTGRES_USER": url.username, "DAGSTER_POSTGRES_PASSWORD": url.password,
        "DAGSTER_POSTGRES_DB": url.path.lstrip("/"),
    }.items():
        monkeypatch.setenv(name, value)
    shutil.copyfile(INSTANCE_YAML, tmp_path / "dagster.yaml")
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))

    @dg.asset
    def probe() -> int:
        return 1

    with dg.DagsterInstance.get() as instance:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        assert type(instance.event_log_storage).__name__ == "PostgresEventLogStorage"
        result = dg.materialize([probe], instance=instance)
        assert result.success
        assert [run.run_id for run in instance.get_runs()] == [result.run_id]


def test_store_kinds_and_config_follow_the_store_url(tmp_path: Path) -> None:
    """With a PostgreSQL URL in the environment the code location shows postgres/pgvector and hides the password."""
    probe = (
        "import dagster as dg, json\n"
        "from embedding_assets.definitions import defs\n"
        "d = defs()\n"
        "node = d.resolve_asset_graph().get(dg.AssetKey('embedding_store'))\n"
        "store = d.resources['store']\n"
        "print(json.dumps({'kinds': sorted(node.kinds), 'url': repr(store.url), 'env': type(store.url).__name__}))\n"
    )
    results = {}
    for backend, url in {
        "postgresql": "postgresql://faq:hush-hush@db.internal:5432/faq",
        "sqlite": f"sqlite:///{tmp_path / 'store.db'}",
    }.items():
        done = subprocess.run(
            [sys.executable, "-c", probe], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300,
            env={**os.environ, settings.STORE_VAR: url, "DAGSTER_HOME": str(tmp_path)},
        )
        assert done.returncode == 0, done.stderr
        results[backend] = json.loads(done.stdout.strip().splitlines()[-1])
        assert "hush-hush" not in done.stdout + done.stderr
    assert results["postgresql"]["kinds"] == ["pgvector", "postgres"]
    assert results["sqlite"]["kinds"] == ["sqlite"]
    assert results["postgresql"]["env"] == "EnvVar"
