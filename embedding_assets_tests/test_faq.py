from __future__ import annotations

import datetime
import math
from collections import Counter
from pathlib import Path

import pytest

from embedding_assets.lib.faq import (
    FaqColumns,
    FaqError,
    Template,
    derived_template_id,
    header_hint,
    missing_id_column_problems,
    normalize_text,
    parse_faq,
    read_faq,
)
from openpyxl import Workbook

from embedding_assets_tests.conftest import HEADER, SAMPLE_FAQ, read_rows, write_rows

NO_ID_HEADER = HEADER[1:]
QUESTION = "Пример вопроса"
ANSWER = "Шаблонный ответ"


def _row(template_id: str, n: int) -> list:
    return [template_id, "Карты", f"Подкатегория {n}", f"Вопрос {n}?", "высокий", "все клиенты", f"Ответ {n}."]


def _no_id_rows() -> list[list]:
    return [
        ["Карты", "Выпуск", "Как заказать карту?", "высокий", "новые клиенты", "В приложении."],
        ["Кредиты", "Погашение", "Как погасить кредит досрочно?", "средний", "все клиенты", "В разделе Кредиты."],
        ["Вклады", "Открытие", "Как открыть вклад?", "низкий", "все клиенты", "Онлайн за минуту."],
    ]


def _message(exc_info: pytest.ExceptionInfo) -> str:
    return str(exc_info.value)


# --- normalize_text -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("и\u0306", "\u0439"),
        ("Мои\u0306 банк", "Мой банк"),
        ("  trimmed  ", "trimmed"),
        ("a  b", "a b"),
        ("line1\nline2", "line1 line2"),
        ("a\tb", "a b"),
        ("a\u00a0b", "a b"),
        (" \t a \r\n\u00a0 b \n ", "a b"),
        (None, ""),
        (float("nan"), ""),
        (math.nan, ""),
        ("", ""),
        ("   ", ""),
        (42, "42"),
    ],
)
def test_normalize_text(value: object, expected: str) -> None:
    assert normalize_text(value) == expected


def test_normalize_text_nfc_is_single_code_point() -> None:
    result = normalize_text("и\u0306")
    assert len(result) == 1
    assert result == "й"


# --- the sample workbook --------------------------------------------------------------------------


def test_parse_sample_faq() -> None:
    templates = parse_faq(SAMPLE_FAQ)
    rows = read_rows(SAMPLE_FAQ)
    assert len(templates) == 90
    assert [t.template_id for t in templates] == [r[0] for r in rows[1:]]
    assert len({t.template_id for t in templates}) == 90
    assert [t.source_row for t in templates] == list(range(2, 92))
    assert Counter(t.category for t in templates) == {
        "Карты": 15,
        "Переводы и платежи": 15,
        "Кредиты": 15,
        "Вклады и накопления": 15,
        "Мобильный банк и онлайн": 15,
        "Безопасность и мошенничество": 15,
    }
    first = templates[0]
    assert first.template_id == "CARD-001"
    assert first.category == "Карты"
    assert first.subcategory == "Оформление и доставка"
    assert first.question == "Как заказать дебетовую карту с доставкой на дом?"
    assert first.priority == "высокий"
    assert first.audience == "новые клиенты"
    assert first.answer.startswith("Оформить дебетовую карту «Путь» можно в приложении")
    assert templates[-1].template_id == "SEC-015"
    assert templates[-1].source_row == 91


def test_faq_copy_parses_like_sample(faq_copy: Path) -> None:
    assert parse_faq(faq_copy) == parse_faq(SAMPLE_FAQ)


def test_vtb_faq_parses(vtb_faq: Path) -> None:
    templates = parse_faq(vtb_faq)
    assert len(templates) == 201
    assert len({t.template_id for t in templates}) == 201
    assert all(t.template_id.startswith("t-") for t in templates)
    assert all(t.question and t.answer and t.category and t.subcategory for t in templates)


# --- derived ids ----------------------------------------------------------------------------------


def test_derived_ids_without_id_column(tmp_path: Path) -> None:
    path = write_rows(tmp_path / "faq.xlsx", [NO_ID_HEADER, *_no_id_rows()])
    templates = parse_faq(path)
    assert [t.template_id for t in templates] == [
        derived_template_id("Карты", "Выпуск", "Как заказать карту?"),
        derived_template_id("Кредиты", "Погашение", "Как погасить кредит досрочно?"),
        derived_template_id("Вклады", "Открытие", "Как открыть вклад?"),
    ]
    for t in templates:
        assert t.template_id.startswith("t-")
        assert len(t.template_id) == len("t-") + 12
    assert len({t.template_id for t in templates}) == 3
    assert [t.source_row for t in templates] == [2, 3, 4]


def test_derived_ids_survive_inserted_row_and_reordering(tmp_path: Path) -> None:
    rows = _no_id_rows()
    base = {t.question: t.template_id for t in parse_faq(write_rows(tmp_path / "a.xlsx", [NO_ID_HEADER, *rows]))}

    inserted_row = ["Новое", "Сверху", "Новый вопрос?", "низкий", "все", "Новый ответ."]
    inserted = parse_faq(write_rows(tmp_path / "b.xlsx", [NO_ID_HEADER, inserted_row, *rows]))
    assert [t.source_row for t in inserted] == [2, 3, 4, 5]
    assert {t.question: t.template_id for t in inserted[1:]} == base
    assert inserted[0].template_id not in base.values()

    reversed_templates = parse_faq(write_rows(tmp_path / "c.xlsx", [NO_ID_HEADER, *reversed(rows)]))
    assert [t.question for t in reversed_templates] == [r[2] for r in reversed(rows)]
    assert {t.question: t.template_id for t in reversed_templates} == base


def test_derived_id_ignores_whitespace_and_case(tmp_path: Path) -> None:
    a = parse_faq(write_rows(tmp_path / "a.xlsx", [NO_ID_HEADER, ["Карты", "Выпуск", "Как заказать карту?", "", "", "x"]]))
    b = parse_faq(
        write_rows(tmp_path / "b.xlsx", [NO_ID_HEADER, [" КАРТЫ ", "выпуск", "Как  заказать\nкарту?", "", "", "y"]])
    )
    assert a[0].template_id == b[0].template_id


def test_repeated_rows_get_suffixes(tmp_path: Path) -> None:
    row = ["Карты", "Выпуск", "Как заказать карту?", "высокий", "все", "Ответ 1"]
    other = ["Кредиты", "Погашение", "Как погасить?", "высокий", "все", "Ответ"]
    path = write_rows(
        tmp_path / "faq.xlsx",
        [NO_ID_HEADER, row, other, row[:5] + ["Ответ 2"], row[:5] + ["Ответ 3"]],
    )
    templates = parse_faq(path)
    base = derived_template_id("Карты", "Выпуск", "Как заказать карту?")
    assert [t.template_id for t in templates] == [
        base,
        derived_template_id("Кредиты", "Погашение", "Как погасить?"),
        f"{base}-2",
        f"{base}-3",
    ]
    assert [t.answer for t in templates] == ["Ответ 1", "Ответ", "Ответ 2", "Ответ 3"]


# --- custom columns, optional columns, blank rows -------------------------------------------------


def test_custom_column_names(tmp_path: Path) -> None:
    columns = FaqColumns(
        category="Category",
        subcategory="Subcategory",
        question="Question",
        priority="Priority",
        audience="Audience",
        answer="Answer",
        template_id="Key",
    )
    path = write_rows(
        tmp_path / "faq.xlsx",
        [
            ["Answer", "Key", "Question", "Subcategory", "Category", "Audience", "Priority"],
            ["Reply A", "k-1", "Question A?", "Sub A", "Cat A", "everyone", "high"],
            ["Reply B", "k-2", "Question B?", "Sub B", "Cat B", "new", "low"],
        ],
    )
    assert parse_faq(path, columns=columns) == [
        Template("k-1", "Cat A", "Sub A", "Question A?", "Reply A", "high", "everyone", 2),
        Template("k-2", "Cat B", "Sub B", "Question B?", "Reply B", "low", "new", 3),
    ]
    with pytest.raises(FaqError) as exc_info:
        parse_faq(path)
    assert "missing required column 'Основная категория'" in _message(exc_info)


def test_optional_columns_may_be_absent(tmp_path: Path) -> None:
    path = write_rows(
        tmp_path / "faq.xlsx",
        [["ID", "Основная категория", "Подкатегория", "Пример вопроса", "Шаблонный ответ"], ["X-1", "c", "s", "q", "a"]],
    )
    assert parse_faq(path) == [Template("X-1", "c", "s", "q", "a", "", "", 2)]


def test_blank_rows_are_skipped_and_keep_sheet_row_numbers(tmp_path: Path) -> None:
    path = write_rows(
        tmp_path / "faq.xlsx",
        [HEADER, _row("A-1", 1), [None] * 7, ["", "  ", "", "", "", "", ""], _row("A-2", 2), [None] * 7],
    )
    templates = parse_faq(path)
    assert [(t.template_id, t.source_row) for t in templates] == [("A-1", 2), ("A-2", 5)]


def test_values_are_normalized(tmp_path: Path) -> None:
    path = write_rows(
        tmp_path / "faq.xlsx",
        [HEADER, [" A-1 ", " Карты\n", "Мои\u0306  счёт", "Как\u00a0дела?", " высокий", "все\tклиенты", "Ответ\n\nздесь "]],
    )
    assert parse_faq(path) == [Template("A-1", "Карты", "Мой счёт", "Как дела?", "Ответ здесь", "высокий", "все клиенты", 2)]


# --- errors ---------------------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.xlsx"
    with pytest.raises(FaqError) as exc_info:
        parse_faq(path)
    assert _message(exc_info) == f"FAQ {path} is not usable:\n  - file not found"
    assert exc_info.value.path == str(path)
    assert exc_info.value.problems == ["file not found"]


def test_directory_is_not_a_file(tmp_path: Path) -> None:
    with pytest.raises(FaqError) as exc_info:
        parse_faq(tmp_path)
    assert _message(exc_info) == f"FAQ {tmp_path} is not usable:\n  - not a file"


def test_text_file_renamed_xlsx(tmp_path: Path) -> None:
    path = tmp_path / "faq.xlsx"
    path.write_text("ID;Вопрос;Ответ\n1;q;a\n", encoding="utf-8")
    with pytest.raises(FaqError) as exc_info:
        parse_faq(path)
    assert _message(exc_info) == (
        f"FAQ {path} is not usable:\n  - is not an .xlsx workbook (an .xlsx file is a zip archive; this one is not)"
    )


def test_missing_required_column_lists_found_columns(tmp_path: Path) -> None:
    header = [h for h in HEADER if h != QUESTION]
    path = write_rows(tmp_path / "faq.xlsx", [header, ["A-1", "c", "s", "p", "a", "ans"]])
    with pytest.raises(FaqError) as exc_info:
        parse_faq(path)
    assert exc_info.value.problems == [
        "row 1: missing required column 'Пример вопроса' (found columns: 'ID', 'Основная категория', "
        "'Подкатегория', 'Приоритет', 'Целевая аудитория', 'Шаблонный ответ')",
        header_hint("Sheet", None, 2),
    ]
    assert str(path) in _message(exc_info)


def test_missing_several_required_columns(tmp_path: Path) -> None:
    path = write_rows(tmp_path / "faq.xlsx", [["ID", "Вопрос"], ["A-1", "q"]])
    with pytest.raises(FaqError) as exc_info:
        parse_faq(path)
    found = "(found columns: 'ID', 'Вопрос')"
    assert exc_info.value.problems == [
        f"row 1: missing required column 'Основная категория' {found}",
        f"row 1: missing required column 'Подкатегория' {found}",
        f"row 1: missing required column 'Пример вопроса' {found}",
        f"row 1: missing required column 'Шаблонный ответ' {found}",
        header_hint("Sheet", None, 2),
    ]


@pytest.mark.parametrize(
    ("column", "field"),
    [
        ("Основная категория", "category"),
        ("Подкатегория", "subcategory"),
        ("Пример вопроса", "question"),
        ("Шаблонный ответ", "answer"),
    ],
)
def test_empty_required_value_names_sheet_row_and_column(tmp_path: Path, column: str, field: str) -> None:
    bad = _row("A-3", 3)
    bad[HEADER.index(column)] = "  \n "
    path = write_rows(tmp_path / "faq.xlsx", [HEADER, _row("A-1", 1), _row("A-2", 2), bad])
    with pytest.raises(FaqError) as exc_info:
        parse_faq(path)
    assert exc_info.value.problems == [f"row 4, column {column!r}: empty {field}"]
    assert _message(exc_info) == f"FAQ {path} is not usable:\n  - row 4, column {column!r}: empty {field}"


def test_every_problem_is_listed(tmp_path: Path) -> None:
    no_question = _row("A-1", 1)
    no_question[HEADER.index(QUESTION)] = None
    no_answer = _row("A-2", 2)
    no_answer[HEADER.index(ANSWER)] = ""
    path = write_rows(tmp_path / "faq.xlsx", [HEADER, no_question, no_answer])
    with pytest.raises(FaqError) as exc_info:
        parse_faq(path)
    assert exc_info.value.problems == [
        "row 2, column 'Пример вопроса': empty question",
        "row 3, column 'Шаблонный ответ': empty answer",
    ]


def test_problem_list_is_truncated_after_twenty(tmp_path: Path) -> None:
    rows = [HEADER]
    for n in range(25):
        row = _row(f"A-{n}", n)
        row[HEADER.index(ANSWER)] = None
        rows.append(row)
    path = write_rows(tmp_path / "faq.xlsx", rows)
    with pytest.raises(FaqError) as exc_info:
        parse_faq(path)
    assert len(exc_info.value.problems) == 25
    lines = _message(exc_info).split("\n")
    assert len(lines) == 1 + 20 + 1
    assert lines[20] == "  - row 21, column 'Шаблонный ответ': empty answer"
    assert lines[-1] == "  - … and 5 more problem(s)"


def test_duplicate_explicit_ids_name_both_rows(tmp_path: Path) -> None:
    path = write_rows(tmp_path / "faq.xlsx", [HEADER, _row("A-1", 1), _row("A-2", 2), _row("A-1", 3)])
    with pytest.raises(FaqError) as exc_info:
        parse_faq(path)
    assert exc_info.value.problems == ["row 4, column 'ID': duplicate id 'A-1' (first used in row 2)"]
    assert str(path) in _message(exc_info)


def test_empty_explicit_id(tmp_path: Path) -> None:
    path = write_rows(tmp_path / "faq.xlsx", [HEADER, _row("A-1", 1), _row("", 2)])
    with pytest.raises(FaqError) as exc_info:
        parse_faq(path)
    assert exc_info.value.problems == ["row 3, column 'ID': empty id"]
    assert _message(exc_info) == f"FAQ {path} is not usable:\n  - row 3, column 'ID': empty id"


def test_header_only_sheet(tmp_path: Path) -> None:
    path = write_rows(tmp_path / "faq.xlsx", [HEADER])
    with pytest.raises(FaqError) as exc_info:
        parse_faq(path)
    assert _message(exc_info) == f"FAQ {path} is not usable:\n  - the sheet has a header but no templates"


def test_header_and_blank_rows_only(tmp_path: Path) -> None:
    path = write_rows(tmp_path / "faq.xlsx", [HEADER, [None] * 7, [""] * 7, [None] * 7])
    with pytest.raises(FaqError) as exc_info:
        parse_faq(path)
    assert exc_info.value.problems == ["the sheet has a header but no templates"]


def test_missing_named_sheet(faq_copy: Path) -> None:
    with pytest.raises(FaqError) as exc_info:
        parse_faq(faq_copy, sheet="FAQ 2024")
    assert _message(exc_info) == f"FAQ {faq_copy} is not usable:\n  - no sheet named 'FAQ 2024' (sheets: 'Sheet')"


def test_existing_named_sheet(faq_copy: Path) -> None:
    assert len(parse_faq(faq_copy, sheet="Sheet")) == 90


# --- sheets a user really sends: the six ways they were misread -----------------------------------

ROWS = [HEADER, _row("A-1", 1), _row("A-2", 2)]
STALE = [HEADER, _row("A-1", 1)[:6] + ["Устаревший ответ."], _row("A-2", 2)]


def _book(path: Path, sheets: list[tuple[str, list[list], str]], active: int) -> Path:
    """A workbook of (title, rows, state) sheets, opening on sheet number `active` (0-based)."""
    book = Workbook()
    book.remove(book.active)
    for title, rows, state in sheets:
        sheet = book.create_sheet(title)
        sheet.sheet_state = state
        for row in rows:
            sheet.append(row)
    book.active = active
    book.save(path)
    return path


def _answers(path: Path, **options) -> list[str]:
    return [t.answer for t in parse_faq(path, **options)]


@pytest.mark.parametrize(
    ("sheets", "active", "sheet", "answers", "note"),
    [
        (
            [("Old", STALE, "hidden"), ("FAQ", ROWS, "visible")], 1, None, ["Ответ 1.", "Ответ 2."],
            "read sheet 'FAQ' (the active sheet); other sheets: 'Old' (hidden); headers in row 1",
        ),
        (
            [("Old", STALE, "visible"), ("FAQ", ROWS, "visible")], 1, None, ["Ответ 1.", "Ответ 2."],
            "read sheet 'FAQ' (the active sheet); other sheets: 'Old'; headers in row 1",
        ),
        (
            [("FAQ", ROWS, "visible"), ("Old", STALE, "visible")], 0, None, ["Ответ 1.", "Ответ 2."],
            "read sheet 'FAQ' (the active sheet); other sheets: 'Old'; headers in row 1",
        ),
        (
            [("Old", STALE, "hidden"), ("FAQ", ROWS, "visible")], 1, "Old", ["Устаревший ответ.", "Ответ 2."],
            "read sheet 'Old' (named in the configuration); other sheets: 'FAQ'; headers in row 1",
        ),
        (
            [("Old", STALE, "visible"), ("FAQ", ROWS, "visible")], 0, " faq ", ["Ответ 1.", "Ответ 2."],
            "read sheet 'FAQ' (named in the configuration); other sheets: 'Old'; headers in row 1",
        ),
    ],
    ids=["hidden-stale-first", "visible-stale-first", "active-first", "hidden-named", "name-any-case"],
)
def test_the_visible_active_sheet_is_read_unless_one_is_named(
    tmp_path: Path, sheets: list, active: int, sheet: str | None, answers: list[str], note: str
) -> None:
    path = _book(tmp_path / "faq.xlsx", sheets, active)
    read = read_faq(path, sheet=sheet)
    assert [t.answer for t in read.templates] == answers
    assert read.note == note


def test_a_hidden_sheet_is_never_read_by_default(tmp_path: Path) -> None:
    import re
    import zipfile

    path = _book(tmp_path / "faq.xlsx", [("Old", STALE, "hidden"), ("FAQ", ROWS, "visible")], 1)
    with zipfile.ZipFile(path) as source:
        parts = {name: source.read(name) for name in source.namelist()}
    parts["xl/workbook.xml"] = re.sub(rb'activeTab="\d+"', b'activeTab="0"', parts["xl/workbook.xml"])
    with zipfile.ZipFile(path, "w") as target:  # hidden yet marked active, as some tools save it
        for name, data in parts.items():
            target.writestr(name, data)
    read = read_faq(path)
    assert [t.answer for t in read.templates] == ["Ответ 1.", "Ответ 2."]
    assert read.note == "read sheet 'FAQ' (the first visible sheet); other sheets: 'Old' (hidden); headers in row 1"


def test_an_empty_active_sheet_names_the_hidden_sheets_with_data(tmp_path: Path) -> None:
    path = _book(tmp_path / "faq.xlsx", [("Old", STALE, "hidden"), ("FAQ", ROWS, "hidden"), ("x", [], "visible")], 2)
    with pytest.raises(FaqError) as exc_info:
        parse_faq(path)
    assert exc_info.value.problems == ["sheet 'x' is empty; the data may be on sheet 'Old' (hidden), 'FAQ' (hidden): set the sheet name"]


@pytest.mark.parametrize(
    ("above", "header_row"),
    [
        ([["FAQ — выгрузка от 01.12"], [None]], 3),
        ([["FAQ — выгрузка от 01.12"], ["Ответственный: отдел поддержки", None, "версия 3"]], 3),
        ([[None], [None], [None], [None], ["Шаблоны ответов"]], 6),
        ([], 1),
    ],
    ids=["title-and-blank", "two-title-rows", "blank-rows-and-title", "no-title"],
)
def test_title_rows_above_the_header_are_skipped(tmp_path: Path, above: list, header_row: int) -> None:
    path = write_rows(tmp_path / "faq.xlsx", [*above, *ROWS])
    read = read_faq(path)
    assert read.header_row == header_row
    assert [(t.template_id, t.source_row) for t in read.templates] == [("A-1", header_row + 1), ("A-2", header_row + 2)]


def test_a_header_row_past_the_searched_rows_is_named_in_the_error(tmp_path: Path) -> None:
    path = write_rows(tmp_path / "faq.xlsx", [*[["примечание"]] * 21, *ROWS])
    with pytest.raises(FaqError) as exc_info:
        parse_faq(path)
    assert exc_info.value.problems[-1] == (
        "headers are looked for in rows 1–20 of sheet 'Sheet', in any case and spacing; to name the sheet, "
        "header row or columns use the [faq] table of embedding_assets.toml, EMBEDDING_ASSETS_FAQ_* variables "
        "or the faq resource's config"
    )
    assert [t.source_row for t in parse_faq(path, header_row=22)] == [23, 24]


@pytest.mark.parametrize(
    "header",
    [
        ["Id", "основная категория", "ПОДКАТЕГОРИЯ", "Пример  вопроса", "приоритет", "Целевая аудитория ", "шаблонный ответ"],
        ["id", " Основная категория", "Подкатегория\n", "пример\u00a0вопроса", "Приоритет", "целевая АУДИТОРИЯ", "Шаблонный\u200b ответ"],
        [" ID ", "Основная Категория", "Подкатегория", "Пример вопроса", "Приоритет", "Целевая аудитория", "Шаблонный ответ"],
    ],
    ids=["title-case", "lower-and-spacing", "padded"],
)
def test_headers_match_in_any_case_and_spacing(tmp_path: Path, header: list[str]) -> None:
    path = write_rows(tmp_path / "faq.xlsx", [header, *ROWS[1:]])
    assert parse_faq(path) == parse_faq(write_rows(tmp_path / "plain.xlsx", ROWS))
    assert [t.template_id for t in parse_faq(path)] == ["A-1", "A-2"]


def test_two_columns_with_the_same_header_are_refused(tmp_path: Path) -> None:
    path = write_rows(tmp_path / "faq.xlsx", [[*HEADER, "id"], *[[*r, "X"] for r in ROWS[1:]]])
    with pytest.raises(FaqError) as exc_info:
        parse_faq(path)
    assert exc_info.value.problems == ["row 1: columns A, H all have the header 'ID'; rename all but one"]


@pytest.mark.parametrize(
    ("published", "expected"),
    [
        ({"e5-small-v1": {"CARD-001", "CARD-002"}}, [
            "the sheet has no id column 'ID', so every id was derived from category, subcategory and question, "
            "but the store published for e5-small-v1 holds 2 explicit id(s) (such as 'CARD-001'); restore the "
            "'ID' column, or name the id column (id_column / EMBEDDING_ASSETS_FAQ_ID_COLUMN)"
        ]),
        ({"e5-small-v1": {derived_template_id("Карты", "Выпуск", "Как заказать карту?")}}, []),
        ({}, []),
    ],
    ids=["explicit-published", "derived-published", "nothing-published"],
)
def test_a_sheet_without_its_id_column_is_named_as_the_cause(published: dict, expected: list[str], tmp_path: Path) -> None:
    templates = parse_faq(write_rows(tmp_path / "faq.xlsx", [NO_ID_HEADER, *_no_id_rows()]))
    assert missing_id_column_problems(templates, published, "ID") == expected
    with_ids = parse_faq(write_rows(tmp_path / "ids.xlsx", ROWS))
    assert missing_id_column_problems(with_ids, {"e5-small-v1": {"CARD-001"}}, "ID") == []


@pytest.mark.parametrize(
    ("column", "value", "problem"),
    [
        (QUESTION, 12345, "holds the number 12345, not text"),
        (ANSWER, 0.1, "holds the number 0.1, not text"),
        (ANSWER, datetime.datetime(2024, 5, 1), "holds a date or time (2024-05-01), not text"),
        (ANSWER, datetime.datetime(2024, 5, 1, 9, 30), "holds a date or time (2024-05-01T09:30:00), not text"),
        (QUESTION, True, "holds the logical value TRUE, not text"),
        ("Приоритет", False, "holds the logical value FALSE, not text"),
        ("ID", 1.5, "holds the number 1.5, not text"),
        ("ID", datetime.date(2024, 5, 1), "holds a date or time (2024-05-01), not text"),
    ],
    ids=["int-question", "float-answer", "date-answer", "datetime-answer", "bool-question", "bool-priority", "float-id", "date-id"],
)
def test_a_number_date_or_logical_cell_is_refused_with_row_and_column(
    tmp_path: Path, column: str, value: object, problem: str
) -> None:
    bad = _row("A-2", 2)
    bad[HEADER.index(column)] = value
    path = write_rows(tmp_path / "faq.xlsx", [HEADER, _row("A-1", 1), bad])
    with pytest.raises(FaqError) as exc_info:
        parse_faq(path)
    assert len(exc_info.value.problems) == 1
    assert exc_info.value.problems[0].startswith(f"row 3, column {column!r}: {problem}; ")
    assert exc_info.value.problems[0].endswith(
        "make the cell text (Format Cells → Text and retype it, or start it with an apostrophe)"
    )


def test_whole_numbers_in_id_priority_and_audience_read_as_their_digits(tmp_path: Path) -> None:
    row = [101, "Карты", "Выпуск", "Как заказать карту?", 1, 2024, "Ответ."]
    path = write_rows(tmp_path / "faq.xlsx", [HEADER, row])
    assert parse_faq(path) == [Template("101", "Карты", "Выпуск", "Как заказать карту?", "Ответ.", "1", "2024", 2)]


def test_a_whole_number_priority_keeps_its_digits_when_another_cell_of_its_column_is_tidied(tmp_path: Path) -> None:
    rows = [
        ["A-1", "Карты", "Выпуск", "Как заказать карту?", 3, "все", "Ответ 1."],
        ["A-2", "Карты", "Выпуск", "Как закрыть карту?", "высокий  ", "все", "Ответ 2."],
    ]
    path = write_rows(tmp_path / "faq.xlsx", [HEADER, *rows])
    assert [(t.template_id, t.priority) for t in parse_faq(path)] == [("A-1", "3"), ("A-2", "высокий")]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("Как\u200b заказать карту?", "Как заказать карту?"),
        ("Как заказать\u200d карту?", "Как заказать карту?"),
        ("\ufeffКак заказать карту?", "Как заказать карту?"),
        ("Как зака\u00adзать карту?", "Как заказать карту?"),
        ("Как заказать карту?\u2060", "Как заказать карту?"),
        ("\u200eКак заказать карту?\u200f", "Как заказать карту?"),
        ("Как заказать\x00 карту?", "Как заказать карту?"),
    ],
    ids=["zero-width-space", "zero-width-joiner", "bom", "soft-hyphen", "word-joiner", "bidi-marks", "nul"],
)
def test_invisible_characters_are_dropped(value: str, expected: str) -> None:
    assert normalize_text(value) == expected


def test_every_format_character_is_dropped() -> None:
    import sys
    import unicodedata

    format_characters = [chr(c) for c in range(sys.maxunicode + 1) if unicodedata.category(chr(c)) == "Cf"]
    assert normalize_text("a" + "".join(format_characters) + "b") == "ab"


@pytest.mark.parametrize(
    ("written", "published"),
    [
        ("Шаг 1._x000D_Шаг 2.", "Шаг 1. Шаг 2."),
        ("Шаг 1._x0009_Шаг 2.", "Шаг 1. Шаг 2."),
        ("Ответ_x0000_.", "Ответ."),
        ("Код _x005F_x000D_ остаётся", "Код _x000D_ остаётся"),
    ],
    ids=["carriage-return", "tab", "nul", "escaped-escape"],
)
def test_excel_escapes_are_decoded(tmp_path: Path, written: str, published: str) -> None:
    row = _row("A-1", 1)
    row[HEADER.index(ANSWER)] = written
    assert _answers(write_rows(tmp_path / "faq.xlsx", [HEADER, row])) == [published]


def test_a_repeated_question_hidden_by_a_zero_width_space_gets_the_same_id(tmp_path: Path) -> None:
    rows = _no_id_rows()
    twin = [*rows[0][:2], rows[0][2].replace(" ", " \u200b", 1), *rows[0][3:5], "Другой ответ."]
    templates = parse_faq(write_rows(tmp_path / "faq.xlsx", [NO_ID_HEADER, *rows, twin]))
    assert templates[-1].question == templates[0].question
    assert templates[-1].template_id == f"{templates[0].template_id}-2"


def test_english_headers_named_in_columns(tmp_path: Path) -> None:
    header = ["Id", "Category", "Subcategory", "Question", "Priority", "Audience", "Answer"]
    columns = FaqColumns("Category", "Subcategory", "Question", "Priority", "Audience", "Answer", "ID")
    path = write_rows(tmp_path / "faq.xlsx", [header, *ROWS[1:]])
    assert parse_faq(path, columns) == parse_faq(write_rows(tmp_path / "plain.xlsx", ROWS))


# --- other formats ----------------------------------------------------------------------------------


def _csv(path: Path, rows: list[list], delimiter: str = ",", encoding: str = "utf-8") -> Path:
    import csv

    with path.open("w", newline="", encoding=encoding) as handle:
        csv.writer(handle, delimiter=delimiter).writerows(rows)
    return path


@pytest.mark.parametrize(
    ("delimiter", "encoding"), [(",", "utf-8"), (";", "utf-8"), ("\t", "utf-8"), (";", "utf-8-sig")],
    ids=["comma", "semicolon", "tab", "bom"],
)
def test_a_utf8_csv_reads_like_the_workbook(tmp_path: Path, delimiter: str, encoding: str) -> None:
    rows = read_rows(SAMPLE_FAQ)
    path = _csv(tmp_path / "faq.csv", [["" if v is None else v for v in r] for r in rows], delimiter, encoding)
    assert parse_faq(path) == parse_faq(SAMPLE_FAQ)


def test_a_csv_in_another_encoding_is_refused(tmp_path: Path) -> None:
    path = _csv(tmp_path / "faq.csv", ROWS, ";", "cp1251")
    with pytest.raises(FaqError) as exc_info:
        parse_faq(path)
    assert exc_info.value.problems == ["is not UTF-8 text (byte 0xce at offset 3); save it as CSV UTF-8"]


def test_an_ods_workbook(tmp_path: Path) -> None:
    import pandas as pd

    rows = read_rows(SAMPLE_FAQ)
    path = tmp_path / "faq.ods"
    pd.DataFrame(rows[1:], columns=rows[0]).to_excel(path, index=False, engine="odf", sheet_name="FAQ")
    assert parse_faq(path) == parse_faq(SAMPLE_FAQ)


def test_an_xls_workbook_with_merged_cells(tmp_path: Path) -> None:
    import xlwt

    rows = read_rows(SAMPLE_FAQ)
    book = xlwt.Workbook()
    sheet = book.add_sheet("FAQ")
    for r, row in enumerate(rows):
        for c, value in enumerate(row):
            if not (c == 1 and 2 <= r <= 3):
                sheet.write(r, c, value)
    sheet.merge(1, 3, 1, 1)  # rows 2-4 share one category cell, as the sample's first three rows do
    book.save(str(tmp_path / "faq.xls"))
    assert [t.category for t in parse_faq(tmp_path / "faq.xls")][:3] == [rows[1][1]] * 3
    assert parse_faq(tmp_path / "faq.xls") == parse_faq(SAMPLE_FAQ)


def test_an_unsupported_file_type(tmp_path: Path) -> None:
    path = tmp_path / "faq.txt"
    path.write_text("ID;Вопрос\n", encoding="utf-8")
    with pytest.raises(FaqError) as exc_info:
        parse_faq(path)
    assert exc_info.value.problems == ["unsupported file type '.txt' (supported: .xlsx, .xlsm, .xls, .xlsb, .ods, .csv)"]


def test_an_xlsm_workbook(tmp_path: Path) -> None:
    path = tmp_path / "faq.xlsm"
    path.write_bytes(SAMPLE_FAQ.read_bytes())
    assert parse_faq(path) == parse_faq(SAMPLE_FAQ)


def test_an_old_xls_workbook_saved_under_an_xlsx_name_is_read_as_what_it_is(tmp_path: Path) -> None:
    import xlwt

    book = xlwt.Workbook()
    sheet = book.add_sheet("FAQ")
    for r, row in enumerate(ROWS):
        for c, value in enumerate(row):
            sheet.write(r, c, value)
    book.save(str(tmp_path / "faq.xlsx"))
    assert [t.template_id for t in parse_faq(tmp_path / "faq.xlsx")] == ["A-1", "A-2"]


def test_an_error_value_reads_as_its_text_for_the_content_check(tmp_path: Path) -> None:
    import xlsxwriter

    book = xlsxwriter.Workbook(str(tmp_path / "faq.xlsx"))
    sheet = book.add_worksheet("FAQ")
    for r, row in enumerate(ROWS):
        sheet.write_row(r, 0, row)
    sheet.write_formula(2, 6, "=1/0", None, "#DIV/0!")
    book.close()
    assert _answers(tmp_path / "faq.xlsx") == ["Ответ 1.", "#DIV/0!"]


def test_a_csv_with_a_title_line_above_its_header(tmp_path: Path) -> None:
    path = tmp_path / "faq.csv"
    body = "\n".join(";".join(str(v) for v in row) for row in ROWS)
    path.write_text(f"FAQ — выгрузка от 01.12\n\n{body}\n", encoding="utf-8")
    read = read_faq(path)
    assert (read.header_row, [t.template_id for t in read.templates]) == (3, ["A-1", "A-2"])
    assert read.note == "read sheet 'faq' (a CSV file); headers in row 3"


def test_a_csv_line_that_ends_early_reads_its_missing_cells_as_empty(tmp_path: Path) -> None:
    header = [*HEADER[:5], ANSWER, HEADER[5]]  # the audience last
    lines = [
        header,
        ["A-1", "Карты", "Выпуск", "Вопрос 1?", "высокий", "Ответ 1.", "все"],
        ["A-2", "Карты", "Выпуск", "Вопрос 2?", "высокий", "Ответ 2."],
    ]
    path = tmp_path / "faq.csv"
    path.write_text("\n".join(";".join(line) for line in lines) + "\n", encoding="utf-8")
    assert [(t.template_id, t.audience) for t in parse_faq(path)] == [("A-1", "все"), ("A-2", "")]
    lines.append(["A-3", "Карты", "Выпуск", "Вопрос 3?"])
    path.write_text("\n".join(";".join(line) for line in lines) + "\n", encoding="utf-8")
    with pytest.raises(FaqError) as exc_info:
        parse_faq(path)
    assert exc_info.value.problems == [f"row 4, column {ANSWER!r}: empty answer"]


@pytest.mark.parametrize(
    ("name", "content", "problem"),
    [
        ("faq.xls", b"ID;question\n", "is not an .xls workbook (an .xls file is an OLE2 compound file; this one is not)"),
        ("faq.ods", b"ID;question\n", "is not an .ods workbook (an .ods file is a zip archive; this one is not)"),
        ("faq", b"ID;question\n", "unsupported file type '(no extension)' (supported: .xlsx, .xlsm, .xls, .xlsb, .ods, .csv)"),
        ("faq.csv", b"\xef\xbb\xbf\n ; \n", "the CSV file holds no cells"),
    ],
    ids=["text-as-xls", "text-as-ods", "no-extension", "blank-csv"],
)
def test_a_file_that_is_not_what_its_name_says(tmp_path: Path, name: str, content: bytes, problem: str) -> None:
    (tmp_path / name).write_bytes(content)
    with pytest.raises(FaqError) as exc_info:
        parse_faq(tmp_path / name)
    assert exc_info.value.problems == [problem]


@pytest.mark.parametrize("background", [False, True], ids=["scanned-when-needed", "scanned-while-parsing"])
def test_hidden_cells_read_alike_however_the_package_is_scanned(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, background: bool
) -> None:
    import xlsxwriter

    from embedding_assets.lib import sheets

    monkeypatch.setattr(sheets, "_BACKGROUND_SCAN_BYTES", 0 if background else 10**12)
    book = xlsxwriter.Workbook(str(tmp_path / "faq.xlsx"))
    sheet = book.add_worksheet("FAQ")
    for r, row in enumerate([*ROWS, _row("A-3", 3)]):
        sheet.write_row(r, 0, row)
    sheet.write_formula(2, 6, "=1/0", None, "#DIV/0!")
    sheet.write_formula(3, 3, "=A1&B1", None, "")
    book.close()
    with pytest.raises(FaqError) as exc_info:
        parse_faq(tmp_path / "faq.xlsx")
    assert exc_info.value.problems == [
        f"row 4, column {QUESTION!r}: formula =A1&B1 has no saved value; "
        "open and save the workbook in Excel or LibreOffice, or paste the values"
    ]
    sheet_read = sheets.read_sheet(tmp_path / "faq.xlsx")
    assert sheet_read.hidden_cells() == ({(4, 4): "=A1&B1"}, {(3, 7): "#DIV/0!"})
