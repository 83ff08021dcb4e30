"""Lexical signals (script folding, character n-grams, lemmas, BM25) and the labelled query sets."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from embedding_assets.lib.faq import parse_faq
from embedding_assets.retrieval.evaluation import load_queries
from embedding_assets.retrieval.lexical import (
    BM25,
    CharNgramIndex,
    LemmaIndex,
    cyrillic_query,
    fold_script,
    lemma,
    lemmas,
    scaled,
    to_cyrillic,
    weighted_sum,
    with_cyrillic_names,
    words,
)
from embedding_assets_tests.conftest import PROJECT_ROOT, SAMPLE_FAQ

BANK_QUERIES = PROJECT_ROOT / "data" / "bank_faq_queries.json"
SAMPLE_SET = PROJECT_ROOT / "data" / "sample_faq_queries.json"
KINDS = {"typo", "translit", "slang", "answer_only", "paraphrase", "short"}


def test_latin_names_read_in_cyrillic():
    assert [to_cyrillic(w) for w in ("MORE", "Forsazh", "cherepaha", "Signature", "kstati")] == [
        "море", "форсаж", "черепаха", "сигнатуре", "кстати",
    ]
    assert with_cyrillic_names("Карта MORE и карточка PLAT/ON в VTB mBank") == (
        "Карта MORE (море) и карточка PLAT/ON (платон) в VTB (втб) mBank (мбанк)"
    )
    assert cyrillic_query("forsazh где получить") == "forsazh (форсаж) где получить"
    assert cyrillic_query("как оформить карту море") == "как оформить карту море"


def test_folding_makes_the_script_and_case_of_a_name_irrelevant():
    pairs = [("MORE", "море"), ("Форсаж", "forsazh"), ("PLAT/ON", "платон"), ("ЧЕРЕПАХА", "cherepaha"),
             ("КСТАТИ", "kstati"), ("Белкарт", "belkart"), ("E-POS", "епос")]
    for one, other in pairs:
        assert fold_script(one) == fold_script(other), (one, other)
    assert fold_script("Карта MORE") == "karta more"
    assert words("PLAT/ON и e-pos, 2.0") == ["platon", "и", "epos", "2", "0"]


def test_character_ngrams_match_typos_and_the_other_script():
    documents = ["Как пополнить карточку MORE?", "Как получить карту Форсаж?", "Где оформить карточку PLAT/ON?"]
    folded = CharNgramIndex(documents)
    assert int(np.argmax(folded.scores("как папалнить море"))) == 0
    assert int(np.argmax(folded.scores("forsazh где взять"))) == 1
    assert int(np.argmax(folded.scores("платон"))) == 2
    assert folded.scores(documents[1])[1] == pytest.approx(1.0, abs=1e-6)

    unfolded = CharNgramIndex(documents, fold=False)
    assert unfolded.scores("forsazh")[1] == 0.0
    assert folded.scores("forsazh")[1] > 0.3


def reference_ngram_scores(documents: list[str], query: str, sizes=range(3, 6)) -> np.ndarray:
    """The index's definition, term by term: TF-IDF (1 + ln tf, smoothed idf) cosine over folded n-grams."""
    def grams(text: str) -> Counter:
        return Counter(
            f" {w} "[i:i + n] for w in fold_script(text).split() for n in sizes for i in range(len(w) + 3 - n)
        )

    counts = [grams(d) for d in documents]
    frequency = Counter(g for c in counts for g in c)
    idf = {g: math.log((1 + len(documents)) / (1 + df)) + 1 for g, df in frequency.items()}

    def vector(c: Counter) -> dict[str, float]:
        raw = {g: (1 + math.log(k)) * idf[g] for g, k in c.items() if g in idf}
        norm = math.sqrt(sum(v * v for v in raw.values()))
        return {g: v / norm for g, v in raw.items()} if norm else {}

    q = vector(grams(query))
    return np.array([sum(w * vector(c).get(g, 0.0) for g, w in q.items()) for c in counts])


def test_character_ngram_scores_equal_the_definition_on_the_sample_faq():
    templates = parse_faq(SAMPLE_FAQ)
    documents = [f"{t.subcategory} {t.question} {t.answer}" for t in templates]
    index = CharNgramIndex(documents)
    for query in ("как папалнить море", "забыла пин от карточки", "forsazh где взять", "кешбэк", "а"):
        assert index.scores(query) == pytest.approx(reference_ngram_scores(documents, query), abs=1e-5), query


def test_character_ngrams_of_an_unknown_query_score_zero():
    index = CharNgramIndex(["вклад в евро", "карта"])
    assert index.scores("").tolist() == [0.0, 0.0]
    assert index.scores("zzzzzz").tolist() == [0.0, 0.0]


def test_empty_corpora_and_texts_of_function_words_only():
    assert CharNgramIndex([]).scores("карта").tolist() == []
    assert BM25([[]]).scores(["карта"]).tolist() == [0.0]
    assert LemmaIndex(["и в на", "вклад"]).scores("и в").tolist() == [0.0, 0.0]


def test_lemmas_drop_function_words_and_read_latin_in_cyrillic():
    assert lemma("карточки") == "карточка"
    assert lemma("через") is None
    assert lemmas("Как мне пополнить карточку MORE через банкомат?") == ["пополнить", "карточка", "море", "банкомат"]


def test_lemma_index_matches_inflected_forms():
    index = LemmaIndex(["Какая доходность вклада в евро?", "Как погашать долг по ЧЕРЕПАХЕ?"])
    scores = index.scores("черепаха долги")
    assert scores[0] == 0.0 and scores[1] > 0.0
    assert index.scores("вкладами евро")[0] > 0.0


def test_bm25_scores_by_hand():
    bm25 = BM25([["a", "b"], ["b"]])
    idf_a = math.log(1 + (2 - 1 + 0.5) / (1 + 0.5))
    norm = 1.5 * (1 - 0.75 + 0.75 * 2 / 1.5)
    assert bm25.scores(["a"]).tolist() == pytest.approx([idf_a * 2.5 / (1 + norm), 0.0])
    assert bm25.scores(["unknown"]).tolist() == [0.0, 0.0]


def test_scaled_and_weighted_sum():
    assert scaled(np.array([0.0, 2.0, 1.0])).tolist() == [0.0, 1.0, 0.5]
    assert scaled(np.zeros(3)).tolist() == [0.0, 0.0, 0.0]
    total = weighted_sum((1.0, np.array([0.5, 0.25])), (0.0, np.array([9.0, 9.0])), (0.5, np.array([1.0, 0.0])))
    assert total.tolist() == [1.0, 0.25]
    with pytest.raises(ValueError, match="non-zero weight"):
        weighted_sum((0.0, np.ones(2)))


def _labelled(path: Path) -> list[dict]:
    return json.loads(path.read_text(encoding="utf-8"))["validation_queries"]


def _check_set(path: Path, template_ids: set[str]) -> None:
    queries = _labelled(path)
    assert len(queries) >= 100
    assert len({q["id"] for q in queries}) == len(queries)
    assert len({q["query"] for q in queries}) == len(queries)
    for q in queries:
        assert q["kind"] in KINDS, q
        gold = q.get("correct_template_ids") or [q["correct_template_id"]]
        assert gold[0] == q["correct_template_id"] and len(set(gold)) == len(gold), q
        assert set(gold) <= template_ids, q
    assert {q["kind"] for q in queries} == KINDS
    assert len(load_queries(path)) == len(queries)


def test_sample_set_labels_name_templates_of_the_sample_faq():
    _check_set(SAMPLE_SET, {t.template_id for t in parse_faq(SAMPLE_FAQ)})


def test_bank_set_labels_name_templates_of_the_bank_faq(vtb_faq):
    _check_set(BANK_QUERIES, {t.template_id for t in parse_faq(vtb_faq)})
