"""The FAQ sensor, evaluated against real files with Dagster's sensor context."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import dagster as dg

from embedding_assets.definitions import build_definitions
from embedding_assets.defs.jobs import build_embed_faq_job
from embedding_assets.defs.resources import FaqWorkbook
from embedding_assets.defs.sensors import CONTENT_TAG, build_faq_sensor
from embedding_assets.lib.model_versions import ModelVersionCatalog
from embedding_assets.settings import Settings
from embedding_assets.lib.faq_watch import FileState, file_sha256, observe
from embedding_assets_tests.conftest import SAMPLE_FAQ, read_rows, write_rows

VERSIONS_TOML = """
[[model_version]]
key = "small-a"
provider = "local"
model = "multilingual-e5-small"
dimension = 384

[[model_version]]
key = "small-b"
provider = "local"
model = "multilingual-e5-small"
dimension = 384
text_template = "{question}"

[[model_version]]
key = "retired"
provider = "local"
model = "multilingual-e5-small"
dimension = 384
active = false
"""


def evaluate(faq: Path, versions: Path, cursor: str | None) -> dg.SensorResult:
    catalog = ModelVersionCatalog.load(versions)
    sensor = build_faq_sensor(build_embed_faq_job(catalog), catalog, interval_seconds=30)
    return sensor(dg.build_sensor_context(cursor=cursor, resources={"faq": FaqWorkbook(path=str(faq))}))


def setup(tmp_path: Path) -> tuple[Path, Path]:
    faq = tmp_path / "faq.xlsx"
    shutil.copyfile(SAMPLE_FAQ, faq)
    versions = tmp_path / "model_versions.toml"
    versions.write_text(VERSIONS_TOML)
    return faq, versions


def edit(faq: Path) -> None:
    rows = read_rows(faq)
    rows[1][6] += " Уточнение."
    write_rows(faq, rows)


def test_first_look_requests_one_run_per_active_version_and_remembers_the_file(tmp_path):
    faq, versions = setup(tmp_path)
    result = evaluate(faq, versions, None)
    sha = file_sha256(faq)
    assert [r.partition_key for r in result.run_requests] == ["small-a", "small-b"]
    assert [r.run_key for r in result.run_requests] == [f"faq-{sha[:16]}-edit-0-small-a", f"faq-{sha[:16]}-edit-0-small-b"]
    assert all(r.tags[CONTENT_TAG] == sha for r in result.run_requests)
    stat = faq.stat()
    assert json.loads(result.cursor) == {"mtime_ns": stat.st_mtime_ns, "size": stat.st_size, "sha256": sha, "edits": 0}


def test_no_change_no_run(tmp_path):
    faq, versions = setup(tmp_path)
    cursor = evaluate(faq, versions, None).cursor
    result = evaluate(faq, versions, cursor)
    assert result.run_requests == []
    assert result.skip_reason.skip_message == f"FAQ file {faq} unchanged (content {file_sha256(faq)[:12]})"
    assert result.cursor == cursor


def test_an_edit_requests_one_run_per_active_version_with_a_new_run_key(tmp_path):
    faq, versions = setup(tmp_path)
    first = evaluate(faq, versions, None)
    edit(faq)
    result = evaluate(faq, versions, first.cursor)
    sha = file_sha256(faq)
    assert [(r.partition_key, r.run_key) for r in result.run_requests] == [
        ("small-a", f"faq-{sha[:16]}-edit-1-small-a"),
        ("small-b", f"faq-{sha[:16]}-edit-1-small-b"),
    ]
    assert FileState.from_cursor(result.cursor).sha256 == sha
    assert evaluate(faq, versions, result.cursor).run_requests == []


def test_the_same_content_rewritten_changes_mtime_but_requests_no_run(tmp_path):
    faq, versions = setup(tmp_path)
    cursor = evaluate(faq, versions, None).cursor
    content = faq.read_bytes()
    faq.write_bytes(content)
    later = FileState.from_cursor(cursor).mtime_ns + 5_000_000_000
    os.utime(faq, ns=(later, later))
    result = evaluate(faq, versions, cursor)
    assert result.run_requests == []
    assert result.skip_reason.skip_message == f"FAQ file {faq} rewritten with the same content ({file_sha256(faq)[:12]})"
    assert FileState.from_cursor(result.cursor).mtime_ns == later
    assert FileState.from_cursor(result.cursor).edits == 0


def test_reverting_an_edit_is_a_new_edit_with_its_own_run_key(tmp_path):
    faq, versions = setup(tmp_path)
    original = faq.read_bytes()
    first = evaluate(faq, versions, None)
    edit(faq)
    second = evaluate(faq, versions, first.cursor)
    faq.write_bytes(original)
    third = evaluate(faq, versions, second.cursor)
    keys = [r.run_key for r in (*first.run_requests, *second.run_requests, *third.run_requests)]
    assert len(keys) == len(set(keys)) == 6
    assert third.run_requests[0].tags[CONTENT_TAG] == first.run_requests[0].tags[CONTENT_TAG]


def test_a_missing_file_is_skipped_with_the_reason_and_keeps_the_cursor(tmp_path):
    faq, versions = setup(tmp_path)
    cursor = evaluate(faq, versions, None).cursor
    faq.unlink()
    result = evaluate(faq, versions, cursor)
    assert result.run_requests == []
    assert result.skip_reason.skip_message == f"FAQ file {faq} not found"
    assert result.cursor == cursor


def test_an_unreadable_path_is_skipped_with_the_reason(tmp_path):
    faq, versions = setup(tmp_path)
    directory = tmp_path / "a-directory.xlsx"
    directory.mkdir()
    result = evaluate(directory, versions, None)
    assert result.run_requests == []
    assert result.skip_reason.skip_message == f"FAQ path {directory} is not a file"


def test_a_garbled_cursor_counts_as_no_cursor(tmp_path):
    faq, _ = setup(tmp_path)
    assert FileState.from_cursor("not json") is None
    assert observe(faq, FileState.from_cursor('{"unexpected": 1}')).changed


def test_a_version_declared_after_loading_is_not_requested_until_the_definitions_reload(tmp_path):
    faq, versions = setup(tmp_path)
    config = Settings.from_environment()
    definitions = build_definitions(
        Settings(**{**vars(config), "faq_path": str(faq), "model_versions_path": str(versions)})
    )
    versions.write_text(
        VERSIONS_TOML + '[[model_version]]\nkey = "small-c"\nprovider = "local"\nmodel = "multilingual-e5-small"\n'
        "dimension = 384\n"
    )
    assert [v.key for v in ModelVersionCatalog.load(versions).active()] == ["small-a", "small-b", "small-c"]

    sensor = definitions.resolve_sensor_def("faq_changed")
    result = sensor(dg.build_sensor_context(cursor=None, resources={"faq": FaqWorkbook(path=str(faq))}))
    partitions = definitions.resolve_job_def("embed_faq").partitions_def.get_partition_keys()
    assert partitions == ["small-a", "small-b", "retired"]
    assert [r.partition_key for r in result.run_requests] == ["small-a", "small-b"]
