"""What keeping earlier generations costs a publish, and what a rollback costs, at N templates.

For each N it publishes a version of N templates (384-d, random unit vectors) through the store API,
then the same edits twice: once with EMBEDDING_ASSETS_KEEP_GENERATIONS=0 (the baseline: nothing kept)
and once with the default 2, both in the same run. Edits: 1 answer, 1% of the answers, a forced
rebuild. Printed: the publish time of each (median of 3), the rollback time of the kept one, and
the template rows and vector bytes one kept generation holds. SQLite files. Nothing is asserted.

Run: `.venv/bin/python bench/bench_rollback.py [N ...]` (default 2000 20000).
"""

from __future__ import annotations

import sqlite3
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))

from embedding_assets.lib.hashing import hash_templates  # noqa: E402
from embedding_assets.lib.model_versions import ModelVersion  # noqa: E402
from embedding_assets.lib.plan import build_change_plan  # noqa: E402
from embedding_assets.store import open_store  # noqa: E402
from embedding_assets_tests.conftest import make_template  # noqa: E402

VERSION = ModelVersion(key="bench-v1", provider="local", model="bench", dimension=384, settings={"variant": "bench"})
REPEATS = 3


def publish(store, templates, *, rebuild: bool = False, seed: int = 0) -> float:
    """Seconds of the publish transaction alone (plan and vectors are made before the clock starts)."""
    info, published = store.published(VERSION.key)
    plan = build_change_plan(
        hash_templates(templates, VERSION.text_template), published, model_version=VERSION.key,
        base_generation=info.generation if info else None, rebuild=rebuild,
    )
    rng = np.random.default_rng(seed)
    vectors = {}
    for item in (*plan.new, *plan.modified):
        vector = rng.normal(size=VERSION.dimension).astype(np.float32)
        vectors[item.content_hash] = vector / np.linalg.norm(vector)
    return store.publish(VERSION, plan, vectors).seconds


def kept_size(path: Path) -> tuple[int, int]:
    """Template rows and vector bytes the store's kept generations hold."""
    with sqlite3.connect(path) as conn:
        rows, vector_bytes = conn.execute("SELECT count(*), coalesce(sum(length(vector)), 0) FROM kept_templates").fetchone()
    return rows, vector_bytes


def measure(path: Path, n: int, edit: str, keep: int) -> tuple[float, float | None, tuple[int, int]]:
    """Median publish and rollback seconds over REPEATS edits, and what one kept generation holds."""
    templates = [make_template(i) for i in range(n)]
    publishes, rollbacks, kept = [], [], (0, 0)
    with open_store(path) as store:
        store.keep_generations = keep
        publish(store, templates)
        for repeat in range(REPEATS):
            changed = n // 100 if edit == "1%" else 1
            edited = [replace(t, answer=f"{t.answer} ({repeat})") if i < changed else t for i, t in enumerate(templates)]
            rebuild = edit == "rebuild"
            publishes.append(publish(store, templates if rebuild else edited, rebuild=rebuild, seed=repeat + 1))
            if keep:
                kept = kept_size(path)
                rollbacks.append(store.rollback(VERSION.key).seconds)
    return statistics.median(publishes), statistics.median(rollbacks) if rollbacks else None, kept


def main() -> None:
    sizes = [int(arg) for arg in sys.argv[1:]] or [2000, 20000]
    print("| templates | edit | publish ms, nothing kept | publish ms, 2 kept | rollback ms | kept rows | kept vector bytes |")
    print("|---|---|---|---|---|---|---|")
    for n in sizes:
        for edit in ("1 answer", "1%", "rebuild"):
            with tempfile.TemporaryDirectory() as tmp:
                baseline, _, _ = measure(Path(tmp) / "baseline.db", n, edit, keep=0)
                published, rollback, (rows, vector_bytes) = measure(Path(tmp) / "kept.db", n, edit, keep=2)
            print(f"| {n} | {edit} | {baseline * 1000:.1f} | {published * 1000:.1f} | {rollback * 1000:.1f} | "
                  f"{rows} | {vector_bytes} |", flush=True)


if __name__ == "__main__":
    main()
