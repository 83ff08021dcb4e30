"""docker-compose.yml, the Dockerfile, .dockerignore and deploy/dagster.yaml agree with the code.

No Docker engine is needed: the compose file is validated against the Compose Specification's JSON
schema, the build context is computed with docker-py's .dockerignore rules, and the services'
commands and health checks are run here against real processes.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import dagster as dg
import pytest
import yaml
from click.testing import CliRunner
from docker.utils.build import exclude_paths

from embedding_assets import settings
from embedding_assets.cli import main as cli
from embedding_assets.store import store_backend
from embedding_assets_tests.conftest import PROJECT_ROOT
from embedding_assets_tests.dagster_ui import free_port
from embedding_assets_tests.test_service import Service

COMPOSE = PROJECT_ROOT / "docker-compose.yml"
DOCKERFILE = PROJECT_ROOT / "Dockerfile"
INSTANCE_YAML = PROJECT_ROOT / "deploy" / "dagster.yaml"
DOCKERIGNORE = PROJECT_ROOT / ".dockerignore"
APP_SERVICES = {"dagster-webserver", "dagster-daemon"}
SERVICES = {"postgres", *APP_SERVICES, "retrieval"}
COMPUTE_LOGS_VAR = "DAGSTER_COMPUTE_LOGS_DIR"
BIN = Path(sys.executable).parent
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


def test_compose_file_follows_the_compose_spec(tmp_path: Path) -> None:
    """check-jsonschema's vendored Compose Specification schema accepts the file and rejects a typo."""
    def validate(path: Path) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(BIN / "check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(path)],
            capture_output=True, text=True, timeout=120,
        )

    done = validate(COMPOSE)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ok -- validation done" in done.stdout
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(COMPOSE.read_text(encoding="utf-8").replace("    healthcheck:\n", "    healthchek:\n", 1))
    done = validate(broken)
    assert done.returncode == 1
    assert "'healthchek' was unexpected" in done.stdout


def test_services_volumes_and_health_checks(compose: dict) -> None:
    services = compose["services"]
    assert set(services) == SERVICES
    assert set(compose["volumes"]) == {"pgdata", "compute-logs"}

    postgres = services["postgres"]
    assert postgres["image"].startswith("pgvector/pgvector:pg")
    assert postgres["volumes"] == ["pgdata:/var/lib/postgresql/data"]
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])

    for name in SERVICES - {"postgres"}:
        service = services[name]
        assert service["build"] == "."
        assert service["depends_on"]["postgres"]["condition"] == "service_healthy"
        for mount in service["volumes"]:
            source, target = mount.split(":")[:2]
            assert source in compose["volumes"] or (PROJECT_ROOT / source).exists(), mount
            assert target.startswith((CONTAINER_ROOT + "/", "/opt/dagster/")), mount
    assert services["dagster-webserver"]["command"][:1] == ["dagster-webserver"]
    assert services["dagster-daemon"]["command"][:2] == ["dagster-daemon", "run"]
    assert services["retrieval"]["command"][:2] == ["embedding-assets", "serve"]
    assert services["retrieval"]["volumes"] == []

    # Runs execute in the daemon's container; the webserver reads their logs from the same volume.
    for name in APP_SERVICES:
        logs = services[name]["environment"][COMPUTE_LOGS_VAR]
        assert f"compute-logs:{logs}" in services[name]["volumes"]

    for name, port in {"dagster-webserver": 3000, "retrieval": 8080}.items():
        check = services[name]["healthcheck"]
        assert check["test"][:3] == ["CMD", "python", "-c"]
        assert f"http://127.0.0.1:{port}/" in check["test"][3]
        assert {"interval", "timeout", "retries", "start_period"} <= set(check)
        assert any(p.endswith(f":{port}") and p.startswith("127.0.0.1:") for p in services[name]["ports"])


def run_health_check(compose: dict, service: str, port: int) -> subprocess.CompletedProcess:
    """A service's compose health check command, pointed at a local port instead of the container's."""
    command = compose["services"][service]["healthcheck"]["test"]
    container_port = re.search(r"127\.0\.0\.1:(\d+)/", command[3]).group(1)
    code = command[3].replace(f"127.0.0.1:{container_port}/", f"127.0.0.1:{port}/")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)


def test_the_webserver_health_check_passes_against_a_running_webserver(compose: dict, tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    port = free_port()
    assert run_health_check(compose, "dagster-webserver", port).returncode == 1  # nothing listening yet
    command = compose["services"]["dagster-webserver"]["command"]
    command = [str(BIN / command[0]), *command[1:]]
    command[command.index("-h") + 1], command[command.index("-p") + 1] = "127.0.0.1", str(port)
    log = (tmp_path / "webserver.log").open("wb")
    webserver = subprocess.Popen(
        command, cwd=PROJECT_ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "DAGSTER_HOME": str(home), settings.STORE_VAR: f"sqlite:///{tmp_path / 'store.db'}"},
    )
    try:
        deadline = time.monotonic() + 180
        while (check := run_health_check(compose, "dagster-webserver", port)).returncode != 0:
            assert webserver.poll() is None, (tmp_path / "webserver.log").read_text()
            assert time.monotonic() < deadline, check.stderr
            time.sleep(1)
    finally:
        webserver.terminate()
        webserver.wait(timeout=60)
        log.close()


def test_the_retrieval_health_check_passes_only_once_a_store_is_loaded(compose: dict, first_run, tmp_path: Path) -> None:
    for name in ("waiting", "ready"):
        (tmp_path / name).mkdir()
    waiting = Service(tmp_path / "not-yet.db", tmp_path / "waiting")
    try:
        assert waiting.get("/healthz")[0] == 200
        check = run_health_check(compose, "retrieval", int(waiting.url.rsplit(":", 1)[1]))
        assert check.returncode == 1 and "503" in check.stderr
    finally:
        waiting.stop()
    store = tmp_path / "store.db"
    shutil.copyfile(first_run[2], store)
    ready = Service(store, tmp_path / "ready")
    try:
        ready.wait_ready()
        assert run_health_check(compose, "retrieval", int(ready.url.rsplit(":", 1)[1])).returncode == 0
    finally:
        ready.stop()


def test_dockerignore_keeps_local_state_out_of_the_build_context(tmp_path: Path) -> None:
    """docker-py's implementation of .dockerignore, over the tracked files plus a developer's local state."""
    tracked = subprocess.run(["git", "ls-files"], cwd=PROJECT_ROOT, capture_output=True, text=True, check=True).stdout.split()
    local_state = [
        "data/embeddings.db", "data/embeddings.db-wal", "data/embeddings.db-shm", "vtb.db",
        ".venv/bin/python", ".dagster_home/dagster.yaml", ".dagster_home/storage/run/compute.out",
        ".tmp_dagster_home_x/dagster.yaml", "embedding_assets/__pycache__/cli.cpython-311.pyc",
        ".pytest_cache/README.md", "embedding_assets.egg-info/PKG-INFO", "bench/results/run.json", ".git/HEAD", ".env",
    ]
    for name in [*tracked, *local_state]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).touch()
    shutil.copyfile(DOCKERIGNORE, tmp_path / ".dockerignore")
    patterns = [line for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines() if line and not line.startswith("#")]
    context = {path for path in exclude_paths(str(tmp_path), patterns) if (tmp_path / path).is_file()}

    assert [name for name in local_state if name in context] == []
    copied = [source for line in re.findall(r"^COPY (.+)$", DOCKERFILE.read_text(encoding="utf-8"), re.M) for source in line.split()[:-1]]
    for source in copied:
        wanted = {name for name in tracked if name == source or name.startswith(source + "/")}
        assert wanted and wanted <= context, source
    assert "data/faq.xlsx" in context
    assert not any(name.startswith(("embedding_assets_tests/", "bench/", "docs/")) for name in context)


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
    for name in SERVICES - {"postgres"}:
        environment = {k: interpolate(str(v), env) for k, v in compose["services"][name]["environment"].items()}
        assert {k for k in environment if k.startswith("EMBEDDING_ASSETS_")} == SETTINGS_VARS
        assert {k for k in environment if k.startswith("DAGSTER_")} == instance_env_vars()
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
    assert {"POSTGRES_PASSWORD", "POSTGRES_USER", "POSTGRES_DB", "DAGSTER_PORT", "RETRIEVAL_PORT"} <= variables
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
    """deploy/dagster.yaml, fed the compose variables, gives a working Dagster instance on a real PostgreSQL.

    A run's stdout lands in the compute logs directory, where another instance (the webserver's
    container) reads it back.
    """
    config = yaml.safe_load(INSTANCE_YAML.read_text(encoding="utf-8"))
    assert set(config["storage"]) == {"postgres"}
    logs = tmp_path / "compute-logs"
    monkeypatch.setenv(COMPUTE_LOGS_VAR, str(logs))
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
        print("probe says hello")
        return 1

    with dg.DagsterInstance.get() as instance:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        assert type(instance.event_log_storage).__name__ == "PostgresEventLogStorage"
        assert type(instance.compute_log_manager).__name__ == "LocalComputeLogManager"
        result = dg.materialize([probe], instance=instance)
        assert result.success
        assert [run.run_id for run in instance.get_runs()] == [result.run_id]
        captured = [
            e.dagster_event.logs_captured_data for e in instance.all_logs(result.run_id)
            if e.dagster_event and e.dagster_event.event_type == dg.DagsterEventType.LOGS_CAPTURED
        ]
    assert captured, "no compute logs were captured"
    assert any(logs in path.parents for path in logs.rglob("*") if path.is_file())
    with dg.DagsterInstance.get() as webserver_instance:  # what the run page asks for, as the UI does
        manager = webserver_instance.compute_log_manager
        log_data = manager.get_log_data(manager.build_log_key_for_run(result.run_id, captured[0].file_key))
    assert "probe says hello" in log_data.stdout.decode()


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
