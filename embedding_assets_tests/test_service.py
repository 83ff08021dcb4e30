"""The HTTP search service as a real process: readiness, search, bad input, hot reload, degradation."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from embedding_assets.retrieval import TemplateRetriever
from embedding_assets_tests.conftest import read_rows, write_rows
from embedding_assets_tests.pipeline import run_pipeline

CLI = str(Path(sys.executable).parent / "embedding-assets")
QUERY = "забыла пин от карточки, банкомат не пускает"
RELOAD_INTERVAL = "0.2"


class Service:
    """`embedding-assets serve` on a free port, in its own process group."""

    def __init__(self, store: Path, tmp_path: Path):
        self.log_path = tmp_path / "service.log"
        self._log = open(self.log_path, "w")
        self.process = subprocess.Popen(
            [CLI, "serve", "--store", str(store), "--port", "0", "--reload-interval", RELOAD_INTERVAL],
            cwd=tmp_path, env={**os.environ, "DAGSTER_HOME": str(tmp_path / "dagster_home")},
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        self.url = self._wait_for_port()

    def _wait_for_port(self) -> str:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            found = re.search(r"Uvicorn running on (http://127\.0\.0\.1:\d+)", self.log())
            if found:
                return found.group(1)
            if self.process.poll() is not None:
                pytest.fail(f"the service exited ({self.process.returncode}):\n{self.log()}")
            time.sleep(0.05)
        pytest.fail(f"the service did not start listening:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text()

    def get(self, path: str, **params: object) -> tuple[int, dict]:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        return self._call(urllib.request.Request(self.url + path + query))

    def post(self, path: str, body: object, raw: bytes | None = None) -> tuple[int, dict]:
        data = raw if raw is not None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        return self._call(request)

    @staticmethod
    def _call(request: urllib.request.Request) -> tuple[int, dict]:
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    def wait_until(self, predicate, what: str, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status, body = self.get("/readyz")
            if predicate(status, body):
                return body
            time.sleep(0.05)
        pytest.fail(f"timed out waiting for {what}; last /readyz: {status} {body}\n{self.log()}")

    def wait_ready(self) -> dict:
        return self.wait_until(lambda status, body: status == 200 and body["status"] == "ready", "ready")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self._log.close()


def hits(service: Service) -> list[dict]:
    status, body = service.get("/search", query=QUERY, top_k=3)
    assert status == 200, body
    return body["hits"]


@pytest.fixture
def start_service(tmp_path):
    started: list[Service] = []

    def start(store: Path) -> Service:
        service = Service(store, tmp_path)
        started.append(service)
        return service

    yield start
    for service in started:
        service.stop()


@pytest.fixture
def store_copy(first_run, tmp_path) -> Path:
    store = tmp_path / "store.db"
    shutil.copyfile(first_run[2], store)
    return store


@pytest.fixture(scope="module")
def running(first_run, tmp_path_factory):
    """One service over an unchanging store copy, shared by the read-only tests."""
    directory = tmp_path_factory.mktemp("service")
    store = directory / "store.db"
    shutil.copyfile(first_run[2], store)
    service = Service(store, directory)
    service.wait_ready()
    yield service, store
    service.stop()


def test_ready_search_and_openapi(running):
    service, store_copy = running
    ready = service.wait_ready()
    assert (ready["model_version"], ready["store_generation"], ready["rows"]) == ("e5-small-v1", 1, 90)
    assert ready["loaded_at"] and "reason" not in ready
    assert service.get("/healthz") == (200, {"status": "ok"})

    expected = TemplateRetriever.load(store_copy).search(QUERY, top_k=3)
    status, body = service.get("/search", query=QUERY, top_k=3)
    assert status == 200
    assert (body["query"], body["model_version"], body["store_generation"]) == (QUERY, "e5-small-v1", 1)
    assert [h["template_id"] for h in body["hits"]] == [h.template_id for h in expected]
    assert [h["rank"] for h in body["hits"]] == [1, 2, 3]
    assert [h["score"] for h in body["hits"]] == pytest.approx([h.score for h in expected], abs=1e-5)
    assert body["hits"][0]["question"] == expected[0].question
    status, posted = service.post("/search", {"query": QUERY, "top_k": 3})
    assert status == 200 and posted["hits"] == body["hits"]

    status, schema = service.get("/openapi.json")
    assert status == 200
    assert {"/search", "/healthz", "/readyz"} <= set(schema["paths"])
    assert {"get", "post"} <= set(schema["paths"]["/search"])


def test_category_and_subcategory_filters(running):
    service, store_copy = running
    snapshot = TemplateRetriever.load(store_copy).index.snapshot
    in_subcategory = [t for t in snapshot.templates if t.subcategory == "Блокировка и перевыпуск"]

    status, body = service.get("/search", query=QUERY, top_k=10, category="Кредиты")
    assert status == 200 and len(body["hits"]) == 10
    assert {h["category"] for h in body["hits"]} == {"Кредиты"}

    status, body = service.post("/search", {"query": QUERY, "top_k": 50, "subcategory": "Блокировка и перевыпуск"})
    assert status == 200
    assert sorted(h["template_id"] for h in body["hits"]) == sorted(t.template_id for t in in_subcategory)

    status, body = service.get("/search", query=QUERY, category="Кредиты", subcategory="Блокировка и перевыпуск")
    assert (status, body["hits"]) == (200, [])


@pytest.mark.parametrize(
    ("params", "status", "detail"),
    [
        ({"query": ""}, 422, "query: String should have at least 1 character"),
        ({"query": "   "}, 422, "query: Value error, query must contain some text"),
        ({"top_k": 3}, 422, "query: Field required"),
        ({"query": QUERY, "top_k": 0}, 422, "top_k: Input should be greater than or equal to 1"),
        ({"query": QUERY, "top_k": 51}, 422, "top_k: Input should be less than or equal to 50"),
        ({"query": QUERY, "top_k": "many"}, 422, "top_k: Input should be a valid integer"),
        ({"query": QUERY, "category": "Ипотека"}, 400, "unknown category 'Ипотека'; known: Безопасность"),
        ({"query": QUERY, "subcategory": "Нет такой"}, 400, "unknown subcategory 'Нет такой'; known: "),
    ],
)
def test_bad_parameters_get_clear_json_errors(running, params, status, detail):
    service, _ = running
    for got_status, body in (service.get("/search", **params), service.post("/search", params)):
        assert got_status == status
        assert body["detail"].startswith(detail), body
    assert service.post("/search", None, raw=b"{not json")[0] == 422


def test_a_publish_while_clients_search_swaps_without_errors(warm, start_service):
    faq, store = warm
    service = start_service(store)
    service.wait_ready()
    rows = read_rows(faq)
    rows.append(["NEW-ZEBRA", "Карты", "Оформление и доставка", "Можно ли заказать карту с рисунком зебры?",
                 "низкий", "все клиенты", "Да, карту с рисунком зебры можно заказать в приложении."])
    write_rows(faq, rows)

    responses: list[tuple[int, int | None]] = []
    stop = threading.Event()

    def client_loop() -> None:
        while not stop.is_set():
            status, body = service.get("/search", query="карта с рисунком зебры", top_k=1)
            responses.append((status, body.get("store_generation")))

    clients = [threading.Thread(target=client_loop) for _ in range(2)]
    for client in clients:
        client.start()
    try:
        outcome = run_pipeline(faq, store)
        assert outcome.result.success and outcome.store["generation"] == 2
        ready = service.wait_until(lambda s, b: b.get("store_generation") == 2, "the new generation")
        time.sleep(0.3)
    finally:
        stop.set()
        for client in clients:
            client.join()

    assert ready["rows"] == 91 and ready["status"] == "ready"
    assert {status for status, _ in responses} == {200}
    assert {generation for _, generation in responses} == {1, 2}
    status, body = service.get("/search", query="карта с рисунком зебры", top_k=1)
    assert (status, body["store_generation"], body["hits"][0]["template_id"]) == (200, 2, "NEW-ZEBRA")
    assert "reloaded: 91 templates at store generation 2" in service.log()


def test_a_store_deleted_or_corrupted_after_start_keeps_serving_and_recovers(store_copy, start_service, tmp_path):
    service = start_service(store_copy)
    service.wait_ready()
    before = hits(service)
    backup = tmp_path / "backup.db"
    shutil.copyfile(store_copy, backup)

    store_copy.unlink()
    degraded = service.wait_until(lambda s, b: b["status"] == "degraded", "degraded after delete")
    assert degraded["reason"] == f"StoreNotFoundError: no embedding store at {store_copy}"
    assert (degraded["rows"], degraded["store_generation"]) == (90, 1)
    assert hits(service) == before

    store_copy.write_bytes(b"this is not an SQLite database" * 100)
    corrupt = service.wait_until(lambda s, b: b.get("reason", "").startswith("StoreCorruptError"), "corrupt")
    assert corrupt["status"] == "degraded"
    assert hits(service) == before

    shutil.copyfile(backup, store_copy)
    recovered = service.wait_ready()
    assert "reason" not in recovered and recovered["rows"] == 90
    assert hits(service) == before
    log = service.log()
    assert "degraded, serving the last good copy: StoreNotFoundError" in log
    assert "store readable again" in log


def test_a_store_missing_at_start_is_not_ready_until_it_appears(first_run, start_service, tmp_path):
    store = tmp_path / "later.db"
    service = start_service(store)
    not_ready = service.wait_until(lambda s, b: s == 503 and b["reason"] != "loading", "a reason")
    assert not_ready["reason"] == f"StoreNotFoundError: no embedding store at {store}"
    assert not_ready["status"] == "not ready"
    status, body = service.get("/search", query=QUERY)
    assert (status, body["error"]) == (503, "not ready")
    assert service.get("/healthz") == (200, {"status": "ok"})

    shutil.copyfile(first_run[2], store)
    ready = service.wait_ready()
    assert (ready["rows"], ready["store_generation"]) == (90, 1)
    assert service.get("/search", query=QUERY, top_k=1)[0] == 200
