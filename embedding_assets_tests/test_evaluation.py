"""`embedding-assets evaluate` and the ranking helpers it measures."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from embedding_assets.retrieval import TemplateRetriever
from embedding_assets.retrieval.evaluation import QueriesFileError, label_mode_for, load_queries
from embedding_assets.retrieval.ranking import LexicalIndex, fuse, reciprocal_rank_fusion
from embedding_assets_tests.conftest import SAMPLE_QUERIES

CLI = str(Path(sys.executable).parent / "embedding-assets")


@pytest.fixture
def store_copy(first_run, tmp_path) -> Path:
    store = tmp_path / "store.db"
    shutil.copyfile(first_run[2], store)
    return store


def evaluate_cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CLI, "evaluate", *args], cwd=tmp_path, capture_output=True, text=True, timeout=300)


def direct_ranks(store: Path, queries: list[dict]) -> list[int]:
    """Rank of each labelled template in a full ranking, computed from the retriever directly."""
    retriever = TemplateRetriever.load(store)
    ranks = []
    for q in queries:
        ranked = [h.template_id for h in retriever.search(q["query"], top_k=len(retriever))]
        ranks.append(ranked.index(q["correct_template_id"]) + 1)
    return ranks


def test_evaluate_prints_the_accuracy_a_direct_computation_gives(store_copy, tmp_path):
    queries = json.loads(SAMPLE_QUERIES.read_text())["validation_queries"]
    ranks = np.array(direct_ranks(store_copy, queries))
    expected = {"top1": np.mean(ranks <= 1), "top3": np.mean(ranks <= 3), "top5": np.mean(ranks <= 5),
                "mrr": np.mean(1 / ranks)}

    done = evaluate_cli(tmp_path, "--queries", str(SAMPLE_QUERIES), "--store", str(store_copy), "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["queries"] == len(queries) == 36
    assert report["label_mode"] == "id" and report["unresolved_labels"] == []
    for key, value in expected.items():
        assert report[key] == pytest.approx(value)
    assert [o["rank"] for o in report["outcomes"]] == ranks.tolist()
    assert sorted(m["query_id"] for m in report["misses"]) == sorted(
        q["id"] for q, r in zip(queries, ranks) if r > 3
    )
    by_category: dict[str, list[int]] = {}
    for q, r in zip(queries, ranks):
        by_category.setdefault(q["category"], []).append(r)
    assert {c: v["queries"] for c, v in report["per_category"].items()} == {c: len(v) for c, v in by_category.items()}
    for category, category_ranks in by_category.items():
        assert report["per_category"][category]["top3"] == pytest.approx(np.mean(np.array(category_ranks) <= 3))

    text = evaluate_cli(tmp_path, "--queries", str(SAMPLE_QUERIES), "--store", str(store_copy))
    assert text.returncode == 0, text.stderr
    assert (f"top-1 {expected['top1']:.1%}  top-3 {expected['top3']:.1%}  top-5 {expected['top5']:.1%}  "
            f"MRR {expected['mrr']:.3f}") in text.stdout
    assert f"misses (labelled template not in the top 3): {int(np.sum(ranks > 3))}" in text.stdout


def test_row_labels_and_labels_naming_no_template(store_copy, tmp_path):
    retriever = TemplateRetriever.load(store_copy)
    row_of = dict(zip(retriever.index.snapshot.columns["template_id"], retriever.index.snapshot.columns["source_row"]))
    queries = json.loads(SAMPLE_QUERIES.read_text())["validation_queries"][:6]
    by_row = [{**q, "correct_template_id": f"tmpl_{row_of[q['correct_template_id']] - 2:03d}"} for q in queries]
    rows_file = tmp_path / "rows.json"
    rows_file.write_text(json.dumps({"validation_queries": by_row}, ensure_ascii=False))
    by_id = tmp_path / "ids.json"
    by_id.write_text(json.dumps({"validation_queries": queries}, ensure_ascii=False))

    as_rows = json.loads(evaluate_cli(tmp_path, "--queries", str(rows_file), "--store", str(store_copy), "--json").stdout)
    as_ids = json.loads(evaluate_cli(tmp_path, "--queries", str(by_id), "--store", str(store_copy), "--json").stdout)
    assert as_rows["label_mode"] == "row"
    assert [o["rank"] for o in as_rows["outcomes"]] == [o["rank"] for o in as_ids["outcomes"]]
    assert [o["expected_id"] for o in as_rows["outcomes"]] == [q["correct_template_id"] for q in queries]

    wrong = [*queries[:5], {**queries[5], "correct_template_id": "CARD-999"}]
    wrong_file = tmp_path / "wrong.json"
    wrong_file.write_text(json.dumps({"validation_queries": wrong}, ensure_ascii=False))
    done = evaluate_cli(tmp_path, "--queries", str(wrong_file), "--store", str(store_copy))
    assert done.returncode == 0, done.stderr
    assert f"label 'CARD-999' of {queries[5]['id']} names no template in the store: not scored" in done.stdout
    assert "6 queries, 5 scored against 90 templates" in done.stdout


def test_a_broken_queries_file_is_a_clear_error(store_copy, tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('{"validation_queries": [{"query": "карта"}]}')
    done = evaluate_cli(tmp_path, "--queries", str(broken), "--store", str(store_copy))
    assert done.returncode == 1
    assert f"{broken.name}: query 1 has no correct_template_id" in done.stderr
    with pytest.raises(QueriesFileError, match="no queries file at"):
        load_queries(tmp_path / "absent.json")


def test_label_mode_prefers_ids_and_falls_back_to_rows():
    assert label_mode_for(["CARD-1", "tmpl_4"], {"CARD-1"}) == "id"
    assert label_mode_for(["tmpl_004", "tmpl_12"], {"CARD-1"}) == "row"
    assert label_mode_for(["tmpl_004", "other"], {"CARD-1"}) == "id"


def test_bm25_matches_inflected_russian_words():
    index = LexicalIndex(["Как заблокировать карточку?", "Как открыть вклад?", "Перевод по номеру телефона"])
    scores = index.scores("заблокировали карточки")
    assert scores[0] > 0 and scores[1] == scores[2] == 0
    assert index.scores("ипотека").tolist() == [0, 0, 0]


def test_fusion_adds_the_scaled_lexical_score_and_rrf_rewards_agreement():
    dense = np.array([0.80, 0.82, 0.70])
    lexical = np.array([4.0, 0.0, 2.0])
    np.testing.assert_allclose(fuse(dense, lexical, 0.1), [0.90, 0.82, 0.75])
    np.testing.assert_array_equal(fuse(dense, np.zeros(3), 0.1), dense)
    fused = reciprocal_rank_fusion(dense, lexical, k=1)
    np.testing.assert_allclose(fused, [1 / 3 + 1 / 2, 1 / 2 + 1 / 4, 1 / 4 + 1 / 3])


def publish_ranking_variant(store: Path, key: str, **ranking) -> None:
    """The current version's vectors published again under `key` with another ranking (no model calls)."""
    from dataclasses import replace

    from embedding_assets.lib.faq import Template
    from embedding_assets.lib.hashing import hash_version_templates
    from embedding_assets.lib.plan import build_change_plan
    from embedding_assets.store import open_store

    with open_store(store) as opened:
        snapshot = opened.snapshot()
        version = replace(snapshot.version.to_model_version(), key=key, **ranking)
        templates = [Template(*(getattr(t, f) for f in Template.__dataclass_fields__)) for t in snapshot.templates]
        plan = build_change_plan(hash_version_templates(templates, version), {}, model_version=key, base_generation=None)
        opened.publish(version, plan, dict(zip(snapshot.columns["content_hash"], snapshot.matrix)))


def test_several_gold_templates_count_by_the_best_ranked_and_kinds_get_their_own_metrics(store_copy, tmp_path):
    queries = json.loads(SAMPLE_QUERIES.read_text())["validation_queries"][:6]
    retriever = TemplateRetriever.load(store_copy)
    ranked = [h.template_id for h in retriever.search(queries[0]["query"], top_k=len(retriever))]
    # The first query also accepts the template ranked second (or third when it is labelled second).
    other = ranked[1] if ranked[1] != queries[0]["correct_template_id"] else ranked[2]
    queries[0] = {**queries[0], "correct_template_ids": [queries[0]["correct_template_id"], other]}
    for position, q in enumerate(queries):
        q["kind"] = "typo" if position % 2 else "slang"
    path = tmp_path / "queries.json"
    path.write_text(json.dumps({"validation_queries": queries}, ensure_ascii=False), encoding="utf-8")
    expected = direct_ranks(store_copy, queries)
    expected[0] = min(expected[0], ranked.index(other) + 1)

    done = evaluate_cli(tmp_path, "--queries", str(path), "--store", str(store_copy), "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert [o["rank"] for o in report["outcomes"]] == expected and expected[0] <= 2
    assert report["outcomes"][0]["expected_ids"] == [queries[0]["correct_template_id"], other]
    for kind, positions in (("slang", [0, 2, 4]), ("typo", [1, 3, 5])):
        ranks = np.array([expected[p] for p in positions])
        assert report["per_kind"][kind] == pytest.approx(
            {"queries": 3, "top1": np.mean(ranks <= 1), "top3": np.mean(ranks <= 3), "top5": np.mean(ranks <= 5),
             "mrr": np.mean(1 / ranks)}
        )
    text = evaluate_cli(tmp_path, "--queries", str(path), "--store", str(store_copy)).stdout
    assert "query kind" in text and "\nslang " in text and "\ntypo " in text


def test_compare_shows_two_versions_side_by_side(store_copy, tmp_path):
    from embedding_assets.lib.model_versions import LexicalSignal

    publish_ranking_variant(store_copy, "chars", lexical=LexicalSignal("char_ngrams", 0.5))
    single = {}
    for key in ("e5-small-v1", "chars"):
        done = evaluate_cli(tmp_path, "--queries", str(SAMPLE_QUERIES), "--store", str(store_copy), "--model", key,
                            "--json")
        assert done.returncode == 0, done.stderr
        single[key] = json.loads(done.stdout)
    done = evaluate_cli(tmp_path, "--queries", str(SAMPLE_QUERIES), "--store", str(store_copy),
                        "--model", "e5-small-v1", "--compare", "chars", "--json")
    assert done.returncode == 0, done.stderr
    compared = json.loads(done.stdout)
    assert compared["model_versions"] == ["e5-small-v1", "chars"]
    metrics = ("queries", "top1", "top3", "top5", "mrr")
    assert compared["overall"] == [{m: single[k][m] for m in metrics} for k in ("e5-small-v1", "chars")]
    assert {k: v[1] for k, v in compared["per_category"].items()} == single["chars"]["per_category"]
    before = {o["query_id"]: o["rank"] for o in single["e5-small-v1"]["outcomes"]}
    after = {o["query_id"]: o["rank"] for o in single["chars"]["outcomes"]}
    assert compared["entered_top3"] == [q for q in after if after[q] <= 3 < before[q]]
    assert compared["left_top3"] == [q for q in after if before[q] <= 3 < after[q]]
    assert before != after  # the lexical signal changes some ranks
    text = evaluate_cli(tmp_path, "--queries", str(SAMPLE_QUERIES), "--store", str(store_copy),
                        "--model", "e5-small-v1", "--compare", "chars").stdout
    assert text.splitlines()[0].endswith("e5-small-v1 -> chars (36 queries, 90 templates)")
    top1 = f"{single['e5-small-v1']['top1']:.3f} -> {single['chars']['top1']:.3f}"
    assert next(line for line in text.splitlines() if line.startswith("overall")).split()[2:5] == top1.split()
