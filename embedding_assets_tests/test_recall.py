"""A run recalls the outputs an earlier run made from the same inputs, and computes what changed."""

from __future__ import annotations

import os
import shutil
import sqlite3
import time
from pathlib import Path

import dagster as dg
import pytest

from embedding_assets.defs import checks
from embedding_assets.defs.io_managers import MISSING, IntermediateIOManager, recall
from embedding_assets.defs.resources import FaqWorkbook
from embedding_assets.lib import hashing
from embedding_assets.store.sqlite import SqliteStore
from embedding_assets_tests.conftest import SAMPLE_FAQ, read_rows, write_rows
from embedding_assets_tests.pipeline import KEY, run_pipeline, store_checks

CHECKS = store_checks()
RECALLED_CHECKS = {"faq_content", "store_matches_faq"}  # the checks that keep a result by what they read


def run_checked(faq, store, instance):
    return run_pipeline(faq, store, instance=instance, checks=CHECKS, only_checks=RECALLED_CHECKS)


def reused(outcome) -> tuple[bool, bool, bool]:
    return (
        outcome.metadata["faq_templates"]["reused_parse"],
        outcome.metadata["template_hashes"]["reused_hashes"],
        outcome.metadata["change_plan"]["reused_plan"],
    )


@pytest.fixture
def built(warm):
    """A copy of the session's published store and its FAQ, run once on an instance later runs go on."""
    faq, store = warm
    instance = dg.DagsterInstance.ephemeral()
    first = run_checked(faq, store, instance)
    assert first.result.success
    return faq, store, instance, first


def test_an_unchanged_faq_and_store_recall_parse_hashes_and_plan(built):
    faq, store, instance, first = built
    assert reused(first) == (False, False, False)
    second = run_checked(faq, store, instance)
    third = run_checked(faq, store, instance)
    for outcome in (second, third):
        assert outcome.result.success
        assert outcome.calls == []
        assert outcome.plan == {"new": 0, "modified": 0, "deleted": 0, "unchanged": 90, "metadata_updated": 0}
        assert outcome.store["rows"] == 90 and outcome.store["published"] is False
        assert {name: e.passed for name, e in outcome.checks.items()} == {name: True for name in outcome.checks}
    assert reused(second) == (True, True, True)
    assert reused(third) == (True, True, True)
    assert second.checks["store_matches_faq"].metadata["reevaluated"].value is False
    assert second.checks["faq_content"].metadata["reevaluated"].value is False


def test_a_kept_store_check_result_hashes_nothing(built, monkeypatch):
    faq, store, instance, _ = built
    hashed = []
    for name in ("hash_version_templates", "hashed_digest"):
        original = getattr(checks, name)
        monkeypatch.setattr(checks, name, lambda *args, _f=original, _n=name: hashed.append(_n) or _f(*args))
    again = run_checked(faq, store, instance)
    assert again.checks["store_matches_faq"].passed
    assert again.checks["store_matches_faq"].metadata["reevaluated"].value is False
    assert hashed == []


def test_an_edited_faq_is_hashed_once_by_its_run_and_checked_against_the_new_generation(built, monkeypatch):
    faq, store, instance, _ = built
    header, *rows = read_rows(faq)
    rows[3][6] = rows[3][6] + " Уточнение."
    write_rows(faq, [header, *rows])
    hashed_lengths = []
    original = hashing.hash_templates_uncached
    monkeypatch.setattr(
        hashing, "hash_templates_uncached", lambda items, version: hashed_lengths.append(len(items)) or original(items, version)
    )
    edited = run_checked(faq, store, instance)
    assert edited.plan["modified"] == 1
    assert edited.checks["store_matches_faq"].passed
    assert edited.checks["store_matches_faq"].metadata["reevaluated"].value is True
    assert hashed_lengths == [90]  # template_hashes; the check compares the new generation with those hashes


def test_the_same_bytes_saved_again_are_recalled_and_one_edited_answer_is_exactly_one_change(built):
    faq, store, instance, _ = built
    data = faq.read_bytes()
    faq.write_bytes(data)  # a new modification time, the same content
    os.utime(faq, (time.time() + 5, time.time() + 5))
    assert reused(run_pipeline(faq, store, instance=instance)) == (True, True, True)

    header, *rows = read_rows(faq)
    rows[7][6] = rows[7][6] + " Уточнение."
    write_rows(faq, [header, *rows])
    edited = run_checked(faq, store, instance)
    assert reused(edited) == (False, False, False)
    assert edited.plan == {"new": 0, "modified": 1, "deleted": 0, "unchanged": 89, "metadata_updated": 0}
    assert len(edited.embedded_texts) == 1 and edited.embedded_texts[0].endswith("Уточнение.")
    assert edited.store["upserted"] == 1 and edited.store["rows"] == 90
    assert edited.checks["store_matches_faq"].passed
    assert edited.checks["store_matches_faq"].metadata["reevaluated"].value is True


def test_a_store_written_outside_a_run_is_planned_and_checked_again(built):
    faq, store, instance, _ = built
    with sqlite3.connect(store) as conn:
        victim = conn.execute("SELECT template_id FROM templates ORDER BY template_id LIMIT 1").fetchone()[0]
        conn.execute("DELETE FROM templates WHERE template_id = ?", (victim,))
    after = run_checked(faq, store, instance)
    assert reused(after) == (True, True, False)  # the FAQ is the same; the store is not
    assert after.plan["new"] == 1 and after.metadata["change_plan"]["new_ids"] == [victim]
    assert after.calls == []  # its vector is still in the cache
    assert after.store["rows"] == 90
    assert after.checks["store_matches_faq"].metadata["reevaluated"].value is True


def test_a_stored_output_that_was_lost_is_computed_again(built):
    faq, store, instance, _ = built
    shutil.rmtree(Path(instance.storage_directory()) / "intermediates" / "blobs")
    again = run_checked(faq, store, instance)
    assert again.result.success
    assert reused(again) == (False, False, False)
    assert again.plan["unchanged"] == 90 and again.calls == []
    assert reused(run_pipeline(faq, store, instance=instance)) == (True, True, True)


def test_the_faq_inputs_key_follows_the_bytes_and_the_reader_settings(tmp_path):
    faq = write_rows(tmp_path / "faq.xlsx", read_rows(SAMPLE_FAQ))
    copy = tmp_path / "copy.xlsx"
    shutil.copyfile(faq, copy)
    key = FaqWorkbook(path=str(faq)).inputs_key()
    assert key == FaqWorkbook(path=str(faq)).inputs_key()
    assert key != FaqWorkbook(path=str(faq), sheet="Другой").inputs_key()
    assert key != FaqWorkbook(path=str(faq), id_column="Номер").inputs_key()
    assert key != FaqWorkbook(path=str(copy)).inputs_key()  # another file: its own parse
    header, *rows = read_rows(faq)
    rows[0][3] = rows[0][3] + "?"
    write_rows(faq, [header, *rows])
    assert key != FaqWorkbook(path=str(faq)).inputs_key()
    assert FaqWorkbook(path=str(tmp_path / "missing.xlsx")).inputs_key() is None


def test_the_store_checks_of_a_run_read_the_published_version_once(built, monkeypatch):
    faq, store, instance, _ = built
    reads = []
    real_snapshot = SqliteStore.snapshot

    def counted(self, key=None):
        reads.append(key)
        return real_snapshot(self, key)

    monkeypatch.setattr(SqliteStore, "snapshot", counted)
    header, *rows = read_rows(faq)
    rows[3][6] = rows[3][6] + " Дополнено."
    write_rows(faq, [header, *rows])
    edited = run_pipeline(faq, store, instance=instance, checks=store_checks())
    assert edited.result.success and edited.store["generation"] > 0
    assert {"store_matches_faq", "retrieval_quality", "near_duplicate_templates"} <= set(edited.checks)
    assert all(edited.checks[name].metadata["reevaluated"].value for name in ("store_matches_faq", "near_duplicate_templates"))
    assert reads == [KEY]  # one read of the new generation, shared by the three checks


def test_an_output_recalled_then_deleted_by_another_run_is_stored_again():
    instance = dg.DagsterInstance.ephemeral()
    blobs = Path(instance.storage_directory()) / "intermediates" / "blobs"

    @dg.asset
    def numbers(context) -> list[int]:
        value = recall(context, "numbers, version 1")
        if value is MISSING:
            return [1, 2, 3]
        shutil.rmtree(blobs)  # another run stored its own output and deleted this one meanwhile
        return value

    @dg.asset
    def total(numbers: list[int]) -> int:
        return sum(numbers)

    for _ in range(2):
        result = dg.materialize([numbers, total], instance=instance, resources={"io_manager": IntermediateIOManager()})
        assert result.success
        assert result.output_for_node("total") == 6
    assert len(list(blobs.glob("*.pickle"))) == 2  # both outputs stored again, readable by a step in a new process
