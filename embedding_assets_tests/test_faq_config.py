"""Naming the FAQ file, sheet and columns: the [faq] config table, environment variables, `materialize --faq`."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from embedding_assets import settings
from embedding_assets.defs.resources import FaqWorkbook, build_resources
from embedding_assets_tests.conftest import SAMPLE_FAQ, read_rows

CLI = str(Path(sys.executable).parent / "embedding-assets")
ENGLISH = ["Id", "Category", "Subcategory", "Question", "Priority", "Audience", "Answer"]
FAQ_VARS = [settings.FAQ_PATH_VAR, settings.FAQ_SHEET_VAR, settings.FAQ_HEADER_ROW_VAR, *settings.FAQ_COLUMN_VARS.values()]


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    for variable in FAQ_VARS:
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv(settings.CONFIG_VAR, str(tmp_path / "embedding_assets.toml"))
    return tmp_path / "embedding_assets.toml"


def test_defaults_without_config_or_variables(clean_env) -> None:
    assert settings.faq_workbook_settings() == {"path": "data/faq.xlsx"}
    faq = build_resources(settings.Settings.from_environment())["faq"]
    assert (faq.path, faq.sheet, faq.header_row, faq.question_column, faq.id_column) == (
        "data/faq.xlsx", None, None, "Пример вопроса", "ID",
    )


def test_the_faq_table_names_file_sheet_header_row_and_columns(clean_env) -> None:
    clean_env.write_text(
        '[faq]\npath = "sheets/faq.xlsx"\nsheet = "FAQ"\nheader_row = 3\n\n'
        '[faq.columns]\nquestion = "Question"\nanswer = "Answer"\nid = "Key"\n',
        encoding="utf-8",
    )
    assert settings.faq_workbook_settings() == {
        "path": str(clean_env.parent / "sheets" / "faq.xlsx"),
        "sheet": "FAQ",
        "header_row": 3,
        "question_column": "Question",
        "answer_column": "Answer",
        "id_column": "Key",
    }
    faq = build_resources(settings.Settings.from_environment())["faq"]
    assert (faq.path, faq.sheet, faq.header_row, faq.question_column, faq.category_column) == (
        str(clean_env.parent / "sheets" / "faq.xlsx"), "FAQ", 3, "Question", "Основная категория",
    )


def test_variables_override_the_faq_table(clean_env, monkeypatch) -> None:
    clean_env.write_text('[faq]\npath = "a.xlsx"\nsheet = "A"\n[faq.columns]\nquestion = "Q"\n', encoding="utf-8")
    monkeypatch.setenv(settings.FAQ_PATH_VAR, "b.csv")
    monkeypatch.setenv(settings.FAQ_HEADER_ROW_VAR, "2")
    monkeypatch.setenv("EMBEDDING_ASSETS_FAQ_QUESTION_COLUMN", "Question")
    assert settings.faq_workbook_settings() == {"path": "b.csv", "sheet": "A", "header_row": 2, "question_column": "Question"}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[faq]\nfile = "x.xlsx"\n', "unknown key(s) in [faq]: file (known: path, sheet, header_row, "
         "columns.{category, subcategory, question, answer, priority, audience, id})"),
        ('[faq.columns]\nquestoin = "Q"\n', "unknown key(s) in [faq]: columns.questoin"),
        ("[faq]\nheader_row = 0\n", "[faq] header_row must be a row number (1 or more), not 0"),
        ("[faq\n", "not valid TOML"),
    ],
    ids=["unknown-key", "unknown-column", "header-row-zero", "bad-toml"],
)
def test_a_wrong_faq_table_is_refused_with_its_cause(clean_env, text: str, message: str) -> None:
    clean_env.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError) as exc_info:
        settings.faq_workbook_settings()
    assert message in str(exc_info.value)


def test_the_resource_says_which_sheet_it_read(tmp_path) -> None:
    from openpyxl import Workbook

    book = Workbook()
    book.active.title = "Old"
    book.active.sheet_state = "hidden"
    faq = book.create_sheet("FAQ")
    for row in read_rows(SAMPLE_FAQ):
        faq.append(row)
    book.active = 1
    book.save(tmp_path / "faq.xlsx")
    sheet = FaqWorkbook(path=str(tmp_path / "faq.xlsx")).read_sheet()
    assert (sheet.sheet, sheet.header_row, sheet.other_sheets, len(sheet.templates)) == ("FAQ", 1, ["Old"], 90)
    assert sheet.note == "read sheet 'FAQ' (the active sheet); other sheets: 'Old' (hidden); headers in row 1"


def test_materialize_reads_the_file_named_by_faq_and_the_columns_named_by_variables(default_run, tmp_path) -> None:
    rows = read_rows(SAMPLE_FAQ)
    faq = tmp_path / "english.csv"
    with faq.open("w", newline="", encoding="utf-8") as handle:
        csv.writer(handle, delimiter=";").writerows([ENGLISH, *[["" if v is None else v for v in r] for r in rows[1:]]])
    shutil.copyfile(default_run[1], tmp_path / "store.db")
    env = {k: v for k, v in os.environ.items() if k not in FAQ_VARS}
    env |= {
        "EMBEDDING_ASSETS_STORE": "sqlite:///store.db",
        "DAGSTER_HOME": str(tmp_path / "dagster_home"),
        settings.CONFIG_VAR: str(tmp_path / "embedding_assets.toml"),
        **{settings.FAQ_COLUMN_VARS[key]: name for key, name in zip(
            ("id", "category", "subcategory", "question", "priority", "audience", "answer"), ENGLISH
        )},
    }

    def materialize(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [CLI, "materialize", "--json", *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
        )

    done = materialize("--faq", str(faq))
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert {k: summary[k] for k in ("new", "modified", "deleted", "unchanged", "embedded")} == {
        "new": 0, "modified": 0, "deleted": 0, "unchanged": 90, "embedded": 0,
    }

    (tmp_path / "embedding_assets.toml").write_text(f'[faq]\npath = "{faq.name}"\n', encoding="utf-8")
    assert json.loads(materialize().stdout)["unchanged"] == 90

    refused = materialize("--faq", str(tmp_path / "absent.xlsx"))
    assert refused.returncode == 1
    assert f"step faq_templates failed: FAQ {tmp_path / 'absent.xlsx'} is not usable:\n  - file not found" in refused.stderr
