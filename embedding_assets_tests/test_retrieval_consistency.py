"""Every search response comes from one index: its model version and generation match its hits."""

from __future__ import annotations

import functools
import json
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest
import uvicorn

from embedding_assets.retrieval import TemplateRetriever
from embedding_assets.retrieval.service import RetrieverHolder, create_app
from embedding_assets.store import open_store
from embedding_assets_tests.reliability import BACKENDS
from embedding_assets_tests.version_flips import QUERY, VersionFlipper

FLIPS = 12


@pytest.fixture(params=BACKENDS)
def store_url(request) -> str:
    return request.getfixturevalue(f"{request.param}_store_url")


class InProcessService:
    """create_app() served by uvicorn on 127.0.0.1 in a thread of this process."""

    def __init__(self, holder: RetrieverHolder):
        self._socket = socket.socket()
        self._socket.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._socket.getsockname()[1]}"
        self._server = uvicorn.Server(uvicorn.Config(create_app(holder), log_level="warning"))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]})
        self._thread.start()

    def get(self, path: str, **params: object) -> tuple[int, dict]:
        url = f"{self.url}{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=30) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())
        except urllib.error.URLError:
            return 0, {}

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while self.get("/readyz")[0] != 200:
            assert time.monotonic() < deadline, "the in-process service never became ready"
            time.sleep(0.05)

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=30)
        self._socket.close()


def search_while_flipping(search, flipper: VersionFlipper, clients: int, flips: int) -> list[tuple[str, int, list]]:
    """Run `clients` threads calling search() while the flipper promotes `flips` times; every response."""
    responses: list[tuple[str, int, list]] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            try:
                responses.append(search())
            except BaseException as exc:  # recorded and asserted below
                errors.append(exc)
                return

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    try:
        for edit in range(1, flips + 1):
            time.sleep(0.05)
            flipper.flip(edit)
        final, deadline = max(flipper.served), time.monotonic() + 30
        while not errors and time.monotonic() < deadline and all(g != final for _, g, _ in responses[-50:]):
            time.sleep(0.02)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
    assert errors == []
    return responses


def test_http_responses_name_the_version_and_generation_their_hits_came_from(store_url: str) -> None:
    with open_store(store_url) as store:
        flipper = VersionFlipper(store)
        holder = RetrieverHolder(store_url, reload_interval=0.01)
        service = InProcessService(holder)
        try:
            service.wait_ready()

            def search() -> tuple[str, int, list]:
                status, body = service.get("/search", query=QUERY, top_k=50)
                assert status == 200, body
                hits = [(h["template_id"], h["answer"]) for h in body["hits"]]
                return body["model_version"], body["store_generation"], hits

            responses = search_while_flipping(search, flipper, clients=6, flips=FLIPS)
        finally:
            service.stop()

    disagreeing = [(v, g) for v, g, hits in responses if flipper.disagreeing(v, g, hits)]
    assert disagreeing == []
    assert {v for v, _, _ in responses} == {"ids-p", "ids-q"}
    assert max(g for _, g, _ in responses) == max(flipper.served)


@pytest.mark.parametrize("mode", ["memory", "database"])
def test_a_retriever_searched_by_threads_while_reloading_never_mixes_generations(postgres_store_url, mode) -> None:
    with open_store(postgres_store_url) as store:
        flipper = VersionFlipper(store)
        retriever = TemplateRetriever.load(postgres_store_url, mode=mode)
        stop_reloading = threading.Event()

        def reload() -> None:
            while not stop_reloading.wait(0.005):
                retriever.reload_if_changed()

        reloader = threading.Thread(target=reload)
        reloader.start()
        try:
            def search() -> tuple[str, int, list]:
                result = retriever.search(QUERY, top_k=50)
                hits = [(h.template_id, h.answer) for h in result.hits]
                return result.identity.model_version, result.identity.store_generation, hits

            responses = search_while_flipping(search, flipper, clients=4, flips=FLIPS)
        finally:
            stop_reloading.set()
            reloader.join(timeout=30)
            retriever.close()

    assert retriever.search_mode == mode
    assert [(v, g) for v, g, hits in responses if flipper.disagreeing(v, g, hits)] == []
    assert {v for v, _, _ in responses} == {"ids-p", "ids-q"}


def test_the_service_can_rank_in_the_database(postgres_store_url: str) -> None:
    with open_store(postgres_store_url) as store:
        VersionFlipper(store)
    holder = RetrieverHolder(postgres_store_url, load=functools.partial(TemplateRetriever.load, mode="database"))
    holder.refresh()
    assert holder.readiness()[1]["model_version"] == "ids-p"
    assert holder.retriever.search_mode == "database"
    holder.retriever.close()
