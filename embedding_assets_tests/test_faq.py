from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import pytest

from embedding_assets.lib.faq import FaqColumns, FaqError, Template, derived_template_id, normalize_text, parse_faq
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
        "'Подкатегория', 'Приоритет', 'Целевая аудитория', 'Шаблонный ответ')"
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
