"""Core pipeline benchmarks: store load vs a raw read, no-op reruns, publishing 10 new templates.

Run: `make bench` (or `.venv/bin/python bench/bench_core.py`). Prints one table; nothing is asserted.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import dagster as dg
import numpy as np

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))

from embedding_assets.lib.faq import Template  # noqa: E402
from embedding_assets.lib.hashing import hash_templates  # noqa: E402
from embedding_assets.lib.model_versions import ModelVersion  # noqa: E402
from embedding_assets.lib.plan import build_change_plan  # noqa: E402
from embedding_assets.retrieval import TemplateRetriever  # noqa: E402
from embedding_assets.store import SqliteStore  # noqa: E402
from embedding_assets_tests.conftest import VTB_FAQ, read_rows, write_rows  # noqa: E402
from embedding_assets_tests.pipeline import run_pipeline, store_checks  # noqa: E402
from embedding_assets.lib.faq import parse_faq  # noqa: E402
from embedding_assets.settings import VALIDATION_QUERIES_VAR  # noqa: E402

CLI = str(Path(sys.executable).parent / "embedding-assets")
REPEATS = 30
ALL_COLUMNS = ("template_id, content_hash, category, subcategory, question, answer, priority, audience, "
               "source_row, vector")


def median_ms(fn, repeats: int = REPEATS) -> float:
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - started) * 1000)
    return statistics.median(samples)


def raw_read(path: Path, key: str, dimension: int, columns: str) -> np.ndarray:
    """The floor: the same rows straight out of SQLite, vector bytes into one matrix, nothing else."""
    with sqlite3.connect(path) as conn:
        rows = conn.execute(f"SELECT {columns} FROM templates WHERE model_version = ?", (key,)).fetchall()
    return np.frombuffer(b"".join(r[-1] for r in rows), dtype="<f4").reshape(len(rows), dimension)


def check_seconds(faq: Path, store: Path, instance: dg.DagsterInstance) -> dict[str, float]:
    """Duration of each asset check's step in one no-op run of the chain with its checks."""
    outcome = run_pipeline(faq, store, instance=instance, checks=store_checks())
    return {
        event.step_key: event.event_specific_data.duration_ms / 1000
        for event in outcome.result.all_events
        if event.event_type_value == "STEP_SUCCESS" and event.step_key.startswith(("faq_templates_", "embedding_store_"))
    }


def synthetic_store(path: Path, rows: int, dimension: int = 384) -> str:
    version = ModelVersion(key="synthetic", provider="local", model="synthetic", dimension=dimension)
    rng = np.random.default_rng(7)
    templates = [
        Template(f"S-{i:06d}", f"Категория {i % 6}", f"Подкатегория {i % 35}", f"Вопрос номер {i}?",
                 f"Ответ оператора номер {i}: " + "текст " * 30, "средний", "все клиенты", i + 2)
        for i in range(rows)
    ]
    hashed = hash_templates(templates, version.text_template)
    vectors = rng.standard_normal((rows, dimension)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    plan = build_change_plan(hashed, {}, model_version=version.key, base_generation=None)
    with SqliteStore(path) as store:
        store.publish(version, plan, {h.content_hash: v for h, v in zip(hashed, vectors)})
    return version.key


def cli_seconds(env: dict, cwd: Path) -> tuple[float, dict]:
    started = time.perf_counter()
    done = subprocess.run([CLI, "materialize", "--json"], env=env, cwd=cwd, capture_output=True, text=True, check=True)
    return time.perf_counter() - started, json.loads(done.stdout)


def main() -> None:
    results: list[tuple[str, str, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        faq = write_rows(tmp / "faq.xlsx", read_rows(VTB_FAQ))
        store = tmp / "vtb.db"
        instance = dg.DagsterInstance.ephemeral()
        cold = run_pipeline(faq, store, instance=instance)
        embed_ms = cold.metadata["template_embeddings"]["embed_ms"]
        results.append(("first run, 201 templates (in process)", f"{embed_ms / 1000:.1f} s embedding", "local e5-small"))

        for label, path, key in (
            ("201 templates (real FAQ)", store, "e5-small-v1"),
            ("10,000 synthetic", tmp / "synthetic.db", synthetic_store(tmp / "synthetic.db", 10_000)),
        ):
            dimension = 384
            load = median_ms(lambda: TemplateRetriever.load(path, key))
            raw = median_ms(lambda: raw_read(path, key, dimension, ALL_COLUMNS))
            vectors_only = median_ms(lambda: raw_read(path, key, dimension, "vector"))
            results.append(
                (f"retriever load, {label}", f"{load:.2f} ms",
                 f"raw read of the same rows {raw:.2f} ms ({load / raw:.2f}x); vectors alone {vectors_only:.2f} ms")
            )

        noop = median_ms(lambda: run_pipeline(faq, store, instance=instance), repeats=5)
        results.append(("no-op rerun, in process", f"{noop:.0f} ms", "0 embedded"))

        # Labelled queries for the real FAQ: the first 36 questions, each naming its own template.
        queries = tmp / "queries.json"
        templates = parse_faq(faq)[:36]
        queries.write_text(json.dumps({"validation_queries": [
            {"id": t.template_id, "query": t.question, "correct_template_id": t.template_id} for t in templates
        ]}, ensure_ascii=False))
        os.environ[VALIDATION_QUERIES_VAR] = str(queries)
        check_seconds(faq, store, instance)  # loads the model for queries
        samples = [check_seconds(faq, store, instance) for _ in range(3)]
        medians = {step: statistics.median(s[step] for s in samples) for step in samples[0]}
        results.append((
            "asset checks in a no-op run, in process", f"{sum(medians.values()):.2f} s",
            ", ".join(f"{step}: {seconds:.2f} s" for step, seconds in medians.items()),
        ))
        del os.environ[VALIDATION_QUERIES_VAR]

        env = {**os.environ, "EMBEDDING_ASSETS_FAQ_PATH": str(faq), "EMBEDDING_ASSETS_STORE": str(store),
               "DAGSTER_HOME": str(tmp / "dagster_home")}
        cli_seconds(env, tmp)  # creates the Dagster instance
        noop_cli = statistics.median(cli_seconds(env, tmp)[0] for _ in range(3))
        results.append(("no-op rerun, CLI (process start to exit)", f"{noop_cli:.2f} s", "0 embedded"))

        rows = read_rows(faq)
        rows += [["Карты", "Новые", f"Новый вопрос номер {i} о картах?", "средний", "все клиенты",
                  f"Новый ответ номер {i}: условия обслуживания карты."] for i in range(10)]
        write_rows(faq, rows)
        seconds, summary = cli_seconds(env, tmp)
        shutil.rmtree(tmp / "dagster_home", ignore_errors=True)
        with SqliteStore(store) as opened:
            assert opened.version("e5-small-v1").rows == 211
        results.append(
            ("publish 10 new templates, CLI", f"{seconds:.2f} s",
             f"of which embedding {summary['embedded']} texts: {summary['embed_ms'] / 1000:.2f} s")
        )

    width = max(len(r[0]) for r in results)
    print(f"{'measurement':<{width}} | {'result':>18} | note")
    print(f"{'-' * width}-|-{'-' * 18}-|-----")
    for name, value, note in results:
        print(f"{name:<{width}} | {value:>18} | {note}")


if __name__ == "__main__":
    main()
