"""One model version ranked in PostgreSQL by its HNSW index, over a small pool of connections."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

import numpy as np

from embedding_assets.lib.embedders import Embedder, embedder_for
from embedding_assets.lib.plan import StoredTemplate
from embedding_assets.retrieval.index import (
    IndexIdentity,
    SearchHit,
    SearchResult,
    StaleIndexError,
    check_facets,
    checked_query,
)
from embedding_assets.retrieval.fusion import LexicalSignal, lexical_signal, lexical_text
from embedding_assets.store import StoreError, VersionInfo, open_store, redact_url

DEFAULT_CONNECTIONS = 4
CONNECTION_WAIT_SECONDS = 30.0


class StorePool:
    """Up to `size` open connections to one PostgreSQL store, each lent to one thread at a time."""

    def __init__(self, url: str, size: int = DEFAULT_CONNECTIONS, first=None, wait: float = CONNECTION_WAIT_SECONDS):
        if size < 1:
            raise ValueError("a connection pool needs at least 1 connection")
        self.url = url
        self.size = size
        self.wait = wait
        self._slots = threading.BoundedSemaphore(size)
        self._idle = [first] if first is not None else []
        self._lock = threading.Lock()
        self._closed = False

    @contextmanager
    def connection(self) -> Iterator:
        """An open store for this thread alone.

        A store error closes that connection and the idle ones (after a server restart they are all
        broken); the next use opens new ones.
        """
        if not self._slots.acquire(timeout=self.wait):
            raise StoreError(
                f"{redact_url(self.url)}: all {self.size} database connections stayed busy for {self.wait:g} s"
            )
        try:
            with self._lock:
                store = self._idle.pop() if self._idle else None
            if store is None:
                store = open_store(self.url, create=False)
            try:
                yield store
            except StoreError:
                store.close()
                self._close_idle()
                raise
            except BaseException:
                self._give_back(store)
                raise
            self._give_back(store)
        finally:
            self._slots.release()

    def _give_back(self, store) -> None:
        with self._lock:
            if not self._closed:
                self._idle.append(store)
                return
        store.close()

    def _close_idle(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for store in idle:
            store.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self._close_idle()


class DatabaseIndex:
    """One model version of a PostgreSQL store at one generation, ranked in the database per query.

    The facets and identity are read once; each search also reads the store's identity and generation
    on the same connection, and raises StaleIndexError when they moved on, so a result never mixes
    this index's identity with another generation's rows.
    """

    mode = "database"

    def __init__(
        self,
        pool: StorePool,
        version: VersionInfo,
        identity: IndexIdentity,
        embedder: Embedder,
        facets: tuple[frozenset[str], frozenset[str]],
        signal: tuple[list[str], LexicalSignal] | None = None,
    ):
        self.pool = pool
        self._signal = signal
        self.version = version
        self.identity = identity
        self.embedder = embedder
        self._facets = facets
        self.loaded_at = datetime.now(UTC).isoformat(timespec="milliseconds")

    @classmethod
    def open(
        cls, pool: StorePool, model_version: str | None, embedder: Embedder | None = None, attempts: int = 5
    ) -> DatabaseIndex:
        """The index of `model_version` (default: the current one) at the store's present generation."""
        with pool.connection() as store:
            for _ in range(attempts):
                state = store.state()
                key = model_version or store.current_version()
                version = store.version(key) if key else None
                if version is None:
                    store.snapshot(model_version)  # raises the same "not published" error as memory mode
                categories, subcategories = store.facets(version.key)
                published = store.published(version.key)[1] if version.to_model_version().lexical else {}
                if store.state() == state:  # nothing was published while the facets were read
                    break
            else:
                raise StoreError(f"{redact_url(pool.url)}: the store kept changing while it was being read")
        embedder = embedder or embedder_for(version.to_model_version())
        identity = IndexIdentity(state.store_id, version.key, state.generation)
        ids = sorted(published)
        signal = lexical_signal(
            version.to_model_version(),
            [lexical_text(published[t].subcategory, published[t].question, published[t].answer) for t in ids],
        )
        return cls(
            pool, version, identity, embedder, (frozenset(categories), frozenset(subcategories)),
            (ids, signal) if signal is not None else None,
        )

    def search(
        self,
        text: str,
        top_k: int = 3,
        category: str | None = None,
        subcategory: str | None = None,
        query_vector: np.ndarray | None = None,
    ) -> SearchResult:
        """The top_k templates nearest to text, ranked by PostgreSQL; StaleIndexError once the store moved on.

        `query_vector`, when given, is text's embedding by this index's embedder (a retry reuses it).
        """
        text = checked_query(text, top_k)
        category, subcategory = check_facets(*self._facets, category, subcategory)
        query = self.embedder.embed_query(text) if query_vector is None else query_vector
        try:
            ranked, state = self._rank(query, top_k, category, subcategory, text)
        except StaleIndexError:
            raise
        except StoreError:  # once more on a new connection: the failed one may have been dropped by the server
            ranked, state = self._rank(query, top_k, category, subcategory, text)
        # Generations only grow within one store identity: an unchanged state after the search means
        # the search read exactly this index's generation.
        if (state.store_id, state.generation) != (self.identity.store_id, self.identity.store_generation):
            raise StaleIndexError(
                f"{redact_url(self.pool.url)}: the store moved to generation {state.generation} while searching "
                f"generation {self.identity.store_generation}",
                query_vector=query,
            )
        hits = tuple(SearchHit.of(rank, t, score) for rank, (t, score) in enumerate(ranked, start=1))
        return SearchResult(hits, self.identity)

    def prepare(self) -> None:
        if self._signal is not None:
            self._signal[1].index()

    def _rank(self, query, top_k: int, category: str | None, subcategory: str | None, text: str = ""):
        if self._signal is None:
            with self.pool.connection() as store:
                return store.search(self.version.key, query, top_k, category, subcategory), store.state()
        ids, signal = self._signal
        bonus = dict(zip(ids, signal.scores(text).tolist()))
        fetch = top_k + 16
        while True:
            with self.pool.connection() as store:
                found, state = store.search(self.version.key, query, fetch, category, subcategory), store.state()
            fused = sorted(
                ((t, score + bonus.get(t.template_id, 0.0)) for t, score in found),
                key=lambda pair: (-pair[1], pair[0].template_id),
            )
            # A template the database did not return scores at most its dense score plus the weight.
            if len(found) < fetch or (len(fused) >= top_k and found[-1][1] + signal.weight < fused[top_k - 1][1]):
                return fused[:top_k], state
            fetch *= 4

    def facets(self) -> tuple[frozenset[str], frozenset[str]]:
        return self._facets

    def templates(self) -> list[StoredTemplate]:
        with self.pool.connection() as store:
            version, published = store.published(self.version.key)
            state = store.state()
        if (state.store_id, state.generation) != (self.identity.store_id, self.identity.store_generation):
            raise StaleIndexError(f"{redact_url(self.pool.url)}: the store moved to generation {state.generation}")
        return [published[tid] for tid in sorted(published)]

    def info(self) -> dict:
        return {
            **self.version.as_dict(),
            "store_id": self.identity.store_id,
            "store_generation": self.identity.store_generation,
            "loaded_rows": self.version.rows,
            "loaded_at": self.loaded_at,
            "store": redact_url(self.pool.url),
            "search_mode": self.mode,
        }

    def reloaded(self, model_version: str | None) -> DatabaseIndex | None:
        with self.pool.connection() as store:
            state = store.state()
        if (state.store_id, state.generation) == (self.identity.store_id, self.identity.store_generation):
            return None
        fresh = DatabaseIndex.open(self.pool, model_version, self.embedder)
        if fresh.version.fingerprint != self.version.fingerprint:
            fresh.embedder = embedder_for(fresh.version.to_model_version())
        return fresh

    def close(self) -> None:
        """Close the pool's connections (shared with the indexes reloaded from this one)."""
        self.pool.close()

    def __len__(self) -> int:
        return self.version.rows
