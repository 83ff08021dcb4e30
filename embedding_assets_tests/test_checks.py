"""Asset checks and the nightly verification, on real SQLite stores and real runs."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

import dagster as dg
import numpy as np
import pytest

from embedding_assets.defs import checks
from embedding_assets.defs.io_managers import verify_published
from embedding_assets.defs.jobs import build_embed_faq_job
from embedding_assets.defs.resources import FaqWorkbook, StoreResource
from embedding_assets.defs.schedules import DRIFT_TAG, REPAIR_CONFIG, build_store_verification
from embedding_assets.lib.faq import parse_faq
from embedding_assets.lib.faq_checks import faq_content_problems
from embedding_assets.lib.model_versions import ModelVersionCatalog
from embedding_assets.lib.near_duplicates import load_search_state
from embedding_assets.retrieval.quality import ValidationQuery, top_k_accuracy
from embedding_assets.store import open_store
from embedding_assets_tests.conftest import make_template, read_rows, write_rows
from embedding_assets_tests.pipeline import KEY, MODEL_VERSIONS, run_pipeline, store_checks

CHECKS = store_checks()
CATALOG = ModelVersionCatalog.load(MODEL_VERSIONS)
VERSION = CATALOG.get(KEY)
store_verification = build_store_verification(build_embed_faq_job(CATALOG), CATALOG, "0 3 * * *", "UTC")
ANSWER = 6


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def set_vector(store: Path, template_id: str, vector: np.ndarray) -> None:
    with sqlite3.connect(store) as conn:
        conn.execute(
            "UPDATE templates SET vector = ? WHERE model_version = ? AND template_id = ?",
            (np.asarray(vector, dtype="<f4").tobytes(), KEY, template_id),
        )


def delete_row(store: Path, template_id: str) -> None:
    """Remove a row behind the store's back, as drift does (the version's row count stays recorded)."""
    with sqlite3.connect(store) as conn:
        conn.execute("DELETE FROM templates WHERE model_version = ? AND template_id = ?", (KEY, template_id))


def report(faq: Path, store: Path):
    with open_store(store, create=False) as opened:
        return verify_published(opened, VERSION, parse_faq(faq))


def test_faq_content_problems_name_the_row_and_the_value():
    templates = [
        make_template(1),
        make_template(2, answer="#REF!"),
        make_template(3, question=make_template(1).question, subcategory=make_template(1).subcategory),
        make_template(4, question=make_template(1).question.upper(), subcategory=make_template(1).subcategory,
                      answer=make_template(1).answer),
    ]
    assert faq_content_problems(templates) == [
        "row 3, answer: spreadsheet error value '#REF!'",
        "row 4: question 'Вопрос номер 1?' repeats row 2 in the same subcategory with a different answer",
    ]
    assert faq_content_problems([make_template(1), make_template(2)]) == []


def test_a_sheet_that_drops_most_published_templates_is_refused():
    templates = [make_template(n) for n in range(1, 4)]
    published = {"v1": {f"T-{n}" for n in range(1, 11)}, "v2": {"T-1", "T-2", "T-3", "T-4"}}
    assert faq_content_problems(templates, published, max_removed_share=0.5) == [
        "the sheet drops 7 of the 10 templates published for v1 (more than 50%); raise max_removed_share to publish it"
    ]
    assert faq_content_problems(templates, published, max_removed_share=0.7) == []


def test_a_published_store_matches_its_faq(warm):
    faq, store = warm
    found = report(faq, store)
    assert found.healthy, found.problems()
    assert (found.expected_rows, found.stored_rows) == (90, 90)


@pytest.mark.parametrize(
    "corrupt, field",
    [
        (lambda store: set_vector(store, "CARD-002", np.full(VERSION.dimension, np.nan)), "unhealthy_ids"),
        (lambda store: set_vector(store, "CARD-002", np.zeros(VERSION.dimension)), "unhealthy_ids"),
        (lambda store: delete_row(store, "CARD-002"), "missing_ids"),
    ],
    ids=["nan-vector", "zero-vector", "missing-row"],
)
def test_store_drift_is_found_and_named(warm, corrupt, field):
    faq, store = warm
    corrupt(store)
    found = report(faq, store)
    assert not found.healthy
    assert getattr(found, field) == ["CARD-002"]
    assert [f for f in ("missing_ids", "extra_ids", "hash_mismatch_ids", "unhealthy_ids") if getattr(found, f)] == [field]


def test_a_vector_of_the_wrong_dimension_makes_the_store_unreadable_for_the_check(warm):
    faq, store = warm
    set_vector(store, "CARD-002", np.ones(VERSION.dimension - 1))
    found = report(faq, store)
    assert not found.healthy
    assert "do not all have dimension 384" in found.problems()[0]


def test_a_template_edited_in_the_faq_but_not_published_is_a_hash_mismatch_and_a_new_one_is_missing(warm):
    faq, store = warm
    rows = read_rows(faq)
    rows[1][ANSWER] += " Изменено."
    rows.append(["NEW-1", "Карты", "Кешбэк", "Новый вопрос про кешбэк?", "низкий", "все клиенты", "Новый ответ."])
    write_rows(faq, rows)
    found = report(faq, store)
    assert found.hash_mismatch_ids == [rows[1][0]]
    assert found.missing_ids == ["NEW-1"]
    assert found.problems()[0] == "90 rows stored, the FAQ has 91 templates"


def test_a_run_records_every_check_passing_and_the_retrieval_accuracy(warm):
    faq, store = warm
    outcome = run_pipeline(faq, store, checks=CHECKS)
    assert outcome.result.success
    assert {name: e.passed for name, e in outcome.checks.items()} == {
        "faq_content": True, "store_matches_faq": True, "retrieval_quality": True, "near_duplicate_templates": True,
    }
    quality = outcome.checks["retrieval_quality"]
    assert quality.severity == dg.AssetCheckSeverity.WARN
    accuracy = quality.metadata["top3_accuracy"].value
    assert 0.7 <= accuracy <= 1.0
    assert quality.metadata["queries_evaluated"].value == 36
    assert round(accuracy * 36) == 36 - len(quality.metadata["missed_queries"].value)
    assert outcome.checks["store_matches_faq"].metadata["model_version"].value == KEY


def test_the_store_checks_run_in_one_step_and_one_selected_alone_runs_alone(warm):
    faq, store = warm
    outcome = run_pipeline(faq, store, checks=CHECKS)
    check_steps = {s for s in outcome.steps_run if s.endswith(("_checks", "_faq_content"))}
    assert check_steps == {"embedding_store_checks", "faq_templates_faq_content"}
    alone = run_pipeline(faq, store, checks=CHECKS, only_checks={"near_duplicate_templates"})
    assert alone.result.success
    assert set(alone.checks) == {"near_duplicate_templates"}
    assert alone.checks["near_duplicate_templates"].passed


def test_a_store_check_that_raises_fails_the_step_after_the_others_report(warm, monkeypatch):
    faq, store = warm

    def near_duplicate_templates(context, store):
        raise RuntimeError("scripted failure of one check")

    monkeypatch.setitem(checks.STORE_CHECKS, "near_duplicate_templates", near_duplicate_templates)
    outcome = run_pipeline(faq, store, checks=CHECKS)
    assert not outcome.result.success
    assert {name: e.passed for name, e in outcome.checks.items()} == {
        "faq_content": True, "store_matches_faq": True, "retrieval_quality": True,
    }
    (failure,) = outcome.result.get_step_failure_events()
    assert failure.step_key == "embedding_store_checks"
    assert failure.event_specific_data.error.cause.message.strip() == (
        "RuntimeError: scripted failure of one check"
    )
    assert outcome.metadata["embedding_store"]["rows"] == 90  # the publish before the checks stands


def test_an_ordinary_run_leaves_a_corrupted_vector_alone_and_the_integrity_check_fails(warm):
    faq, store = warm
    set_vector(store, "CARD-002", np.full(VERSION.dimension, np.nan))
    outcome = run_pipeline(faq, store, checks=CHECKS)
    assert outcome.result.success
    assert outcome.metadata["change_plan"]["repaired"] == 0
    assert outcome.metadata["embedding_store"]["published"] is False
    evaluation = outcome.checks["store_matches_faq"]
    assert not evaluation.passed
    assert evaluation.metadata["unhealthy_vectors"].value == 1
    assert "CARD-002" in evaluation.description


def test_a_broken_sheet_stops_at_the_blocking_check_and_leaves_the_store_identical(warm):
    faq, store = warm
    rows = read_rows(faq)
    rows[6][ANSWER] += " Новая редакция ответа."
    copied = [f"{rows[5][0]}-copy", *rows[5][1:6], "Другой ответ на тот же вопрос."]
    write_rows(faq, [*rows, copied])
    before = digest(store)
    outcome = run_pipeline(faq, store, checks=CHECKS)
    assert not outcome.result.success
    evaluation = outcome.checks["faq_content"]
    assert not evaluation.passed and evaluation.severity == dg.AssetCheckSeverity.ERROR
    assert f"repeats row 6 in the same subcategory with a different answer" in evaluation.metadata["problem_list"].value
    assert "template_embeddings" not in outcome.steps_run
    assert "embedding_store" not in outcome.steps_run
    assert outcome.calls == []
    assert digest(store) == before


def test_top_k_accuracy_counts_only_queries_whose_template_is_published():
    queries = [ValidationQuery("a", "q1", "T-1"), ValidationQuery("b", "q2", "T-2"), ValidationQuery("c", "q3", "T-9")]
    answers = {"q1": ["T-3", "T-1"], "q2": ["T-3", "T-4"]}
    found = top_k_accuracy(lambda text, k: answers[text][:k], queries, {"T-1", "T-2", "T-3", "T-4"}, top_k=2)
    assert (found.evaluated, found.hits, found.accuracy, found.misses, found.without_template) == (2, 1, 0.5, ["b"], ["c"])
    assert top_k_accuracy(lambda text, k: answers[text][:k], queries, {"T-1", "T-2"}, top_k=1).misses == ["a", "b"]


def schedule_context(faq: Path, store: Path) -> dg.ScheduleEvaluationContext:
    return dg.build_schedule_context(
        resources={
            "faq": FaqWorkbook(path=str(faq)),
            "store": StoreResource(url=str(store)),
        }
    )


def test_the_nightly_verification_skips_a_healthy_store(warm):
    faq, store = warm
    result = store_verification(schedule_context(faq, store))
    assert isinstance(result, dg.SkipReason)
    assert result.skip_message == f"store verified: {KEY}: 90 rows match the FAQ"


def test_the_nightly_verification_repairs_drift_from_the_cache_without_embedding(warm):
    faq, store = warm
    set_vector(store, "CARD-002", np.full(VERSION.dimension, np.nan))
    set_vector(store, "CARD-003", np.zeros(VERSION.dimension))
    delete_row(store, "CARD-004")

    requests = store_verification(schedule_context(faq, store))
    assert [(r.partition_key, r.run_config) for r in requests] == [(KEY, REPAIR_CONFIG)]
    assert "CARD-004" in requests[0].tags[DRIFT_TAG]

    outcome = run_pipeline(faq, store, checks=CHECKS, repair=True)
    assert outcome.result.success
    assert outcome.metadata["change_plan"]["repaired"] == 2
    assert outcome.plan == {"new": 1, "modified": 2, "deleted": 0, "unchanged": 87, "metadata_updated": 0}
    assert outcome.calls == []  # every vector came back from the content-addressed cache
    assert outcome.checks["store_matches_faq"].passed
    assert report(faq, store).healthy
    assert isinstance(store_verification(schedule_context(faq, store)), dg.SkipReason)


def test_the_nightly_verification_skips_with_the_reason_when_the_faq_is_broken(warm, tmp_path):
    _, store = warm
    broken = write_rows(tmp_path / "broken.xlsx", [["Вопрос"], ["что-то"]])
    result = store_verification(schedule_context(broken, store))
    assert isinstance(result, dg.SkipReason)
    assert result.skip_message.startswith(f"cannot verify the store: FAQ {broken} is not usable")


def test_a_vector_of_the_wrong_dimension_is_repaired_by_republishing_the_version_from_the_cache(warm):
    faq, store = warm
    set_vector(store, "CARD-002", np.ones(VERSION.dimension - 1))
    requests = store_verification(schedule_context(faq, store))
    assert [r.partition_key for r in requests] == [KEY]

    outcome = run_pipeline(faq, store, checks=CHECKS, repair=True)
    assert outcome.result.success
    assert outcome.metadata["change_plan"]["repaired"] == 90
    assert outcome.calls == []
    assert report(faq, store).healthy


QUESTION = 3


def near_duplicate_metadata(outcome) -> dict:
    return {k: v.value for k, v in outcome.checks["near_duplicate_templates"].metadata.items()}


def edit_with_a_near_duplicate(faq: Path) -> None:
    """Reword one question, delete one template, add a reworded copy of another (a near-duplicate pair)."""
    rows = read_rows(faq)
    rows[10][QUESTION] = rows[10][QUESTION].rstrip("?") + " сегодня?"
    duplicate = [*rows[6]]
    duplicate[0], duplicate[QUESTION] = "DUP-001", rows[6][QUESTION].rstrip("?") + ", подскажите?"
    del rows[20]
    write_rows(faq, [*rows, duplicate])


def near_duplicate_states(instance: dg.DagsterInstance) -> list[Path]:
    return sorted((Path(instance.storage_directory()) / "near_duplicates").glob("*"))


def test_after_an_edit_the_near_duplicate_check_compares_only_the_changed_rows_and_finds_what_a_full_search_finds(
    warm,
):
    faq, store = warm
    instance = dg.DagsterInstance.ephemeral()
    first = near_duplicate_metadata(run_pipeline(faq, store, instance=instance, checks=CHECKS))
    assert (first["incremental"], first["rows_compared"], first["templates"], first["pair_count"]) == (False, 90, 90, 0)
    (state,) = near_duplicate_states(instance)
    assert state.name.endswith(f"--{KEY}.npz") and state.name.startswith(first["evaluated_state"].split(":")[0])

    edit_with_a_near_duplicate(faq)
    edited = run_pipeline(faq, store, instance=instance, checks=CHECKS)
    assert edited.result.success and len(edited.embedded_texts) == 2
    found = edited.checks["near_duplicate_templates"]
    metadata = near_duplicate_metadata(edited)
    assert (metadata["incremental"], metadata["rows_compared"], metadata["templates"]) == (True, 2, 90)
    assert (metadata["pair_count"], metadata["reevaluated"]) == (1, True)
    assert {metadata["pairs"][0]["first_id"], metadata["pairs"][0]["second_id"]} == {"DUP-001", read_rows(faq)[6][0]}

    # a new instance has no saved search: the full search gives the same result
    full_run = run_pipeline(faq, store, instance=dg.DagsterInstance.ephemeral(), checks=CHECKS)
    full = full_run.checks["near_duplicate_templates"]
    full_metadata = near_duplicate_metadata(full_run)
    assert (full_metadata.pop("incremental"), full_metadata.pop("rows_compared")) == (False, 90)
    assert full_metadata == {k: v for k, v in metadata.items() if k not in ("incremental", "rows_compared")}
    assert (full.passed, full.severity, full.description) == (False, found.severity, found.description)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_damaged_near_duplicate_state_means_a_full_search_with_the_right_result(warm, damage):
    faq, store = warm
    instance = dg.DagsterInstance.ephemeral()
    assert run_pipeline(faq, store, instance=instance, checks=CHECKS).result.success
    (state,) = near_duplicate_states(instance)
    state.write_bytes(b"\x00not a saved search" if damage == "garbage" else state.read_bytes()[:300])

    edit_with_a_near_duplicate(faq)
    outcome = run_pipeline(faq, store, instance=instance, checks=CHECKS)

    assert outcome.result.success
    evaluation = outcome.checks["near_duplicate_templates"]
    metadata = near_duplicate_metadata(outcome)
    assert (metadata["incremental"], metadata["rows_compared"], metadata["pair_count"]) == (False, 90, 1)
    assert not evaluation.passed and evaluation.description == "1 pair(s) of templates with vectors at cosine >= 0.98"
    assert near_duplicate_states(instance) == [state]
    assert load_search_state(state).ids.size == 90  # the full search saved a readable state again
