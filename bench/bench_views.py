"""Multi-view model versions: query latency at 201 templates and loading next to a raw read of the rows.

Run: `.venv/bin/python bench/bench_views.py STORE.db [QUERIES.json]` on a store that holds both
versions (materialize the bank FAQ first). For each version it prints the load time of a memory
index next to a plain sqlite3 read of the same rows and vectors (the raw baseline, same run), the
time until the background lexical index is ready, and the p50/p95 query latency split into the
query embedding and the ranking. Nothing is asserted.
"""

from __future__ import annotations

import json
import os
import sqlite3
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "passive")
PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))

from embedding_assets.retrieval import TemplateRetriever  # noqa: E402
from embedding_assets.store import open_store  # noqa: E402

REPEATS = 7


def raw_read(path: Path, key: str) -> float:
    """Seconds to read a version's template rows and view vectors with plain sqlite3 (no decoding)."""
    started = time.perf_counter()
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    conn.execute("SELECT * FROM templates WHERE model_version = ? ORDER BY template_id", (key,)).fetchall()
    conn.execute("SELECT * FROM template_views WHERE model_version = ? ORDER BY view, template_id", (key,)).fetchall()
    conn.close()
    return time.perf_counter() - started


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def main() -> None:
    store = Path(sys.argv[1])
    queries_file = Path(sys.argv[2]) if len(sys.argv) > 2 else PROJECT_ROOT / "data" / "bank_faq_queries.json"
    queries = [q["query"] for q in json.loads(queries_file.read_text(encoding="utf-8"))["validation_queries"]]
    with open_store(store, create=False) as opened:
        keys = [v.key for v in opened.versions()]
    embedder = None
    print(f"{store}: {', '.join(keys)}; {len(queries)} queries from {queries_file.name}")
    print("| version | templates | raw read ms | load ms | load / raw | lexical ready ms | embed p50 ms | rank p50 ms | query p50 ms | query p95 ms |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for key in keys:
        raw_read(store, key)  # warm the page cache for both
        raw = [raw_read(store, key) for _ in range(REPEATS)]
        loads, ready = [], []
        for _ in range(REPEATS):
            started = time.perf_counter()
            retriever = TemplateRetriever.load(str(store), key, embedder=embedder, mode="memory")
            loads.append(time.perf_counter() - started)
            signal = retriever.index._signal
            if signal is not None:
                signal.index()
            ready.append(time.perf_counter() - started)
            embedder = retriever.index.embedder
        index = retriever.index
        embed, rank, total = [], [], []
        for text in queries:
            started = time.perf_counter()
            vector = embedder.embed_query(text)
            embedded = time.perf_counter()
            index.search(text, top_k=3, query_vector=vector)
            done = time.perf_counter()
            embed.append(embedded - started)
            rank.append(done - embedded)
            total.append(done - started)
        p95 = sorted(total)[int(0.95 * (len(total) - 1))] * 1000
        lexical = f"{median_ms(ready):.1f}" if index._signal is not None else "-"
        print(
            f"| {key} | {len(index)} | {median_ms(raw):.2f} | {median_ms(loads):.2f} | "
            f"{median_ms(loads) / median_ms(raw):.2f} | {lexical} | {median_ms(embed):.2f} | {median_ms(rank):.2f} | "
            f"{median_ms(total):.2f} | {p95:.2f} |"
        )


if __name__ == "__main__":
    main()
