"""A broken FAQ sheet, in every way we have seen one break: a clear error, and the store untouched."""

from __future__ import annotations

import datetime
import io
import re
import zipfile
from pathlib import Path

import pytest
from msoffcrypto.format.ooxml import OOXMLFile
from openpyxl import Workbook, load_workbook

from embedding_assets import settings
from embedding_assets.defs.resources import FaqWorkbook
from embedding_assets.lib.faq import header_hint
from embedding_assets.store import open_store
from embedding_assets_tests.conftest import HEADER, read_rows, write_rows
from embedding_assets_tests.pipeline import failure_message, run_pipeline
from embedding_assets_tests.secrets_scan import no_secrets_in_outputs  # noqa: F401  (autouse)

pytestmark = pytest.mark.reliability


def _problem(faq: Path, *problems: str) -> str:
    return f"step faq_templates failed: FAQ {faq} is not usable:\n" + "\n".join(f"  - {p}" for p in problems)


def _run_refused(faq: Path, store: Path, expected: str, sheet: str | None = None) -> None:
    before = store.read_bytes()
    outcome = run_pipeline(faq, store, sheet=sheet)
    assert not outcome.result.success
    assert failure_message(outcome.result) == expected
    assert outcome.calls == []
    assert store.read_bytes() == before


def _sample_rows() -> list[list]:
    from embedding_assets_tests.conftest import SAMPLE_FAQ

    return read_rows(SAMPLE_FAQ)


def test_a_text_file_named_xlsx(warm) -> None:
    faq, store = warm
    faq.write_text("ID;Вопрос;Ответ\n1;вопрос;ответ\n", encoding="utf-8")
    _run_refused(faq, store, _problem(faq, "is not an .xlsx workbook (an .xlsx file is a zip archive; this one is not)"))


def test_an_empty_file(warm) -> None:
    faq, store = warm
    faq.write_bytes(b"")
    _run_refused(faq, store, _problem(faq, "the file is empty (0 bytes)"))


def test_a_password_protected_workbook(warm) -> None:
    faq, store = warm
    encrypted = io.BytesIO()
    with faq.open("rb") as plain:
        OOXMLFile(plain).encrypt("секрет", encrypted)
    faq.write_bytes(encrypted.getvalue())
    _run_refused(
        faq, store,
        _problem(faq, "is a password-protected workbook; save it without a password"),
    )


def test_a_truncated_zip(warm) -> None:
    faq, store = warm
    faq.write_bytes(faq.read_bytes()[: faq.stat().st_size // 2])
    before = store.read_bytes()
    outcome = run_pipeline(faq, store)
    assert not outcome.result.success
    assert re.fullmatch(
        re.escape(_problem(faq, "cannot be read as an .xlsx workbook (BadZipFile: ")) + r".+\)",
        failure_message(outcome.result),
    )
    assert (outcome.calls, store.read_bytes()) == ([], before)


def test_a_missing_column(warm) -> None:
    faq, store = warm
    write_rows(faq, [row[:6] for row in _sample_rows()])
    found = ", ".join(repr(h) for h in HEADER[:6])
    _run_refused(
        faq, store,
        _problem(faq, f"row 1: missing required column 'Шаблонный ответ' (found columns: {found})", header_hint("Sheet", None, 20)),
    )


def test_a_renamed_header(warm) -> None:
    faq, store = warm
    rows = _sample_rows()
    rows[0][3] = "Вопрос клиента"
    write_rows(faq, rows)
    found = ", ".join(repr(h) for h in [*HEADER[:3], "Вопрос клиента", *HEADER[4:]])
    _run_refused(
        faq, store,
        _problem(faq, f"row 1: missing required column 'Пример вопроса' (found columns: {found})", header_hint("Sheet", None, 20)),
    )


def test_empty_cells_are_all_listed(warm) -> None:
    faq, store = warm
    rows = _sample_rows()
    rows[5][6] = None
    rows[9][1] = "   "
    write_rows(faq, rows)
    _run_refused(
        faq, store,
        _problem(faq, "row 6, column 'Шаблонный ответ': empty answer", "row 10, column 'Основная категория': empty category"),
    )


def test_duplicate_explicit_ids(warm) -> None:
    faq, store = warm
    rows = _sample_rows()
    rows[7][0] = rows[2][0]
    write_rows(faq, rows)
    _run_refused(faq, store, _problem(faq, f"row 8, column 'ID': duplicate id {rows[2][0]!r} (first used in row 3)"))


def test_a_formula_without_a_saved_value(warm) -> None:
    faq, store = warm
    rows = _sample_rows()
    rows[4][6] = "=CONCATENATE(G2, G3)"
    write_rows(faq, rows)
    _run_refused(
        faq, store,
        _problem(faq, "row 5, column 'Шаблонный ответ': formula =CONCATENATE(G2, G3) has no saved value; "
                      "open and save the workbook in Excel or LibreOffice, or paste the values"),
    )


def _with_saved_formula_value(path: Path, cell: str, formula: str, value: str) -> None:
    """Write a formula with a cached result, as Excel saves it (openpyxl itself saves no results)."""
    book = load_workbook(path)
    book.active[cell] = f"={formula}"
    book.save(path)
    with zipfile.ZipFile(path) as source:
        parts = {name: source.read(name) for name in source.namelist()}
    sheet = parts["xl/worksheets/sheet1.xml"].decode()
    sheet, count = re.subn(
        rf'<c r="{cell}"([^>]*)><f>([^<]*)</f><v\s*/?>(</v>)?</c>',
        rf'<c r="{cell}" t="str"><f>\2</f><v>{value}</v></c>',
        sheet,
    )
    assert count == 1, sheet[:500]
    parts["xl/worksheets/sheet1.xml"] = sheet.encode()
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as target:
        for name, data in parts.items():
            target.writestr(name, data)


def test_a_formula_reads_as_its_saved_value(warm) -> None:
    faq, store = warm
    rows = _sample_rows()
    _with_saved_formula_value(faq, "G5", "UPPER(G4)", "Сохранённое значение формулы.")
    outcome = run_pipeline(faq, store)
    assert outcome.result.success
    assert (outcome.plan["modified"], outcome.embedded_texts) == (
        1, [f"{rows[4][2]}: {rows[4][3]}\nСохранённое значение формулы."],
    )
    with open_store(store) as opened:
        answers = dict(zip(opened.snapshot().columns["template_id"], opened.snapshot().columns["answer"]))
    assert answers[rows[4][0]] == "Сохранённое значение формулы."


def test_merged_category_cells_fill_their_rows(warm) -> None:
    faq, store = warm
    rows = _sample_rows()
    same = [i for i in range(1, len(rows)) if rows[i][1] == rows[1][1]]
    run = [same[0]]
    while run[-1] + 1 in same:
        run.append(run[-1] + 1)
    assert len(run) >= 3
    for i in run[1:]:
        rows[i][1] = None
    write_rows(faq, rows)
    book = load_workbook(faq)
    book.active.merge_cells(start_row=run[0] + 1, end_row=run[-1] + 1, start_column=2, end_column=2)
    book.save(faq)
    before = store.read_bytes()

    outcome = run_pipeline(faq, store)

    assert outcome.result.success
    assert outcome.plan == {"new": 0, "modified": 0, "deleted": 0, "unchanged": 90, "metadata_updated": 0}
    assert (outcome.calls, store.read_bytes()) == ([], before)


def test_a_ten_thousand_character_answer_is_embedded_and_stored_whole(warm) -> None:
    faq, store = warm
    rows = _sample_rows()
    long_answer = ("Подробное пояснение условий обслуживания. " * 240)[:10_000].strip()
    rows[3][6] = long_answer
    write_rows(faq, rows)

    outcome = run_pipeline(faq, store)

    assert outcome.result.success
    assert (outcome.plan["modified"], len(outcome.calls), len(outcome.embedded_texts)) == (1, 1, 1)
    with open_store(store) as opened:
        snapshot = opened.snapshot()
    stored = dict(zip(snapshot.columns["template_id"], snapshot.columns["answer"]))
    assert stored[rows[3][0]] == long_answer


def test_data_on_the_second_sheet_with_an_empty_first_sheet(warm) -> None:
    faq, store = warm
    rows = _sample_rows()
    book = Workbook()
    book.active.title = "Обложка"
    data = book.create_sheet("FAQ")
    for row in rows:
        data.append(row)
    book.save(faq)
    _run_refused(faq, store, _problem(faq, "sheet 'Обложка' is empty; the data may be on sheet 'FAQ': set the sheet name"))

    named = run_pipeline(faq, store, sheet="FAQ")
    assert named.result.success
    assert named.plan["unchanged"] == 90 and named.calls == []


def test_a_workbook_whose_only_sheet_is_empty(warm) -> None:
    faq, store = warm
    Workbook().save(faq)
    _run_refused(faq, store, _problem(faq, "sheet 'Sheet' is empty"))


# --- sheets as users send them: published as the user sees them, or refused with the cause -------

UNCHANGED = {"new": 0, "modified": 0, "deleted": 0, "unchanged": 90}
ENGLISH = ["Id", "Category", "Subcategory", "Question", "Priority", "Audience", "Answer"]


def _hidden_stale_first_sheet(faq: Path, rows: list[list], monkeypatch) -> dict:
    stale = [list(r) for r in rows]
    for row in stale[1:6]:
        row[6] = "Устаревший ответ из старой копии."
    book = Workbook()
    book.active.title = "Копия"
    for row in stale:
        book.active.append(row)
    book.active.sheet_state = "hidden"
    current = book.create_sheet("FAQ")
    for row in rows:
        current.append(row)
    book.active = 1
    book.save(faq)
    return {}


def _title_rows(faq: Path, rows: list[list], monkeypatch) -> dict:
    write_rows(faq, [["FAQ — выгрузка от 01.12"], [None], *rows])
    return {}


def _header_case(faq: Path, rows: list[list], monkeypatch) -> dict:
    header = ["id", "ОСНОВНАЯ КАТЕГОРИЯ", " подкатегория", "Пример  вопроса", "приоритет", "Целевая Аудитория", "шаблонный ответ "]
    write_rows(faq, [header, *rows[1:]])
    return {}


def _no_id_column(faq: Path, rows: list[list], monkeypatch) -> dict:
    write_rows(faq, [row[1:] for row in rows])
    return {}


def _typed_cells(faq: Path, rows: list[list], monkeypatch) -> dict:
    rows[4][3] = 12345
    rows[6][6] = datetime.datetime(2024, 5, 1)
    rows[8][6] = True
    write_rows(faq, rows)
    return {}


def _zero_width_repeat(faq: Path, rows: list[list], monkeypatch) -> dict:
    twin = ["NEW-1", *rows[1][1:3], rows[1][3].replace(" ", " \u200b", 1), *rows[1][4:6], "Другой ответ на тот же вопрос."]
    write_rows(faq, [*rows, twin])
    return {}


def _excel_escape(faq: Path, rows: list[list], monkeypatch) -> dict:
    rows[3][6] = rows[3][6].replace(" ", "_x000D_\n", 1)
    rows[5][3] = rows[5][3].replace(" ", "_x0009_", 1)
    write_rows(faq, rows)
    return {}


def _english_headers_named_in_the_config(faq: Path, rows: list[list], monkeypatch) -> dict:
    write_rows(faq, [ENGLISH, *rows[1:]])
    config = faq.parent / "embedding_assets.toml"
    config.write_text(
        f'[faq]\npath = "{faq.name}"\n\n[faq.columns]\ncategory = "Category"\nsubcategory = "Subcategory"\n'
        'question = "Question"\nanswer = "Answer"\npriority = "Priority"\naudience = "Audience"\n',
        encoding="utf-8",
    )
    monkeypatch.setenv(settings.CONFIG_VAR, str(config))
    monkeypatch.delenv(settings.FAQ_PATH_VAR, raising=False)
    return {"workbook": FaqWorkbook(**settings.faq_workbook_settings())}


def _english_headers_not_named(faq: Path, rows: list[list], monkeypatch) -> dict:
    write_rows(faq, [ENGLISH, *rows[1:]])
    return {}


def _missing_columns(faq: Path) -> str:
    found = ", ".join(map(repr, ENGLISH))
    return _problem(
        faq,
        *(f"row 1: missing required column {c!r} (found columns: {found})" for c in HEADER[1:4] + HEADER[6:]),
        "headers are looked for in rows 1–20 of sheet 'Sheet', in any case and spacing; to name the sheet, "
        "header row or columns use the [faq] table of embedding_assets.toml, EMBEDDING_ASSETS_FAQ_* variables "
        "or the faq resource's config",
    )


def _typed_problems(faq: Path) -> str:
    text = "make the cell text (Format Cells → Text and retype it, or start it with an apostrophe)"
    return _problem(
        faq,
        f"row 5, column 'Пример вопроса': holds the number 12345, not text; the sheet may show it otherwise "
        f"(its number format is not read), so {text}",
        f"row 7, column 'Шаблонный ответ': holds a date or time (2024-05-01), not text; the sheet shows it "
        f"through its number format, which is not read, so {text}",
        f"row 9, column 'Шаблонный ответ': holds the logical value TRUE, not text; {text}",
    )


@pytest.mark.parametrize(
    ("build", "expected"),
    [
        (_hidden_stale_first_sheet, UNCHANGED),
        (_title_rows, UNCHANGED),
        (_header_case, UNCHANGED),
        (_no_id_column, "blocked: the sheet has no id column 'ID', so every id was derived from category, "
         "subcategory and question, but the store published for e5-small-v1 holds 90 explicit id(s) (such as "
         "'APP-001'); restore the 'ID' column, or name the id column (id_column / EMBEDDING_ASSETS_FAQ_ID_COLUMN)"),
        (_typed_cells, _typed_problems),
        (_zero_width_repeat, "blocked: row 92: question {question!r} repeats row 2 in the same subcategory with a different answer"),
        (_excel_escape, UNCHANGED),
        (_english_headers_named_in_the_config, UNCHANGED),
        (_english_headers_not_named, _missing_columns),
    ],
    ids=[
        "1-hidden-stale-first-sheet", "2-title-rows", "3-header-case", "3-no-id-column", "4-numbers-dates-booleans",
        "5-zero-width-repeat", "5-excel-escapes", "6-english-headers-in-config", "6-english-headers-not-named",
    ],
)
def test_a_sheet_as_users_send_it(warm, monkeypatch, build, expected) -> None:
    from embedding_assets.defs.checks import faq_content

    faq, store = warm
    rows = _sample_rows()
    options = build(faq, rows, monkeypatch)
    before = store.read_bytes()

    outcome = run_pipeline(faq, store, checks=[faq_content], **options)

    assert outcome.calls == []
    if isinstance(expected, dict):
        assert outcome.result.success, failure_message(outcome.result)
        assert {k: outcome.plan[k] for k in expected} == expected
        if build is not _title_rows:  # moved rows update the stored row numbers, nothing else
            assert store.read_bytes() == before
        return
    assert not outcome.result.success
    assert store.read_bytes() == before
    if callable(expected):
        assert failure_message(outcome.result) == expected(faq)
        return
    problems = outcome.checks["faq_content"].metadata["problem_list"].value.split("\n")
    assert problems[0] == "- " + expected.removeprefix("blocked: ").format(question=rows[1][3])
