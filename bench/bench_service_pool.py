"""The search service's database mode: one connection (the former locked connection) against a pool.

A PostgreSQL store of synthetic clustered vectors is served by the real service (uvicorn on
127.0.0.1, ranked in the database); CLIENTS threads send REQUESTS searches over HTTP. Query vectors
are precomputed so the figure is the service and database time, not the local model's. Pool size 1
is the baseline: every search waits for the one connection, as the former lock made it.

Run: `.venv/bin/python bench/bench_service_pool.py [--rows 5000] [--clients 8] [--requests 400]`.
The PostgreSQL server is found like the tests find it. Prints one table; nothing is asserted.
"""

from __future__ import annotations

import argparse
import functools
import json
import socket
import statistics
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))

import uvicorn  # noqa: E402

from embedding_assets.lib.model_versions import ModelVersion  # noqa: E402
from embedding_assets.retrieval import TemplateRetriever  # noqa: E402
from embedding_assets.retrieval.service import RetrieverHolder, create_app  # noqa: E402
from embedding_assets.store import open_store  # noqa: E402
from embedding_assets_tests.postgres import new_database, postgres_server_url  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_pgvector import publish, synthetic  # noqa: E402

DIMENSION = 384
VERSION = ModelVersion(key="synthetic-v1", provider="local", model="multilingual-e5-small", dimension=DIMENSION)


class FixedQueries:
    """Query vectors chosen in advance: query text "q<N>" is the N-th vector."""

    def __init__(self, vectors: np.ndarray):
        self.vectors = vectors
        self.dimension = vectors.shape[1]

    def embed_query(self, text: str) -> np.ndarray:
        number = int(text[1:]) if text[1:].isdigit() else 0
        return self.vectors[number % len(self.vectors)]

    def embed_passages(self, texts):
        raise NotImplementedError("the benchmark only ranks queries")


def run_clients(url: str, clients: int, requests: int, queries: int) -> tuple[list[float], float]:
    """Per-request latencies (ms) and wall seconds for `requests` searches from `clients` threads."""
    latencies: list[float] = []
    counter = iter(range(requests))
    lock = threading.Lock()

    def client() -> None:
        while True:
            with lock:
                n = next(counter, None)
            if n is None:
                return
            query = urllib.parse.urlencode({"query": f"q{n % queries}", "top_k": 10})
            started = time.perf_counter()
            with urllib.request.urlopen(f"{url}/search?{query}", timeout=60) as response:
                assert response.status == 200 and json.loads(response.read())["hits"]
            latencies.append((time.perf_counter() - started) * 1000)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies, time.perf_counter() - started


def measure(store_url: str, embedder: FixedQueries, connections: int, clients: int, requests: int) -> dict:
    load = functools.partial(TemplateRetriever.load, mode="database", embedder=embedder,
                             database_connections=connections)
    holder = RetrieverHolder(store_url, reload_interval=60, load=load)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(create_app(holder), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]})
    thread.start()
    try:
        while holder.retriever is None:
            time.sleep(0.05)
        run_clients(url, clients, clients * 5, len(embedder.vectors))  # warm-up: connections opened
        latencies, seconds = run_clients(url, clients, requests, len(embedder.vectors))
    finally:
        server.should_exit = True
        thread.join()
        sock.close()
        if holder.retriever is not None:
            holder.retriever.close()
    quantiles = statistics.quantiles(latencies, n=20)
    return {"p50": statistics.median(latencies), "p95": quantiles[18], "rps": requests / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=5000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--pool", type=int, default=4, help="connections of the pooled run")
    args = parser.parse_args()

    templates, vectors, queries = synthetic(args.rows, DIMENSION)
    with postgres_server_url() as server, new_database(server) as store_url:
        with open_store(store_url) as store:
            publish(store, VERSION, templates, vectors)
        embedder = FixedQueries(queries)
        results = {n: measure(store_url, embedder, n, args.clients, args.requests) for n in (1, args.pool)}

    print(f"search service, database mode: {args.rows} rows x {DIMENSION}-d, {args.clients} clients, "
          f"{args.requests} HTTP requests each run (top 10, precomputed query vectors)")
    print(f"{'connections':<34} {'p50 ms':>8} {'p95 ms':>8} {'req/s':>8}")
    for n, label in ((1, "1 (baseline: one shared connection)"), (args.pool, f"{args.pool} (pool)")):
        r = results[n]
        print(f"{label:<34} {r['p50']:>8.2f} {r['p95']:>8.2f} {r['rps']:>8.1f}")


if __name__ == "__main__":
    main()
