"""The whole asset chain with the real model, a real SQLite file and a real Dagster instance."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from embedding_assets.lib.faq import derived_template_id, normalize_text
from embedding_assets.retrieval import TemplateRetriever
from embedding_assets.store import open_store
from embedding_assets_tests.conftest import read_rows, write_rows
from embedding_assets_tests.pipeline import KEY, failure_message, run_pipeline

SAMPLE_ROWS = 90
COL = {"id": 0, "category": 1, "subcategory": 2, "question": 3, "priority": 4, "audience": 5, "answer": 6}


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def published(store: Path) -> dict:
    with open_store(store, create=False) as opened:
        snapshot = opened.snapshot(KEY)
    return {t.template_id: (t, snapshot.matrix[i]) for i, t in enumerate(snapshot.templates)}


def test_first_run_embeds_every_text_and_a_rerun_embeds_nothing(first_run):
    cold, rerun, store = first_run
    assert cold.result.success
    texts = cold.embedded_texts
    assert len(texts) == SAMPLE_ROWS == len(set(texts))
    assert len(cold.calls) == 3  # batches of 32
    assert cold.plan == {"new": 90, "modified": 0, "deleted": 0, "unchanged": 0, "metadata_updated": 0}
    assert cold.metadata["template_embeddings"]["embedded"] == 90
    assert cold.metadata["template_embeddings"]["embedding_calls"] == 3
    assert (cold.store["rows"], cold.store["generation"], cold.store["published"]) == (90, 1, True)

    assert rerun.result.success
    assert rerun.calls == []
    assert rerun.plan == {"new": 0, "modified": 0, "deleted": 0, "unchanged": 90, "metadata_updated": 0}
    assert (rerun.store["rows"], rerun.store["generation"], rerun.store["published"]) == (90, 1, False)


def test_add_five_modify_two_delete_one_embeds_exactly_seven(warm):
    faq, store = warm
    before = published(store)
    rows = read_rows(faq)
    header, body = rows[0], rows[1:]
    deleted_id = body[10][COL["id"]]
    modified = {body[0][COL["id"]], body[40][COL["id"]]}
    for row in body:
        if row[COL["id"]] in modified:
            row[COL["answer"]] += " Подробнее — в разделе «Помощь» приложения."
    body = [row for row in body if row[COL["id"]] != deleted_id]
    added = [
        [f"NEW-{i:03d}", "Карты", "Кешбэк", f"Начисляется ли кешбэк за покупку номер {i} в месяце?", "низкий",
         "держатели карт", f"Да, кешбэк начисляется и за {i}-ю покупку, если она сделана картой «Путь»."]
        for i in range(1, 6)
    ]
    write_rows(faq, [header, *added[:2], *body, *added[2:]])

    outcome = run_pipeline(faq, store)

    assert outcome.result.success
    assert outcome.plan == {"new": 5, "modified": 2, "deleted": 1, "unchanged": 87, "metadata_updated": 87}
    assert len(outcome.embedded_texts) == 7
    assert {t.split("\n", 1)[0].split(": ", 1)[1] for t in outcome.embedded_texts} >= {r[COL["question"]] for r in added}
    after = published(store)
    assert len(after) == SAMPLE_ROWS + 4
    assert deleted_id not in after
    assert {f"NEW-{i:03d}" for i in range(1, 6)} <= set(after)
    for template_id in modified:
        assert after[template_id][0].answer.endswith("в разделе «Помощь» приложения.")
        assert not np.allclose(after[template_id][1], before[template_id][1])
    untouched = next(tid for tid in before if tid not in modified and tid != deleted_id)
    np.testing.assert_array_equal(after[untouched][1], before[untouched][1])
    assert outcome.store["generation"] == 2


def test_reordered_rows_and_a_blank_row_at_the_top_cost_nothing(warm):
    faq, store = warm
    rows = read_rows(faq)
    write_rows(faq, [rows[0], [None] * len(rows[0]), *reversed(rows[1:])])

    outcome = run_pipeline(faq, store)

    assert outcome.calls == []
    # rows 2..91 become 92..3: only the middle one (row 47) keeps its row number
    assert outcome.plan == {"new": 0, "modified": 0, "deleted": 0, "unchanged": 90, "metadata_updated": 89}
    after = published(store)
    assert after[rows[-1][COL["id"]]][0].source_row == 3  # first template, below the blank row
    assert len(after) == SAMPLE_ROWS


def test_a_deleted_then_reinserted_template_comes_back_from_the_cache(warm):
    faq, store = warm
    rows = read_rows(faq)
    write_rows(faq, [rows[0], *rows[2:]])
    removed = run_pipeline(faq, store)
    assert removed.plan["deleted"] == 1 and removed.calls == []

    write_rows(faq, rows)
    restored = run_pipeline(faq, store)

    assert restored.plan["new"] == 1
    assert restored.calls == []
    assert restored.metadata["template_embeddings"]["cache_hits"] == 1
    assert len(published(store)) == SAMPLE_ROWS


def test_editing_only_priority_updates_in_place_without_embedding(warm):
    faq, store = warm
    rows = read_rows(faq)
    target = rows[5]
    target[COL["priority"]] = "низкий" if target[COL["priority"]] != "низкий" else "высокий"
    write_rows(faq, rows)

    outcome = run_pipeline(faq, store)

    assert outcome.calls == []
    assert outcome.plan == {"new": 0, "modified": 0, "deleted": 0, "unchanged": 90, "metadata_updated": 1}
    assert published(store)[target[COL["id"]]][0].priority == target[COL["priority"]]
    assert outcome.store["generation"] == 2


def test_identical_texts_are_embedded_once(warm):
    faq, store = warm
    rows = read_rows(faq)
    twin = list(rows[1])
    twin[COL["id"]] = "CARD-TWIN"
    write_rows(faq, [*rows, twin])

    outcome = run_pipeline(faq, store)

    assert outcome.plan["new"] == 1
    assert outcome.calls == []  # same text as CARD-001: its vector is in the cache
    after = published(store)
    np.testing.assert_array_equal(after["CARD-TWIN"][1], after[rows[1][COL["id"]]][1])


def test_force_rebuilds_the_version_and_re_embeds_everything(warm):
    faq, store = warm
    outcome = run_pipeline(faq, store, force=True)
    assert outcome.result.success
    assert len(outcome.embedded_texts) == SAMPLE_ROWS
    assert outcome.plan["new"] == SAMPLE_ROWS
    assert (outcome.store["rows"], outcome.store["generation"]) == (SAMPLE_ROWS, 2)


def test_without_an_id_column_inserting_a_row_at_the_top_embeds_only_that_row(warm):
    faq, store = warm
    rows = [row[1:] for row in read_rows(faq)]
    write_rows(faq, rows)
    switched = run_pipeline(faq, store)
    # ids change from the ID column to derived ones; every text is already cached
    assert switched.plan["new"] == 90 and switched.plan["deleted"] == 90 and switched.calls == []

    inserted = ["Карты", "Кешбэк", "Можно ли выбрать категории кешбэка на следующий месяц?", "средний",
                "держатели карт", "Да, до 1-го числа в приложении: Карты → Кешбэк → Выбрать категории."]
    write_rows(faq, [rows[0], inserted, *rows[1:]])
    outcome = run_pipeline(faq, store)

    assert outcome.plan == {"new": 1, "modified": 0, "deleted": 0, "unchanged": 90, "metadata_updated": 90}
    assert len(outcome.calls) == 1 and len(outcome.embedded_texts) == 1
    assert derived_template_id(*inserted[:3]) in published(store)


def _missing_column(rows):
    return [[c for i, c in enumerate(r) if i != COL["answer"]] for r in rows]


def _empty_answer(rows):
    rows[7][COL["answer"]] = "   "
    return rows


def _duplicate_id(rows):
    rows[9][COL["id"]] = rows[3][COL["id"]]
    return rows


@pytest.mark.parametrize(
    ("break_faq", "expected"),
    [
        ("missing", ["not usable", "file not found"]),
        ("not_xlsx", ["is not an .xlsx workbook (an .xlsx file is a zip archive; this one is not)"]),
        (_missing_column, ["row 1", "missing required column 'Шаблонный ответ'"]),
        (_empty_answer, ["row 8", "column 'Шаблонный ответ'", "empty answer"]),
        (_duplicate_id, ["row 10", "column 'ID'", "duplicate id 'CARD-003'", "first used in row 4"]),
    ],
)
def test_a_broken_faq_fails_before_anything_is_written(warm, break_faq, expected):
    faq, store = warm
    if break_faq == "missing":
        faq.unlink()
    elif break_faq == "not_xlsx":
        faq.write_text("id;question\n1;hello\n", encoding="utf-8")
    else:
        write_rows(faq, break_faq(read_rows(faq)))
    digest = file_digest(store)

    outcome = run_pipeline(faq, store)

    assert not outcome.result.success
    message = failure_message(outcome.result)
    assert str(faq) in message
    for part in expected:
        assert part in message
    assert outcome.calls == []
    assert "embedding_store" not in outcome.metadata
    assert file_digest(store) == digest
    assert len(TemplateRetriever.load(store)) == SAMPLE_ROWS


def test_the_real_bank_faq_materializes_and_finds_a_paraphrase(vtb_faq, tmp_path):
    store = tmp_path / "vtb.db"
    outcome = run_pipeline(vtb_faq, store)

    assert outcome.result.success
    assert outcome.store["rows"] == 201
    texts = outcome.embedded_texts
    assert len(texts) == len(set(texts)) == outcome.metadata["template_hashes"]["unique_texts"]
    retriever = TemplateRetriever.load(store)
    rows = read_rows(vtb_faq)[1:]
    category, subcategory, question = (normalize_text(rows[109][i]) for i in range(3))
    assert question == "Как открыть вклад Мои условия?"
    hits = retriever.search("Хочу оформить депозит «Мои условия» — что для этого нужно?", top_k=3)
    assert hits[0].template_id == derived_template_id(category, subcategory, question)
    assert hits[0].subcategory == subcategory
