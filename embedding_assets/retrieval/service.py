"""HTTP search service over the published store: hot reload, readiness, last-good-copy serving."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field, field_validator
from swagger_ui_bundle import swagger_ui_path

from embedding_assets.lib.embedders import EmbeddingError
from embedding_assets.lib.openai_embedder import RETRYABLE_STATUSES
from embedding_assets.lib.redaction import redact
from embedding_assets.retrieval import IndexIdentity, TemplateRetriever
from embedding_assets.settings import MAX_QUERY_CHARS, MAX_TOP_K
from embedding_assets.store import PostgresAddress, StoreError, parse_store_url, redact_url

log = logging.getLogger("embedding_assets.service")

DOCS_ASSETS = "/docs/assets"
MAX_BODY_BYTES = 64 * 1024  # a JSON body with the longest query, escaped, fits many times over
DRAINED_BODY_BYTES = 16 * 1024 * 1024  # a larger body is read (not parsed) so its client sees the 413
SEARCH_TIMEOUT_S = 15.0  # default; a search still running then is answered 504 (it finishes in its worker)
SEARCH_WORKERS = 4
MAX_PENDING_SEARCHES = 16  # searches waiting or running; more are answered 503 at once
DETAIL_CHARS = 300


class SearchRequest(BaseModel):
    """A customer query and how many templates to return."""

    query: str = Field(
        description=f"The customer's question, in any wording (at most {MAX_QUERY_CHARS} characters).",
        min_length=1,
        max_length=MAX_QUERY_CHARS,
    )
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
        self.secrets = store_secrets(self.store)
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
            message = redact(f"{type(exc).__name__}: {exc}", self.secrets)
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


def store_secrets(store: str) -> list[str]:
    """The password of a PostgreSQL store address, hidden from every message and log line."""
    try:
        address = parse_store_url(store)
    except StoreError:
        return []
    return [address.password] if isinstance(address, PostgresAddress) and address.password else []


class RedactingFilter(logging.Filter):
    """Hides secrets in log records (the message, its arguments and a formatted traceback)."""

    def __init__(self, secrets: list[str]):
        super().__init__()
        self.secrets = secrets

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + "".join(traceback.format_exception(*record.exc_info)).rstrip()
            record.exc_info, record.exc_text = None, None
        record.msg, record.args = redact(message, self.secrets), None
        return True


def _error(status: int, error: str, detail: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": error, "detail": detail})


def _add_offline_docs(app: FastAPI) -> None:
    """Swagger UI at /docs from the files of the installed swagger-ui-bundle package, no CDN."""
    app.mount(DOCS_ASSETS, StaticFiles(directory=str(swagger_ui_path)), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url,
            title=f"{app.title} · API docs",
            swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{DOCS_ASSETS}/favicon-32x32.png",
            swagger_ui_parameters={"validatorUrl": None},  # the online validator badge is an external image
        )


def _embedding_failure(exc: EmbeddingError) -> JSONResponse:
    """502 when the provider refused the query; 503 when it could not be reached, timed out or was overloaded."""
    status = getattr(exc, "status", None)
    if status is None or status in RETRYABLE_STATUSES:
        said = "did not answer" if status is None else f"answered HTTP {status}"
        return _error(503, "embedding provider unavailable",
                      f"the query could not be embedded: the embedding provider {said}; try again later")
    return _error(502, "embedding provider error",
                  f"the query could not be embedded: the embedding provider answered HTTP {status}")


def create_app(holder: RetrieverHolder, search_timeout: float = SEARCH_TIMEOUT_S) -> FastAPI:
    """The FastAPI application serving one holder's retriever; a search taking over search_timeout s is a 504."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        holder.start()
        yield
        holder.stop()
        searches.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(
        title="FAQ template retrieval",
        description="Top-k FAQ templates for a customer query, from the latest published embedding store.",
        version="1",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    app.state.holder = holder
    _add_offline_docs(app)
    searches = ThreadPoolExecutor(max_workers=SEARCH_WORKERS, thread_name_prefix="search")
    pending = threading.BoundedSemaphore(MAX_PENDING_SEARCHES)

    @app.middleware("http")
    async def bounded_body(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
            if length.isdigit() and int(length) <= DRAINED_BODY_BYTES:
                async for _ in request.stream():
                    pass
            return _error(413, "request too large", f"the request body may hold at most {MAX_BODY_BYTES} bytes")
        return await call_next(request)

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
        detail = redact(f"{type(exc).__name__}: {exc}", holder.secrets)
        trace = redact("".join(traceback.format_exception(exc)).rstrip(), holder.secrets)
        log.error("unexpected error on %s: %s\n%s", request.url.path, detail, trace)
        return _error(500, "internal error", redact(detail, holder.secrets, limit=DETAIL_CHARS))

    def run_search(request: SearchRequest) -> SearchResponse | JSONResponse:
        retriever = holder.retriever
        if retriever is None:
            return _error(503, "not ready", holder.problem or "the store is still loading")
        started = time.perf_counter()
        try:
            result = retriever.search(request.query, request.top_k, request.category, request.subcategory)
        except EmbeddingError as exc:
            log.warning("search failed: %s", redact(str(exc), holder.secrets))
            return _embedding_failure(exc)
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

    async def bounded_search(request: SearchRequest) -> SearchResponse | JSONResponse:
        """The search in a worker thread: at most MAX_PENDING_SEARCHES at once, search_timeout s each."""
        if not pending.acquire(blocking=False):
            return _error(503, "busy", "too many searches in progress; try again shortly")
        try:
            future = searches.submit(run_search, request)
        except BaseException:
            pending.release()
            raise
        future.add_done_callback(lambda _: pending.release())
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), search_timeout)
        except TimeoutError:
            log.warning("search timed out after %g s", search_timeout)
            return _error(504, "search timed out", f"the search did not finish within {search_timeout:g} s")

    responses = {
        400: {"description": "Unknown category or subcategory"},
        413: {"description": f"Request body over {MAX_BODY_BYTES} bytes"},
        422: {"description": f"Empty query, a query over {MAX_QUERY_CHARS} characters, or top_k out of range"},
        502: {"description": "The embedding provider answered the query with an error"},
        503: {"description": "No store loaded yet, the embedding provider unreachable, or too many searches"},
        504: {"description": f"The search did not finish in time ({search_timeout:g} s)"},
    }

    @app.get("/search", response_model=SearchResponse, responses=responses, summary="Search (query string)")
    async def search_get(params: Annotated[SearchRequest, Query()]):
        return await bounded_search(params)

    @app.post("/search", response_model=SearchResponse, responses=responses, summary="Search (JSON body)")
    async def search_post(body: SearchRequest):
        return await bounded_search(body)

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
    search_timeout: float = SEARCH_TIMEOUT_S,
) -> None:
    """Run the service with uvicorn until interrupted."""
    import uvicorn

    # The local model's OpenMP threads otherwise spin between parallel regions; on a busy machine
    # that multiplies query latency (see the README's benchmarks). Read when the model first loads.
    os.environ.setdefault("OMP_WAIT_POLICY", "passive")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for client_log in ("httpx", "httpx2"):  # their request lines carry the provider URL
        logging.getLogger(client_log).setLevel(logging.WARNING)
    holder = RetrieverHolder(store, model_version, reload_interval, lexical_weight)
    config = uvicorn.Config(create_app(holder, search_timeout), host=host, port=port, log_level="info")
    hide = RedactingFilter(holder.secrets)
    for name in ("", "uvicorn", "uvicorn.error", "uvicorn.access"):
        for handler in logging.getLogger(name).handlers:
            handler.addFilter(hide)
    uvicorn.Server(config).run()
