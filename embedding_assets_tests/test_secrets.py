"""Sentinel secrets (an API key, database and proxy passwords) never show, whole or in part, anywhere a
user or the Dagster UI can see them: CLI output, the Dagster instance directory, the service's answers
and log, file names. Store addresses are read as libpq reads them. Hostile queries are refused fast."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from itertools import count
from pathlib import Path

import psycopg2
import pytest
from psycopg2 import sql
from psycopg2.extensions import parse_dsn

from embedding_assets.lib.redaction import redact
from embedding_assets.settings import MAX_QUERY_CHARS
from embedding_assets.store import StoreError, open_store, parse_store_url, redact_url, sqlite_path, store_backend
from embedding_assets.store.urls import PostgresAddress, connection_settings
from embedding_assets_tests.conftest import SAMPLE_FAQ, read_rows, write_rows
from embedding_assets_tests.openai_servers import FaultServer, Reply, free_port
from embedding_assets_tests.postgres import with_database
from embedding_assets_tests.reliability import record_figure
from embedding_assets_tests.secrets_scan import assert_no_leaks, find_leaks, fragments

CLI = str(Path(sys.executable).parent / "embedding-assets")
KEY = "bge-m3-v1"
DIMENSION = 8
API_KEY = "sk-sentinelAPI-4e8b1f6d2a9c"  # 27 characters, like a real key
PROXY_TOKEN = "proxyTOKEN-93b7e15c0d"
DB_PASSWORD = "Pw#dbSECRET-6a2f90c17e"  # "#" is legal in a libpq URL password
SECRETS = (API_KEY, PROXY_TOKEN, DB_PASSWORD)
QUOTE_AT = 170  # where the provider's 400 quotes the Authorization header
_roles = count(1)


@pytest.fixture(scope="module")
def api():
    server = FaultServer(dimension=DIMENSION).start()
    yield server
    server.stop()


@pytest.fixture
def project(tmp_path: Path, api) -> dict[str, str]:
    """Environment of a deployment: an API model version whose URL and key come from the environment."""
    api.reset()
    versions = tmp_path / "versions.toml"
    versions.write_text(
        f'[[model_version]]\nkey = "{KEY}"\nprovider = "openai"\nmodel = "fake-embed"\ndimension = {DIMENSION}\n'
        'batch_size = 10\nsettings = { base_url_env = "EMBED_API_URL", max_attempts = 1, timeout = 2 }\n',
        encoding="utf-8",
    )
    return {
        **os.environ,
        "EMBEDDING_ASSETS_FAQ_PATH": str(write_rows(tmp_path / "faq.xlsx", read_rows(SAMPLE_FAQ))),
        "EMBEDDING_ASSETS_STORE": str(tmp_path / "store.db"),
        "EMBEDDING_ASSETS_MODEL_VERSIONS": str(versions),
        "DAGSTER_HOME": str(tmp_path / "dagster_home"),
        "EMBED_API_URL": api.base_url,
        "OPENAI_API_KEY": API_KEY,
    }


def run_cli(env: dict[str, str], *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([CLI, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def outputs(*runs: subprocess.CompletedProcess) -> list[tuple[str, str]]:
    return [(f"{' '.join(run.args[1:3])} {name}", text) for run in runs
            for name, text in (("stdout", run.stdout), ("stderr", run.stderr))]


def add_template(env: dict[str, str]) -> None:
    faq = Path(env["EMBEDDING_ASSETS_FAQ_PATH"])
    new = ["NEW-1", "Карты", "Кешбэк", "Есть ли кешбэк?", "низкий", "все", "Да."]
    write_rows(faq, [*read_rows(SAMPLE_FAQ), new])


def instance_bytes(env: dict[str, str]) -> bytes:
    return b"".join(p.read_bytes() for p in Path(env["DAGSTER_HOME"]).rglob("*") if p.is_file())


# --- the one redaction function ----------------------------------------------------------------


def test_a_key_after_the_cut_is_redacted_before_the_message_is_cut() -> None:
    message = "Invalid request: ".ljust(QUOTE_AT, ".") + f"Authorization: Bearer {API_KEY} and more"
    shown = redact(message, [API_KEY], limit=200)
    assert len(shown) == 200 and shown.endswith("…")
    assert find_leaks(SECRETS, [("shown", shown)]) == []
    unknown = redact(message.replace(API_KEY, "sk-otherKEY-0123456789abcdef"), [], limit=200)
    assert "Authorization: Bearer ***" in unknown and "otherKEY" not in unknown
    assert redact("a sk-abcdef123456 token") == "a *** token"
    shown = redact(f"cannot connect to http://proxy:{PROXY_TOKEN}@h:8/v1 now")
    assert shown == "cannot connect to http://proxy:***@h:8/v1 now"


def test_the_scan_finds_every_fragment_and_only_those(tmp_path: Path) -> None:
    assert len(fragments("abcdefghij")) == 3
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / f"x{API_KEY[5:13]}.db").write_bytes(b"")
    (tmp_path / "b.bin").write_bytes(b"\x00zz" + DB_PASSWORD[-8:].encode())
    leaks = find_leaks(SECRETS, [("out", f"..{PROXY_TOKEN[:8]}..")], [tmp_path])
    assert sorted(leaks) == sorted([
        f"out: {PROXY_TOKEN[:8]!r}", f"file name {tmp_path / 'a' / f'x{API_KEY[5:13]}.db'}: {API_KEY[5:13]!r}",
        f"bytes of {tmp_path / 'b.bin'}: {DB_PASSWORD[-8:].encode()!r}"])
    assert find_leaks(SECRETS, [("out", API_KEY[:7] + "*" + API_KEY[8:14])]) == []


# --- store addresses as libpq reads them -------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "shown", "dsn", "schema"),
    [
        ("postgresql://u:pw#secret@h:5432/db", "postgresql://u:***@h:5432/db", "postgresql://u:pw#secret@h:5432/db",
         "embedding_store"),
        ("postgres://u:pw#s?x@h/db?schema=faq&sslmode=require", "postgres://u:***@h/db?schema=faq&sslmode=require",
         "postgres://u:pw#s?x@h/db?sslmode=require", "faq"),
        ("postgresql://u@h/db?password=pw%23secret", "postgresql://u@h/db?password=***",
         "postgresql://u@h/db?password=pw%23secret", "embedding_store"),
        ("host=h port=5433 user=u password=pw#secret dbname=db", "host=h port=5433 user=u password=*** dbname=db",
         "host=h port=5433 user=u password=pw#secret dbname=db", "embedding_store"),
        ("host=h  password = 'p w\\'secret'  dbname=db schema=faq", "host=h password=*** dbname=db schema=faq",
         "host=h password='p w\\'secret' dbname=db", "faq"),
    ],
)
def test_postgres_addresses_are_parsed_by_libpq_and_shown_without_the_password(address, shown, dsn, schema) -> None:
    assert store_backend(address) == "postgresql" and sqlite_path(address) is None
    assert redact_url(address) == shown
    assert connection_settings(address) == (dsn, schema)
    parsed = parse_store_url(address)
    assert isinstance(parsed, PostgresAddress) and parsed.parameters == parse_dsn(dsn)
    assert parsed.password in {"pw#secret", "pw#s?x", "p w'secret"}
    assert "secret" not in redact_url(address) + repr(parsed)


@pytest.mark.parametrize(
    ("address", "path"),
    [("sqlite:///data/x.db", "data/x.db"), ("sqlite:////abs/x", "/abs/x"), ("store.db", "store.db"),
     ("dir/a=b.sqlite3", "dir/a=b.sqlite3"), ("x.SQLITE", "x.SQLITE")],
)
def test_sqlite_addresses(address: str, path: str) -> None:
    assert store_backend(address) == "sqlite"
    assert parse_store_url(address) == sqlite_path(address) == Path(path)


@pytest.mark.parametrize(
    ("address", "message"),
    [
        ("notes.txt", "unsupported store address (an SQLite path must end in .db, .sqlite or .sqlite3) notes.txt; "),
        ("sqlite:///x.db?password=pw#secret", "a store address holding password= is never used as a file name, and "
         "this is no PostgreSQL address: sqlite:///x.db?password=***; "),
        ("mysql://u:pw#secret@h/db", "unsupported store URL scheme 'mysql' in mysql://u:***@h/db; "),
        ("host=h pasword=pw#secret", "host=h pasword=… is not a valid PostgreSQL address: "
         'invalid connection option "pasword"'),
        ("host=h password pw#secret", "the store address looks like a libpq keyword string (key=value ...) but "
         'cannot be read: a quote is not closed or a word has no "="'),
        ("host=h password='pw#secret", "the store address looks like a libpq keyword string"),
    ],
)
def test_anything_else_is_refused_and_never_becomes_a_file(address: str, message: str, tmp_path: Path,
                                                           monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(StoreError) as raised:
        open_store(address)
    assert str(raised.value).startswith(message)
    assert list(tmp_path.iterdir()) == []
    assert "secret" not in str(raised.value)


# --- the CLI and the Dagster instance ------------------------------------------------------------


def test_a_provider_400_quoting_the_key_after_170_characters_shows_nowhere(project, api, tmp_path: Path) -> None:
    done = run_cli(project, "materialize", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert {r.authorization for r in api.requests} == {f"Bearer {API_KEY}"}

    add_template(project)
    api.reset(fallback=Reply(status=400, quote_request_after=QUOTE_AT))
    failed = run_cli(project, "materialize", cwd=tmp_path)
    assert [r.authorization for r in api.requests] == [f"Bearer {API_KEY}"]  # the server got (and quoted) the key
    api.reset(fallback=Reply(status=400, quote_request_after=QUOTE_AT))
    searched = run_cli(project, "search", "где банкомат?", cwd=tmp_path)
    searched_json = run_cli(project, "search", "где банкомат?", "--json", cwd=tmp_path)

    assert failed.returncode == 1
    rejected = (f"the server at {api.base_url} rejected the request (HTTP 400: Invalid request: the input could "
                "not be read as text; the request had ")
    assert rejected in failed.stderr
    assert "Authorization: Bearer *** and…); check the model version's settings" in failed.stderr
    for run in (searched, searched_json):
        assert run.returncode == 1 and run.stdout == "" and "Traceback" not in run.stderr
        assert run.stderr.startswith(f"Error: model version '{KEY}': embedding the query failed: {rejected}")
    assert b"rejected the request (HTTP 400" in instance_bytes(project)  # the event log holds the message
    assert_no_leaks(SECRETS, outputs(done, failed, searched, searched_json), [tmp_path])


def test_a_provider_url_with_credentials_is_redacted_in_messages_and_the_event_log(project, api,
                                                                                   tmp_path: Path) -> None:
    port = free_port()
    project["EMBED_API_URL"] = f"http://proxyuser:{PROXY_TOKEN}@127.0.0.1:{port}/v1"
    failed = run_cli(project, "materialize", "--json", cwd=tmp_path)
    assert failed.returncode == 1
    assert (json.loads(failed.stdout)["success"], json.loads(failed.stdout)["published"]) == (False, False)
    assert failed.stderr.splitlines()[0] == (
        f"{KEY}: step template_embeddings failed: model version '{KEY}': gave up after 1 attempt(s); last HTTP "
        f"status none (cannot connect to http://proxyuser:***@127.0.0.1:{port}/v1); 0 of 90 text(s) embedded and "
        "cached, 90 failed (a rerun sends only those)"
    )
    assert f"cannot connect to http://proxyuser:***@127.0.0.1:{port}/v1".encode() in instance_bytes(project)

    project["EMBED_API_URL"] = api.base_url.replace("http://", f"http://proxyuser:{PROXY_TOKEN}@")
    done = run_cli(project, "materialize", "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    api.reset(fallback=Reply(status=400, quote_request_after=QUOTE_AT))
    searched = run_cli(project, "search", "где банкомат?", cwd=tmp_path)
    assert searched.returncode == 1 and "Traceback" not in searched.stderr
    assert f"the server at {project['EMBED_API_URL'].replace(PROXY_TOKEN, '***')} rejected" in searched.stderr
    project["EMBED_API_URL"] = f"http://proxyuser:{PROXY_TOKEN}@127.0.0.1:{port}/v1"
    unreachable = run_cli(project, "search", "где банкомат?", cwd=tmp_path)
    assert unreachable.returncode == 1 and unreachable.stderr == (
        f"Error: model version '{KEY}': embedding the query failed: gave up after 1 attempt(s); last HTTP status "
        f"none (cannot connect to http://proxyuser:***@127.0.0.1:{port}/v1)\n"
    )
    assert_no_leaks(SECRETS, outputs(failed, done, searched, unreachable), [tmp_path])


def test_the_cli_refuses_a_query_over_the_limit_before_embedding_it(project, api, tmp_path: Path) -> None:
    assert run_cli(project, "materialize", cwd=tmp_path).returncode == 0
    api.reset()
    long = run_cli(project, "search", "where atm " * 10_000, cwd=tmp_path)  # 100 kB
    assert long.returncode == 2 and api.requests == []
    assert long.stderr.endswith(
        f"Error: Invalid value for TEXT: the query has 100000 characters; at most {MAX_QUERY_CHARS} are accepted "
        "(the query model reads no more than its first 512 tokens)\n"
    )
    ok = run_cli(project, "search", "б" * MAX_QUERY_CHARS, "--json", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert [r.inputs for r in api.requests] == [["б" * MAX_QUERY_CHARS]]


# --- PostgreSQL addresses with a sentinel password -----------------------------------------------


@contextmanager
def sentinel_database(server_url: str) -> Iterator[dict[str, str]]:
    """A role with the sentinel password owning a new database with pgvector; yields host, port, user, dbname."""
    n = next(_roles)
    role, database = f"faq_owner_{os.getpid()}_{n}", f"faq_db_{os.getpid()}_{n}"
    admin = psycopg2.connect(server_url, connect_timeout=10)
    admin.autocommit = True
    try:
        with admin.cursor() as cur:
            cur.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD %s").format(sql.Identifier(role)), (DB_PASSWORD,))
            cur.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(database), sql.Identifier(role)))
        inside = psycopg2.connect(with_database(server_url, database), connect_timeout=10)
        inside.autocommit = True
        with inside.cursor() as cur:
            cur.execute("CREATE EXTENSION IF NOT EXISTS vector")
        inside.close()
        server = parse_dsn(server_url)
        yield {"host": server.get("host", "127.0.0.1"), "port": server.get("port", "5432"), "user": role,
               "dbname": database}
    finally:
        with admin.cursor() as cur:
            cur.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(database)))
            cur.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))
        admin.close()


@pytest.mark.parametrize("form", ["keywords", "url-with-hash"])
def test_postgres_addresses_with_a_sentinel_password_work_and_never_show_it(form: str, postgres_server: str,
                                                                          project, tmp_path: Path) -> None:
    with sentinel_database(postgres_server) as db:
        if form == "keywords":
            address = (f"host={db['host']} port={db['port']} user={db['user']} password={DB_PASSWORD} "
                       f"dbname={db['dbname']}")
            shown = address.replace(DB_PASSWORD, "***")
        else:
            address = f"postgresql://{db['user']}:{DB_PASSWORD}@{db['host']}:{db['port']}/{db['dbname']}?schema=faq"
            shown = address.replace(DB_PASSWORD, "***")
        project["EMBEDDING_ASSETS_STORE"] = address
        done = run_cli(project, "materialize", "--json", cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        status = run_cli(project, "status", "--json", cwd=tmp_path)
        status_text = run_cli(project, "status", cwd=tmp_path)
        listed = run_cli(project, "versions", "list", cwd=tmp_path)
        found = run_cli(project, "search", "где банкомат?", "--json", cwd=tmp_path)
        project["EMBEDDING_ASSETS_STORE"] = address.replace(DB_PASSWORD, DB_PASSWORD + "-wrong")
        refused = run_cli(project, "status", cwd=tmp_path)

    assert json.loads(done.stdout)["store"] == shown
    assert (json.loads(status.stdout)["store"], json.loads(status.stdout)["generation"]) == (shown, 1)
    assert status_text.stdout.startswith(f"store {shown} at generation 1\n")
    assert KEY in listed.stdout and len(json.loads(found.stdout)["hits"]) == 3
    assert refused.returncode == 1 and "password authentication failed" in refused.stderr
    assert db["user"].encode() in instance_bytes(project)  # the event log holds the (redacted) address
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dagster_home", "faq.xlsx", "versions.toml"]
    assert_no_leaks(SECRETS, outputs(done, status, status_text, listed, found, refused), [tmp_path])


# --- the HTTP service ----------------------------------------------------------------------------


def _request(port: int, path: str, body: bytes | None = None, timeout: float = 30) -> tuple[int, object, float]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body,
                                     headers={"Content-Type": "application/json"} if body is not None else {})
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, text = response.status, response.read()
    except urllib.error.HTTPError as error:
        status, text = error.code, error.read()
    try:
        body = json.loads(text or b"null")
    except ValueError:
        body = text.decode()
    return status, body, time.perf_counter() - started


def _search(port: int, query: str, timeout: float = 30) -> tuple[int, dict, float]:
    return _request(port, "/search", json.dumps({"query": query}).encode(), timeout)


@contextmanager
def running_service(env: dict[str, str], log: Path, *args: str) -> Iterator[int]:
    port = free_port()
    with log.open("wb") as out:
        process = subprocess.Popen([CLI, "serve", "--port", str(port), "--reload-interval", "0.2", *args],
                                   cwd=log.parent, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if _request(port, "/readyz", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        yield port
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_the_service_answers_provider_failures_and_hostile_queries_safely(project, api, tmp_path: Path) -> None:
    assert run_cli(project, "materialize", cwd=tmp_path).returncode == 0
    project["EMBED_API_URL"] = api.base_url.replace("http://", f"http://proxyuser:{PROXY_TOKEN}@")
    log = tmp_path / "service.log"
    bodies: list[tuple[str, str]] = []

    def answer(port: int, reply: Reply | None, query: str = "где банкомат?") -> tuple[int, dict]:
        api.reset(fallback=reply)
        status, body, _ = _search(port, query)
        bodies.append((f"{status} body", json.dumps(body, ensure_ascii=False)))
        return status, body

    with running_service(project, tmp_path / "service-1s.log", "--search-timeout", "1") as port:
        # under the model version's 2 s timeout, over the service's 1 s
        assert answer(port, Reply(delay=1.5)) == (504, {
            "error": "search timed out", "detail": "the search did not finish within 1 s"})
    api.reset()
    with running_service(project, log) as port:
        assert answer(port, None)[0] == 200
        assert answer(port, Reply(status=400, quote_request_after=QUOTE_AT)) == (502, {
            "error": "embedding provider error",
            "detail": "the query could not be embedded: the embedding provider answered HTTP 400"})
        assert answer(port, Reply(status=503)) == (503, {
            "error": "embedding provider unavailable",
            "detail": "the query could not be embedded: the embedding provider answered HTTP 503; try again later"})
        assert answer(port, Reply(delay=3)) == (503, {  # the model version's 2 s timeout
            "error": "embedding provider unavailable",
            "detail": "the query could not be embedded: the embedding provider did not answer; try again later"})

        api.reset()
        refused = {}
        for name, size in (("100 kB", 100_000), ("2 MB", 2_000_000)):
            status, body, took = _search(port, "я" * (size // 2))  # two bytes a character
            refused[name] = (status, body)
            record_figure(f"service refuses a {name} query", f"HTTP {status} in {took * 1000:.0f} ms")
        over = _search(port, "я" * (MAX_QUERY_CHARS + 1))
        got = _request(port, "/search?query=" + "%D1%8F" * (MAX_QUERY_CHARS + 1))
        long_get = _request(port, "/search?query=" + "a" * 100_000)  # over the HTTP server's header limit
        assert api.requests == []  # nothing of those reached the model
        assert answer(port, None)[0] == 200
    assert refused == {name: (413, {"error": "request too large",
                                    "detail": "the request body may hold at most 65536 bytes"}) for name in refused}
    detail = f"query: String should have at most {MAX_QUERY_CHARS} characters"
    assert over[:2] == got[:2] == (422, {"error": "invalid request", "detail": detail})
    assert long_get[:2] == (400, "Invalid HTTP request received.")
    service_log = log.read_text()
    assert "search failed: model version 'bge-m3-v1': embedding the query failed: the server at " in service_log
    assert "search timed out after 1 s" in (tmp_path / "service-1s.log").read_text()
    assert_no_leaks(SECRETS, [*bodies, ("service log", service_log)], [tmp_path])
