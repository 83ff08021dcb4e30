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
from embedding_assets.store import open_store
from embedding_assets_tests import version_flips
from embedding_assets_tests.conftest import read_rows, write_rows
from embedding_assets_tests.pipeline import run_pipeline
from embedding_assets_tests.reliability import record_figure
from embedding_assets_tests.version_flips import VERSIONS, VersionFlipper

CLI = str(Path(sys.executable).parent / "embedding-assets")
QUERY = "забыла пин от карточки, банкомат не пускает"
RELOAD_INTERVAL = "0.2"


class Service:
    """`embedding-assets serve` on a free port, in its own process group."""

    def __init__(self, store: Path | str, tmp_path: Path, reload_interval: str = RELOAD_INTERVAL):
        self.log_path = tmp_path / "service.log"
        self._log = open(self.log_path, "w")
        self.process = subprocess.Popen(
            [CLI, "serve", "--store", str(store), "--port", "0", "--reload-interval", reload_interval],
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

    def start(store: Path | str, reload_interval: str = RELOAD_INTERVAL) -> Service:
        service = Service(store, tmp_path, reload_interval)
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


def _ids(service: Service) -> set[str]:
    status, body = service.get("/search", query=version_flips.QUERY, top_k=50)
    assert status == 200, body
    return {h["template_id"] for h in body["hits"]}


def _build(store: Path, prefix: str, publishes: int) -> str:
    """A new store holding `prefix`'s templates after `publishes` publishes; its store id."""
    with open_store(store) as opened:
        for edit in range(publishes):
            version_flips.publish(opened, VERSIONS["P"], version_flips.sheet(prefix, edit))
        return opened.state().store_id


def _wait_for_ids(service: Service, ids: set[str], timeout: float) -> float:
    """Seconds until a search answers with exactly `ids`, polling every 20 ms; fails after `timeout`."""
    started = time.monotonic()
    while _ids(service) != ids:
        assert time.monotonic() - started < timeout, f"still serving other rows after {timeout} s:\n{service.log()}"
        time.sleep(0.02)
    return time.monotonic() - started


def test_a_store_replaced_at_the_same_generation_is_served_within_2_seconds(start_service, tmp_path):
    store = tmp_path / "replaced.db"
    first_id = _build(store, "P", 3)
    service = start_service(store, reload_interval="0.5")
    assert service.wait_ready()["store_generation"] == 3
    assert _ids(service) == {f"P-{n}" for n in range(1, version_flips.TEMPLATES + 1)}

    for path in (store, Path(f"{store}-wal"), Path(f"{store}-shm")):
        path.unlink(missing_ok=True)
    second_id = _build(store, "Q", 3)
    seconds = _wait_for_ids(service, {f"Q-{n}" for n in range(1, version_flips.TEMPLATES + 1)}, timeout=5)

    assert second_id != first_id
    assert seconds < 2.0
    ready = service.wait_ready()
    assert (ready["store_id"], ready["store_generation"]) == (second_id, 3)
    assert "the store was replaced (new store identity); loading it" in service.log()
    record_figure("replaced store", f"served the rebuilt store's rows {seconds:.2f} s after it was rebuilt "
                                    "(reload interval 0.5 s, same generation number)")


def test_a_store_whose_generation_goes_back_is_reloaded_and_logged(start_service, tmp_path):
    store = tmp_path / "restored.db"
    _build(store, "P", 1)
    older = tmp_path / "older.db"
    shutil.copyfile(store, older)
    with open_store(store) as opened:  # generation 2: the same ids, other answers; then a third id set
        version_flips.publish(opened, VERSIONS["P"], version_flips.sheet("P", 1)[:5])
    service = start_service(store, reload_interval="0.2")
    assert service.wait_ready()["store_generation"] == 2
    assert _ids(service) == {f"P-{n}" for n in range(1, 6)}

    shutil.copyfile(older, store)  # what losing the newest publish (e.g. a deleted -wal file) leaves behind
    _wait_for_ids(service, {f"P-{n}" for n in range(1, version_flips.TEMPLATES + 1)}, timeout=10)

    assert service.wait_ready()["store_generation"] == 1
    assert "the store's generation went back from 2 to 1; loading what it holds now" in service.log()


def test_1500_requests_from_16_clients_during_6_promotes_all_match_their_hits(start_service, tmp_path):
    store = tmp_path / "flips.db"
    with open_store(store) as opened:
        flipper = VersionFlipper(opened)
        service = start_service(store, reload_interval="0.05")
        service.wait_ready()
        requests, clients, promotes = 1500, 16, 6
        responses: list[tuple[str, int, list]] = []
        failures: list[object] = []
        remaining = iter(range(requests))
        lock = threading.Lock()

        def client() -> None:
            while True:
                with lock:
                    if next(remaining, None) is None:
                        return
                status, body = service.get("/search", query=version_flips.QUERY, top_k=50)
                if status != 200:
                    failures.append((status, body))
                    continue
                hits = [(h["template_id"], h["answer"]) for h in body["hits"]]
                responses.append((body["model_version"], body["store_generation"], hits))

        threads = [threading.Thread(target=client) for _ in range(clients)]
        for thread in threads:
            thread.start()
        for edit in range(1, promotes + 1):
            while len(responses) < edit * requests // (promotes + 1) and any(t.is_alive() for t in threads):
                time.sleep(0.01)
            flipper.flip(edit)
        for thread in threads:
            thread.join(timeout=300)

    disagreeing = [(v, g) for v, g, hits in responses if flipper.disagreeing(v, g, hits)]
    versions = {v for v, _, _ in responses}
    generations = {g for _, g, _ in responses}
    assert failures == []
    assert len(responses) == requests
    assert disagreeing == []
    assert versions == {"ids-p", "ids-q"}
    assert len(generations) >= 2
    record_figure(
        "one response, one index",
        f"{requests} requests from {clients} clients during {promotes} promotes: {len(disagreeing)} responses "
        f"whose version/generation disagree with their hits ({len(generations)} generations served)",
    )
