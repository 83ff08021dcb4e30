"""HTTP search service over the published store: hot reload, readiness, last-good-copy serving."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, field_validator

from embedding_assets.retrieval import IndexIdentity, TemplateRetriever
from embedding_assets.store import redact_url

log = logging.getLogger("embedding_assets.service")

MAX_TOP_K = 50


class SearchRequest(BaseModel):
    """A customer query and how many templates to return."""

    query: str = Field(description="The customer's question, in any wording.", min_length=1)
    top_k: int = Field(3, ge=1, le=MAX_TOP_K, description=f"Number of templates to return (1–{MAX_TOP_K}).")
    category: str | None = Field(None, description="Only templates of this category.")
    subcategory: str | None = Field(None, description="Only templates of this subcategory.")

    @field_validator("query")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("query must contain some text")
        return value.strip()


class Hit(BaseModel):
    rank: int
    template_id: str
    score: float
    category: str
    subcategory: str
    question: str
    answer: str


class SearchResponse(BaseModel):
    query: str
    model_version: str = Field(description="The model version whose index ranked the hits.")
    store_id: str = Field(description="The identity of the store the hits were read from.")
    store_generation: int = Field(description="The store generation the hits were read from.")
    took_ms: float
    hits: list[Hit]


class RetrieverHolder:
    """Owns the current retriever: loads it, polls the store for a new identity or generation, reports readiness.

    A reload swaps a fully built index into the retriever; each search ranks on one index and answers
    with that index's identity, so a request in flight finishes on, and reports, the copy it started with.
    """

    def __init__(
        self,
        store: str | Path,
        model_version: str | None = None,
        reload_interval: float = 2.0,
        lexical_weight: float = 0.0,
        load: Callable[..., TemplateRetriever] = TemplateRetriever.load,
    ):
        self.store = str(store)
        self.model_version = model_version
        self.reload_interval = reload_interval
        self.lexical_weight = lexical_weight
        self._load = load
        self.retriever: TemplateRetriever | None = None
        self.problem: str | None = None
        self.last_check: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def refresh(self) -> None:
        """Load the store if nothing is loaded yet, else reload it when its identity or generation changed."""
        try:
            if self.retriever is None:
                started = time.perf_counter()
                retriever = self._load(self.store, self.model_version, lexical_weight=self.lexical_weight)
                retriever.search("проверка", top_k=1)  # loads the query model before the first request
                self.retriever = retriever
                info = retriever.info()
                log.info(
                    "ready: %s, %d templates at store generation %d (%.0f ms including the query model)",
                    info["model_version"], info["loaded_rows"], info["store_generation"],
                    (time.perf_counter() - started) * 1000,
                )
            else:
                before = self.retriever.index.identity
                if self.retriever.reload_if_changed():
                    self._log_reload(before, self.retriever.info())
        except Exception as exc:  # any failure to read the store leaves the last good copy serving
            message = f"{type(exc).__name__}: {exc}"
            if message != self.problem:
                if self.retriever is None:
                    log.warning("not ready, retrying every %.1f s: %s", self.reload_interval, message)
                else:
                    log.warning("degraded, serving the last good copy: %s", message)
            self.problem = message
            return
        finally:
            self.last_check = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        if self.problem is not None:
            log.info("store readable again")
            self.problem = None

    @staticmethod
    def _log_reload(before: IndexIdentity, info: dict) -> None:
        if info["store_id"] != before.store_id:
            log.warning("the store was replaced (new store identity); loading it")
        elif info["store_generation"] < before.store_generation:
            log.warning(
                "the store's generation went back from %d to %d; loading what it holds now",
                before.store_generation, info["store_generation"],
            )
        log.info("reloaded: %d templates at store generation %d", info["loaded_rows"], info["store_generation"])

    def _poll(self) -> None:
        while not self._stop.wait(self.reload_interval):
            self.refresh()

    def start(self) -> None:
        """Load in the background (a missing store must not block startup), then keep polling."""
        def run() -> None:
            self.refresh()
            self._poll()

        self._thread = threading.Thread(target=run, name="store-reloader", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def readiness(self) -> tuple[int, dict]:
        retriever = self.retriever
        if retriever is None:
            return 503, {"status": "not ready", "store": redact_url(self.store), "reason": self.problem or "loading",
                         "last_check": self.last_check}
        info = retriever.info()
        body = {
            "status": "degraded" if self.problem else "ready",
            "store": info["store"],
            "model_version": info["model_version"],
            "provider": info["provider"],
            "model": info["model"],
            "store_id": info["store_id"],
            "store_generation": info["store_generation"],
            "rows": info["loaded_rows"],
            "loaded_at": info["loaded_at"],
            "last_check": self.last_check,
        }
        if self.problem:
            body["reason"] = self.problem
        return 200, body


def _error(status: int, error: str, detail: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": error, "detail": detail})


def create_app(holder: RetrieverHolder) -> FastAPI:
    """The FastAPI application serving one holder's retriever."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        holder.start()
        yield
        holder.stop()

    app = FastAPI(
        title="FAQ template retrieval",
        description="Top-k FAQ templates for a customer query, from the latest published embedding store.",
        version="1",
        lifespan=lifespan,
    )
    app.state.holder = holder

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for e in exc.errors():
            loc = e.get("loc", ())
            field = str(loc[-1]) if len(loc) > 1 and isinstance(loc[-1], str) else "request body"
            problems.append(f"{field}: {e.get('msg')}")
        return _error(422, "invalid request", "; ".join(problems))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s", request.url.path)
        return _error(500, "internal error", f"{type(exc).__name__}: {exc}")

    def run_search(request: SearchRequest) -> SearchResponse | JSONResponse:
        retriever = holder.retriever
        if retriever is None:
            return _error(503, "not ready", holder.problem or "the store is still loading")
        started = time.perf_counter()
        try:
            result = retriever.search(request.query, request.top_k, request.category, request.subcategory)
        except ValueError as exc:
            return _error(400, "bad request", str(exc))
        return SearchResponse(
            query=request.query,
            model_version=result.identity.model_version,
            store_id=result.identity.store_id,
            store_generation=result.identity.store_generation,
            took_ms=round((time.perf_counter() - started) * 1000, 3),
            hits=[Hit(**h.as_dict()) for h in result.hits],
        )

    responses = {
        400: {"description": "Unknown category or subcategory"},
        422: {"description": "Empty query or top_k out of range"},
        503: {"description": "No store loaded yet"},
    }

    @app.get("/search", response_model=SearchResponse, responses=responses, summary="Search (query string)")
    def search_get(params: Annotated[SearchRequest, Query()]):
        return run_search(params)

    @app.post("/search", response_model=SearchResponse, responses=responses, summary="Search (JSON body)")
    def search_post(body: SearchRequest):
        return run_search(body)

    @app.get("/healthz", summary="The process is alive")
    def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz", summary="A store is loaded: model version, generation, rows, load time")
    def readyz() -> JSONResponse:
        status, body = holder.readiness()
        return JSONResponse(status_code=status, content=body)

    return app


def serve(
    store: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    model_version: str | None = None,
    reload_interval: float = 2.0,
    lexical_weight: float = 0.0,
) -> None:
    """Run the service with uvicorn until interrupted."""
    import uvicorn

    # The local model's OpenMP threads otherwise spin between parallel regions; on a busy machine
    # that multiplies query latency (see the README's benchmarks). Read when the model first loads.
    os.environ.setdefault("OMP_WAIT_POLICY", "passive")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    holder = RetrieverHolder(store, model_version, reload_interval, lexical_weight)
    uvicorn.run(create_app(holder), host=host, port=port, log_level="info")
