"""A broken FAQ sheet, in every way we have seen one break: a clear error, and the store untouched."""

from __future__ import annotations

import io
import re
import zipfile
from pathlib import Path

import pytest
from msoffcrypto.format.ooxml import OOXMLFile
from openpyxl import Workbook, load_workbook

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
        _problem(faq, "is a password-protected workbook or an old .xls file; save it as an .xlsx without a password"),
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
    _run_refused(faq, store, _problem(faq, f"row 1: missing required column 'Шаблонный ответ' (found columns: {found})"))


def test_a_renamed_header(warm) -> None:
    faq, store = warm
    rows = _sample_rows()
    rows[0][3] = "Вопрос клиента"
    write_rows(faq, rows)
    found = ", ".join(repr(h) for h in [*HEADER[:3], "Вопрос клиента", *HEADER[4:]])
    _run_refused(faq, store, _problem(faq, f"row 1: missing required column 'Пример вопроса' (found columns: {found})"))


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
